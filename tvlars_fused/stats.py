"""The per-segment statistics of docs/SPEC.md in torch ops, backend-neutral: chunk partial sums ->
per-segment sums -> the stats row (norms, trust ratio, phi, the weight decay applied). The torch
backend computes its stats with these, and sharded (FSDP2) buckets recompute theirs from
all-reduced sums (sharding.py)."""
from __future__ import annotations

from typing import List, Optional

import torch

from .abi import (COL_ALPHA, COL_DELAY, COL_EPS, COL_ETA, COL_GAMMA_MIN, COL_GFLAGS, COL_HOLD, COL_LMBDA,
                  COL_LR, COL_NORM_CLIP, COL_USE_PHI, COL_WEIGHT_DECAY, FLAG_SKIP_ADAPTATION,
                  FLAG_SKIP_WEIGHT_DECAY, GF_GRAD_DENOMINATOR, GF_NO_ADAPT, GF_PLAIN_ZERO, GF_TRUST_CLIP,
                  PART_COLS, PART_D2, PART_G2, PART_W2, REDUCE_TILE, SEG_FIRST_CHUNK, SEG_FLAGS, SEG_GROUP,
                  SEG_NUM_CHUNKS)
from .schedule import phi


def keep_mask(device: torch.device, found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim bool on `device`: False when GradScaler found an inf/nan (then nothing changes)."""
    if found_inf is None:
        return torch.ones((), dtype=torch.bool, device=device)
    return found_inf.reshape(()) == 0


class ReducePlan:
    """How a bucket's chunk partials become per-segment sums in the order of docs/SPEC.md ("The
    segment sum"): each segment's chunks in tiles of REDUCE_TILE, each tile a pairwise tree, the
    tiles added in chunk order. Index tensors on the bucket's device, built once per bucket."""

    def __init__(self, seg_rows: List[list], num_chunks: int, device: torch.device):
        tiles, seg_tiles = [], []
        for row in seg_rows:
            first, n = row[SEG_FIRST_CHUNK], row[SEG_NUM_CHUNKS]
            mine = []
            for base in range(first, first + n, REDUCE_TILE):
                mine.append(len(tiles))
                tiles.append(list(range(base, min(base + REDUCE_TILE, first + n))))
            seg_tiles.append(mine)
        # A tile padded with zeros to any power of two >= its length has the same tree sum (x + 0 = x
        # for these non-negative sums): pad every tile to the widest one's power of two.
        width = 1
        while width < max([len(t) for t in tiles] + [1]):
            width *= 2
        zero_chunk, zero_tile = num_chunks, len(tiles)
        self.tile_index = torch.tensor([t + [zero_chunk] * (width - len(t)) for t in tiles] or [[zero_chunk]],
                                       dtype=torch.int64, device=device)
        depth = max([len(t) for t in seg_tiles] + [0])
        self.seg_tiles = torch.tensor([[t[k] if k < len(t) else zero_tile for t in seg_tiles] for k in range(depth)],
                                      dtype=torch.int64, device=device).reshape(depth, len(seg_rows))
        self.num_tiles = len(tiles)


def segment_sums(b) -> torch.Tensor:
    """[S, PART_COLS] per-segment sums of the chunk partials (w^2, d^2, g'^2), in the order of
    docs/SPEC.md."""
    plan = b.reduce_plan
    parts = torch.cat([b.partials[: b.num_chunks], b.partials.new_zeros(1, PART_COLS)])
    v = parts[plan.tile_index]                      # [tiles, width, cols]
    while v.shape[1] > 1:                           # one tree level: v[i] = v[2i] + v[2i+1]
        v = v[:, 0::2] + v[:, 1::2]
    tile_sums = torch.cat([v[: plan.num_tiles, 0], v.new_zeros(1, PART_COLS)])
    total = b.partials.new_zeros(b.num_segments, PART_COLS)
    for k in range(plan.seg_tiles.shape[0]):       # tiles in chunk order (one, below 4M elements)
        total = total + tile_sums[plan.seg_tiles[k]]
    return total


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt, as the kernels' (torch's own float32 sqrt is off by an ulp
    for ~16% of inputs on some CPU builds; through float64 it is exact for float32 inputs).
    float64: torch's sqrt (within an ulp)."""
    return x.double().sqrt().to(x.dtype) if x.dtype == torch.float32 else x.sqrt()


def finalize_stats(b, sums: torch.Tensor, keep: torch.Tensor) -> None:
    """Per-segment sums of w^2, d^2, g'^2 -> the stats row (docs/SPEC.md, "The trust ratio") of
    the segments updated now: norms after norm_clip, q, phi(t), g' norm, the weight decay pass 2
    applies."""
    tab = b.group_table[b.seg_table[:, SEG_GROUP]]
    seg_flags = b.seg_table[:, SEG_FLAGS]
    gflags = tab[:, COL_GFLAGS].to(torch.int64)
    clip = tab[:, COL_NORM_CLIP]
    norms = _sqrt(sums)
    wn = torch.minimum(norms[:, PART_W2], clip)
    dn = torch.minimum(norms[:, PART_D2], clip)
    gn = torch.minimum(norms[:, PART_G2], clip)
    t = b.step.reshape(()).to(b.acc_dtype)
    ph = phi(t, tab[:, COL_LMBDA], tab[:, COL_DELAY], tab[:, COL_ALPHA], tab[:, COL_GAMMA_MIN])
    one = torch.ones_like(ph)
    ph = torch.where((tab[:, COL_USE_PHI] != 0) & ~(t < tab[:, COL_HOLD]), ph, one)
    wd = torch.where((seg_flags & FLAG_SKIP_WEIGHT_DECAY) != 0, torch.zeros_like(ph), tab[:, COL_WEIGHT_DECAY])
    grad_form = (gflags & GF_GRAD_DENOMINATOR) != 0
    adapt = ((gflags & GF_NO_ADAPT) == 0) & ((seg_flags & FLAG_SKIP_ADAPTATION) == 0)
    nonzero = (wn > 0) & torch.where(grad_form, gn, dn).gt(0)
    denom = torch.where(grad_form, (gn + wd * wn) + tab[:, COL_EPS], dn + tab[:, COL_EPS])
    clip_q = (gflags & GF_TRUST_CLIP) != 0
    ratio = tab[:, COL_ETA] * ph * wn / denom
    fallback = torch.where(clip_q & ((gflags & GF_PLAIN_ZERO) == 0), _clip_ratio(one, tab[:, COL_LR]), one)
    q = torch.where(adapt & nonzero, torch.where(clip_q, _clip_ratio(ratio, tab[:, COL_LR]), ratio),
                    torch.where(adapt, fallback, one))
    wd = torch.where(adapt & ~nonzero & ((gflags & GF_PLAIN_ZERO) != 0), torch.zeros_like(wd), wd)
    apply = (b.seg_active != 0) & keep
    b.stats.copy_(torch.where(apply[:, None], torch.stack([wn, dn, q, ph, gn, wd], dim=1), b.stats))


def _clip_ratio(q: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """trust_clip: min(q / lr, 1), NaN staying NaN (torch.clamp)."""
    return torch.clamp(q / lr, max=1.0)
