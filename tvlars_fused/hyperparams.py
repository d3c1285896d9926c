"""Hyperparameters shared by the reference and the fused optimizers: defaults, validation, and
how a param group becomes a row of the group table (layout: abi.py)."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch

from .abi import (COL_ALPHA, COL_DELAY, COL_ETA, COL_GAMMA_MIN, COL_LMBDA, COL_LR, COL_MOMENTUM,
                  COL_NORM_CLIP, COL_PAPER_FORM, COL_USE_PHI, COL_WEIGHT_DECAY, FLAG_SKIP_ADAPTATION,
                  FLAG_SKIP_WEIGHT_DECAY, GROUP_COLS)

MOMENTUM_FORMS = ("heavy_ball", "paper")

TVLARS_DEFAULTS: Dict[str, Any] = dict(
    momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=1e-3, delay_steps=0, alpha=1.0,
    gamma_min=0.0, weight_decay_filter=False, lars_adaptation_filter=False, norm_clip=None,
    momentum_form="heavy_ball",
)
LARS_DEFAULTS: Dict[str, Any] = dict(
    momentum=0.9, weight_decay=0.0, eta=1e-3, weight_decay_filter=False,
    lars_adaptation_filter=False, norm_clip=None, momentum_form="heavy_ball",
)

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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


def validate_group(group: Dict[str, Any], tvlars: bool, where: str = "") -> None:
    """Raise ValueError naming the first invalid hyperparameter of a param group."""
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
    if group["momentum_form"] not in MOMENTUM_FORMS:
        raise ValueError(f"Invalid momentum_form: {group['momentum_form']!r}{at}; use one of {MOMENTUM_FORMS}")
    clip = group["norm_clip"]
    if clip is not None:
        clip = _real("norm_clip", clip, at=at)
        if clip <= 0.0:
            raise ValueError(f"Invalid norm_clip: {clip}{at}; use a value > 0, or None for no clipping")
    for flag in ("weight_decay_filter", "lars_adaptation_filter"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r}{at}; it must be True or False")
    if not tvlars:
        return
    for name in ("lmbda", "alpha", "gamma_min"):
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
        row[COL_USE_PHI] = 1.0
    row[COL_NORM_CLIP] = math.inf if group["norm_clip"] is None else float(group["norm_clip"])
    row[COL_PAPER_FORM] = 1.0 if group["momentum_form"] == "paper" else 0.0
    return row


def segment_flags(group: Dict[str, Any], ndim: int) -> int:
    flags = 0
    if group["weight_decay_filter"] and ndim == 1:
        flags |= FLAG_SKIP_WEIGHT_DECAY
    if group["lars_adaptation_filter"] and ndim == 1:
        flags |= FLAG_SKIP_ADAPTATION
    return flags
