"""LAMB as Triton jit functions (docs/SPEC.md, "LAMB"), called by the generic kernels of
triton_backend.py through its five hooks. Pass 1 updates the moments m and v (state slots 0 and 1)
and sums w'^2, u^2, g'^2; pass 2 recomputes u from the new moments and reads no gradient."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import abi as B
from .triton_math import col, div, pow_int, sqrt, store_stats, store_weights

_C = tl.constexpr
COL_LR, COL_WD, COL_GFLAGS, COL_NORM_CLIP = _C(B.COL_LR), _C(B.COL_WEIGHT_DECAY), _C(B.COL_GFLAGS), \
    _C(B.COL_NORM_CLIP)
BETA1, BETA2, BETA3, OM2 = _C(B.LAMB_BETA1), _C(B.LAMB_BETA2), _C(B.LAMB_BETA3), _C(B.LAMB_ONE_MINUS_BETA2)
EPS, RATIO_EPS = _C(B.LAMB_EPS), _C(B.LAMB_RATIO_EPS)
STAT_COLS, STAT_WD = _C(B.STAT_COLS), _C(B.STAT_WEIGHT_DECAY)
STAT_BC1, STAT_BC2, STAT_STEP = _C(B.LAMB_STAT_BC1), _C(B.LAMB_STAT_BC2), _C(B.LAMB_STAT_STEP)
GF_NO_ADAPT, GF_WD_L2, GF_WD_DECOUPLED = _C(B.GF_NO_ADAPT), _C(B.GF_WD_L2), _C(B.GF_WD_DECOUPLED)
GF_TRUST_CLIP = _C(B.GF_TRUST_CLIP)
GF_BC_MOMENTS, GF_BC_STEP_SIZE, GF_BC_FIRST = _C(B.GF_BC_MOMENTS), _C(B.GF_BC_STEP_SIZE), _C(B.GF_BC_FIRST_MOMENT)
F_SKIP_WD, F_SKIP_ADAPT = _C(B.FLAG_SKIP_WEIGHT_DECAY), _C(B.FLAG_SKIP_ADAPTATION)


@triton.jit
def _terms(grow, t, ACC: tl.constexpr):
    """The per-group values formed in float64 and rounded once to ACC (k = t + 1): bc1, bc2 (1
    unless bias_correction="moments"), the decoupled decay factor 1 - lr*wd, lr*s, s (the step-size
    correction: sqrt(bc2)/bc1 for "step_size", 1/bc1 for "first_moment", else 1)."""
    gflags = tl.load(grow + COL_GFLAGS).to(tl.int32)
    k = t.to(tl.int32) + 1
    bc1 = 1.0 - pow_int(tl.load(grow + BETA1), k)
    bc2 = 1.0 - pow_int(tl.load(grow + BETA2), k)
    lr = tl.load(grow + COL_LR)
    s = tl.where((gflags & GF_BC_STEP_SIZE) != 0, tl.sqrt(bc2) / bc1,
                 tl.where((gflags & GF_BC_FIRST) != 0, 1.0 / bc1, 1.0))
    moments = (gflags & GF_BC_MOMENTS) != 0
    return (tl.where(moments, bc1, 1.0).to(ACC), tl.where(moments, bc2, 1.0).to(ACC),
            (1.0 - lr * tl.load(grow + COL_WD)).to(ACC), (lr * s).to(ACC), s.to(ACC))


@triton.jit
def _modes(grow, flags, wd):
    """Which weight-decay term the segment takes: (l2, decoupled, in the update); none without decay."""
    gflags = tl.load(grow + COL_GFLAGS).to(tl.int32)
    decay = wd != 0
    l2 = decay & ((gflags & GF_WD_L2) != 0)
    decoupled = decay & ((gflags & GF_WD_DECOUPLED) != 0)
    return l2, decoupled, decay & ~l2 & ~decoupled


@triton.jit
def pass1_params(grow, flags, gmul, t, ACC: tl.constexpr, IEEE: tl.constexpr):
    wd = tl.where((flags & F_SKIP_WD) != 0, 0.0, tl.load(grow + COL_WD)).to(ACC)
    l2, decoupled, in_update = _modes(grow, flags, wd)
    bc1, bc2, factor, lr_s, s = _terms(grow, t, ACC)
    return (gmul, wd, l2, decoupled, in_update, col(grow, BETA1, ACC), col(grow, BETA3, ACC), col(grow, BETA2, ACC),
            col(grow, OM2, ACC), col(grow, EPS, ACC), bc1, bc2, factor)


@triton.jit
def _direction(m, v, w, wd, in_update, bc1, bc2, eps, BC: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """u = r + wd*w ("update" mode), r = (m/bc1) / (sqrt(v/bc2) + eps). Without moment bias
    correction in the bucket (BC False) bc1 = bc2 = 1: the divisions by 1 are left out."""
    if BC:
        r = div(div(m, bc1, IEEE), sqrt(div(v, bc2, IEEE), ACC) + eps, IEEE)
    else:
        r = div(m, sqrt(v, ACC) + eps, IEEE)
    return tl.where(in_update, r + wd * w, r)


@triton.jit
def pass1_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0: tl.constexpr, V1: tl.constexpr,
                V2: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """The moments updated and stored; w'^2, u^2, g'^2 on the elements offs[mask], 0 elsewhere.
    The bucket's variant (Lamb.variant): V0 / V1 whether any segment takes l2 / decoupled weight
    decay, V2 whether any group corrects the moments (each compiled out otherwise)."""
    gmul, wd, l2, decoupled, in_update, beta1, beta3, beta2, om2, eps, bc1, bc2, factor = P
    w = tl.load(wp + offs, mask=mask, other=0.0).to(ACC)
    gs = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * gmul
    m = tl.load(s_ptr + offs, mask=mask, other=0.0)
    v = tl.load(s_ptr + state_stride + offs, mask=mask, other=0.0)
    x = gs
    if V0:
        x = tl.where(l2, gs + wd * w, gs)
    m = beta1 * m + beta3 * x
    v = beta2 * v + om2 * (x * x)
    tl.store(s_ptr + offs, m, mask=mask)
    tl.store(s_ptr + state_stride + offs, v, mask=mask)
    u = tl.where(mask, _direction(m, v, w, wd, in_update, bc1, bc2, eps, V2, IEEE, ACC), 0.0)  # (0/0 off the mask)
    wq = w
    if V1:
        wq = tl.where(decoupled, w * factor, w)
    return wq * wq, u * u, gs * gs


@triton.jit
def finish(stats, seg, sw, su, sg, grow, flags, t, ACC: tl.constexpr, IEEE: tl.constexpr):
    """A segment's sums of w'^2, u^2, g'^2 -> its stats row: ||w'|| (after weight_norm_clip), ||u||,
    q = ||w'|| / (||u|| + ratio_eps) (1 for a zero norm or without adaptation), s, ||g'||, the
    weight decay applied; then for pass 2 (which must not read t) bc1, bc2 and (lr*s)*q."""
    wn = sqrt(sw, ACC)
    clip = col(grow, COL_NORM_CLIP, ACC)
    wn = tl.where(wn > clip, clip, wn)   # NaN stays NaN
    un = sqrt(su, ACC)
    gn = sqrt(sg, ACC)
    gflags = tl.load(grow + COL_GFLAGS).to(tl.int32)
    adapt = ((gflags & GF_NO_ADAPT) == 0) & ((flags & F_SKIP_ADAPT) == 0)
    q = tl.where(adapt & (wn > 0) & (un > 0), div(wn, un + col(grow, RATIO_EPS, ACC), IEEE), 1.0).to(ACC)
    q = tl.where(((gflags & GF_TRUST_CLIP) != 0) & (q > 1.0), 1.0, q).to(ACC)   # timm's lambc; NaN stays
    wd = tl.where((flags & F_SKIP_WD) != 0, 0.0, tl.load(grow + COL_WD)).to(ACC)
    bc1, bc2, factor, lr_s, s = _terms(grow, t, ACC)
    store_stats(stats, seg, wn, un, q, s, gn, wd)
    srow = stats + seg * STAT_COLS
    tl.store(srow + STAT_BC1, bc1)
    tl.store(srow + STAT_BC2, bc2)
    tl.store(srow + STAT_STEP, lr_s * q)


@triton.jit
def pass2_params(grow, flags, srow, gmul, ACC: tl.constexpr, IEEE: tl.constexpr):
    """Everything t-dependent from the stats row (pass 1 wrote it)."""
    wd = tl.load(srow + STAT_WD)
    l2, decoupled, in_update = _modes(grow, flags, wd)
    factor = (1.0 - tl.load(grow + COL_LR) * tl.load(grow + COL_WD)).to(ACC)
    return (wd, decoupled, in_update, col(grow, EPS, ACC), tl.load(srow + STAT_BC1), tl.load(srow + STAT_BC2), factor,
            tl.load(srow + STAT_STEP))


@triton.jit
def pass2_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0: tl.constexpr, V1: tl.constexpr,
                V2: tl.constexpr, BF16: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """w = w' - ((lr*s)*q)*u on the elements offs[mask], u from the moments pass 1 stored."""
    wd, decoupled, in_update, eps, bc1, bc2, factor, a = P
    w = tl.load(wp + offs, mask=mask, other=0.0).to(ACC)
    m = tl.load(s_ptr + offs, mask=mask, other=0.0)
    v = tl.load(s_ptr + state_stride + offs, mask=mask, other=0.0)
    u = _direction(m, v, w, wd, in_update, bc1, bc2, eps, V2, IEEE, ACC)
    if V1:
        w = tl.where(decoupled, w * factor, w)
    store_weights(wp, offs, w - a * u, mask, BF16)
