"""The backends that run the bucket step of docs/SPEC.md, behind one contract (Backend) and one
registry (resolve, available_backends):

- "triton": kernels/triton_backend.py, the main GPU path (CUDA tensors; CPU tensors only under the
  Triton interpreter, TRITON_INTERPRET=1, for tests);
- "cuda" / "cpu": the C++ extension in csrc/ (kernels/extension.py);
- "torch": kernels/torch_backend.py, plain torch ops, runs anywhere.

Every backend runs every algorithm (abi.ALGO_*). A backend module is imported on first use (triton
or the extension may be missing: the reason is kept and reported).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
# name -> (module, attribute): the backend object
_REGISTRY = {"triton": (".triton_backend", "BACKEND"), "cuda": (".extension", "CUDA_BACKEND"),
             "cpu": (".extension", "CPU_BACKEND"), "torch": (".torch_backend", "BACKEND")}
_loaded: Dict[str, object] = {}


class Backend:
    """The backend contract (docs/DESIGN.md, "The backend contract").

    - NAME: the name users pass as backend=...; CHUNK_ELEMS: elements per chunk (a multiple of 16),
      which the optimizer lays the bucket's chunk table out with; SUPPORTS_SHARDED: bucket_step
      honours `between` (FSDP2: the all-reduce of the segment sums between the passes);
      requirement: what available() needs, for error messages.
    - available(device): whether it can run buckets on `device`.
    - bucket_step(view, grad_scale, found_inf, between=None): one optimizer step of a bucket, given
      as a buckets.BucketView; no host sync, deterministic. grad_scale / found_inf are one-element
      float32 tensors on the bucket's device, or None (torch's fused AMP protocol). Per-bucket host
      objects (launch arguments, slices) go in view.plan(name, build), never on the bucket.
    """

    NAME: str
    CHUNK_ELEMS: int
    SUPPORTS_SHARDED: bool = False
    requirement: str = ""

    def available(self, device) -> bool:
        raise NotImplementedError

    def bucket_step(self, view, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    between: Optional[Callable] = None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.NAME!r}>"


def _load(name: str):
    """The backend object, or the reason it cannot be imported (a string)."""
    if name not in _loaded:
        module, attribute = _REGISTRY[name]
        try:
            _loaded[name] = getattr(importlib.import_module(module, __name__), attribute)
        except Exception as exc:  # missing triton / extension not built
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that runs buckets on `device`, with a clear error when it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            found = _load(name)
            if not isinstance(found, str) and found.available(device):
                return found
        raise RuntimeError(f"no backend can run tensors on {device}")  # torch always can
    found = _load(backend)
    if isinstance(found, str):
        raise RuntimeError(f"backend={backend!r} is not available: {found}. Use backend='auto' or 'torch'.")
    if not found.available(device):
        raise RuntimeError(f"backend={backend!r} cannot run parameters on {device}: {found.requirement}. "
                           "Use backend='auto' to pick one that can.")
    return found


def available_backends(device, names=("triton", "cuda", "cpu", "torch")) -> list:
    """The names among `names` (in that order) of the backends that can run tensors on `device`."""
    out = []
    for name in names:
        try:
            resolve(name, torch.device(device))
            out.append(name)
        except RuntimeError:
            pass
    return out
