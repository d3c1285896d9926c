"""backend="torch": the bucket step (docs/SPEC.md) in plain torch ops over the flat buffers.

Portable (any device torch supports), deterministic (per-chunk partial sums added in chunk order,
like the kernels), and a readable statement of what the Triton and C++ kernels compute. It
allocates bucket-sized temporaries, so it is the slow fused path. `finalize_stats` is also what
turns all-reduced partial sums into trust ratios for sharded (FSDP2) buckets.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import hyperparams as H
from ..buckets import (CHUNK_SEG, CHUNK_START, SEG_END, SEG_FLAGS, SEG_GROUP, SEG_NUM_CHUNKS,
                       SEG_OFFSET, Bucket)
from ..schedule import phi

NAME = "torch"
CHUNK_ELEMS = 4096
requirement = "any device"
SUPPORTS_SHARDED = True   # bucket_step takes `between` (FSDP2 all-reduce between the passes)


def available(device: torch.device) -> bool:
    return True


def _keep(b: Bucket, found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim bool: False when GradScaler found an inf/nan (then nothing changes)."""
    if found_inf is None:
        return torch.ones((), dtype=torch.bool, device=b.device)
    return found_inf.reshape(()) == 0


def _per_elem(b: Bucket, x: torch.Tensor) -> torch.Tensor:
    lengths = b.seg_table[:, SEG_END] - b.seg_table[:, SEG_OFFSET]
    return torch.repeat_interleave(x, lengths, output_size=b.numel)


def _w_and_d(b: Bucket, grad_scale: Optional[torch.Tensor]):
    acc = b.acc_dtype
    w = b.param_buf.to(acc)
    g = b.grad_buf.to(acc)
    if grad_scale is not None:
        g = g / grad_scale.reshape(()).to(acc)
    tab = b.group_table[b.seg_table[:, SEG_GROUP]]
    skip_wd = (b.seg_table[:, SEG_FLAGS] & H.FLAG_SKIP_WEIGHT_DECAY) != 0
    wd = torch.where(skip_wd, torch.zeros_like(tab[:, H.COL_WEIGHT_DECAY]), tab[:, H.COL_WEIGHT_DECAY])
    return w, g + _per_elem(b, wd) * w


def segment_sums(b: Bucket) -> torch.Tensor:
    """[S, 2] per-segment sum(w^2), sum(d^2): the chunk partials added in chunk order."""
    counts = b.seg_table[:, SEG_NUM_CHUNKS]
    return torch.segment_reduce(b.partials[: b.num_chunks], "sum", lengths=counts, unsafe=True, axis=0)


def finalize_stats(b: Bucket, sums: torch.Tensor, keep: torch.Tensor) -> None:
    """Per-segment sums of squares -> stats = (wn, dn, q, phi) for the segments updated now."""
    tab = b.group_table[b.seg_table[:, SEG_GROUP]]
    flags = b.seg_table[:, SEG_FLAGS]
    clip = tab[:, H.COL_NORM_CLIP]
    wn = torch.minimum(sums[:, 0].sqrt(), clip)
    dn = torch.minimum(sums[:, 1].sqrt(), clip)
    ph = phi(b.step.reshape(()).to(b.acc_dtype), tab[:, H.COL_LMBDA], tab[:, H.COL_DELAY],
             tab[:, H.COL_ALPHA], tab[:, H.COL_GAMMA_MIN])
    ph = torch.where(tab[:, H.COL_USE_PHI] != 0, ph, torch.ones_like(ph))
    adapt = ((flags & H.FLAG_SKIP_ADAPTATION) == 0) & (wn > 0) & (dn > 0)
    q = torch.where(adapt, tab[:, H.COL_ETA] * ph * wn / dn, torch.ones_like(wn))
    apply = (b.seg_active != 0) & keep
    b.stats.copy_(torch.where(apply[:, None], torch.stack([wn, dn, q, ph], dim=1), b.stats))


def pass1(b: Bucket, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    if not b.num_chunks:
        return
    w, d = _w_and_d(b, grad_scale)
    starts = b.chunk_table[:, CHUNK_START]
    ends = torch.minimum(starts + b.chunk_elems, b.seg_table[b.chunk_table[:, CHUNK_SEG], SEG_END])
    lengths = ends - starts
    b.partials.copy_(torch.stack([torch.segment_reduce(w * w, "sum", lengths=lengths, unsafe=True),
                                  torch.segment_reduce(d * d, "sum", lengths=lengths, unsafe=True)], 1))
    finalize_stats(b, segment_sums(b), _keep(b, found_inf))


def pass2(b: Bucket, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    keep = _keep(b, found_inf)
    if b.num_chunks:
        acc = b.acc_dtype
        w, d = _w_and_d(b, grad_scale)
        tab = b.group_table[b.seg_table[:, SEG_GROUP]]
        lr = _per_elem(b, tab[:, H.COL_LR])
        mom = _per_elem(b, tab[:, H.COL_MOMENTUM])
        u = _per_elem(b, b.stats[:, 2]) * d
        s = b.state_buf.to(acc)
        s_new = mom * s + u
        w_new = w - lr * s_new
        if any(row[H.COL_PAPER_FORM] for row in b._rows or ()):
            paper = _per_elem(b, tab[:, H.COL_PAPER_FORM] != 0)
            m_new = w - lr * u
            w_new = torch.where(paper, m_new + mom * (m_new - s), w_new)
            s_new = torch.where(paper, m_new, s_new)
        apply = _per_elem(b, (b.seg_active != 0) & keep)
        b.param_buf.copy_(torch.where(apply, w_new, w))
        b.state_buf.copy_(torch.where(apply, s_new, s))
    b.step.add_(keep.to(b.step.dtype))


def bucket_step(b: Bucket, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                between: Optional[Callable[[Bucket], None]] = None) -> None:
    """`between(bucket)`, when given, runs after pass 1 (e.g. all-reduce the partial sums of a
    sharded bucket and recompute the stats from them)."""
    pass1(b, grad_scale, found_inf)
    if between is not None:
        between(b)
    pass2(b, grad_scale, found_inf)
