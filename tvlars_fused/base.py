"""What the reference and the fused optimizers share: validation of parameters, gradients and
hyperparameters, the state layout (docs/SPEC.md) and state_dict loading."""
from __future__ import annotations

from itertools import chain
from typing import Any, Dict, Iterable

import torch
from torch.optim import Optimizer

from .hyperparams import validate_group
from .schedule import phi

STEP_KEY = "step"   # the optimizer-wide step counter t, a 0-dim float32 tensor in self.state


def state_key(momentum_form: str) -> str:
    """Per-parameter state entry: the heavy-ball buffer, or the paper's previous iterate m."""
    return "momentum_buffer" if momentum_form == "heavy_ball" else "m"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and the update run in float32 at least, float64 for float64 parameters."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe(group_index: int, param_index: int, p: torch.Tensor) -> str:
    return (f"param_groups[{group_index}]['params'][{param_index}] "
            f"(shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})")


def check_param(p: torch.Tensor, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: optimizer parameters must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError(f"{where}: complex parameters are not supported; "
                         "optimize torch.view_as_real(p) as a real parameter instead")
    if not p.is_floating_point():
        raise ValueError(f"{where}: only floating-point parameters can be optimized, got {p.dtype}")


def grad_ok(g: torch.Tensor) -> bool:
    """The cheap test every step makes (check_grad says what is wrong)."""
    return g.layout == torch.strided and not g.is_complex()


def check_grad(g: torch.Tensor, where: str) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{where}: sparse gradients are not supported by TVLARS/LARS (the layer-wise "
                           "norms need the dense gradient); use a dense embedding (sparse=False)")
    if g.is_complex():
        raise RuntimeError(f"{where}: complex gradients are not supported; "
                           "optimize torch.view_as_real(p) as a real parameter instead")


class LarsFamilyBase(Optimizer):
    _tvlars = True

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        if not isinstance(params, torch.Tensor):
            params = list(params)
            if not params:
                raise ValueError(
                    "params is empty: pass the parameters to optimize, e.g. model.parameters() (a "
                    "generator can be consumed only once: call model.parameters() again or pass a list)")
        super().__init__(params, defaults)
        self.state[STEP_KEY] = torch.zeros((), dtype=torch.float32)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # Validate before torch appends the group, so a rejected group leaves no trace.
        gi = len(self.param_groups)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(f"param_groups[{gi}]['params'] is a set; pass an ordered collection (a list) "
                            "so the parameter order is the same in every run")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        owner = {id(q): (gj, j) for gj, g in enumerate(self.param_groups) for j, q in enumerate(g["params"])}
        for i, p in enumerate(params):
            check_param(p, describe(gi, i, p))
            if any(p is q for q in params[:i]):
                raise ValueError(f"{describe(gi, i, p)} appears twice in the same group; list each parameter once")
            if id(p) in owner:
                gj, j = owner[id(p)]
                raise ValueError(f"{describe(gi, i, p)} is already param_groups[{gj}]['params'][{j}]; a "
                                 "parameter can belong to only one group: remove it from one of them")
        validate_group({**self.defaults, **param_group}, self._tvlars, where=f"param_groups[{gi}]")
        super().add_param_group({**param_group, "params": params})

    def begin_step(self, closure):
        """The start of every step(): run the closure (with grad enabled), then validate. Returns
        the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.validate_step()
        return loss

    def validate_step(self) -> None:
        """Check every group and gradient before anything is updated, so a rejected step changes
        nothing."""
        for gi, group in enumerate(self.param_groups):
            validate_group(group, self._tvlars, where=f"param_groups[{gi}]")
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is not None and not grad_ok(g):
                    check_grad(g, describe(gi, i, p))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved_groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"load_state_dict: the state_dict has {len(saved_groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}; it comes from a different model or grouping: build the optimizer "
                "over the same parameter groups")
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"load_state_dict: param_groups[{gi}] has {len(sg['params'])} parameters in the state_dict "
                    f"and {len(g['params'])} in this optimizer (a parameter group that does not match); it "
                    "comes from a different model: build the optimizer over the same parameters, in the same order")
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_groups) == len(self.param_groups):
            id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups), params))
            for pid, entry in saved_state.items():
                p = id_map.get(pid)
                for key, value in (entry.items() if p is not None else ()):
                    if isinstance(value, torch.Tensor) and value.shape != p.shape:
                        raise ValueError(
                            f"load_state_dict: state[{pid!r}][{key!r}] has shape {tuple(value.shape)} but the "
                            f"parameter it belongs to has shape {tuple(p.shape)}; the state_dict comes from a "
                            "different model (or parameter order): build the optimizer over the same parameters")
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype; bfloat16/float16 parameters keep float32
        # state, so copy the saved values again at the state dtype.
        if len(saved_groups) == len(self.param_groups):
            for pid, entry in saved_state.items():
                p = id_map.get(pid)
                if p is None:
                    continue
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, dtype=accumulation_dtype(p.dtype),
                                                      copy=True)
        step = saved_state.get(STEP_KEY)
        self.state[STEP_KEY] = (torch.zeros((), dtype=torch.float32) if step is None
                                else torch.as_tensor(step, dtype=torch.float32).detach().to("cpu", copy=True).reshape(()))

    def scale(self, group: Dict[str, Any], t: float) -> float:
        """phi(t) for TVLARS; LARS overrides it with 1."""
        return phi(t, group["lmbda"], group["delay_steps"], group["alpha"], group["gamma_min"])

