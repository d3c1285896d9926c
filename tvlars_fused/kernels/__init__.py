"""Backends that run the bucket step of docs/SPEC.md. Each backend module has NAME, CHUNK_ELEMS,
available(device) and bucket_step(bucket, grad_scale, found_inf).

- "triton": tvlars_fused/kernels/triton_lars.py, the main GPU path (CUDA tensors; CPU tensors only
  under the Triton interpreter, TRITON_INTERPRET=1, for tests);
- "cuda" / "cpu": the C++ extension in csrc/ (tvlars_fused/kernels/extension.py);
- "torch": tvlars_fused/kernels/torch_backend.py, plain torch ops, runs anywhere.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_MODULES = {"triton": ".triton_lars", "cuda": ".extension", "cpu": ".extension", "torch": ".torch_backend"}
_loaded: Dict[str, object] = {}


def _module(name: str):
    """The backend module, or the reason it cannot be imported (a string)."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name], __name__)
            if name in ("cuda", "cpu"):
                mod = mod.backend(name)
            _loaded[name] = mod
        except Exception as exc:  # missing triton / extension not built
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def resolve(backend: str, device: torch.device):
    """The backend module that runs buckets on `device`, with a clear error when it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            mod = _module(name)
            if not isinstance(mod, str) and mod.available(device):
                return mod
        raise RuntimeError(f"no backend can run tensors on {device}")  # torch always can
    mod = _module(backend)
    if isinstance(mod, str):
        raise RuntimeError(f"backend={backend!r} is not available: {mod}. Use backend='auto' or 'torch'.")
    if not mod.available(device):
        raise RuntimeError(f"backend={backend!r} cannot run parameters on {device}: {mod.requirement}. "
                           "Use backend='auto' to pick one that can.")
    return mod


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
