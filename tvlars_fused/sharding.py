"""FSDP2 (fully_shard) support: parameters are DTensors whose local shards hold only part of each
layer, while the trust ratio needs the norms of the whole layer. The per-segment partial sums of
the local shards are all-reduced (one collective per bucket, not one per parameter) between pass 1
and pass 2, and the trust ratios recomputed from them."""
from __future__ import annotations

from typing import List, Optional

import torch


def is_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter: its bucket mirrors the local shard (see buckets.py)."""
    return hasattr(p, "to_local") and hasattr(p, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def bucket_key(p: torch.Tensor) -> tuple:
    """Parameters that share a bucket: same device and dtype (and, for DTensors, same mesh and
    sharded mesh dims, so one all-reduce serves the whole bucket)."""
    if not is_sharded(p):
        return (p.device, p.dtype)
    return (local(p).device, p.dtype, p.device_mesh, _shard_dims(p))  # DeviceMesh compares by value


def _shard_dims(p) -> tuple:
    from torch.distributed.tensor import Shard
    return tuple(dim for dim, pl in enumerate(p.placements) if isinstance(pl, Shard))


def shard_groups(p) -> List:
    """The process groups over which a DTensor parameter is sharded."""
    return [p.device_mesh.get_group(dim) for dim in _shard_dims(p)]


def all_reduce_norms(bucket, groups: List, found_inf: Optional[torch.Tensor]) -> None:
    """Runs between pass 1 and pass 2 of a sharded bucket (a BucketView): sum the per-segment sums
    of squares over the shards (the process groups `groups`) and recompute the stats rows (norms,
    trust ratio) from the totals."""
    import torch.distributed as dist

    from .kernels.torch_backend import finalize_stats
    from .stats import keep_mask, segment_sums
    sums = segment_sums(bucket)
    for group in groups:
        dist.all_reduce(sums, group=group)
    finalize_stats(bucket, sums, keep_mask(bucket.device, found_inf), hand_off=False)
