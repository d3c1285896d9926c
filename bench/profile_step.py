"""Where step()'s host time goes: for each implementation, the host time per step (perf_counter over
N steps issued back to back, no sync between them) and a cProfile of those steps, the top functions
by their own time (Python and the C calls it makes: Triton's launcher, torch ops, the extension's
op). On a GPU the host-bound sets (host161, host2000) show what a step pays besides its kernels.

    python -m bench.profile_step --set host161 --impls fused-triton,fused-cuda,sgd-fused --steps 300

Implementations are the benchmark's (bench/implementations.py), plus `fused-triton-jit` (CUDA
only: fused-triton with every launch through Triton's JIT, see TritonJit); one that cannot run here
is named and skipped. Every implementation takes the same number of steps, so fused-triton-jit's
parameters are compared bit for bit with fused-triton's at the end.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from . import implementations as I
from . import shapes


class TritonJit:
    """fused-triton with every launch through Triton's JIT (TritonBackend.bind_launches off): what
    the bound launches (triton_backend._Bound) save, side by side in one process."""

    name = "fused-triton-jit"

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise I.Unavailable("needs a CUDA device (on the CPU both are the interpreter's)")
        from tvlars_fused.kernels import triton_backend as TB

        self.backend = TB.TritonBackend()
        self.backend.bind_launches = False
        self.impl = I.make("fused-triton", device)
        self.device = device

    def setup(self, params) -> None:
        self.impl.setup(params)
        for b in self.impl.opt._buckets:
            b.backend = self.backend

    def step(self) -> None:
        self.impl.step()


def make(name: str, device: torch.device):
    return TritonJit(device) if name == TritonJit.name else I.make(name, device)


def params_for(set_name: str, device: torch.device, dtype: torch.dtype):
    """Fresh parameters of the set with fixed random weights and gradients (as the benchmark)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for shape in shapes.SETS[set_name]:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.05).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 0.01).to(device=device, dtype=dtype)
        out.append(p)
    return out


def host_us_per_step(impl, steps: int, rounds: int = 5) -> float:
    """Median over rounds of the host time per step; the device is drained between rounds, so
    a round measures host time unless the device falls behind (then it is the device's time)."""
    sync = torch.cuda.synchronize if impl.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            impl.step()
        times.append((time.perf_counter() - t0) / steps * 1e6)
    sync()
    return statistics.median(times)


def profile(impl, steps: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        impl.step()
    prof.disable()
    if impl.device.type == "cuda":
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:]).rstrip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="host161", choices=sorted(shapes.SETS))
    ap.add_argument("--impls", default="fused-triton,fused-triton-jit,fused-cuda,fused-cpu,sgd-fused",
                    help="comma-separated benchmark implementations (bench/implementations.py), "
                         "or fused-triton-jit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=300, help="steps per timed round and profiled")
    ap.add_argument("--top", type=int, default=20, help="functions listed per implementation")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    n_tensors, n_params = shapes.count(args.set)
    print(f"{args.set}: {n_tensors} tensors, {n_params:,} params, {args.dtype} on {device}; "
          f"{args.steps} steps per round")
    final = {}
    for name in args.impls.split(","):
        try:
            impl = make(name, device)
            params = params_for(args.set, device, dtype)
            impl.setup(params)
        except I.Unavailable as exc:
            print(f"\n== {name}: not run ({exc})")
            continue
        try:
            for _ in range(10):   # warm-up: compiles, first-step state, caches
                impl.step()
            us = host_us_per_step(impl, args.steps)
            table = profile(impl, args.steps, args.top)
        except Exception as exc:   # (an experiment that fails must not cost the rows after it)
            print(f"\n== {name}: failed: {type(exc).__name__}: {exc}")
            continue
        print(f"\n== {name}: {us:.1f} us/step (host, median of 5 rounds)\n{table}")
        final[name] = [p.detach().clone() for p in params]
    if "fused-triton" in final and TritonJit.name in final:
        same = all(torch.equal(a, b) for a, b in zip(final["fused-triton"], final[TritonJit.name]))
        print(f"\n{TritonJit.name} ended with the same bits as fused-triton: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
