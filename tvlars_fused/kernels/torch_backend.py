"""backend="torch": the bucket step (docs/SPEC.md) in plain torch ops.

Portable (any device torch supports), deterministic, no host sync, and a readable statement of
what the Triton and C++ kernels compute, rounding included: one IEEE operation per torch op (never
addcmul, which may be fused into an FMA).

Without per-element expansion or bucket-sized temporaries:
- per-segment values (lr, momentum, weight decay, trust ratio q) are 0-dim views of the device
  tables, applied by torch._foreach_* ops to per-segment views of the flat buffers (the weights,
  which live in the parameters' own memory, are gathered into scratch and written back); which segments
  are active, take weight decay or use the paper form is host knowledge from Bucket.prepare;
- the buffers are worked through in slices of whole chunks, with scratch rows allocated once per
  step: on the CPU a bucket-sized temporary page-faults anew every step (slower than all the
  math), while a slice stays in cache from one op to the next;
- chunk partial sums are 16-element block sums (segments, hence chunks, start at multiples of 16)
  added per chunk by segment_reduce, so no bit depends on the slicing.

The per-segment statistics come from tvlars_fused/stats.py (shared with FSDP2's sharded buckets).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..abi import (ALIGN, CHUNK_SEG, CHUNK_START, COL_FORM, COL_GFLAGS, COL_GRAD_SIGN, COL_LR, COL_MOMENTUM,
                   COL_UNDAMPED, COL_WEIGHT_DECAY, FLAG_FIRST_STEP, FLAG_SKIP_WEIGHT_DECAY, FORM_HEAVY_BALL,
                   FORM_LR_SCALED, FORM_PAPER, GF_NESTEROV, PART_COLS, SEG_END, SEG_FIRST_CHUNK, SEG_FLAGS,
                   SEG_GROUP, SEG_NUMEL, SEG_OFFSET, STAT_TRUST_RATIO, STAT_WEIGHT_DECAY)
from ..buckets import Bucket
from ..stats import finalize_stats, keep_mask, segment_sums

NAME = "torch"
CHUNK_ELEMS = 4096
# Elements per slice. CPU: a few MiB of scratch, cache-resident, still few ops per step. Other
# devices have a caching allocator and are bound by kernel launches: fewer, larger slices.
SLICE_ELEMS = 1 << 18
SLICE_ELEMS_NOT_CPU = 1 << 24
requirement = "any device"
SUPPORTS_SHARDED = True   # bucket_step takes `between` (FSDP2 all-reduce between the passes)


def available(device: torch.device) -> bool:
    return True


class _Slice:
    """[lo, hi) of the flat buffers: chunks c0..c1-1, holding parts of the segments `segs`.
    Of a tensor over the slice, views(t)[k] is the part of segment segs[k] (padding left out)."""

    def __init__(self, b: Bucket, lo: int, hi: int, c0: int, c1: int, segs: List[int]):
        self.lo, self.hi, self.n, self.c0, self.c1, self.segs = lo, hi, hi - lo, c0, c1, segs
        self.sizes, at = [], lo        # gap, part, gap, part, ..., gap
        self.ranges = []               # the part of each segment, in elements of its parameter
        for i in segs:
            offset, numel = b._seg_rows[i][SEG_OFFSET], b._seg_rows[i][SEG_NUMEL]
            start, end = max(lo, offset), min(hi, offset + numel)
            self.sizes += [start - at, end - start]
            self.ranges.append((start - offset, end - offset))
            at = end
        self.sizes.append(hi - at)

    def views(self, t: torch.Tensor) -> List[torch.Tensor]:
        return t.split(self.sizes)[1::2]

    def weight_parts(self, b: Bucket) -> List[torch.Tensor]:
        """The parameters' memory over the slice (each a dense tensor: linear views of it)."""
        out = []
        for i, (a, e) in zip(self.segs, self.ranges):
            w = b.weights[i]
            out.append(w.as_strided((w.numel(),), (1,))[a:e])
        return out


def _slices(b: Bucket) -> List[_Slice]:
    """The buffers cut at chunk starts into slices of at most SLICE_ELEMS elements. Host objects,
    built once per bucket (its layout never changes)."""
    if getattr(b, "_torch_slices", None) is None:
        limit = SLICE_ELEMS if b.device.type == "cpu" else SLICE_ELEMS_NOT_CPU
        chunks = [(row[SEG_FIRST_CHUNK] + k, i, start, min(start + b.chunk_elems, row[SEG_END]))
                  for i, row in enumerate(b._seg_rows)
                  for k, start in enumerate(range(row[SEG_OFFSET], row[SEG_END], b.chunk_elems))]
        out, first = [], 0
        for j, (c, _, _, end) in enumerate(chunks):
            if j + 1 == len(chunks) or chunks[j + 1][3] - chunks[first][2] > limit:
                segs = sorted({i for _, i, _, _ in chunks[first:j + 1]})
                out.append(_Slice(b, chunks[first][2], end, chunks[first][0], c + 1, segs))
                first = j + 1
        b._torch_slices = out
    return b._torch_slices


class _Step:
    """What one step needs besides the buffers: host lists and 0-dim device scalars per segment,
    and the scratch rows: 0 w^2 (then g'^2), 1 d, 2 w (the weights gathered in acc; gaps zero),
    3 g', 4 s (vetoable steps only)."""

    def __init__(self, b: Bucket, grad_scale: Optional[torch.Tensor], vetoable: bool):
        group = [row[SEG_GROUP] for row in b._seg_rows]
        rows = [b._rows[g] for g in group]
        self.active = [a != 0 for a in b._active]
        # pass 1's weight decay: the group's unless the segment skips it (host knowledge)
        self.decay = [(row[SEG_FLAGS] & FLAG_SKIP_WEIGHT_DECAY) == 0 and r[COL_WEIGHT_DECAY] != 0
                      for row, r in zip(b._seg_rows, rows)]
        self.form = [int(r[COL_FORM]) for r in rows]
        self.nesterov = [(int(r[COL_GFLAGS]) & GF_NESTEROV) != 0 for r in rows]
        self.first = [(row[SEG_FLAGS] & FLAG_FIRST_STEP) != 0 for row in b._seg_rows]
        per_group = [row.unbind(0) for row in b.group_table.unbind(0)]
        self.lr, self.mom, self.wd, self.undamped, sign = (
            [per_group[g][col] for g in group]
            for col in (COL_LR, COL_MOMENTUM, COL_WEIGHT_DECAY, COL_UNDAMPED, COL_GRAD_SIGN))
        # g' = g * gmul, gmul = sign / scale (one division per step, as the kernels' 1/scale)
        inv = None if grad_scale is None else 1.0 / grad_scale.reshape(()).to(b.acc_dtype)
        self.gmul = sign if inv is None else torch._foreach_mul(sign, inv)
        # found_inf may veto the step: then w and s are updated in scratch and kept or not at the end
        self.vetoable = vetoable
        longest = max([sl.n for sl in _slices(b)] + [0])
        self.work = torch.empty(4 + vetoable, longest, dtype=b.acc_dtype, device=b.device)

    def weights(self, b: Bucket, sl: _Slice) -> torch.Tensor:
        """w over the slice in acc, gathered from the parameters into scratch (gaps zero)."""
        w = self.work[2, :sl.n].zero_()
        torch._foreach_copy_(sl.views(w), sl.weight_parts(b))
        return w

    def scaled_grad(self, b: Bucket, sl: _Slice) -> torch.Tensor:
        """g' = g * gmul over the slice, in acc (gaps zero)."""
        gs = self.work[3, :sl.n].copy_(b.grad_buf[sl.lo:sl.hi])
        torch._foreach_mul_(sl.views(gs), [self.gmul[i] for i in sl.segs])
        return gs

    def direction(self, sl: _Slice, gs: torch.Tensor, w: torch.Tensor, wd: List[torch.Tensor],
                  decay: List[bool]) -> torch.Tensor:
        """d = g' + wd*w over the slice, in acc (no wd*w where `decay` says the segment has none)."""
        d = self.work[1, :sl.n].copy_(gs)
        ks = [k for k, i in enumerate(sl.segs) if decay[i]]
        if ks:
            D, W = sl.views(d), sl.views(w)
            torch._foreach_add_([D[k] for k in ks], torch._foreach_mul([W[k] for k in ks], [wd[sl.segs[k]] for k in ks]))
        return d


def _chunk_blocks(b: Bucket) -> torch.Tensor:
    """[C] 16-element blocks per chunk (a chunk ends at the chunk size or its segment's end)."""
    starts = b.chunk_table[:, CHUNK_START]
    ends = torch.minimum(starts + b.chunk_elems, b.seg_table[b.chunk_table[:, CHUNK_SEG], SEG_END])
    return (ends - starts) // ALIGN


def pass1(b: Bucket, st: _Step, keep: torch.Tensor) -> None:
    """Chunk partials of w^2, d^2 and g'^2 (of the slices with an active segment), then the stats
    of every segment (a zero-size one gets norms 0, q = 1 and phi(t))."""
    blocks = _chunk_blocks(b) if b.num_chunks else None
    for sl in _slices(b):
        if not any(st.active[i] for i in sl.segs):
            continue
        w = st.weights(b, sl)
        gs = st.scaled_grad(b, sl)
        d = st.direction(sl, gs, w, st.wd, st.decay)
        sq = st.work[:2, :sl.n]
        torch.mul(w, w, out=sq[0])
        d.mul_(d)
        sums_wd = sq.reshape(2, -1, ALIGN).sum(2)                      # [2, blocks]: w^2, d^2
        torch.mul(gs, gs, out=sq[0])
        sums_g = sq[0].reshape(1, -1, ALIGN).sum(2)                    # [1, blocks]: g'^2
        sums = torch.cat([sums_wd, sums_g])                            # PART_W2, PART_D2, PART_G2
        lengths = blocks[sl.c0:sl.c1].expand(PART_COLS, -1)
        partials = torch.segment_reduce(sums, "sum", lengths=lengths, unsafe=True, axis=1)
        b.partials[sl.c0:sl.c1].copy_(partials.t())
    finalize_stats(b, segment_sums(b), keep)


def pass2(b: Bucket, st: _Step, keep: torch.Tensor) -> None:
    """u = q*d with d = g' + wd*w (wd: the stats' weight decay), then the momentum form of
    docs/SPEC.md: heavy_ball s = first ? u : mom*s + (1 - dampening)*u, w -= lr*(nesterov ?
    u + mom*s : s); lr_scaled s = mom*s + lr*u, w -= nesterov ? lr*u + mom*s : s; paper
    mn = w - lr*u, w = mn + mom*(mn - s), s = mn. Only the active segments' parameters and state
    are written; a low-precision w is rounded once."""
    q = b.stats[:, STAT_TRUST_RATIO].unbind(0)
    wd = b.stats[:, STAT_WEIGHT_DECAY].unbind(0)
    for sl in _slices(b):
        act = [k for k, i in enumerate(sl.segs) if st.active[i]]
        if not act:
            continue
        s_buf = b.state_buf[sl.lo:sl.hi]
        w = st.weights(b, sl)
        s = st.work[-1, :sl.n].copy_(s_buf) if st.vetoable else s_buf
        d = st.direction(sl, st.scaled_grad(b, sl), w, wd, st.decay)   # (the stats' wd is 0 or the group's)
        W, S, D = sl.views(w), sl.views(s), sl.views(d)
        torch._foreach_mul_([D[k] for k in act], [q[sl.segs[k]] for k in act])    # u = q*d
        for form in (FORM_HEAVY_BALL, FORM_PAPER, FORM_LR_SCALED):
            ks = [k for k in act if st.form[sl.segs[k]] == form]
            if ks:
                _momentum(st, form, [sl.segs[k] for k in ks], [W[k] for k in ks], [S[k] for k in ks],
                          [D[k] for k in ks])
        # back to the parameters (rounded to their dtype), unless vetoed
        parts, N = sl.weight_parts(b), sl.views(w.to(b.dtype))
        if st.vetoable:
            N = [torch.where(keep, n, part) for n, part in zip(N, parts)]
        torch._foreach_copy_([parts[k] for k in act], [N[k] for k in act])
        if s is not s_buf:
            torch.where(keep, s, s_buf, out=s)
            S_buf = sl.views(s_buf)
            torch._foreach_copy_([S_buf[k] for k in act], [S[k] for k in act])


def _momentum(st: _Step, form: int, segs: List[int], w_: List[torch.Tensor], s_: List[torch.Tensor],
              u_: List[torch.Tensor]) -> None:
    """The momentum form on per-segment views (one IEEE operation per op, as the kernels)."""
    lr, mom = [st.lr[i] for i in segs], [st.mom[i] for i in segs]
    if form == FORM_PAPER:
        mn = torch._foreach_sub(w_, torch._foreach_mul(u_, lr))            # mn = w - lr*u
        t = torch._foreach_sub(mn, s_)
        torch._foreach_mul_(t, mom)
        torch._foreach_add_(t, mn)                                         # mom*(mn - s) + mn
        torch._foreach_copy_(w_, t)
        torch._foreach_copy_(s_, mn)
        return
    nest = [k for k, i in enumerate(segs) if st.nesterov[i]]
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
    first = [k for k, i in enumerate(segs) if st.first[i]]
    rest = [k for k in range(len(segs)) if k not in first]
    if rest:
        torch._foreach_mul_([s_[k] for k in rest], [mom[k] for k in rest])
        torch._foreach_add_([s_[k] for k in rest],
                            torch._foreach_mul([u_[k] for k in rest], [st.undamped[segs[k]] for k in rest]))
    if first:   # torch's SGD: the first buffer is u itself
        torch._foreach_copy_([s_[k] for k in first], [u_[k] for k in first])
    step = list(s_)
    if nest:
        look = torch._foreach_mul([s_[k] for k in nest], [mom[k] for k in nest])
        torch._foreach_add_(look, [u_[k] for k in nest])                   # u + mom*s
        for k, v in zip(nest, look):
            step[k] = v
    torch._foreach_sub_(w_, torch._foreach_mul(step, lr))                  # w = w - lr*step


def bucket_step(b: Bucket, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                between: Optional[Callable[[Bucket], None]] = None) -> None:
    """`between(bucket)`, when given, runs after pass 1 (e.g. all-reduce the partial sums of a
    sharded bucket and recompute the stats from them)."""
    keep = keep_mask(b.device, found_inf)
    st = _Step(b, grad_scale, vetoable=found_inf is not None)
    pass1(b, st, keep)
    if between is not None:
        between(b)
    pass2(b, st, keep)
    b.step.add_(keep.to(b.step.dtype))
