"""TVLARS and LARS (docs/SPEC.md, "The algorithm"): options, validation, the group-table row and
the momentum state. LARS is TVLARS with phi(t) == 1."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch

from .. import abi as A
from .base import WEIGHTS, ZEROS, Algorithm, adapts, check_at_least, check_bools, check_lr, lr_column, new_row, real

MOMENTUM_FORMS = tuple(A.FORMS)          # "heavy_ball", "paper", "lr_scaled"
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
_BOOLS = ("weight_decay_filter", "lars_adaptation_filter", "trust_clip", "adapt", "always_adapt",
          "plain_step_on_zero_norm", "nesterov", "maximize")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)   # the smallest normal float32


def applied_dampening(group: Dict[str, Any]) -> float:
    """The dampening the group table carries: none at momentum 0, where a heavy-ball step is lr*u
    and leaves the buffer as it is (torch's SGD keeps no buffer then; docs/SPEC.md)."""
    return float(group["dampening"]) if float(group["momentum"]) != 0.0 else 0.0


class Lars(Algorithm):
    """TVLARS (tvlars=True) or LARS."""

    id = A.ALGO_LARS
    slots = A.LARS_STATE_SLOTS
    stat_names = A.LARS_STAT_NAMES
    # the heavy-ball (and lr-scaled) buffer, or the paper's previous iterate m
    key_sets = (("momentum_buffer",), ("m",))
    adaptation_filter = "lars_adaptation_filter"
    first_update_stat = A.LARS_STAT_PENDING

    def __init__(self, tvlars: bool):
        self.tvlars = tvlars
        self.name = "TVLARS" if tvlars else "LARS"
        self.defaults = TVLARS_DEFAULTS if tvlars else LARS_DEFAULTS

    def __repr__(self) -> str:
        return f"Lars(tvlars={self.tvlars})"

    # -- state -----------------------------------------------------------------------------------
    def state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ("m",) if group["momentum_form"] == "paper" else ("momentum_buffer",)

    def initial_state(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return (WEIGHTS,) if group["momentum_form"] == "paper" else (ZEROS,)   # the paper: m starts at w

    def first_step_flag(self, group: Dict[str, Any]) -> bool:
        # torch's SGD: with dampening the first buffer is u itself (not (1 - dampening)*u); at
        # momentum 0 the mark waits for the first step with momentum (SGD creates its buffer then)
        return group["momentum_form"] == "heavy_ball" and float(group["dampening"]) != 0

    def variant(self, rows: Sequence[list]) -> tuple:
        """(the only momentum form of the rows, -1 if mixed; any Nesterov; any dampening)."""
        forms = {int(r[A.LARS_FORM]) for r in rows}
        return (forms.pop() if len(forms) == 1 else -1,
                int(any(int(r[A.COL_GFLAGS]) & A.GF_NESTEROV for r in rows)),
                int(any(r[A.LARS_UNDAMPED] != 1.0 for r in rows)))

    # -- options ---------------------------------------------------------------------------------
    def validate(self, group: Dict[str, Any], where: str = "") -> None:
        at = f" (in {where})" if where else ""
        check_lr(group, at)
        momentum = real("momentum", group["momentum"], at=at)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}{at}; it must lie in [0, 1)")
        if 0.0 < momentum < _FLOAT32_TINY:   # (0 in float32, where the kernels read it: "no momentum")
            raise ValueError(f"Invalid momentum: {momentum}{at}; a momentum below {_FLOAT32_TINY:.3g} rounds to 0 "
                             "in float32: use 0")
        check_at_least(group, "weight_decay", 0.0, at)
        eta = real("eta", group["eta"], at=at)
        if eta <= 0.0:
            raise ValueError(f"Invalid eta: {eta}{at}; the trust coefficient must be > 0")
        form = group["momentum_form"]
        if form not in MOMENTUM_FORMS:
            raise ValueError(f"Invalid momentum_form: {form!r}{at}; use one of {MOMENTUM_FORMS}")
        clip = group["norm_clip"]
        if clip is not None:
            clip = real("norm_clip", clip, at=at)
            if clip <= 0.0:
                raise ValueError(f"Invalid norm_clip: {clip}{at}; use a value > 0, or None for no clipping")
        check_bools(group, _BOOLS, at)
        if group["denominator"] not in DENOMINATORS:
            raise ValueError(f"Invalid denominator: {group['denominator']!r}{at}; use 'update' (||g + wd*w||, "
                             "Barlow Twins and the TVLARS authors) or 'grad' (||g|| + wd*||w||, You et al. 2017, "
                             "apex LARC, timm, Lightning, MLPerf)")
        check_at_least(group, "eps", 0.0, at, "the denominator's epsilon")
        dampening = real("dampening", group["dampening"], at=at)
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
            # (always_adapt=False with weight_decay=0 is allowed: whether the group adapts follows its
            # weight decay, and timm's LARC gives its no-decay group exactly that)
            if not group["adapt"]:
                raise ValueError(
                    f"Invalid trust_clip=True{at}: adapt=False, so this group has no trust ratio to clip; "
                    "remove trust_clip or let the group adapt")
        if self.tvlars:
            self._validate_schedule(group, at)

    @staticmethod
    def _validate_schedule(group: Dict[str, Any], at: str) -> None:
        for name in ("lmbda", "alpha", "gamma_min", "hold_steps"):
            check_at_least(group, name, 0.0, at)
        real("delay_steps", group["delay_steps"], at=at)
        # phi(t) is largest at t = 0; it must be representable in float32, the kernels' precision.
        x0 = -float(group["lmbda"]) * float(group["delay_steps"])
        denom = float(group["alpha"]) + math.exp(max(min(x0, 700.0), -745.0))
        peak = math.inf if denom == 0.0 else 1.0 / denom
        if not peak + float(group["gamma_min"]) < _FLOAT32_MAX:
            raise ValueError(
                f"Invalid lmbda/delay_steps/alpha{at}: phi(0) = 1/(alpha + exp(-lmbda*delay_steps)) overflows "
                f"float32 (alpha={group['alpha']}, lmbda={group['lmbda']}, delay_steps={group['delay_steps']}); "
                "use alpha > 0 or a smaller lmbda * delay_steps")

    # -- the group table -------------------------------------------------------------------------
    @staticmethod
    def group_flags(group: Dict[str, Any]) -> int:
        flags = 0
        if not adapts(group):
            flags |= A.GF_NO_ADAPT
        if group["denominator"] == "grad":
            flags |= A.GF_GRAD_DENOMINATOR
        if group["trust_clip"]:
            flags |= A.GF_TRUST_CLIP
        if group["plain_step_on_zero_norm"]:
            flags |= A.GF_PLAIN_ZERO
        if group["nesterov"]:
            flags |= A.GF_NESTEROV
        return flags

    def group_row(self, group: Dict[str, Any]) -> list:
        row = new_row()
        row[A.COL_LR] = lr_column(group["lr"])
        row[A.COL_WEIGHT_DECAY] = float(group["weight_decay"])
        row[A.COL_GRAD_SIGN] = -1.0 if group["maximize"] else 1.0
        row[A.COL_GFLAGS] = float(self.group_flags(group))
        row[A.COL_NORM_CLIP] = math.inf if group["norm_clip"] is None else float(group["norm_clip"])
        row[A.LARS_MOMENTUM] = float(group["momentum"])
        row[A.LARS_ETA] = float(group["eta"])
        if self.tvlars:
            row[A.LARS_LMBDA] = float(group["lmbda"])
            row[A.LARS_DELAY] = float(group["delay_steps"])
            row[A.LARS_ALPHA] = float(group["alpha"])
            row[A.LARS_GAMMA_MIN] = float(group["gamma_min"])
            row[A.LARS_HOLD] = float(group["hold_steps"])
            row[A.LARS_USE_PHI] = 1.0
        row[A.LARS_FORM] = float(A.FORMS[group["momentum_form"]])
        row[A.LARS_EPS] = float(group["eps"])
        row[A.LARS_UNDAMPED] = 1.0 - applied_dampening(group)   # (as torch's alpha=1 - dampening, in float64)
        return row


TVLARS_ALGORITHM = Lars(tvlars=True)
LARS_ALGORITHM = Lars(tvlars=False)
