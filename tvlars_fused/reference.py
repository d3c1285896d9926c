"""Eager per-parameter TVLARS and LARS: the reference every fused path is checked against.

Written for clarity, not speed: one parameter at a time, exactly as docs/SPEC.md states the
algorithm. Low-precision (bfloat16/float16) parameters are updated in float32 with float32
momentum state, as the fused kernels do; float64 parameters in float64.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .base import STEP, LayerwiseOptimizer, accumulation_dtype
from .hyperparams import LARS_DEFAULTS, TVLARS_DEFAULTS
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
        if isinstance(lr, torch.Tensor):   # any one-element shape ([[0.1]] included) acts as a scalar
            lr = lr.detach().reshape(()).to(device=w.device, dtype=acc)
        # (w - buf * lr, never sub(alpha=lr): torch may fuse that into an FMA; a number and a tensor
        # lr must give the same bits, as in the kernels)
        state = self.state[p]
        state[STEP] = self._t
        if group["momentum_form"] == "heavy_ball":
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(w)
            buf.mul_(momentum).add_(d)
            w_new = w - buf * lr
        else:
            m = state.get("m")
            if m is None:
                m = state["m"] = w.clone()
            m_new = w - d * lr
            w_new = m_new + (m_new - m) * momentum
            m.copy_(m_new)
        p.copy_(w_new)


class TVLARS(ReferenceOptimizer):
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
        super().__init__(params, defaults)


class LARS(ReferenceOptimizer):
    """Eager reference LARS: TVLARS with phi(t) == 1 (the Barlow Twins LARS)."""
    tvlars = False

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball"):
        defaults = dict(LARS_DEFAULTS, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        weight_decay_filter=weight_decay_filter,
                        lars_adaptation_filter=lars_adaptation_filter, norm_clip=norm_clip,
                        momentum_form=momentum_form)
        super().__init__(params, defaults)
