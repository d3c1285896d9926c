"""TVLARS / LARS in torch ops (docs/SPEC.md, "The algorithm"), for the torch backend's driver
(torch_backend.py): per-slice foreach math of the two passes and the stats row of a segment."""
from __future__ import annotations

from typing import List

import torch

from ..abi import (COL_GFLAGS, COL_LR, COL_NORM_CLIP, COL_WEIGHT_DECAY, FLAG_SKIP_ADAPTATION,
                   FLAG_SKIP_WEIGHT_DECAY, FORM_HEAVY_BALL, FORM_LR_SCALED, FORM_PAPER, GF_GRAD_DENOMINATOR,
                   GF_NESTEROV, GF_NO_ADAPT, GF_PLAIN_ZERO, GF_TRUST_CLIP, LARS_ALPHA, LARS_DELAY, LARS_EPS,
                   LARS_ETA, LARS_FORM, LARS_GAMMA_MIN, LARS_HOLD, LARS_LMBDA, LARS_MOMENTUM, LARS_STAT_FIRST,
                   LARS_STAT_PENDING, LARS_UNDAMPED,
                   LARS_USE_PHI, PART_G2, PART_U2, PART_W2, SEG_FLAGS, SEG_GROUP, STAT_PUBLIC, STAT_TRUST_RATIO,
                   STAT_WEIGHT_DECAY)
from ..schedule import phi
from ..stats import exact_sqrt

# finalize_stats writes the stats row's leading columns: the public ones, then FIRST, PENDING
assert (LARS_STAT_FIRST, LARS_STAT_PENDING) == (STAT_PUBLIC, STAT_PUBLIC + 1)

EXTRA_ROWS = 0                  # scratch rows beyond the driver's
WRITES_STATE = (False, True)    # pass 1, pass 2
PASS2_READS_GRAD = True


class Context:
    """Per step: which segments take weight decay, their momentum form and switches (host), and
    their lr, momentum, weight decay, 1 - dampening, q and the applied weight decay (0-dim)."""

    def __init__(self, b, st):
        rows = [b.group_rows[g] for g in st.seg_group]
        flags = [row[SEG_FLAGS] for row in b.seg_rows]
        # pass 1's weight decay: the group's unless the segment skips it (host knowledge)
        self.decay = [(f & FLAG_SKIP_WEIGHT_DECAY) == 0 and r[COL_WEIGHT_DECAY] != 0 for f, r in zip(flags, rows)]
        self.form = [int(r[LARS_FORM]) for r in rows]
        self.nesterov = [(int(r[COL_GFLAGS]) & GF_NESTEROV) != 0 for r in rows]
        self.damped = [r[LARS_UNDAMPED] != 1 for r in rows]   # may take torch's first buffer u
        self.moving = [r[LARS_MOMENTUM] != 0 for r in rows]   # heavy_ball at momentum 0: s stays
        self.lr, self.mom, self.wd, self.undamped = (st.per_segment(c) for c in
                                                     (COL_LR, LARS_MOMENTUM, COL_WEIGHT_DECAY, LARS_UNDAMPED))
        # pass 2's trust ratio and weight decay, from the stats pass 1 writes
        self.q = b.stats[:, STAT_TRUST_RATIO].unbind(0)
        self.stats_wd = b.stats[:, STAT_WEIGHT_DECAY].unbind(0)
        self.first = b.stats[:, LARS_STAT_FIRST].unbind(0)    # this step is the first update (device)


def _direction(st, sl, gs: torch.Tensor, w: torch.Tensor, wd: List[torch.Tensor]) -> torch.Tensor:
    """d = g' + wd*w over the slice, in scratch row 1 (no wd*w where the segment has no decay)."""
    ctx = st.ctx
    d = st.row(1, sl).copy_(gs)
    ks = [k for k, i in enumerate(sl.segs) if ctx.decay[i]]
    if ks:
        D, W = sl.views(d), sl.views(w)
        torch._foreach_add_([D[k] for k in ks], torch._foreach_mul([W[k] for k in ks], [wd[sl.segs[k]] for k in ks]))
    return d


def pass1(st, sl, act: List[int], w: torch.Tensor, gs: torch.Tensor, state) -> tuple:
    """The vectors whose norms the trust ratio takes: w and d = g' + wd*w (the static wd)."""
    return w, _direction(st, sl, gs, w, st.ctx.wd)


def pass2(st, sl, act: List[int], w: torch.Tensor, gs: torch.Tensor, state: List[torch.Tensor]) -> None:
    """u = q*d with d = g' + wd*w (wd: the stats' weight decay), then the momentum form of
    docs/SPEC.md: heavy_ball s = first ? u : mom*s + (1 - dampening)*u, w -= lr*(nesterov ?
    u + mom*s : s); lr_scaled s = mom*s + lr*u, w -= nesterov ? lr*u + mom*s : s; paper
    mn = w - lr*u, w = mn + mom*(mn - s), s = mn."""
    ctx = st.ctx
    d = _direction(st, sl, gs, w, ctx.stats_wd)   # (the stats' wd is 0 or the group's)
    W, S, D = sl.views(w), sl.views(state[0]), sl.views(d)
    torch._foreach_mul_([D[k] for k in act], [ctx.q[sl.segs[k]] for k in act])    # u = q*d
    for form in (FORM_HEAVY_BALL, FORM_PAPER, FORM_LR_SCALED):
        ks = [k for k in act if ctx.form[sl.segs[k]] == form]
        if ks:
            _momentum(ctx, form, [sl.segs[k] for k in ks], [W[k] for k in ks], [S[k] for k in ks],
                      [D[k] for k in ks])


def _momentum(ctx: Context, form: int, segs: List[int], w_: List[torch.Tensor], s_: List[torch.Tensor],
              u_: List[torch.Tensor]) -> None:
    """The momentum form on per-segment views (one IEEE operation per op, as the kernels)."""
    lr, mom = [ctx.lr[i] for i in segs], [ctx.mom[i] for i in segs]
    if form == FORM_PAPER:
        mn = torch._foreach_sub(w_, torch._foreach_mul(u_, lr))            # mn = w - lr*u
        t = torch._foreach_sub(mn, s_)
        torch._foreach_mul_(t, mom)
        torch._foreach_add_(t, mn)                                         # mom*(mn - s) + mn
        torch._foreach_copy_(w_, t)
        torch._foreach_copy_(s_, mn)
        return
    nest = [k for k, i in enumerate(segs) if ctx.nesterov[i]]
    if form == FORM_LR_SCALED:
        lu = torch._foreach_mul(u_, lr)                                    # lr*u
        torch._foreach_mul_(s_, mom)
        torch._foreach_add_(s_, lu)                                        # s = mom*s + lr*u
        step = list(s_)
        if nest:
            look = torch._foreach_mul([s_[k] for k in nest], [mom[k] for k in nest])
            torch._foreach_add_(look, [lu[k] for k in nest])               # lr*u + mom*s
            for k, v in zip(nest, look):
                step[k] = v
        torch._foreach_sub_(w_, step)
        return
    if not all(ctx.moving[i] for i in segs):   # heavy_ball at momentum 0: w = w - lr*u, s stays
        still = [k for k, i in enumerate(segs) if not ctx.moving[i]]
        torch._foreach_sub_([w_[k] for k in still], torch._foreach_mul([u_[k] for k in still],
                                                                       [lr[k] for k in still]))
        moving = [k for k, i in enumerate(segs) if ctx.moving[i]]
        if moving:
            _momentum(ctx, form, *([x[k] for k in moving] for x in (segs, w_, s_, u_)))
        return
    torch._foreach_mul_(s_, mom)
    torch._foreach_add_(s_, torch._foreach_mul(u_, [ctx.undamped[i] for i in segs]))
    for k, i in enumerate(segs):   # torch's SGD: with dampening, the first buffer is u itself
        if ctx.damped[i]:
            s_[k].copy_(torch.where(ctx.first[i] != 0, u_[k], s_[k]))
    step = list(s_)
    if nest:
        look = torch._foreach_mul([s_[k] for k in nest], [mom[k] for k in nest])
        torch._foreach_add_(look, [u_[k] for k in nest])                   # u + mom*s
        for k, v in zip(nest, look):
            step[k] = v
    torch._foreach_sub_(w_, torch._foreach_mul(step, lr))                  # w = w - lr*step


def finalize_stats(b, sums: torch.Tensor, keep: torch.Tensor, hand_off: bool = True) -> None:
    """Per-segment sums of w^2, d^2, g'^2 -> the stats row (docs/SPEC.md, "The algorithm") of the
    segments updated now: norms after norm_clip, q, phi(t), ||g'||, the weight decay pass 2 applies."""
    tab = b.group_table[b.seg_table[:, SEG_GROUP]].to(b.acc_dtype)
    seg_flags = b.seg_table[:, SEG_FLAGS]
    gflags = tab[:, COL_GFLAGS].to(torch.int64)
    clip = tab[:, COL_NORM_CLIP]
    norms = exact_sqrt(sums)
    wn = torch.minimum(norms[:, PART_W2], clip)
    dn = torch.minimum(norms[:, PART_U2], clip)
    gn = torch.minimum(norms[:, PART_G2], clip)
    t = b.step.reshape(()).to(b.acc_dtype)
    ph = phi(t, tab[:, LARS_LMBDA], tab[:, LARS_DELAY], tab[:, LARS_ALPHA], tab[:, LARS_GAMMA_MIN])
    one = torch.ones_like(ph)
    ph = torch.where((tab[:, LARS_USE_PHI] != 0) & ~(t < tab[:, LARS_HOLD]), ph, one)
    wd = torch.where((seg_flags & FLAG_SKIP_WEIGHT_DECAY) != 0, torch.zeros_like(ph), tab[:, COL_WEIGHT_DECAY])
    grad_form = (gflags & GF_GRAD_DENOMINATOR) != 0
    adapt = ((gflags & GF_NO_ADAPT) == 0) & ((seg_flags & FLAG_SKIP_ADAPTATION) == 0)
    nonzero = (wn > 0) & torch.where(grad_form, gn, dn).gt(0)
    denom = torch.where(grad_form, (gn + wd * wn) + tab[:, LARS_EPS], dn + tab[:, LARS_EPS])
    clip_q = (gflags & GF_TRUST_CLIP) != 0
    ratio = tab[:, LARS_ETA] * ph * wn / denom
    fallback = torch.where(clip_q & ((gflags & GF_PLAIN_ZERO) == 0), _clip_ratio(one, tab[:, COL_LR]), one)
    q = torch.where(adapt & nonzero, torch.where(clip_q, _clip_ratio(ratio, tab[:, COL_LR]), ratio),
                    torch.where(adapt, fallback, one))
    wd = torch.where(adapt & ~nonzero & ((gflags & GF_PLAIN_ZERO) != 0), torch.zeros_like(wd), wd)
    apply = (b.seg_active != 0) & keep
    # the first update, if this is it: FIRST = PENDING, PENDING = 0 (abi.py), once per step with
    # momentum (a step at momentum 0 leaves the buffer, and the mark, as they are)
    pending, zero = b.stats[:, LARS_STAT_PENDING], torch.zeros_like(wd)
    moving = tab[:, LARS_MOMENTUM] != 0
    cols = [wn, dn, q, ph, gn, wd] + ([torch.where(moving, pending, zero), torch.where(moving, zero, pending)]
                                      if hand_off else [])
    n = len(cols)
    b.stats[:, :n].copy_(torch.where(apply[:, None], torch.stack(cols, dim=1), b.stats[:, :n]))


def _clip_ratio(q: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """trust_clip: min(q / lr, 1) as q >= lr ? 1 : q / lr (docs/SPEC.md: 1 at lr = 0; NaN stays NaN)."""
    return torch.where(q >= lr, torch.ones_like(q), q / lr)
