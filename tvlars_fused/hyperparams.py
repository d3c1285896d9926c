"""Hyperparameters shared by the reference and the fused optimizers: defaults, validation, and
how a param group becomes a row of the group table (layout: abi.py; meaning: docs/SPEC.md)."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch

from .abi import (COL_ALPHA, COL_DELAY, COL_EPS, COL_ETA, COL_FORM, COL_GAMMA_MIN, COL_GFLAGS, COL_GRAD_SIGN,
                  COL_HOLD, COL_LMBDA, COL_LR, COL_MOMENTUM, COL_NORM_CLIP, COL_UNDAMPED, COL_USE_PHI,
                  COL_WEIGHT_DECAY, FLAG_SKIP_ADAPTATION, FLAG_SKIP_WEIGHT_DECAY, FORMS, GF_GRAD_DENOMINATOR,
                  GF_NESTEROV, GF_NO_ADAPT, GF_PLAIN_ZERO, GF_TRUST_CLIP, GROUP_COLS)

MOMENTUM_FORMS = tuple(FORMS)          # "heavy_ball", "paper", "lr_scaled"
DENOMINATORS = ("update", "grad")

# The options every LARS-family group has (LARS's defaults; TVLARS adds the schedule and its own
# weight decay). Each default keeps the behaviour the option did not exist for: a state_dict saved
# before an option existed loads with it.
LARS_DEFAULTS: Dict[str, Any] = dict(
    momentum=0.9, weight_decay=0.0, eta=1e-3, weight_decay_filter=False, lars_adaptation_filter=False,
    norm_clip=None, momentum_form="heavy_ball", denominator="update", eps=0.0, trust_clip=False,
    adapt=True, always_adapt=True, plain_step_on_zero_norm=False, nesterov=False, dampening=0.0,
    maximize=False,
)
TVLARS_DEFAULTS: Dict[str, Any] = dict(
    LARS_DEFAULTS, weight_decay=5e-4, lmbda=1e-3, delay_steps=0, alpha=1.0, gamma_min=0.0, hold_steps=0,
)

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def options(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """A constructor's hyperparameters (its locals() minus self, params and backend): the
    param-group defaults."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "backend", "__class__")}
_BOOLS = ("weight_decay_filter", "lars_adaptation_filter", "trust_clip", "adapt", "always_adapt",
          "plain_step_on_zero_norm", "nesterov", "maximize")


def _real(name: str, value: Any, tensor_ok: bool = False, at: str = "") -> float:
    if isinstance(value, torch.Tensor):
        if not tensor_ok:
            raise ValueError(f"{name} must be a Python number, got a tensor{at}; only lr may be a tensor")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}{at}")
        return None  # tensors (e.g. a device lr) are checked on the device only, never synced
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}{at}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}{at}")
    return float(value)


def adapts(group: Dict[str, Any]) -> bool:
    """Whether the group uses the layer-wise trust ratio at all (timm's always_adapt=False: only
    when it has weight decay)."""
    return bool(group["adapt"]) and (bool(group["always_adapt"]) or float(group["weight_decay"]) != 0.0)


def validate_group(group: Dict[str, Any], tvlars: bool, where: str = "") -> None:
    """Raise ValueError naming the first invalid (or contradictory) hyperparameter of a group."""
    at = f" (in {where})" if where else ""
    lr = _real("lr", group["lr"], tensor_ok=True, at=at)
    if lr is not None and lr < 0.0:
        raise ValueError(f"Invalid lr: {lr}{at}; the learning rate must be >= 0")
    momentum = _real("momentum", group["momentum"], at=at)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum}{at}; it must lie in [0, 1)")
    wd = _real("weight_decay", group["weight_decay"], at=at)
    if wd < 0.0:
        raise ValueError(f"Invalid weight_decay: {wd}{at}; it must be >= 0")
    eta = _real("eta", group["eta"], at=at)
    if eta <= 0.0:
        raise ValueError(f"Invalid eta: {eta}{at}; the trust coefficient must be > 0")
    form = group["momentum_form"]
    if form not in MOMENTUM_FORMS:
        raise ValueError(f"Invalid momentum_form: {form!r}{at}; use one of {MOMENTUM_FORMS}")
    clip = group["norm_clip"]
    if clip is not None:
        clip = _real("norm_clip", clip, at=at)
        if clip <= 0.0:
            raise ValueError(f"Invalid norm_clip: {clip}{at}; use a value > 0, or None for no clipping")
    for flag in _BOOLS:
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r}{at}; it must be True or False")
    if group["denominator"] not in DENOMINATORS:
        raise ValueError(f"Invalid denominator: {group['denominator']!r}{at}; use 'update' (||g + wd*w||, "
                         "Barlow Twins and the TVLARS authors) or 'grad' (||g|| + wd*||w||, You et al. 2017, "
                         "apex LARC, timm, Lightning, MLPerf)")
    eps = _real("eps", group["eps"], at=at)
    if eps < 0.0:
        raise ValueError(f"Invalid eps: {eps}{at}; the denominator's epsilon must be >= 0")
    dampening = _real("dampening", group["dampening"], at=at)
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"Invalid dampening: {dampening}{at}; it must lie in [0, 1]")
    if group["nesterov"] and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(f"Invalid nesterov=True{at}: Nesterov momentum requires momentum > 0 and dampening = 0 "
                         f"(got momentum={momentum}, dampening={dampening}), as in torch.optim.SGD")
    if form == "paper" and (group["nesterov"] or dampening != 0.0):
        raise ValueError(f"Invalid nesterov/dampening with momentum_form='paper'{at}: the paper's momentum has "
                         "neither; use momentum_form='heavy_ball' (torch's SGD momentum) for them")
    if form == "lr_scaled" and dampening != 0.0:
        raise ValueError(f"Invalid dampening with momentum_form='lr_scaled'{at}: TensorFlow's momentum has no "
                         "dampening; use momentum_form='heavy_ball' for it")
    if group["trust_clip"]:
        if not adapts(group):
            raise ValueError(
                f"Invalid trust_clip=True{at}: this group does not adapt (adapt=False, or always_adapt=False "
                "with weight_decay=0), so there is no trust ratio to clip; remove trust_clip or let it adapt")
        if lr == 0.0:
            raise ValueError(f"Invalid trust_clip=True with lr=0{at}: the clip is min(q/lr, 1); use lr > 0")
    if not tvlars:
        return
    for name in ("lmbda", "alpha", "gamma_min", "hold_steps"):
        value = _real(name, group[name], at=at)
        if value < 0.0:
            raise ValueError(f"Invalid {name}: {value}{at}; it must be >= 0")
    _real("delay_steps", group["delay_steps"], at=at)
    # phi(t) is largest at t = 0; it must be representable in float32, the kernels' precision.
    x0 = -float(group["lmbda"]) * float(group["delay_steps"])
    denom = float(group["alpha"]) + math.exp(max(min(x0, 700.0), -745.0))
    peak = math.inf if denom == 0.0 else 1.0 / denom
    if not peak + float(group["gamma_min"]) < _FLOAT32_MAX:
        raise ValueError(
            f"Invalid lmbda/delay_steps/alpha{at}: phi(0) = 1/(alpha + exp(-lmbda*delay_steps)) overflows "
            f"float32 (alpha={group['alpha']}, lmbda={group['lmbda']}, delay_steps={group['delay_steps']}); "
            "use alpha > 0 or a smaller lmbda * delay_steps")


def group_flags(group: Dict[str, Any]) -> int:
    """The group's switches as the bits of the group table's flags column."""
    flags = 0
    if group["denominator"] == "grad":
        flags |= GF_GRAD_DENOMINATOR
    if group["trust_clip"]:
        flags |= GF_TRUST_CLIP
    if not adapts(group):
        flags |= GF_NO_ADAPT
    if group["plain_step_on_zero_norm"]:
        flags |= GF_PLAIN_ZERO
    if group["nesterov"]:
        flags |= GF_NESTEROV
    return flags


def group_row(group: Dict[str, Any], tvlars: bool) -> list:
    """One row of the per-group table, as Python floats (a tensor lr is filled in on the device)."""
    lr = group["lr"]
    row = [0.0] * GROUP_COLS
    row[COL_LR] = 0.0 if isinstance(lr, torch.Tensor) else float(lr)
    row[COL_MOMENTUM] = float(group["momentum"])
    row[COL_WEIGHT_DECAY] = float(group["weight_decay"])
    row[COL_ETA] = float(group["eta"])
    if tvlars:
        row[COL_LMBDA] = float(group["lmbda"])
        row[COL_DELAY] = float(group["delay_steps"])
        row[COL_ALPHA] = float(group["alpha"])
        row[COL_GAMMA_MIN] = float(group["gamma_min"])
        row[COL_HOLD] = float(group["hold_steps"])
        row[COL_USE_PHI] = 1.0
    row[COL_NORM_CLIP] = math.inf if group["norm_clip"] is None else float(group["norm_clip"])
    row[COL_FORM] = float(FORMS[group["momentum_form"]])
    row[COL_EPS] = float(group["eps"])
    row[COL_UNDAMPED] = 1.0 - float(group["dampening"])   # (as torch's alpha=1 - dampening, in float64)
    row[COL_GRAD_SIGN] = -1.0 if group["maximize"] else 1.0
    row[COL_GFLAGS] = float(group_flags(group))
    return row


def segment_flags(group: Dict[str, Any], ndim: int) -> int:
    flags = 0
    if group["weight_decay_filter"] and ndim == 1:
        flags |= FLAG_SKIP_WEIGHT_DECAY
    if group["lars_adaptation_filter"] and ndim == 1:
        flags |= FLAG_SKIP_ADAPTATION
    return flags
