"""backend="cpu" / backend="cuda": the C++/CUDA extension tvlars_fused._C (csrc/).

Importing this module imports tvlars_fused._C, which registers torch.ops.tvlars_fused.bucket_step
and bucket_step_at (CPU always; CUDA when the extension was compiled with nvcc against a CUDA build
of torch). Each bucket step is one op call: on the CPU a fused, multithreaded, cache-aware kernel;
on CUDA two kernel launches on the current stream, no host sync. CPU_BACKEND and CUDA_BACKEND are
the registry's objects (kernels.Backend).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from .. import _C  # noqa: F401  (loads the library: registers the op)
except ImportError as exc:  # not built: the caller falls back to another backend
    raise ImportError(
        "the C++ extension tvlars_fused._C is not built, so backend='cpu'/'cuda' is unavailable "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` (or `make install`) in the "
        "source tree, or use backend='auto'/'torch'.") from exc

from . import Backend
from .traced import traced_step

__all__ = ["WITH_CUDA", "bucket_step_op", "CPU_BACKEND", "CUDA_BACKEND"]

OP_NAME = "tvlars_fused::bucket_step"
bucket_step_op = torch.ops.tvlars_fused.bucket_step.default       # params as a list: traceable
bucket_step_at_op = torch.ops.tvlars_fused.bucket_step_at.default  # params by address: eager


def _has_kernel(dispatch_key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key))


#: True when the CUDA kernels were compiled into the extension.
WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0)) and _has_kernel("CUDA")


def _call(b, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    # Eager: the first parameter's address (the others by b.w_offsets, which sync_params keeps
    # true before every step) instead of a list of every parameter tensor to convert per call.
    # Traced (CPU only: CUDA traces to traced.py's op): the list, so that torch.compile sees which
    # tensors the op writes.
    compiling = torch.compiler.is_compiling()
    params = b.weights if compiling else b.weights[0].data_ptr()
    op = bucket_step_op if compiling else bucket_step_at_op
    op(params, b.w_offsets, b.grad_buf, b.state_buf, b.seg_table, b.seg_active, b.chunk_table, b.group_table, b.step,
       b.partials, b.counters, b.stats, None if grad_scale is None else grad_scale.reshape(1),
       None if found_inf is None else found_inf.reshape(1), b.chunk_elems, b.algorithm.id)


class CPUBackend(Backend):
    """The fused CPU kernel: at::parallel_for over segments and chunks, SIMD inner loops,
    deterministic for every thread count."""
    NAME = "cpu"
    # A chunk is the unit of the deterministic reduction and of the parallel split of a large
    # segment (16 KiB of float32 per buffer: a handful of chunks per thread even for mid-sized layers).
    CHUNK_ELEMS = 4096
    requirement = "CPU tensors (the C++ extension tvlars_fused._C)"

    def available(self, device) -> bool:
        return torch.device(device).type == "cpu"

    def bucket_step(self, view, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    between=None) -> None:
        _call(view, grad_scale, found_inf)


class CUDABackend(Backend):
    """The CUDA kernels: pass 1 (per-chunk partial sums, last block of a segment reduces them in
    chunk order) and pass 2 (elementwise update), on the current stream, no host sync."""
    NAME = "cuda"
    CHUNK_ELEMS = 4096
    requirement = ("CUDA tensors and a tvlars_fused._C compiled with its CUDA kernels "
                   "(nvcc and a CUDA build of torch at build time"
                   + ("" if WITH_CUDA else "; this build has none") + ")")

    def available(self, device) -> bool:
        return WITH_CUDA and torch.device(device).type == "cuda"

    def bucket_step(self, view, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    between=None) -> None:
        if torch.compiler.is_compiling():   # (the list op addresses the parameters from params[0])
            return traced_step(self, view, grad_scale, found_inf, between)
        _call(view, grad_scale, found_inf)


CPU_BACKEND = CPUBackend()
CUDA_BACKEND = CUDABackend()
