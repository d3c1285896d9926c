"""LAMB (You et al. 2019; docs/SPEC.md, "LAMB"): options, validation, the group-table row and the
Adam moments."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

from .. import abi as A
from .base import Algorithm, adapts, check_at_least, check_bools, check_lr, lr_column, new_row, real

BIAS_CORRECTIONS = ("moments", "step_size", "first_moment", "none")
WEIGHT_DECAY_MODES = ("update", "l2", "decoupled")

LAMB_DEFAULTS: Dict[str, Any] = dict(
    betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction="moments", weight_decay_mode="update",
    grad_averaging=True, weight_norm_clip=None, ratio_eps=0.0, adapt=True, always_adapt=True,
    weight_decay_filter=False, adaptation_filter=False, maximize=False, trust_clip=False,
)
_BOOLS = ("grad_averaging", "adapt", "always_adapt", "weight_decay_filter", "adaptation_filter", "maximize",
          "trust_clip")


def bias_correction_mode(value: Any) -> str:
    """"moments" / "step_size" / "none"; apex's booleans: True is "moments", False "none"."""
    if value is True:
        return "moments"
    if value is False:
        return "none"
    return value


class Lamb(Algorithm):
    id = A.ALGO_LAMB
    name = "LAMB"
    slots = A.LAMB_STATE_SLOTS
    stat_names = A.LAMB_STAT_NAMES
    defaults = LAMB_DEFAULTS
    key_sets = (("exp_avg", "exp_avg_sq"),)
    adaptation_filter = "adaptation_filter"

    def __repr__(self) -> str:
        return "Lamb()"

    def state_keys(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return self.key_sets[0]

    def variant(self, rows: Sequence[list]) -> tuple:
        """(any l2 weight decay, any decoupled weight decay, any moment bias correction)."""
        flags = [int(r[A.COL_GFLAGS]) for r in rows]
        return tuple(int(any(f & bit for f in flags)) for bit in (A.GF_WD_L2, A.GF_WD_DECOUPLED, A.GF_BC_MOMENTS))

    def validate(self, group: Dict[str, Any], where: str = "") -> None:
        at = f" (in {where})" if where else ""
        check_lr(group, at)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}{at}; use a pair (beta1, beta2), e.g. (0.9, 0.999)")
        for i, beta in enumerate(betas):
            value = real(f"betas[{i}]", beta, at=at)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid betas[{i}]: {value}{at}; it must lie in [0, 1)")
        check_at_least(group, "eps", 0.0, at)
        check_at_least(group, "weight_decay", 0.0, at)
        check_at_least(group, "ratio_eps", 0.0, at, "the trust ratio's epsilon")
        clip = group["weight_norm_clip"]
        if clip is not None and real("weight_norm_clip", clip, at=at) <= 0.0:
            raise ValueError(f"Invalid weight_norm_clip: {clip}{at}; use a value > 0 (pytorch-optimizer: 10), "
                             "or None for no clamp")
        if bias_correction_mode(group["bias_correction"]) not in BIAS_CORRECTIONS:
            raise ValueError(f"Invalid bias_correction: {group['bias_correction']!r}{at}; use 'moments' (the paper, "
                             "apex; True), 'step_size' (torch-optimizer's debias=True), 'first_moment' "
                             "(pytorch-optimizer's default) or 'none' (False)")
        if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
            raise ValueError(f"Invalid weight_decay_mode: {group['weight_decay_mode']!r}{at}; use 'update' (the "
                             "paper: r + wd*w inside the trust ratio), 'l2' (wd*w added to the gradient) or "
                             "'decoupled' (w*(1 - lr*wd) before the step, as AdamW)")
        check_bools(group, _BOOLS, at)
        if group["trust_clip"] and not group["adapt"]:
            raise ValueError(f"Invalid trust_clip=True{at}: adapt=False, so this group has no trust ratio to clip; "
                             "remove trust_clip or let the group adapt")

    @staticmethod
    def group_flags(group: Dict[str, Any]) -> int:
        flags = 0 if adapts(group) else A.GF_NO_ADAPT
        flags |= A.GF_TRUST_CLIP if group["trust_clip"] else 0
        mode = group["weight_decay_mode"]
        flags |= A.GF_WD_L2 if mode == "l2" else A.GF_WD_DECOUPLED if mode == "decoupled" else 0
        bc = bias_correction_mode(group["bias_correction"])
        flags |= {"moments": A.GF_BC_MOMENTS, "step_size": A.GF_BC_STEP_SIZE,
                  "first_moment": A.GF_BC_FIRST_MOMENT}.get(bc, 0)
        return flags

    def group_row(self, group: Dict[str, Any]) -> list:
        beta1, beta2 = (float(b) for b in group["betas"])
        row = new_row()
        row[A.COL_LR] = lr_column(group["lr"])
        row[A.COL_WEIGHT_DECAY] = float(group["weight_decay"])
        row[A.COL_GRAD_SIGN] = -1.0 if group["maximize"] else 1.0
        row[A.COL_GFLAGS] = float(self.group_flags(group))
        clip = group["weight_norm_clip"]
        row[A.COL_NORM_CLIP] = math.inf if clip is None else float(clip)
        row[A.LAMB_BETA1] = beta1
        row[A.LAMB_BETA2] = beta2
        row[A.LAMB_BETA3] = 1.0 - beta1 if group["grad_averaging"] else 1.0
        row[A.LAMB_ONE_MINUS_BETA2] = 1.0 - beta2
        row[A.LAMB_EPS] = float(group["eps"])
        row[A.LAMB_RATIO_EPS] = float(group["ratio_eps"])
        return row


LAMB_ALGORITHM = Lamb()
