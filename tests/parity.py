"""Shared parity harness: train the same parameters with a reference and a fused optimizer and
compare them by the project's rule (docs/SPEC.md, tests/README):

- float32: the fused run's max error against a float64 reference run must be at most 2x the
  float32 reference run's error against it, plus a tiny absolute floor;
- bfloat16/float16: within a few units in the last place of the reference run in the same dtype.

Gradients are exact and fresh every step: the loss is sum_p (p * c_p).sum() with c_p drawn in
float64 from a per-step seed, so backward (the fast path through the bucket views) produces
grad = c_p in the parameter dtype, identically for every optimizer.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

# 1-D, 2-D, 4-D, larger than one 4096-element chunk (several chunks, last one partial), tiny ones,
# and numels that are not multiples of 16 or of the chunk.
SHAPES = [(7,), (33,), (16, 9), (4, 3, 3, 3), (5000,), (70, 130), (1,), (1, 1), (3, 4097)]


def make_init(shapes: Sequence[tuple], seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def init_with_zero(shapes: Sequence[tuple], zero: Optional[int]) -> List[torch.Tensor]:
    """make_init(shapes) with tensor `zero` (if not None) all zeros: a layer with ||w|| = 0, q = 1."""
    init = make_init(shapes)
    if zero is not None:
        init[zero].zero_()
    return init


def used(step: int, i: int) -> bool:
    """Some None grads: param 2 every third step, param 3 not before step 4 (the paper form's m = w
    starts late), param 7 on odd steps."""
    return not ((i == 2 and step % 3 == 0) or (i == 3 and step < 4) or (i == 7 and step % 2 == 1))


def grads_for_step(shapes: Sequence[tuple], step: int, seed: int = 1, scale: float = 1.0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return [scale * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def train(make_opt: Callable, init: Sequence[torch.Tensor], dtype: torch.dtype, steps: int,
          device="cpu", used: Optional[Callable[[int, int], bool]] = None, seed: int = 1,
          grad_scale: float = 1.0, per_step: Optional[Callable] = None, zero_grad: Sequence[int] = ()):
    """Run `steps` optimizer steps; `used(step, i)` False leaves parameter i out of the loss
    (its .grad stays None after zero_grad, as for an unused branch); parameters listed in
    `zero_grad` get a gradient of exact zeros every step."""
    params = [torch.nn.Parameter(x.clone().to(device=device, dtype=dtype)) for x in init]
    opt = make_opt(params)
    shapes = [tuple(x.shape) for x in init]
    for s in range(steps):
        opt.zero_grad()
        cs = grads_for_step(shapes, s, seed, grad_scale)
        terms = [(p * (torch.zeros_like(c) if i in zero_grad else c).to(device=device, dtype=dtype)).sum()
                 for i, (p, c) in enumerate(zip(params, cs)) if used is None or used(s, i)]
        if terms:
            torch.stack([t.to(torch.float64) for t in terms]).sum().backward()
        opt.step()
        if per_step is not None:
            per_step(s, opt, params)
    return params, opt


def max_err(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max([float((x.detach().double().cpu() - y.detach().double().cpu()).abs().max())
                for x, y in zip(a, b) if x.numel()] + [0.0])


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    """max |a - e| / max(1, max |e|), in float64: a parameter's error against its size."""
    if not e.numel():
        return 0.0
    a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
    return float((a64 - e64).abs().max()) / max(1.0, float(e64.abs().max()))


def assert_parity_fp32(fused, ref32, ref64, what: str = "") -> tuple:
    e_fused, e_ref = max_err(fused, ref64), max_err(ref32, ref64)
    scale = max([float(x.detach().abs().max()) for x in ref64 if x.numel()] + [1.0])
    floor = 4 * torch.finfo(torch.float32).eps * scale
    assert e_fused <= 2 * e_ref + floor, (
        f"{what}: fused float32 error {e_fused:.3e} > 2 x reference float32 error {e_ref:.3e} + floor {floor:.1e}")
    return e_fused, e_ref


def assert_close_ulps(actual, expected, dtype: torch.dtype, max_ulps: float, what: str = "") -> float:
    """|actual - expected| <= max_ulps * ulp(expected), elementwise, ulp in `dtype`; returns the worst."""
    worst = 0.0
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    for a, e in zip(actual, expected):
        if not e.numel():
            continue
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        ulp = torch.clamp(e64.abs() * eps, min=tiny)
        worst = max(worst, float(((a64 - e64).abs() / ulp).max()))
    assert worst <= max_ulps, f"{what}: {worst:.2f} ulps > {max_ulps}"
    return worst


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bits (an integer view of the same width, on the CPU): exact comparisons that tell
    -0.0 from 0.0 and compare NaN payloads."""
    t = t.detach().reshape(-1).cpu()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def weights_flat(bucket) -> torch.Tensor:
    """A copy of a bucket's weights (the parameters' memory the kernels update), concatenated."""
    return torch.cat([w.detach().reshape(-1) for w in bucket.weights]).clone()
