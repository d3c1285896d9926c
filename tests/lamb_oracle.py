"""An independent LAMB for the tests, written from the paper and docs/SPEC.md ("## LAMB"), not from
this project's code: You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes" (arXiv 1904.00962), Algorithm 2, with the options of the SPEC.

Plain per-parameter torch ops, everything computed in float64 (whatever the parameters' dtype: the
result is rounded once to it), the moments kept in float64, bias corrections with Python's `**`.
It is a torch.optim.Optimizer, so param groups, zero_grad and LR schedulers work as usual; t is
optimizer-wide (`oracle.t`), as in the SPEC. `oracle.stats[p]` holds what the last step that
updated p computed: weight_norm (||w'||, clipped), update_norm (||u||), trust_ratio (q), step_scale
(s), grad_norm (||g'||) and weight_decay (wd, after the filter).

Per parameter with a gradient g, with k = t + 1:

    g' = -g if maximize else g
    wd = 0 if (weight_decay_filter and w.ndim == 1) else weight_decay
    adapts = adapt and (always_adapt or weight_decay != 0) and not (adaptation_filter and w.ndim == 1)
    x  = g' + wd*w (weight_decay_mode "l2") else g'
    m  = beta1*m + beta3*x   (beta3 = 1 - beta1 with grad_averaging, else 1)
    v  = beta2*v + (1 - beta2)*x*x
    r  = (m / bc1) / (sqrt(v / bc2) + eps)       bc = 1 - beta^k for "moments", else 1
    w' = w*(1 - lr*wd) ("decoupled") else w
    u  = r + wd*w ("update", the paper's Algorithm 2) else r
    q  = min(||w'||, clip) / (||u|| + ratio_eps) if adapts and both norms > 0, else 1
         (trust_clip, timm's lambc: min(q, 1))
    s  = sqrt(1 - beta2^k) / (1 - beta1^k) for "step_size", 1 / (1 - beta1^k) for "first_moment",
         else 1
    w  = w' - lr*s*q*u
"""
from __future__ import annotations

import math
from typing import Dict

import torch

F64 = torch.float64
BIAS_CORRECTIONS = ("moments", "step_size", "first_moment", "none")
WEIGHT_DECAY_MODES = ("update", "l2", "decoupled")


def bias_correction_name(value) -> str:
    if value is True:
        return "moments"
    if value is False:
        return "none"
    assert value in BIAS_CORRECTIONS, value
    return value


class OracleLAMB(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction="moments", weight_decay_mode="update", grad_averaging=True,
                 weight_norm_clip=None, ratio_eps=0.0, adapt=True, always_adapt=True,
                 weight_decay_filter=False, adaptation_filter=False, maximize=False, trust_clip=False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        weight_decay_mode=weight_decay_mode, grad_averaging=grad_averaging,
                        weight_norm_clip=weight_norm_clip, ratio_eps=ratio_eps, adapt=adapt,
                        always_adapt=always_adapt, weight_decay_filter=weight_decay_filter,
                        adaptation_filter=adaptation_filter, maximize=maximize, trust_clip=trust_clip)
        super().__init__(params, defaults)
        self.t = 0
        self.stats: Dict[torch.Tensor, Dict[str, float]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self.t + 1
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, ratio_eps = float(group["eps"]), float(group["ratio_eps"])
            mode = group["weight_decay_mode"]
            assert mode in WEIGHT_DECAY_MODES, mode
            correction = bias_correction_name(group["bias_correction"])
            beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
            if correction == "moments":
                bc1, bc2 = 1.0 - beta1 ** k, 1.0 - beta2 ** k
            else:
                bc1 = bc2 = 1.0
            if correction == "step_size":
                s = math.sqrt(1.0 - beta2 ** k) / (1.0 - beta1 ** k)
            elif correction == "first_moment":
                s = 1.0 / (1.0 - beta1 ** k)
            else:
                s = 1.0
            clip = group["weight_norm_clip"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.detach().to(F64)
                if group["maximize"]:
                    g = -g
                w = p.detach().to(F64)
                one_dim = p.ndim == 1
                wd = 0.0 if (group["weight_decay_filter"] and one_dim) else float(group["weight_decay"])
                adapts = (bool(group["adapt"]) and (bool(group["always_adapt"]) or float(group["weight_decay"]) != 0.0)
                          and not (group["adaptation_filter"] and one_dim))
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(w)
                    state["exp_avg_sq"] = torch.zeros_like(w)
                x = g + wd * w if (mode == "l2" and wd != 0.0) else g
                m = beta1 * state["exp_avg"] + beta3 * x
                v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * (x * x)
                r = (m / bc1) / (torch.sqrt(v / bc2) + eps)
                w1 = w * (1.0 - lr * wd) if (mode == "decoupled" and wd != 0.0) else w
                u = r + wd * w if (mode == "update" and wd != 0.0) else r
                wn = float(torch.linalg.vector_norm(w1))
                if clip is not None:
                    wn = min(wn, float(clip))
                un = float(torch.linalg.vector_norm(u))
                if adapts:
                    q = wn / (un + ratio_eps) if (wn > 0.0 and un > 0.0) else 1.0
                    if group["trust_clip"]:
                        q = min(q, 1.0)
                else:
                    q = 1.0
                p.copy_(w1 - ((lr * s) * q) * u)
                state["exp_avg"], state["exp_avg_sq"] = m, v
                self.stats[p] = dict(weight_norm=wn, update_norm=un, trust_ratio=q, step_scale=s,
                                     grad_norm=float(torch.linalg.vector_norm(g)), weight_decay=wd)
        self.t += 1
        return loss
