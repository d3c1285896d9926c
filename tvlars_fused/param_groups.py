"""The usual parameter groups of layer-wise training, from a model: biases and normalization
parameters excluded from weight decay and/or from the trust ratio (MLPerf, Barlow Twins, solo-learn,
timm's `filter_bias_and_bn`), by name, module type or any rule of yours.

    from tvlars_fused import LARS, lars_param_groups
    opt = LARS(lars_param_groups(model), lr=..., weight_decay=1e-6)

A rule is one of:
  - a string: a regular expression searched in the parameter's full name ("bias", r"\\.bn\\d*\\.");
  - a module class: parameters that belong directly to a module of that type (nn.Embedding);
  - a callable (name, param, module) -> bool;
  - the ready-made rules BIAS (names ending in "bias"), NORM (every torch normalization layer) and
    ONE_DIM (parameters with ndim <= 1: the `p.ndim == 1` filters of Barlow Twins and TVLARS,
    0-dim parameters included).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Sequence, Union

import torch
from torch import nn

__all__ = ["lars_param_groups", "BIAS", "NORM", "ONE_DIM"]

BIAS = r"bias$"   # (nn.MultiheadAttention's in_proj_bias too, as the BERT/TF rule "bias" has it)
NORM = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                         getattr(nn, "RMSNorm", None)) if t is not None)


def ONE_DIM(name: str, param: torch.Tensor, module: nn.Module) -> bool:  # noqa: N802 (a rule constant)
    return param.ndim <= 1


Rule = Union[str, type, tuple, Callable[[str, torch.Tensor, nn.Module], bool]]


def _matches(rule: Rule, name: str, param: torch.Tensor, module: nn.Module) -> bool:
    if isinstance(rule, str):
        return re.search(rule, name) is not None
    if isinstance(rule, type) or (isinstance(rule, tuple) and all(isinstance(r, type) for r in rule)):
        return isinstance(module, rule)
    if callable(rule):
        return bool(rule(name, param, module))
    raise TypeError(f"a parameter-group rule must be a regular expression (str), a module class, or a callable "
                    f"(name, param, module) -> bool; got {rule!r}")


def lars_param_groups(model: nn.Module, exclude_from_weight_decay: Sequence[Rule] = (BIAS, NORM),
                      exclude_from_adaptation: Sequence[Rule] = (BIAS, NORM), include_frozen: bool = False,
                      **options: Any) -> List[Dict[str, Any]]:
    """Named parameter groups of `model` for TVLARS/LARS (or any torch optimizer that knows the
    options): parameters matching a rule of `exclude_from_weight_decay` get weight_decay=0,
    those matching `exclude_from_adaptation` get adapt=False (no trust ratio: a plain momentum
    step). `options` go into every group (e.g. lr=...); the optimizer's arguments apply to the
    rest. Parameters with requires_grad=False are left out unless include_frozen. Groups come in a
    fixed order (decayed+adapted, then the exclusions); empty ones are left out. A tied parameter
    appears once, under its first name."""
    for arg, value in (("exclude_from_weight_decay", exclude_from_weight_decay),
                       ("exclude_from_adaptation", exclude_from_adaptation)):
        if isinstance(value, (str, type)) or callable(value):
            raise TypeError(f"{arg} must be a list of rules, got a single rule {value!r}: wrap it in a list")
    buckets: Dict[tuple, List[tuple]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not (p.requires_grad or include_frozen):
                continue
            seen.add(id(p))
            name = f"{module_name}.{pname}" if module_name else pname
            decay = not any(_matches(r, name, p, module) for r in exclude_from_weight_decay)
            adapt = not any(_matches(r, name, p, module) for r in exclude_from_adaptation)
            buckets.setdefault((decay, adapt), []).append((name, p))
    if not buckets:
        raise ValueError("lars_param_groups: the model has no trainable parameters (include_frozen=True to "
                         "include those with requires_grad=False)")
    groups = []
    for decay, adapt in ((True, True), (False, True), (True, False), (False, False)):
        if (decay, adapt) in buckets:
            group: Dict[str, Any] = {"params": buckets[(decay, adapt)], **options}
            if not decay:
                group["weight_decay"] = 0.0
            if not adapt:
                group["adapt"] = False
            groups.append(group)
    return groups
