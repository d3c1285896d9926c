"""TVLARS / LARS as Triton jit functions (docs/SPEC.md, "The algorithm"), called by the generic
kernels of triton_backend.py through its five hooks: pass1_params, pass1_block, finish,
pass2_params, pass2_block. Per-segment values travel as tuples."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import abi as B
from .triton_math import col, div, sqrt, store_stats, store_weights

_C = tl.constexpr
COL_LR, COL_WD, COL_GFLAGS, COL_NORM_CLIP = _C(B.COL_LR), _C(B.COL_WEIGHT_DECAY), _C(B.COL_GFLAGS), \
    _C(B.COL_NORM_CLIP)
MOMENTUM, ETA, LMBDA, DELAY, ALPHA = _C(B.LARS_MOMENTUM), _C(B.LARS_ETA), _C(B.LARS_LMBDA), _C(B.LARS_DELAY), \
    _C(B.LARS_ALPHA)
GAMMA_MIN, USE_PHI, FORM_COL, HOLD = _C(B.LARS_GAMMA_MIN), _C(B.LARS_USE_PHI), _C(B.LARS_FORM), _C(B.LARS_HOLD)
EPS, UNDAMPED = _C(B.LARS_EPS), _C(B.LARS_UNDAMPED)
STAT_Q, STAT_WD, STAT_COLS = _C(B.STAT_TRUST_RATIO), _C(B.STAT_WEIGHT_DECAY), _C(B.STAT_COLS)
FORM_HEAVY_BALL, FORM_PAPER, FORM_LR_SCALED = _C(B.FORM_HEAVY_BALL), _C(B.FORM_PAPER), _C(B.FORM_LR_SCALED)
GF_GRAD_DENOM, GF_TRUST_CLIP, GF_NO_ADAPT = _C(B.GF_GRAD_DENOMINATOR), _C(B.GF_TRUST_CLIP), _C(B.GF_NO_ADAPT)
GF_PLAIN_ZERO, GF_NESTEROV = _C(B.GF_PLAIN_ZERO), _C(B.GF_NESTEROV)
F_SKIP_WD, F_SKIP_ADAPT = _C(B.FLAG_SKIP_WEIGHT_DECAY), _C(B.FLAG_SKIP_ADAPTATION)
STAT_FIRST, STAT_PENDING = _C(B.LARS_STAT_FIRST), _C(B.LARS_STAT_PENDING)


@triton.jit
def _weight_decay(grow, flags, ACC: tl.constexpr):
    """The group's weight decay, 0 where the segment skips it."""
    return tl.where((flags & F_SKIP_WD) != 0, 0.0, tl.load(grow + COL_WD)).to(ACC)


@triton.jit
def pass1_params(grow, flags, gmul, t, ACC: tl.constexpr, IEEE: tl.constexpr):
    return gmul, _weight_decay(grow, flags, ACC)


@triton.jit
def pass1_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0: tl.constexpr, V1: tl.constexpr,
                V2: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """w^2, d^2, g'^2 on the elements offs[mask] (g' = g*gmul, d = g' + wd*w, no wd*w where wd
    is 0), 0 elsewhere."""
    gmul, wd = P
    w = tl.load(wp + offs, mask=mask, other=0.0).to(ACC)
    gs = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * gmul
    d = tl.where(wd != 0, gs + wd * w, gs)
    return w * w, d * d, gs * gs


@triton.jit
def _clip_ratio(q, lr, IEEE: tl.constexpr):
    """trust_clip: min(q / lr, 1) as q >= lr ? 1 : q / lr (docs/SPEC.md: 1 at lr = 0; NaN stays NaN)."""
    return tl.where(q >= lr, 1.0, div(q, lr, IEEE))


@triton.jit
def finish(stats, seg, sw, sd, sg, grow, flags, t, ACC: tl.constexpr, IEEE: tl.constexpr):
    """A segment's sums of w^2, d^2, g'^2 -> its stats row (docs/SPEC.md, "The algorithm"): norms
    after norm_clip, q, phi(t), ||g'||, the weight decay pass 2 applies."""
    clip = col(grow, COL_NORM_CLIP, ACC)
    wn = sqrt(sw, ACC)
    dn = sqrt(sd, ACC)
    gn = sqrt(sg, ACC)
    wn = tl.where(wn > clip, clip, wn)   # NaN stays NaN (torch.clamp semantics)
    dn = tl.where(dn > clip, clip, dn)
    gn = tl.where(gn > clip, clip, gn)

    # phi(t), overflow-safe: x = lmbda*(t - delay), e = exp(-|x|) <= 1 (in ACC; on the GPU
    # tl.exp is ex2.approx of a rounded product: relative error about |x|*6e-8); 1 while t < hold
    tt = t.to(ACC)
    x = (tt - col(grow, DELAY, ACC)) * col(grow, LMBDA, ACC)
    alpha = col(grow, ALPHA, ACC)
    e = tl.exp(-tl.abs(x))
    # (IEEE round-to-nearest divisions: the plain float32 `/` is approximate on the GPU)
    ph = tl.where(x > 0, div(e, 1.0 + alpha * e, IEEE), div(tl.full((), 1.0, ACC), alpha + e, IEEE))
    ph = tl.where((col(grow, USE_PHI, ACC) != 0) & ~(tt < col(grow, HOLD, ACC)),
                  ph + col(grow, GAMMA_MIN, ACC), 1.0).to(ACC)

    gflags = tl.load(grow + COL_GFLAGS).to(tl.int32)
    lr = col(grow, COL_LR, ACC)
    wd = _weight_decay(grow, flags, ACC)
    grad_form = (gflags & GF_GRAD_DENOM) != 0
    trust_clip = (gflags & GF_TRUST_CLIP) != 0
    adapt = ((gflags & GF_NO_ADAPT) == 0) & ((flags & F_SKIP_ADAPT) == 0)
    nonzero = (wn > 0) & (tl.where(grad_form, gn, dn) > 0)
    eps = col(grow, EPS, ACC)
    denom = tl.where(grad_form, (gn + wd * wn) + eps, dn + eps)
    ratio = div(col(grow, ETA, ACC) * ph * wn, denom, IEEE)
    ratio = tl.where(trust_clip, _clip_ratio(ratio, lr, IEEE), ratio)
    plain = (gflags & GF_PLAIN_ZERO) != 0
    one = tl.full((), 1.0, ACC)
    fallback = tl.where(trust_clip & ~plain, _clip_ratio(one, lr, IEEE), one)
    q = tl.where(adapt, tl.where(nonzero, ratio, fallback), one).to(ACC)
    wd = tl.where(adapt & ~nonzero & plain, 0.0, wd).to(ACC)
    store_stats(stats, seg, wn, dn, q, ph, gn, wd)
    # the first update, if this is it (abi.py: PENDING, set with the state, survives a skipped step
    # and a step at momentum 0, which leaves the buffer as it is)
    srow = stats + seg * STAT_COLS
    pending = tl.load(srow + STAT_PENDING)
    moving = col(grow, MOMENTUM, ACC) != 0
    tl.store(srow + STAT_FIRST, tl.where(moving, pending, 0.0).to(ACC))
    tl.store(srow + STAT_PENDING, tl.where(moving, 0.0, pending).to(ACC))


@triton.jit
def pass2_params(grow, flags, srow, gmul, ACC: tl.constexpr, IEEE: tl.constexpr):
    """(q, the stats' weight decay, lr, momentum, 1 - dampening, gmul, nesterov, first, form)."""
    nesterov = (tl.load(grow + COL_GFLAGS).to(tl.int32) & GF_NESTEROV) != 0
    return (tl.load(srow + STAT_Q), tl.load(srow + STAT_WD), col(grow, COL_LR, ACC), col(grow, MOMENTUM, ACC),
            col(grow, UNDAMPED, ACC), gmul, nesterov, tl.load(srow + STAT_FIRST) != 0,
            tl.load(grow + FORM_COL).to(tl.int32))


@triton.jit
def _heavy_ball(w, s, u, lr, mom, undamped, nesterov, first, NESTEROV: tl.constexpr, DAMPED: tl.constexpr):
    """torch's SGD momentum: s = first ? u : momentum*s + (1 - dampening)*u; w -= lr*(nesterov ?
    u + momentum*s : s); at momentum 0, w -= lr*u and s stays (torch's SGD keeps no buffer then).
    (Without dampening in the bucket, (1 - 0)*u == u: the product is left out.)"""
    if DAMPED:
        s_new = tl.where(first, u, mom * s + undamped * u)
    else:
        s_new = mom * s + u
    moving = mom != 0
    if NESTEROV:
        step = tl.where(nesterov, u + mom * s_new, s_new)
    else:
        step = s_new
    return tl.where(moving, s_new, s), w - lr * tl.where(moving, step, u)


@triton.jit
def _lr_scaled(w, s, u, lr, mom, nesterov, NESTEROV: tl.constexpr):
    """TensorFlow's ApplyMomentum: s = momentum*s + lr*u; w -= nesterov ? lr*u + momentum*s : s."""
    lu = lr * u
    s_new = mom * s + lu
    if NESTEROV:
        return s_new, w - tl.where(nesterov, lu + mom * s_new, s_new)
    else:
        return s_new, w - s_new


@triton.jit
def _paper(w, s, u, lr, mom):
    """The paper's Algorithm 1: mn = w - lr*u; w = mn + momentum*(mn - s); s = mn."""
    s_new = w - lr * u
    return s_new, s_new + mom * (s_new - s)


@triton.jit
def _momentum(w, s, u, lr, mom, undamped, nesterov, first, FORM: tl.constexpr, NESTEROV: tl.constexpr,
              DAMPED: tl.constexpr):
    if FORM == FORM_PAPER:
        return _paper(w, s, u, lr, mom)
    elif FORM == FORM_LR_SCALED:
        return _lr_scaled(w, s, u, lr, mom, nesterov, NESTEROV)
    else:
        return _heavy_ball(w, s, u, lr, mom, undamped, nesterov, first, NESTEROV, DAMPED)


@triton.jit
def pass2_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0: tl.constexpr, V1: tl.constexpr,
                V2: tl.constexpr, BF16: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """u = q*d, the momentum form (docs/SPEC.md), w and the state stored, on the elements
    offs[mask]. The bucket's variant (Lars.variant): V0 its only momentum form (-1: mixed, then the
    segment's form picks the code, uniformly over the program), V1 / V2 whether any group uses
    Nesterov / dampening (compiled out otherwise)."""
    q, wd, lr, mom, undamped, gmul, nesterov, first, form = P
    w = tl.load(wp + offs, mask=mask, other=0.0).to(ACC)
    gs = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * gmul
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = q * tl.where(wd != 0, gs + wd * w, gs)
    if V0 == -1:
        if form == FORM_PAPER:
            s_new, w_new = _momentum(w, s, u, lr, mom, undamped, nesterov, first, FORM_PAPER, V1, V2)
        elif form == FORM_LR_SCALED:
            s_new, w_new = _momentum(w, s, u, lr, mom, undamped, nesterov, first, FORM_LR_SCALED, V1, V2)
        else:
            s_new, w_new = _momentum(w, s, u, lr, mom, undamped, nesterov, first, FORM_HEAVY_BALL, V1, V2)
    else:
        s_new, w_new = _momentum(w, s, u, lr, mom, undamped, nesterov, first, V0, V1, V2)
    store_weights(wp, offs, w_new, mask, BF16)
    tl.store(s_ptr + offs, s_new.to(s_ptr.dtype.element_ty), mask=mask)
