"""phi(t), the time-varying scale of TVLARS (docs/SPEC.md):

    phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + gamma_min

It starts near 1/(alpha + exp(-lmbda*delay_steps)) + gamma_min (exploration) and decays to gamma_min.
Evaluated without overflow: with x = lmbda*(t - delay_steps) and e = exp(-|x|) <= 1,
    x > 0:  phi = e / (1 + alpha*e) + gamma_min       (exp(x) overflowing just gives gamma_min)
    x <= 0: phi = 1 / (alpha + e) + gamma_min
The kernels (Triton and csrc/algo/lars.h) evaluate the same two branches.
"""
from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[int, float]

__all__ = ["phi"]


def phi(t: Union[Number, torch.Tensor], lmbda: float, delay_steps: float, alpha: float,
        gamma_min: float) -> Union[float, torch.Tensor]:
    """phi(t) for a Python number (returns a float) or a tensor t (returns a tensor on t's device,
    float64 if t is float64 else float32; no host sync)."""
    if isinstance(t, torch.Tensor):
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        x = (t.to(dtype) - delay_steps) * lmbda
        e = torch.exp(-x.abs())
        return torch.where(x > 0, e / (1.0 + alpha * e), 1.0 / (alpha + e)) + gamma_min
    x = lmbda * (float(t) - delay_steps)
    e = math.exp(-abs(x))
    if x > 0:
        return e / (1.0 + alpha * e) + gamma_min
    denom = alpha + e
    return (math.inf if denom == 0.0 else 1.0 / denom) + gamma_min


def _main(argv=None) -> None:
    """python -m tvlars_fused.schedule: plot phi(t) to a PNG (the paper's decay plot)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tvlars_fused.schedule", description=_main.__doc__)
    ap.add_argument("--lmbda", type=float, nargs="+", default=[1e-3, 5e-3, 1e-2],
                    help="one curve per value")
    ap.add_argument("--delay-steps", type=float, default=0.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--gamma-min", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="phi.png")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise SystemExit(f"plotting needs matplotlib (pip install matplotlib): {exc}")
    ts = list(range(args.steps))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lm in args.lmbda:
        ax.plot(ts, [phi(t, lm, args.delay_steps, args.alpha, args.gamma_min) for t in ts],
                label=f"lmbda={lm:g}")
    ax.set_xlabel("step t")
    ax.set_ylabel("phi(t)")
    ax.set_title(f"TVLARS phi(t): delay_steps={args.delay_steps:g}, alpha={args.alpha:g}, "
                 f"gamma_min={args.gamma_min:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    _main()
