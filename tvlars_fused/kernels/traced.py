"""optimizer.step() inside torch.compile on the GPU backends (triton, cuda).

Dynamo cannot trace their launches (device guards, plans, bound launches), and the compiled graph
must see what a step reads and writes. A traced step calls the op `tvlars_fused::traced_bucket_step`
instead: its arguments are every tensor of the bucket the kernels touch (the extension's op schema)
and the bucket's serial; at run time it runs the backend's eager step on that bucket.

The compiled graph hands the op its own versions of the tensors it mutated earlier in the graph
(the uploaded tables, the gradients backward wrote, the parameters: AOTAutograd functionalizes
them and writes them back when the graph ends), not the bucket's memory, which the kernels address
by the bucket's own pointers and offsets. So the op copies each argument that is not the bucket's
memory into it before the step, and the step's results back out after: device copies, no host sync,
none at all where the graph passed the bucket's own tensors. (The CPU backend's op takes each
parameter by its own pointer and needs none of this.)
"""
from __future__ import annotations

from typing import List, Optional

import torch

# The bucket's tensors in the op's order after the parameters (BucketView attribute names), and
# which of them the step writes
TENSORS = ("w_offsets", "grad_buf", "state_buf", "seg_table", "seg_active", "chunk_table", "group_table", "step",
           "partials", "counters", "stats")
WRITTEN = ("state_buf", "step", "partials", "counters", "stats")


@torch.library.custom_op("tvlars_fused::traced_bucket_step",
                         mutates_args=("params", "state", "step", "partials", "counters", "stats"))
def traced_bucket_step(params: List[torch.Tensor], param_offsets: torch.Tensor, grads: torch.Tensor,
                       state: torch.Tensor, seg_table: torch.Tensor, seg_active: torch.Tensor,
                       chunk_table: torch.Tensor, group_table: torch.Tensor, step: torch.Tensor,
                       partials: torch.Tensor, counters: torch.Tensor, stats: torch.Tensor,
                       grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], bucket: int,
                       backend: str, variant: List[int]) -> None:
    """The eager step of bucket `bucket` (BucketView.serial) by backend `backend`, compiled for
    `variant` (the bucket's, as traced), on the values of the arguments, which receive the results."""
    from ..buckets import find_view
    from . import resolve
    view = find_view(bucket)
    if view is None or len(params) != len(view.weights):
        raise RuntimeError("tvlars_fused::traced_bucket_step: the optimizer whose step was compiled is gone or "
                           "rebuilt its buckets: compile the step again")
    given = (*params, param_offsets, grads, state, seg_table, seg_active, chunk_table, group_table, step,
             partials, counters, stats)
    own = (*view.weights, *(getattr(view, name) for name in TENSORS))
    written = set(range(len(params))) | {len(params) + TENSORS.index(name) for name in WRITTEN}
    copies = [i for i, (g, o) in enumerate(zip(given, own)) if g.data_ptr() != o.data_ptr()]
    if copies:
        torch._foreach_copy_([own[i] for i in copies], [given[i] for i in copies])
    view.use_traced_variant(tuple(variant))
    resolve(backend, view.device).bucket_step(view, grad_scale, found_inf)
    out = [i for i in copies if i in written]
    if out:
        torch._foreach_copy_([given[i] for i in out], [own[i] for i in out])


@traced_bucket_step.register_fake
def _(params, param_offsets, grads, state, seg_table, seg_active, chunk_table, group_table, step, partials,
      counters, stats, grad_scale, found_inf, bucket, backend, variant) -> None:
    return None


def traced_step(backend, view, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                between=None) -> None:
    """What `backend`.bucket_step(view, ...) traces to under torch.compile."""
    if between is not None:
        raise RuntimeError(f"backend={backend.NAME!r} cannot step sharded (FSDP2) parameters inside torch.compile "
                           "(the all-reduce between its two passes): leave optimizer.step() outside "
                           "torch.compile, or use backend='torch'")
    traced_bucket_step(list(view.weights), *(getattr(view, name) for name in TENSORS), grad_scale, found_inf,
                       view.serial, backend.NAME, list(view.variant))
