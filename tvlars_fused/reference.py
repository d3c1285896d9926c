"""Eager per-parameter TVLARS and LARS: the reference every fused path is checked against.

Written for clarity, not speed: one parameter at a time, exactly as docs/SPEC.md states the
algorithm. Low-precision (bfloat16/float16) parameters are updated in float32 with float32
momentum state, as the fused kernels do; float64 parameters in float64.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch

from .base import STEP, LayerwiseOptimizer, accumulation_dtype
from .hyperparams import adapts, options
from .schedule import phi

__all__ = ["TVLARS", "LARS", "phi"]


class ReferenceOptimizer(LayerwiseOptimizer):
    """The eager per-parameter loop. t is one CPU float32 tensor that every state entry's "step"
    points at (incremented in place)."""

    def __init__(self, params, defaults):
        self._t = torch.zeros((), dtype=torch.float32)
        super().__init__(params, defaults)

    def _step_tensor(self) -> torch.Tensor:
        return self._t

    def _load_step(self, t: float) -> None:
        self._t = torch.tensor(float(t), dtype=torch.float32)
        for st in self.state.values():
            if isinstance(st, dict) and st:
                st[STEP] = self._t

    def __setstate__(self, state):
        super().__setstate__(state)
        if "defaults" in state:   # unpickled or deep-copied: t lives in the state entries
            self._load_step(self._max_step(self.state))

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.begin_step(closure)
        # "step" entries written from outside (ZeroRedundancyOptimizer.load_state_dict): adopt t
        replaced = [st[STEP] for st in self.state.values()
                    if isinstance(st, dict) and STEP in st and st[STEP] is not self._t]
        if replaced:
            self._load_step(max(float(v) for v in replaced))
        t = float(self._t)
        for group in self.param_groups:
            scale = self.scale(group, t)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, scale)
        self._t += 1
        return loss

    def _update(self, p: torch.Tensor, group: Dict[str, Any], scale: float) -> None:
        """docs/SPEC.md for one parameter: scale is phi(t) (1 for LARS). Every product and sum is
        its own op (no FMA-prone alpha= arguments), as in the kernels."""
        acc = accumulation_dtype(p.dtype)
        w = p.detach().to(acc)
        g = p.grad.detach().to(acc)
        g = -g if group["maximize"] else g
        one_dim = p.ndim == 1
        wd = 0.0 if (group["weight_decay_filter"] and one_dim) else float(group["weight_decay"])
        d = g + w * wd if wd != 0.0 else g
        lr, momentum = group["lr"], group["momentum"]
        if isinstance(lr, torch.Tensor):   # any one-element shape ([[0.1]] included) acts as a scalar
            lr = lr.detach().reshape(()).to(device=w.device, dtype=acc)
        if adapts(group) and not (group["lars_adaptation_filter"] and one_dim):
            q, plain = self._trust_ratio(w, g, d, wd, group, scale, lr)
            d = torch.where(plain, g, d)       # plain_step_on_zero_norm: a zero norm, no weight decay
            d = q * d
        state = self.state[p]
        state[STEP] = self._t
        form = group["momentum_form"]
        if form == "paper":
            m = state.get("m")
            if m is None:
                m = state["m"] = w.clone()
            m_new = w - d * lr
            w_new = m_new + (m_new - m) * momentum
            m.copy_(m_new)
        else:
            buf = state.get("momentum_buffer")
            first = buf is None
            if first:
                buf = state["momentum_buffer"] = torch.zeros_like(w)
            if form == "heavy_ball":   # torch's SGD momentum: the first buffer is d itself
                if first:
                    buf.copy_(d)
                else:
                    buf.mul_(momentum).add_(d * (1.0 - group["dampening"]))
                step = d + buf * momentum if group["nesterov"] else buf
                w_new = w - step * lr
            else:                      # lr_scaled: TensorFlow's ApplyMomentum
                ld = d * lr
                buf.mul_(momentum).add_(ld)
                w_new = w - (ld + buf * momentum if group["nesterov"] else buf)
        p.copy_(w_new)

    @staticmethod
    def _trust_ratio(w, g, d, wd: float, group: Dict[str, Any], scale: float, lr):
        """q (a 0-dim tensor) and whether the step is plain (a zero norm with
        plain_step_on_zero_norm): docs/SPEC.md, "The trust ratio"."""
        wn, gn, dn = (torch.linalg.vector_norm(x) for x in (w, g, d))
        if group["norm_clip"] is not None:
            wn, gn, dn = (x.clamp(max=group["norm_clip"]) for x in (wn, gn, dn))
        grad_form = group["denominator"] == "grad"
        nonzero = (wn > 0) & ((gn if grad_form else dn) > 0)
        denom = (gn + wd * wn) + group["eps"] if grad_form else dn + group["eps"]
        ratio = group["eta"] * scale * wn / denom
        one = torch.ones_like(wn)
        if group["trust_clip"]:
            ratio = torch.clamp(ratio / lr, max=1.0)
            one = one if group["plain_step_on_zero_norm"] else torch.clamp(one / lr, max=1.0)
        plain = ~nonzero & group["plain_step_on_zero_norm"]
        return torch.where(nonzero, ratio, one), plain


class TVLARS(ReferenceOptimizer):
    """Eager reference TVLARS (arXiv 2309.14053); see docs/SPEC.md."""

    def __init__(self, params, lr: Union[float, torch.Tensor], momentum: float = 0.9, weight_decay: float = 5e-4,
                 eta: float = 1e-3, lmbda: float = 1e-3, delay_steps: float = 0, alpha: float = 1.0,
                 gamma_min: float = 0.0, hold_steps: float = 0, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball", denominator: str = "update", eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, always_adapt: bool = True,
                 plain_step_on_zero_norm: bool = False, nesterov: bool = False, dampening: float = 0.0,
                 maximize: bool = False):
        super().__init__(params, options(locals()))


class LARS(ReferenceOptimizer):
    """Eager reference LARS: TVLARS with phi(t) == 1 (the Barlow Twins LARS)."""
    tvlars = False

    def __init__(self, params, lr: Union[float, torch.Tensor], momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, weight_decay_filter: bool = False, lars_adaptation_filter: bool = False,
                 norm_clip: Optional[float] = None, momentum_form: str = "heavy_ball", denominator: str = "update",
                 eps: float = 0.0, trust_clip: bool = False, adapt: bool = True, always_adapt: bool = True,
                 plain_step_on_zero_norm: bool = False, nesterov: bool = False, dampening: float = 0.0,
                 maximize: bool = False):
        super().__init__(params, options(locals()))
