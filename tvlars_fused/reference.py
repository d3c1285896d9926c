"""Eager per-parameter TVLARS and LARS: the reference every fused path is checked against.

Written for clarity, not speed: one parameter at a time, exactly as docs/SPEC.md states the
algorithm. Low-precision (bfloat16/float16) parameters are updated in float32 with float32
momentum state, as the fused kernels do; float64 parameters in float64.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .base import STEP_KEY, LarsFamilyBase, accumulation_dtype
from .hyperparams import LARS_DEFAULTS, TVLARS_DEFAULTS, validate_group
from .schedule import phi

__all__ = ["TVLARS", "LARS", "phi"]


class _EagerLars(LarsFamilyBase):
    @torch.no_grad()
    def step(self, closure=None):
        loss = self.begin_step(closure)
        t = float(self.state[STEP_KEY])
        for group in self.param_groups:
            scale = self.scale(group, t)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, scale)
        self.state[STEP_KEY] += 1
        return loss

    def _update(self, p: torch.Tensor, group: Dict[str, Any], scale: float) -> None:
        acc = accumulation_dtype(p.dtype)
        w = p.detach().to(acc)
        d = p.grad.detach().to(acc, copy=True)
        one_dim = p.ndim == 1
        if not (group["weight_decay_filter"] and one_dim):
            d.add_(w, alpha=group["weight_decay"])
        if not (group["lars_adaptation_filter"] and one_dim):
            wn = torch.linalg.vector_norm(w)
            dn = torch.linalg.vector_norm(d)
            if group["norm_clip"] is not None:
                wn = wn.clamp(max=group["norm_clip"])
                dn = dn.clamp(max=group["norm_clip"])
            q = torch.where((wn > 0) & (dn > 0), group["eta"] * scale * wn / dn, torch.ones_like(wn))
            d.mul_(q)
        lr, momentum = group["lr"], group["momentum"]
        state = self.state[p]
        if group["momentum_form"] == "heavy_ball":
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(w)
            buf.mul_(momentum).add_(d)
            w_new = w - buf * lr if isinstance(lr, torch.Tensor) else w.sub(buf, alpha=lr)
        else:
            m = state.get("m")
            if m is None:
                m = state["m"] = w.clone()
            m_new = w - d * lr if isinstance(lr, torch.Tensor) else w.sub(d, alpha=lr)
            w_new = m_new + (m_new - m) * momentum
            m.copy_(m_new)
        p.copy_(w_new)


class TVLARS(_EagerLars):
    """Eager reference TVLARS (arXiv 2309.14053); see docs/SPEC.md."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 eta: float = 1e-3, lmbda: float = 1e-3, delay_steps: float = 0, alpha: float = 1.0,
                 gamma_min: float = 0.0, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball"):
        defaults = dict(TVLARS_DEFAULTS, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lmbda=lmbda, delay_steps=delay_steps, alpha=alpha, gamma_min=gamma_min,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter, norm_clip=norm_clip,
                        momentum_form=momentum_form)
        validate_group(defaults, tvlars=True, where="the constructor arguments")
        super().__init__(params, defaults)


class LARS(_EagerLars):
    """Eager reference LARS: TVLARS with phi(t) == 1 (the Barlow Twins LARS)."""
    _tvlars = False

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball"):
        defaults = dict(LARS_DEFAULTS, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter, norm_clip=norm_clip,
                        momentum_form=momentum_form)
        validate_group(defaults, tvlars=False, where="the constructor arguments")
        super().__init__(params, defaults)

    def scale(self, group, t):
        return 1.0
