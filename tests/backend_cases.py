"""The (device, backend) cases of the suites that run each test on every fused backend of every
device present (tests/test_dropin.py, tests/test_reliability.py):

- the CPU: every backend of `available_backends("cpu")` ("torch", the C++ "cpu" op once
  tvlars_fused._C is built, "triton" under the Triton interpreter, that is without a GPU); test
  ids are the backend's name: `[torch]`, `[cpu]`, `[triton]`;
- a CUDA device, when present: every backend of `available_backends("cuda")` ("triton", the C++
  "cuda" ops, "torch"); ids name the device: `[cuda-triton]`, `[cuda-cuda]`, `[cuda-torch]`.

`case.reference` is the eager tvlars_fused.reference optimizer on the case's device (ids
`[reference]`, `[cuda-reference]`); `case.optimizer(cls, **hyper)` builds either.

The tests build their tensors on the CPU (CPU generators, torch.manual_seed: the same numbers on
every device) and move them with `.to(case.device)`; they compare results after moving them to the
CPU (parity.max_err does).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, List, Optional, Sequence

import torch

if not torch.cuda.is_available():   # (conftest.py does the same; kept for imports outside pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tvlars_fused  # noqa: E402
from tvlars_fused import reference as _reference  # noqa: E402
from tvlars_fused.kernels import available_backends  # noqa: E402

# The fused backends, in the order of the cases (and of the test ids) on each device.
FUSED_BACKENDS = ("torch", "cpu", "cuda", "triton")
REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class BackendCase:
    """One fused backend (or the eager reference) on one device."""
    device: str
    backend: str   # a fused backend name, or "reference"

    @property
    def id(self) -> str:
        return self.backend if self.device == "cpu" else f"{self.device}-{self.backend}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def from_id(cls, case_id: str) -> "BackendCase":
        """The case with this id ("triton": the CPU; "cuda-triton": device "cuda")."""
        device, _, backend = case_id.rpartition("-")
        return cls(device or "cpu", backend)

    @property
    def fused(self) -> bool:
        return self.backend != REFERENCE

    @property
    def interpreted(self) -> bool:
        """Triton kernels on CPU tensors, under the Triton interpreter (~0.2 s a step)."""
        return self.backend == "triton" and torch.device(self.device).type == "cpu"

    @property
    def reference(self) -> "BackendCase":
        """The eager reference on this case's device."""
        return dataclasses.replace(self, backend=REFERENCE)

    def optimizer(self, cls: str = "TVLARS", **hyper) -> Callable:
        """A factory params -> optimizer: tvlars_fused.<cls> with this backend (the parameters
        must be on this case's device), or tvlars_fused.reference.<cls>."""
        def build(params):
            if not self.fused:
                return getattr(_reference, cls)(params, **hyper)
            return getattr(tvlars_fused, cls)(params, backend=self.backend, **hyper)
        return build


def devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(on: Optional[Sequence[str]] = None, names: Sequence[str] = FUSED_BACKENDS) -> List[BackendCase]:
    """The cases of the backends among `names` that can run tensors on each device of `on`
    (default: every device present)."""
    return [BackendCase(dev, b) for dev in (devices() if on is None else on)
            for b in available_backends(dev, tuple(names))]


def with_reference(cases: Iterable[BackendCase]) -> List[BackendCase]:
    """The cases, then the reference on each of their devices (once per device)."""
    cases = list(cases)
    refs: List[BackendCase] = []
    for c in cases:
        if all(r.id != c.reference.id for r in refs):
            refs.append(c.reference)
    return cases + refs


def params(cases: Iterable[BackendCase]) -> list:
    """pytest params, one per case, with the case's id."""
    return [pytest.param(c, id=c.id) for c in cases]


# Every fused backend on every device present, and those on the CPU only (for the tests that are
# CPU-only by nature; each test file lists its own with the reason).
CASES: List[BackendCase] = backend_cases()
CPU_CASES: List[BackendCase] = backend_cases(["cpu"])
