"""Eager per-parameter TVLARS, LARS and LAMB: the references every fused path is checked against.

Written for clarity, not speed: one parameter at a time, exactly as docs/SPEC.md states each
algorithm. Low-precision (bfloat16/float16) parameters are updated in float32 with float32 state,
as the fused kernels do; float64 parameters in float64.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch.optim.optimizer import required

from .algorithms import LAMB_ALGORITHM, LARS_ALGORITHM, TVLARS_ALGORITHM, adapts, options
from .algorithms.lamb import bias_correction_mode
from .base import STEP, LayerwiseOptimizer, accumulation_dtype, check_step
from .schedule import phi

__all__ = ["TVLARS", "LARS", "LAMB", "phi"]


def _norm(x: torch.Tensor) -> torch.Tensor:
    """sqrt of the sum of squares, as docs/SPEC.md's segment sums (torch's vector_norm returns |x|
    for one element, where the square may underflow to 0 or overflow)."""
    return torch.linalg.vector_norm(x) if x.numel() != 1 else (x * x).sum().sqrt()


class ReferenceOptimizer(LayerwiseOptimizer):
    """The eager per-parameter loop. t is one CPU float32 tensor that every state entry's "step"
    points at (incremented in place). Subclasses implement `_update(p, group, t)`."""

    def __init__(self, params, defaults):
        self._t = torch.zeros((), dtype=torch.float32)
        # id(p) -> the buffer just created for p, whose first update takes d itself (heavy_ball with
        # dampening, as torch's SGD; the fused classes' PENDING mark in the stats row)
        self._first_update: Dict[int, torch.Tensor] = {}
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
        # (loaded, unpickled or copied state is not waiting for a first update, as in the fused classes)
        self._first_update: Dict[int, torch.Tensor] = {}
        if "defaults" in state:   # unpickled or deep-copied: t lives in the state entries
            self._load_step(self._max_step(self.state))

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.begin_step(closure)
        # "step" entries written from outside (ZeroRedundancyOptimizer.load_state_dict): adopt t
        replaced = [st[STEP] for st in self.state.values()
                    if isinstance(st, dict) and STEP in st and st[STEP] is not self._t]
        if replaced:
            self._load_step(max(check_step(v) for v in replaced))
        t = float(self._t)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    st = self.state[p]
                    st[STEP] = self._t
                    self._follow_dtype(p, st)
                    self._update(p, group, t)
        self._t += 1
        return loss

    def _update(self, p: torch.Tensor, group: Dict[str, Any], t: float) -> None:
        raise NotImplementedError

    def _follow_dtype(self, p: torch.Tensor, st: Dict[str, Any]) -> None:
        """A parameter moved to another dtype or device (model.double(), model.to(...)) takes its
        state along at the state dtype of its new dtype (docs/SPEC.md), as the fused classes do; a
        first-update mark moves with the tensor it marks."""
        acc = accumulation_dtype(p.dtype)
        for key, value in st.items():
            if (key != STEP and isinstance(value, torch.Tensor) and value.is_floating_point()
                    and (value.dtype != acc or value.device != p.device)):
                st[key] = value.to(device=p.device, dtype=acc)
                if self._first_update.get(id(p)) is value:
                    self._first_update[id(p)] = st[key]


def _operands(p: torch.Tensor, group: Dict[str, Any]):
    """w and g' in the accumulation dtype, the weight decay after the ndim == 1 filter, and lr (a
    tensor lr as a 0-dim tensor of that dtype: any one-element shape acts as a scalar)."""
    acc = accumulation_dtype(p.dtype)
    w = p.detach().to(acc)
    g = p.grad.detach().to(acc)
    g = -g if group["maximize"] else g
    wd = 0.0 if (group["weight_decay_filter"] and p.ndim == 1) else float(group["weight_decay"])
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.detach().reshape(()).to(device=w.device, dtype=acc)
    return w, g, wd, lr


def _lr_float64(group: Dict[str, Any], device: torch.device) -> torch.Tensor:
    """lr as a 0-dim float64 tensor: products of lr with other hyperparameters are formed in
    float64 and rounded once (docs/SPEC.md), whether lr is a float or a tensor of any dtype."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        return lr.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


def _adapts(group: Dict[str, Any], p: torch.Tensor, filter_name: str) -> bool:
    return adapts(group) and not (group[filter_name] and p.ndim == 1)


class _LarsReference(ReferenceOptimizer):
    """TVLARS / LARS, docs/SPEC.md "The algorithm". Every product and sum is its own op (no
    FMA-prone alpha= arguments), as in the kernels."""

    def _update(self, p: torch.Tensor, group: Dict[str, Any], t: float) -> None:
        w, g, wd, lr = _operands(p, group)
        d = g + w * wd if wd != 0.0 else g
        momentum = group["momentum"]
        if _adapts(group, p, "lars_adaptation_filter"):
            q, plain = self._trust_ratio(w, g, d, wd, group, self._phi(group, t), lr)
            d = torch.where(plain, g, d)       # plain_step_on_zero_norm: a zero norm, no weight decay
            d = q * d
        state = self.state[p]
        form = group["momentum_form"]
        # another form's state (a momentum_form switched between "paper" and the others) is
        # dropped: the form's own starts afresh (as the fused classes do)
        state.pop("momentum_buffer" if form == "paper" else "m", None)
        if form == "paper":
            m = state.get("m")
            if m is None:
                m = state["m"] = w.clone()
            m_new = w - d * lr
            w_new = m_new + (m_new - m) * momentum
            m.copy_(m_new)
        else:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(w)
                if form == "heavy_ball" and group["dampening"] != 0:
                    self._first_update[id(p)] = buf   # torch's SGD: its first buffer is d itself
            if form == "heavy_ball" and momentum == 0:
                # torch's SGD keeps no buffer at momentum 0: the plain step, buf (and its mark) as it was
                w_new = w - d * lr
            elif form == "heavy_ball":
                if self._first_update.pop(id(p), None) is buf:
                    buf.copy_(d)
                else:
                    buf.mul_(momentum).add_(d * (1.0 - group["dampening"]))
                step = d + buf * momentum if group["nesterov"] else buf
                w_new = w - step * lr
            else:                      # lr_scaled: TensorFlow's ApplyMomentum
                if momentum != 0:   # (an update with momentum: the shared buffer's first)
                    self._first_update.pop(id(p), None)
                ld = d * lr
                buf.mul_(momentum).add_(ld)
                w_new = w - (ld + buf * momentum if group["nesterov"] else buf)
        p.copy_(w_new)

    def _phi(self, group: Dict[str, Any], t: float) -> float:
        """phi(t) for TVLARS (1 while t < hold_steps), 1 for LARS."""
        if not self.algorithm.tvlars or t < group["hold_steps"]:
            return 1.0
        return phi(t, group["lmbda"], group["delay_steps"], group["alpha"], group["gamma_min"])

    @staticmethod
    def _trust_ratio(w, g, d, wd: float, group: Dict[str, Any], scale: float, lr):
        """q (a 0-dim tensor) and whether the step is plain (a zero norm with
        plain_step_on_zero_norm): docs/SPEC.md, "The trust ratio"."""
        wn, gn, dn = (_norm(x) for x in (w, g, d))
        if group["norm_clip"] is not None:
            wn, gn, dn = (x.clamp(max=group["norm_clip"]) for x in (wn, gn, dn))
        grad_form = group["denominator"] == "grad"
        nonzero = (wn > 0) & ((gn if grad_form else dn) > 0)
        denom = (gn + wd * wn) + group["eps"] if grad_form else dn + group["eps"]
        ratio = group["eta"] * scale * wn / denom
        one = torch.ones_like(wn)
        if group["trust_clip"]:
            def clip(x):   # min(x / lr, 1), written so that lr = 0 gives 1 (docs/SPEC.md)
                return torch.where(x >= lr, torch.ones_like(x), x / lr)
            ratio = clip(ratio)
            one = one if group["plain_step_on_zero_norm"] else clip(one)
        plain = ~nonzero & group["plain_step_on_zero_norm"]
        return torch.where(nonzero, ratio, one), plain


class TVLARS(_LarsReference):
    """Eager reference TVLARS (arXiv 2309.14053); see docs/SPEC.md."""
    algorithm = TVLARS_ALGORITHM

    def __init__(self, params, lr: Union[float, torch.Tensor] = required, momentum: float = 0.9, *,
                 weight_decay: float = 5e-4, eta: float = 1e-3, lmbda: float = 1e-3, delay_steps: float = 0,
                 alpha: float = 1.0, gamma_min: float = 0.0, hold_steps: float = 0, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball", denominator: str = "update", eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, always_adapt: bool = True,
                 plain_step_on_zero_norm: bool = False, nesterov: bool = False, dampening: float = 0.0,
                 maximize: bool = False):
        super().__init__(params, options(locals()))


class LARS(_LarsReference):
    """Eager reference LARS: TVLARS with phi(t) == 1 (the Barlow Twins LARS)."""
    algorithm = LARS_ALGORITHM

    def __init__(self, params, lr: Union[float, torch.Tensor] = required, momentum: float = 0.9, *,
                 weight_decay: float = 0.0, eta: float = 1e-3, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball", denominator: str = "update", eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, always_adapt: bool = True,
                 plain_step_on_zero_norm: bool = False, nesterov: bool = False, dampening: float = 0.0,
                 maximize: bool = False):
        super().__init__(params, options(locals()))


class LAMB(ReferenceOptimizer):
    """Eager reference LAMB (You et al. 2019, Algorithm 2); see docs/SPEC.md, "LAMB"."""
    algorithm = LAMB_ALGORITHM

    def __init__(self, params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), *,
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: Union[str, bool] = "moments",
                 weight_decay_mode: str = "update", grad_averaging: bool = True,
                 weight_norm_clip: Optional[float] = None, ratio_eps: float = 0.0, adapt: bool = True,
                 always_adapt: bool = True, weight_decay_filter: bool = False, adaptation_filter: bool = False,
                 maximize: bool = False, trust_clip: bool = False):
        super().__init__(params, options(locals()))

    def _update(self, p: torch.Tensor, group: Dict[str, Any], t: float) -> None:
        w, g, wd, _ = _operands(p, group)
        mode = group["weight_decay_mode"]
        decay = wd != 0.0
        beta1, beta2 = (float(b) for b in group["betas"])
        beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(w)
            state["exp_avg_sq"] = torch.zeros_like(w)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        x = g + w * wd if mode == "l2" and decay else g
        m.copy_(m * beta1 + x * beta3)
        v.copy_(v * beta2 + (x * x) * (1.0 - beta2))
        k = t + 1
        bc1, bc2 = 1.0 - beta1 ** k, 1.0 - beta2 ** k
        moments = bias_correction_mode(group["bias_correction"]) == "moments"
        m_hat, v_hat = (m / bc1, v / bc2) if moments else (m, v)
        r = m_hat / (v_hat.sqrt() + group["eps"])
        lr64 = _lr_float64(group, w.device)   # SPEC: 1 - lr*wd and lr*s in float64, rounded once
        w_d = w * (1.0 - lr64 * wd).to(w.dtype) if mode == "decoupled" and decay else w
        u = r + w * wd if mode == "update" and decay else r
        q = torch.ones((), dtype=w.dtype, device=w.device)
        if _adapts(group, p, "adaptation_filter"):
            wn, un = _norm(w_d), _norm(u)
            if group["weight_norm_clip"] is not None:
                wn = wn.clamp(max=group["weight_norm_clip"])
            q = torch.where((wn > 0) & (un > 0), wn / (un + group["ratio_eps"]), q)
            if group["trust_clip"]:   # timm's lambc: min(q, 1), a NaN staying NaN
                q = torch.where(q > 1, torch.ones_like(q), q)
        s = {"step_size": math.sqrt(bc2) / bc1, "first_moment": 1.0 / bc1}.get(
            bias_correction_mode(group["bias_correction"]), 1.0)
        p.copy_(w_d - u * ((lr64 * s).to(w.dtype) * q))
