"""Algorithm: what differs between the layer-wise optimizers, as one object per optimizer class
that the shared machinery asks (base.py, buckets.py, every backend). The math itself lives once per
language: docs/SPEC.md, csrc/algo/<name>.h (CPU and CUDA), kernels/triton_<name>.py and
kernels/torch_<name>.py; this is the policy around it:

- the options: their defaults (each one keeps the behaviour from before it existed, so an older
  state_dict loads) and validation with errors that name the argument;
- a param group -> one float64 row of the group table (layout: abi.py) and per-parameter segment
  flags;
- the state: the keys of a parameter's entry (one state slot each, in slot order) and how each
  slot starts.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import _RequiredParameter

from ..abi import FLAG_SKIP_ADAPTATION, FLAG_SKIP_WEIGHT_DECAY, GROUP_COLS

ZEROS, WEIGHTS = "zeros", "weights"   # how a state slot starts


def options(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """A constructor's hyperparameters (its locals() minus self, params and backend): the
    param-group defaults."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "backend", "__class__")}


def real(name: str, value: Any, tensor_ok: bool = False, at: str = "") -> float:
    """A finite Python number (None for a one-element tensor, allowed where tensor_ok: such a
    value is only ever read on the device)."""
    if isinstance(value, torch.Tensor):
        if not tensor_ok:
            raise ValueError(f"{name} must be a Python number, got a tensor{at}; only lr may be a tensor")
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element: {name} must be a number or a one-element tensor, "
                             f"got shape {tuple(value.shape)}{at}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"Tensor {name} must be real: got dtype {value.dtype}{at}; use a floating-point tensor")
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):   # (numpy's scalars are numbers.Real)
        raise ValueError(f"{name} must be a real number, got {value!r}{at}")
    # (math.isfinite cannot be traced by torch.compile, where a float option that a scheduler
    # moves is a symbolic float; x - x == 0 there, which numpy's scalars would warn about here)
    if not (value - value == 0 if torch.compiler.is_compiling() else math.isfinite(value)):
        raise ValueError(f"{name} must be finite, got {value!r}{at}")
    return float(value)


def _is_bool(value: Any) -> bool:
    """True or False, or numpy's bool (a sweep config's value; torch.optim accepts it too)."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def check_bools(group: Dict[str, Any], names: Sequence[str], at: str) -> None:
    for flag in names:
        if not _is_bool(group[flag]):
            raise ValueError(f"Invalid {flag}: {group[flag]!r}{at}; it must be True or False")


def check_lr(group: Dict[str, Any], at: str):
    if isinstance(group["lr"], _RequiredParameter):
        raise ValueError(f"lr is required{at}: pass lr=... to the constructor, or give every param group "
                         "its own 'lr'")
    lr = real("lr", group["lr"], tensor_ok=True, at=at)
    if lr is not None and lr < 0.0:
        raise ValueError(f"Invalid lr: {lr}{at}; the learning rate must be >= 0")
    return lr


def check_tensor_lr_value(lr: Any, at: str) -> None:
    """A tensor lr's value, checked where torch.optim checks it: when a group is added, after
    validate() has checked its shape and dtype (reading it syncs; step() only ever reads it on the
    device)."""
    if isinstance(lr, torch.Tensor):
        value = float(lr.detach().reshape(()))
        if not value >= 0.0 or value == math.inf:
            raise ValueError(f"Invalid lr: {value}{at}; the learning rate must be finite and >= 0")


def check_at_least(group: Dict[str, Any], name: str, low: float, at: str, what: str = "") -> float:
    value = real(name, group[name], at=at)
    if value < low:
        raise ValueError(f"Invalid {name}: {value}{at}; {what or 'it'} must be >= {low:g}")
    return value


def lr_column(lr: Any) -> float:
    """The group table's lr (a tensor lr is copied there on the device at every step instead)."""
    return 0.0 if isinstance(lr, torch.Tensor) else float(lr)


def new_row() -> list:
    return [0.0] * GROUP_COLS


def adapts(group: Dict[str, Any]) -> bool:
    """Whether the group uses the layer-wise trust ratio at all (always_adapt=False: only when it
    has weight decay; timm's LARS, apex FusedLAMB's use_nvlamb=False)."""
    return bool(group["adapt"]) and (bool(group["always_adapt"]) or float(group["weight_decay"]) != 0.0)


class Algorithm:
    """The policy of one layer-wise optimizer (docs/DESIGN.md, "Adding an optimizer")."""

    id: int                            # abi.ALGO_*: the kernels' `algorithm` argument
    name: str                          # the class name users know ("TVLARS", "LARS", "LAMB")
    slots: int                         # state slots per element
    stat_names: Tuple[str, ...]        # layer_stats() columns
    defaults: Dict[str, Any]           # every option, at the default that keeps older state_dicts loading
    key_sets: Tuple[Tuple[str, ...], ...]   # every key tuple a state entry may hold (state_keys' values)
    adaptation_filter: str             # the option that skips the trust ratio of ndim == 1 parameters

    def validate(self, group: Dict[str, Any], where: str = "") -> None:
        """Raise ValueError naming the first invalid (or contradictory) option of a group."""
        raise NotImplementedError

    def group_row(self, group: Dict[str, Any]) -> list:
        """The group's row of the group table: GROUP_COLS Python floats (abi.py)."""
        raise NotImplementedError

    def state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """The state entry's keys for a parameter of this group, one per slot, in slot order."""
        raise NotImplementedError

    def initial_state(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """How each slot starts when a parameter is first updated: ZEROS or WEIGHTS (a copy of w)."""
        return (ZEROS,) * self.slots

    # the stats column that marks a parameter's first update as pending (set when its state
    # starts; the kernels consume it in the step that updates it), or None
    first_update_stat: Optional[int] = None

    def first_step_flag(self, group: Dict[str, Any]) -> bool:
        """Whether a parameter's first update is marked (first_update_stat) for the kernels."""
        return False

    def variant(self, rows: Sequence[list]) -> tuple:
        """What a bucket's group rows use of the options that shape the elementwise code (backends
        may compile for just that; () when nothing is specialised), as a tuple of ints."""
        return ()

    def segment_flags(self, group: Dict[str, Any], ndim: int) -> int:
        """The ndim == 1 filters (Barlow Twins, the TVLARS authors) as segment flags."""
        flags = 0
        if group["weight_decay_filter"] and ndim == 1:
            flags |= FLAG_SKIP_WEIGHT_DECAY
        if group[self.adaptation_filter] and ndim == 1:
            flags |= FLAG_SKIP_ADAPTATION
        return flags
