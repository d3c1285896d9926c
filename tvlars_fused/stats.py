"""The per-segment sums of docs/SPEC.md in torch ops, backend-neutral: chunk partial sums ->
per-segment sums, in the order the spec fixes ("The segment sum"). The torch backend reduces with
these, and sharded (FSDP2) buckets all-reduce them between the passes (sharding.py); each
algorithm turns them into its stats row (kernels/torch_<algorithm>.py)."""
from __future__ import annotations

from typing import List, Optional

import torch

from .abi import PART_COLS, REDUCE_TILE, SEG_FIRST_CHUNK, SEG_NUM_CHUNKS


def keep_mask(device: torch.device, found_inf: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim bool on `device`: False when GradScaler found an inf/nan (then nothing changes)."""
    if found_inf is None:
        return torch.ones((), dtype=torch.bool, device=device)
    return found_inf.reshape(()) == 0


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded sqrt, as the kernels' (torch's own float32 sqrt is off by an ulp for ~16%
    of inputs on some CPU builds; through float64 it is exact for float32 inputs). float64:
    torch's sqrt (within an ulp)."""
    return x.double().sqrt().to(x.dtype) if x.dtype == torch.float32 else x.sqrt()


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
    """[S, PART_COLS] per-segment sums of the chunk partials of a bucket (a BucketView), in the
    order of docs/SPEC.md."""
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
