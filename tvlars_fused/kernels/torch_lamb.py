"""LAMB in torch ops (docs/SPEC.md, "LAMB"), for the torch backend's driver (torch_backend.py):
per-slice foreach math of the two passes and the stats row of a segment.

Pass 1 updates the moments m and v and sums the squares of w' and u; pass 2 recomputes u from
the new moments and applies w = w' - ((lr*s)*q)*u (it reads no gradient)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..abi import (COL_GFLAGS, COL_LR, COL_NORM_CLIP, COL_WEIGHT_DECAY, FLAG_SKIP_ADAPTATION, FLAG_SKIP_WEIGHT_DECAY,
                   GF_BC_FIRST_MOMENT, GF_BC_MOMENTS, GF_BC_STEP_SIZE, GF_NO_ADAPT, GF_TRUST_CLIP, GF_WD_DECOUPLED,
                   GF_WD_L2, LAMB_BETA1, LAMB_BETA2, LAMB_BETA3, LAMB_EPS, LAMB_ONE_MINUS_BETA2, LAMB_RATIO_EPS,
                   LAMB_STAT_BC1, LAMB_STAT_BC2, LAMB_STAT_STEP, PART_G2, PART_U2, PART_W2, SEG_FLAGS, SEG_GROUP)
from ..stats import exact_sqrt

EXTRA_ROWS = 3                  # 4: x (l2), 5: sqrt(v/bc2) + eps, 6: w' (decoupled)
WRITES_STATE = (True, False)    # pass 1 updates m and v; pass 2 only reads them
PASS2_READS_GRAD = False


def group_terms(b) -> Tuple[torch.Tensor, ...]:
    """Per group, in float64 from the exact table and t: bc1 and bc2 (1 unless
    bias_correction="moments"), the decoupled decay factor 1 - lr*wd, lr*s and s (s = sqrt(bc2)/bc1
    for "step_size", 1/bc1 for "first_moment", else 1). Device tensors [G]: no host sync."""
    tab = b.group_table
    k = b.step.reshape(()).double() + 1.0
    gflags = tab[:, COL_GFLAGS].long()
    bc1 = 1.0 - torch.pow(tab[:, LAMB_BETA1], k)
    bc2 = 1.0 - torch.pow(tab[:, LAMB_BETA2], k)
    one = torch.ones_like(bc1)
    moments = (gflags & GF_BC_MOMENTS) != 0
    s = torch.where((gflags & GF_BC_STEP_SIZE) != 0, bc2.sqrt() / bc1,
                    torch.where((gflags & GF_BC_FIRST_MOMENT) != 0, 1.0 / bc1, one))
    decay = 1.0 - tab[:, COL_LR] * tab[:, COL_WEIGHT_DECAY]
    return torch.where(moments, bc1, one), torch.where(moments, bc2, one), decay, tab[:, COL_LR] * s, s


class Context:
    """Per step: each segment's weight-decay mode (host) and its betas, eps, weight decay, bias
    corrections and decay factor (0-dim acc); pass 2 takes the bias corrections and (lr*s)*q from
    the stats row, as the kernels do."""

    def __init__(self, b, st):
        rows = [b.group_rows[g] for g in st.seg_group]
        flags = [row[SEG_FLAGS] for row in b.seg_rows]
        gflags = [int(r[COL_GFLAGS]) for r in rows]
        decay = [(f & FLAG_SKIP_WEIGHT_DECAY) == 0 and r[COL_WEIGHT_DECAY] != 0 for f, r in zip(flags, rows)]
        self.l2 = [d and (g & GF_WD_L2) != 0 for d, g in zip(decay, gflags)]
        self.decoupled = [d and (g & GF_WD_DECOUPLED) != 0 for d, g in zip(decay, gflags)]
        self.in_update = [d and (g & (GF_WD_L2 | GF_WD_DECOUPLED)) == 0 for d, g in zip(decay, gflags)]
        self.beta1, self.beta3, self.beta2, self.om2, self.eps, self.wd = (
            st.per_segment(c) for c in (LAMB_BETA1, LAMB_BETA3, LAMB_BETA2, LAMB_ONE_MINUS_BETA2, LAMB_EPS,
                                        COL_WEIGHT_DECAY))
        terms = torch.stack(group_terms(b)[:3], dim=1).to(b.acc_dtype)    # rounded once to acc
        per_group = [row.unbind(0) for row in terms.unbind(0)]
        self.bc1, self.bc2, self.factor = ([per_group[g][j] for g in st.seg_group] for j in range(3))
        # pass 2's, from the stats pass 1 writes
        self.stats_bc1, self.stats_bc2, self.step = (b.stats[:, c].unbind(0)
                                                     for c in (LAMB_STAT_BC1, LAMB_STAT_BC2, LAMB_STAT_STEP))


def _pick(values: list, sl, ks: List[int]) -> list:
    return [values[sl.segs[k]] for k in ks]


def _update_direction(st, sl, act: List[int], w: torch.Tensor, state: List[torch.Tensor],
                      bc1: list, bc2: list) -> torch.Tensor:
    """u = r + wd*w (weight_decay_mode "update"), r = (m/bc1) / (sqrt(v/bc2) + eps), in scratch
    row 1 (gaps zero)."""
    ctx = st.ctx
    M, V, W = sl.views(state[0]), sl.views(state[1]), sl.views(w)
    den = st.row(5, sl)
    D = sl.views(den)
    torch._foreach_copy_([D[k] for k in act], torch._foreach_div([V[k] for k in act], _pick(bc2, sl, act)))
    den.copy_(exact_sqrt(den))                                          # sqrt(v/bc2), correctly rounded
    torch._foreach_add_([D[k] for k in act], _pick(ctx.eps, sl, act))
    r = torch._foreach_div(torch._foreach_div([M[k] for k in act], _pick(bc1, sl, act)), [D[k] for k in act])
    u = st.row(1, sl).zero_()
    U = sl.views(u)
    torch._foreach_copy_([U[k] for k in act], r)
    ks = [k for k in act if ctx.in_update[sl.segs[k]]]
    if ks:
        torch._foreach_add_([U[k] for k in ks], torch._foreach_mul([W[k] for k in ks], _pick(ctx.wd, sl, ks)))
    return u


def pass1(st, sl, act: List[int], w: torch.Tensor, gs: torch.Tensor, state: List[torch.Tensor]) -> tuple:
    """m = beta1*m + beta3*x, v = beta2*v + (1 - beta2)*(x*x) with x = g' (+ wd*w for "l2"); the
    vectors whose norms the trust ratio takes: w' (w*(1 - lr*wd) for "decoupled") and u."""
    ctx = st.ctx
    W, M, V = sl.views(w), sl.views(state[0]), sl.views(state[1])
    X = sl.views(gs)
    l2 = [k for k in act if ctx.l2[sl.segs[k]]]
    if l2:
        X = sl.views(st.row(4, sl).copy_(gs))
        torch._foreach_add_([X[k] for k in l2], torch._foreach_mul([W[k] for k in l2], _pick(ctx.wd, sl, l2)))
    Ma, Va, Xa = [M[k] for k in act], [V[k] for k in act], [X[k] for k in act]
    torch._foreach_mul_(Ma, _pick(ctx.beta1, sl, act))
    torch._foreach_add_(Ma, torch._foreach_mul(Xa, _pick(ctx.beta3, sl, act)))
    xx = torch._foreach_mul(Xa, Xa)
    torch._foreach_mul_(xx, _pick(ctx.om2, sl, act))
    torch._foreach_mul_(Va, _pick(ctx.beta2, sl, act))
    torch._foreach_add_(Va, xx)
    u = _update_direction(st, sl, act, w, state, ctx.bc1, ctx.bc2)
    dec = [k for k in act if ctx.decoupled[sl.segs[k]]]
    if not dec:
        return w, u
    wd_ = st.row(6, sl).copy_(w)
    WD = sl.views(wd_)
    torch._foreach_mul_([WD[k] for k in dec], _pick(ctx.factor, sl, dec))
    return wd_, u


def pass2(st, sl, act: List[int], w: torch.Tensor, gs, state: List[torch.Tensor]) -> None:
    """w = w' - ((lr*s)*q)*u, u from the moments pass 1 stored."""
    ctx = st.ctx
    u = _update_direction(st, sl, act, w, state, ctx.stats_bc1, ctx.stats_bc2)
    W, U = sl.views(w), sl.views(u)
    dec = [k for k in act if ctx.decoupled[sl.segs[k]]]
    if dec:
        torch._foreach_mul_([W[k] for k in dec], _pick(ctx.factor, sl, dec))          # w' = w*(1 - lr*wd)
    torch._foreach_sub_([W[k] for k in act], torch._foreach_mul([U[k] for k in act], _pick(ctx.step, sl, act)))


def finalize_stats(b, sums: torch.Tensor, keep: torch.Tensor, hand_off: bool = True) -> None:
    """Per-segment sums of w'^2, u^2, g'^2 -> the stats row of the segments updated now:
    ||w'|| (after weight_norm_clip), ||u||, q = ||w'|| / (||u|| + ratio_eps) (1 for a zero norm or
    without adaptation), s, ||g'||, the weight decay applied; then for pass 2 bc1, bc2, (lr*s)*q."""
    tab = b.group_table[b.seg_table[:, SEG_GROUP]].to(b.acc_dtype)
    seg_flags = b.seg_table[:, SEG_FLAGS]
    gflags = tab[:, COL_GFLAGS].to(torch.int64)
    norms = exact_sqrt(sums)
    wn = torch.minimum(norms[:, PART_W2], tab[:, COL_NORM_CLIP])
    un, gn = norms[:, PART_U2], norms[:, PART_G2]
    bc1, bc2, _, lr_s, s = (x.to(b.acc_dtype)[b.seg_table[:, SEG_GROUP]] for x in group_terms(b))
    adapt = ((gflags & GF_NO_ADAPT) == 0) & ((seg_flags & FLAG_SKIP_ADAPTATION) == 0)
    one = torch.ones_like(wn)
    q = torch.where(adapt & (wn > 0) & (un > 0), wn / (un + tab[:, LAMB_RATIO_EPS]), one)
    q = torch.where(((gflags & GF_TRUST_CLIP) != 0) & (q > 1), one, q)   # timm's lambc; NaN stays
    wd = torch.where((seg_flags & FLAG_SKIP_WEIGHT_DECAY) != 0, torch.zeros_like(wn), tab[:, COL_WEIGHT_DECAY])
    apply = (b.seg_active != 0) & keep
    rows = torch.stack([wn, un, q, s, gn, wd, bc1, bc2, lr_s * q], dim=1)
    b.stats.copy_(torch.where(apply[:, None], rows, b.stats))
