"""backend="torch": the bucket step (docs/SPEC.md) in plain torch ops, for every algorithm.

Portable (any device torch supports), deterministic, no host sync, and a readable statement of
what the Triton and C++ kernels compute, rounding included: one IEEE operation per torch op (never
addcmul, which may be fused into an FMA). This module is the driver; each algorithm's math is in
kernels/torch_<algorithm>.py (MATH below).

Without per-element expansion or bucket-sized temporaries:
- per-segment values (lr, momentum, weight decay, trust ratio q, ...) are 0-dim device tensors,
  applied by torch._foreach_* ops to per-segment views of the flat buffers (the weights, which
  live in the parameters' own memory, are gathered into scratch and written back); which segments
  are active or take weight decay is host knowledge from Bucket.prepare;
- the buffers are worked through in slices of whole chunks, with scratch rows allocated once per
  step: on the CPU a bucket-sized temporary page-faults anew every step (slower than all the
  math), while a slice stays in cache from one op to the next;
- chunk partial sums are 16-element block sums (segments, hence chunks, start at multiples of 16)
  added per chunk by segment_reduce, so no bit depends on the slicing.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..abi import (ALGO_LAMB, ALGO_LARS, ALIGN, CHUNK_SEG, CHUNK_START, COL_GRAD_SIGN, PART_COLS, SEG_END,
                   SEG_FIRST_CHUNK, SEG_GROUP, SEG_NUMEL, SEG_OFFSET)
from ..stats import keep_mask, segment_sums
from . import Backend, torch_lamb, torch_lars

# each algorithm's math: Context(view, step), pass1, pass2, finalize_stats, EXTRA_ROWS,
# WRITES_STATE (pass 1, pass 2), PASS2_READS_GRAD
MATH = {ALGO_LARS: torch_lars, ALGO_LAMB: torch_lamb}


class _Slice:
    """[lo, hi) of the flat buffers: chunks c0..c1-1, holding parts of the segments `segs`.
    Of a tensor over the slice, views(t)[k] is the part of segment segs[k] (padding left out)."""

    def __init__(self, b, lo: int, hi: int, c0: int, c1: int, segs: List[int]):
        self.lo, self.hi, self.n, self.c0, self.c1, self.segs = lo, hi, hi - lo, c0, c1, segs
        self.sizes, at = [], lo        # gap, part, gap, part, ..., gap
        self.ranges = []               # the part of each segment, in elements of its parameter
        for i in segs:
            offset, numel = b.seg_rows[i][SEG_OFFSET], b.seg_rows[i][SEG_NUMEL]
            start, end = max(lo, offset), min(hi, offset + numel)
            self.sizes += [start - at, end - start]
            self.ranges.append((start - offset, end - offset))
            at = end
        self.sizes.append(hi - at)

    def views(self, t: torch.Tensor) -> List[torch.Tensor]:
        return t.split(self.sizes)[1::2]

    def weight_parts(self, b) -> List[torch.Tensor]:
        """The parameters' memory over the slice (each a dense tensor: linear views of it)."""
        out = []
        for i, (a, e) in zip(self.segs, self.ranges):
            w = b.weights[i]
            out.append(w.as_strided((w.numel(),), (1,))[a:e])
        return out


def _build_slices(b) -> List[_Slice]:
    """The buffers cut at chunk starts into slices of at most BACKEND.SLICE_ELEMS elements."""
    limit = BACKEND.SLICE_ELEMS if b.device.type == "cpu" else BACKEND.SLICE_ELEMS_NOT_CPU
    chunks = [(row[SEG_FIRST_CHUNK] + k, i, start, min(start + b.chunk_elems, row[SEG_END]))
              for i, row in enumerate(b.seg_rows)
              for k, start in enumerate(range(row[SEG_OFFSET], row[SEG_END], b.chunk_elems))]
    out, first = [], 0
    for j, (c, _, _, end) in enumerate(chunks):
        if j + 1 == len(chunks) or chunks[j + 1][3] - chunks[first][2] > limit:
            segs = sorted({i for _, i, _, _ in chunks[first:j + 1]})
            out.append(_Slice(b, chunks[first][2], end, chunks[first][0], c + 1, segs))
            first = j + 1
    return out


def slices(b) -> List[_Slice]:
    """Host objects, built once per bucket (its layout never changes)."""
    return b.plan("torch-slices", _build_slices)


class Step:
    """What one step needs besides the buffers: host lists and 0-dim device scalars per segment,
    and the scratch rows: 0 and 1 the squares (1 also the update direction), 2 w (the weights
    gathered in acc; gaps zero), 3 g', then the algorithm's EXTRA_ROWS, then copies of the state
    slots (vetoable steps only)."""

    def __init__(self, b, grad_scale: Optional[torch.Tensor], vetoable: bool):
        self.math = MATH[b.algorithm.id]
        self.seg_group = [row[SEG_GROUP] for row in b.seg_rows]
        self.active = [a != 0 for a in b.active]
        # the group table in acc, per group its columns as 0-dim views (one conversion per step)
        self.columns = [row.unbind(0) for row in b.group_table.to(b.acc_dtype).unbind(0)]
        sign = self.per_segment(COL_GRAD_SIGN)
        # g' = g * gmul, gmul = sign / scale (one division per step, as the kernels' 1/scale)
        inv = None if grad_scale is None else 1.0 / grad_scale.reshape(()).to(b.acc_dtype)
        self.gmul = sign if inv is None else torch._foreach_mul(sign, inv)
        # found_inf may veto the step: then the state is updated in scratch and kept or not at the end
        self.vetoable = vetoable
        self.first_slot_row = 4 + self.math.EXTRA_ROWS
        longest = max([sl.n for sl in slices(b)] + [0])
        rows = self.first_slot_row + (b.algorithm.slots if vetoable else 0)
        self.work = torch.empty(rows, longest, dtype=b.acc_dtype, device=b.device)
        self.ctx = self.math.Context(b, self)

    def per_segment(self, col: int) -> List[torch.Tensor]:
        """Column col of each segment's group row, as 0-dim acc tensors."""
        return [self.columns[g][col] for g in self.seg_group]

    def row(self, k: int, sl: _Slice) -> torch.Tensor:
        return self.work[k, :sl.n]

    def weights(self, b, sl: _Slice) -> torch.Tensor:
        """w over the slice in acc, gathered from the parameters into scratch (gaps zero)."""
        w = self.row(2, sl).zero_()
        torch._foreach_copy_(sl.views(w), sl.weight_parts(b))
        return w

    def scaled_grad(self, b, sl: _Slice) -> torch.Tensor:
        """g' = g * gmul over the slice, in acc (gaps zero)."""
        gs = self.row(3, sl).copy_(b.grad_buf[sl.lo:sl.hi])
        torch._foreach_mul_(sl.views(gs), [self.gmul[i] for i in sl.segs])
        return gs

    def state(self, b, sl: _Slice, writes: bool = True) -> List[torch.Tensor]:
        """Each state slot over the slice: the buffer itself, or a scratch copy when the pass writes
        it and the step is vetoable (commit_state puts it back where found_inf allows)."""
        rows = [b.state_buf[k, sl.lo:sl.hi] for k in range(b.algorithm.slots)]
        if not (writes and self.vetoable):
            return rows
        return [self.row(self.first_slot_row + k, sl).copy_(r) for k, r in enumerate(rows)]

    def commit_state(self, b, sl: _Slice, state: List[torch.Tensor], act: List[int], keep: torch.Tensor) -> None:
        """A vetoable step's slots back into the buffer where found_inf allows (active parts only)."""
        if not self.vetoable:
            return
        for k, s in enumerate(state):
            s_buf = b.state_buf[k, sl.lo:sl.hi]
            torch.where(keep, s, s_buf, out=s)
            S, S_buf = sl.views(s), sl.views(s_buf)
            torch._foreach_copy_([S_buf[j] for j in act], [S[j] for j in act])


def _chunk_blocks(b) -> torch.Tensor:
    """[C] 16-element blocks per chunk (a chunk ends at the chunk size or its segment's end)."""
    starts = b.chunk_table[:, CHUNK_START]
    ends = torch.minimum(starts + b.chunk_elems, b.seg_table[b.chunk_table[:, CHUNK_SEG], SEG_END])
    return (ends - starts) // ALIGN


def finalize_stats(b, sums: torch.Tensor, keep: torch.Tensor, hand_off: bool = True) -> None:
    """Per-segment sums of squares -> the stats rows of the segments updated now (the algorithm's
    math); also what a sharded bucket runs after the all-reduce (sharding.py), with hand_off=False:
    pass 1's one-time hand-offs (LARS's first-update mark) were made by its first finalize."""
    MATH[b.algorithm.id].finalize_stats(b, sums, keep, hand_off)


def pass1(b, st: Step, keep: torch.Tensor) -> None:
    """Chunk partials of the squares of the algorithm's weight and update terms and of g' (of the
    slices with an active segment), then the stats of every segment (a zero-size one gets norms 0
    and the zero-norm trust ratio)."""
    blocks = _chunk_blocks(b) if b.num_chunks else None
    writes_state = st.math.WRITES_STATE[0]
    for sl in slices(b):
        act = [k for k, i in enumerate(sl.segs) if st.active[i]]
        if not act:
            continue
        w = st.weights(b, sl)
        gs = st.scaled_grad(b, sl)
        state = st.state(b, sl) if writes_state else None   # (pass 1 reads the state it writes)
        w_term, u_term = st.math.pass1(st, sl, act, w, gs, state)
        if writes_state:
            st.commit_state(b, sl, state, act, keep)
        sq = st.work[:2, :sl.n]
        torch.mul(w_term, w_term, out=sq[0])
        torch.mul(u_term, u_term, out=sq[1])
        sums_wu = sq.reshape(2, -1, ALIGN).sum(2)                      # [2, blocks]: w^2, u^2
        torch.mul(gs, gs, out=sq[0])
        sums_g = sq[0].reshape(1, -1, ALIGN).sum(2)                    # [1, blocks]: g'^2
        sums = torch.cat([sums_wu, sums_g])                            # PART_W2, PART_U2, PART_G2
        lengths = blocks[sl.c0:sl.c1].expand(PART_COLS, -1)
        partials = torch.segment_reduce(sums, "sum", lengths=lengths, unsafe=True, axis=1)
        b.partials[sl.c0:sl.c1].copy_(partials.t())
    finalize_stats(b, segment_sums(b), keep)


def pass2(b, st: Step, keep: torch.Tensor) -> None:
    """The algorithm's update of w (in scratch) and of its state, then w back to the parameters
    (rounded once to their dtype). Only the active segments' parameters and state are written."""
    writes_state = st.math.WRITES_STATE[1]
    for sl in slices(b):
        act = [k for k, i in enumerate(sl.segs) if st.active[i]]
        if not act:
            continue
        w = st.weights(b, sl)
        state = st.state(b, sl, writes=writes_state)   # (LAMB's pass 2 only reads m and v)
        gs = st.scaled_grad(b, sl) if st.math.PASS2_READS_GRAD else None
        st.math.pass2(st, sl, act, w, gs, state)
        # back to the parameters (rounded to their dtype), unless vetoed
        parts, N = sl.weight_parts(b), sl.views(w.to(b.dtype))
        if st.vetoable:
            N = [torch.where(keep, n, part) for n, part in zip(N, parts)]
        torch._foreach_copy_([parts[k] for k in act], [N[k] for k in act])
        if writes_state:
            st.commit_state(b, sl, state, act, keep)


class TorchBackend(Backend):
    NAME = "torch"
    CHUNK_ELEMS = 4096
    # Elements per slice. CPU: a few MiB of scratch, cache-resident, still few ops per step. Other
    # devices have a caching allocator and are bound by kernel launches: fewer, larger slices.
    SLICE_ELEMS = 1 << 18
    SLICE_ELEMS_NOT_CPU = 1 << 24
    SUPPORTS_SHARDED = True
    requirement = "any device"

    def available(self, device) -> bool:
        return True

    def bucket_step(self, b, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    between: Optional[Callable] = None) -> None:
        keep = keep_mask(b.device, found_inf)
        st = Step(b, grad_scale, vetoable=found_inf is not None)
        pass1(b, st, keep)
        if between is not None:
            between(b)
        pass2(b, st, keep)
        b.step.add_(keep.to(b.step.dtype))


BACKEND = TorchBackend()
