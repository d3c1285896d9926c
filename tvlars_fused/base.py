"""LayerwiseOptimizer: what the eager reference and the fused optimizers share (they are siblings
over this base). It owns the torch.optim contract: parameter and param-group validation (named
parameters included), the state format, load_state_dict, pickling. A subclass names its
algorithm (algorithms/: options, validation, state keys), implements step() and says where the
step count t lives.

State format (docs/SPEC.md, "State"): `optimizer.state` is keyed by parameters only. A parameter's
entry is created the first time it is updated and holds `"step"` (t, the optimizer-wide count of
steps taken: a 0-dim float32 tensor, the same value for every parameter) and the algorithm's state
tensors (TVLARS/LARS: `"momentum_buffer"`, or `"m"` for the paper's momentum form; LAMB:
`"exp_avg"` and `"exp_avg_sq"`).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from .algorithms import Algorithm, check_tensor_lr_value

STEP = "step"                       # per-parameter state entry: t
LEGACY_STEP = "step"                # the format before 0.2: one non-parameter key state["step"] = t


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, the update and the momentum state are float32 at least, float64 for float64
    parameters (so bfloat16/float16 parameters keep float32 state)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe(group_index: int, param_index: int, p: torch.Tensor, name: Optional[str] = None) -> str:
    label = f" {name!r}" if name is not None else ""
    # a lazy module's parameter has no shape before its first forward
    shape = "uninitialized" if is_lazy(p) else f"shape {tuple(p.shape)}"
    return f"param_groups[{group_index}]['params'][{param_index}]{label} ({shape}, dtype {p.dtype}, device {p.device})"


def is_lazy(p: Any) -> bool:
    """A lazy module's parameter before its first forward (no size yet)."""
    return isinstance(p, torch.nn.parameter.UninitializedTensorMixin)


def is_sized(p: Any) -> bool:
    return not is_lazy(p)


def check_param(p: Any, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: optimizer parameters must be tensors, got {type(p).__name__}")
    if p.is_complex():
        raise ValueError(f"{where}: complex parameters are not supported; "
                         "optimize torch.view_as_real(p) as a real parameter instead")
    if not p.is_floating_point():
        raise ValueError(f"{where}: only floating-point parameters can be optimized, got {p.dtype}")
    if not (p.is_leaf or p.retains_grad):
        raise ValueError(f"{where}: can't optimize a non-leaf tensor; optimize the leaf it was computed "
                         "from (e.g. a nn.Parameter)")


def grad_ok(g: torch.Tensor) -> bool:
    """The cheap test every step makes (check_grad says what is wrong)."""
    return g.layout == torch.strided and not g.is_complex()


def check_grad(g: torch.Tensor, where: str) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{where}: sparse gradients are not supported (the layer-wise trust ratio needs "
                           "the dense gradient's norm); use a dense embedding (sparse=False)")
    if g.is_complex():
        raise RuntimeError(f"{where}: complex gradients are not supported; "
                           "optimize torch.view_as_real(p) as a real parameter instead")


def _param_and_name(item: Any):
    """A params entry: a tensor, or a (name, tensor) pair from named_parameters()."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[1], item[0]
    return item, None


def _same(a: Any, b: Any) -> bool:
    """Equal option values (a tensor lr compares by value; never an error)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    a, b = (tuple(x) if isinstance(x, list) else x for x in (a, b))   # (betas as a list or a tuple)
    try:
        return bool(a == b)
    except Exception:   # noqa: BLE001 (a value whose == is not a bool)
        return False


def check_step(value) -> float:
    """A "step" entry's value (loaded, or written into the state from outside) as t: a whole number
    in [0, 2^24], where float32 (t's dtype) counts exactly."""
    try:
        t = float(value)
    except OverflowError:
        t = math.inf
    if not (math.isfinite(t) and 0.0 <= t <= 2.0 ** 24 and t == math.floor(t)):
        raise ValueError(f"Invalid 'step' in the optimizer state: {t}; a step count is a whole number in "
                         "[0, 2**24] (t is float32)")
    return t


class LayerwiseOptimizer(Optimizer):
    """Base of the layer-wise optimizers (reference and fused). Subclasses set `algorithm` and
    implement step(), `_step_tensor()` (where t lives) and `_load_step(t, state)` (adopt loaded
    state)."""

    algorithm: Algorithm

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        # lr=required (torch.optim's convention): then every param group must give its own lr
        self.algorithm.validate({**defaults, "lr": 0.0} if defaults["lr"] is required else defaults,
                                where="the constructor arguments")
        check_tensor_lr_value(defaults["lr"], " (in the constructor arguments)")
        if isinstance(params, torch.Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts "
                            "(e.g. model.parameters()), but got a single tensor of shape "
                            f"{tuple(params.shape)}: wrap it in a list")
        params = list(params)
        if not params:
            raise ValueError(
                "params is empty: pass the parameters to optimize, e.g. model.parameters() (a "
                "generator can be consumed only once: call model.parameters() again or pass a list)")
        super().__init__(params, defaults)

    # -- parameters and groups -------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # Validate before torch appends the group, so a rejected group leaves no trace.
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        gi = len(self.param_groups)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(f"param_groups[{gi}]['params'] is a set; pass an ordered collection (a list) "
                            "so the parameter order is the same in every run")
        items = [params] if isinstance(params, torch.Tensor) else list(params)
        owner = {id(q): (gj, j) for gj, g in enumerate(self.param_groups) for j, q in enumerate(g["params"])}
        seen = set()
        for i, item in enumerate(items):
            p, name = _param_and_name(item)
            where = describe(gi, i, p, name) if isinstance(p, torch.Tensor) else f"param_groups[{gi}]['params'][{i}]"
            check_param(p, where)
            if id(p) in seen:
                raise ValueError(f"optimizer contains a parameter group with duplicate parameters: {where} appears "
                                 "twice in the same group (torch.optim warns, and would update it twice); list "
                                 "each parameter once")
            seen.add(id(p))
            if id(p) in owner:
                gj, j = owner[id(p)]
                raise ValueError(f"some parameters appear in more than one parameter group: {where} is already "
                                 f"param_groups[{gj}]['params'][{j}]; remove it from one of them")
        self.algorithm.validate({**self.defaults, **param_group}, where=f"param_groups[{gi}]")
        if "lr" in param_group:
            check_tensor_lr_value(param_group["lr"], f" (in param_groups[{gi}])")
        super().add_param_group({**param_group, "params": items})

    def _where(self, gi: int, i: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        return describe(gi, i, group["params"][i], names[i] if names else None)

    # -- step ------------------------------------------------------------------------------------
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
            self.algorithm.validate(group, where=f"param_groups[{gi}]")
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is not None and not grad_ok(g):
                    check_grad(g, self._where(gi, i))

    @property
    def step_count(self) -> torch.Tensor:
        """t, the number of steps this optimizer has taken (a 0-dim float32 tensor; on the
        parameters' device for the fused classes: reading it as a number syncs)."""
        return self._step_tensor()

    def _step_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    # -- state_dict ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state_dict, with each parameter's "step" its own tensor, as torch's Adam
        keeps them: the live entries share one counter, which writers that refuse aliased tensors
        (safetensors' save_file of the flattened state) would reject. One copy per counter, split
        into per-entry views (one op, not one per parameter)."""
        sd = super().state_dict()
        state = sd["state"]   # (its entries are the live state's dicts: replaced, not edited)
        by_counter: Dict[int, list] = {}
        for k, st in state.items():
            t = st.get(STEP) if isinstance(st, dict) else None   # (load_state_dict keeps other values)
            if isinstance(t, torch.Tensor):
                by_counter.setdefault(id(t), []).append(k)
        for keys in by_counter.values():
            t = state[keys[0]][STEP]
            for k, copy in zip(keys, t.detach().expand(len(keys), *t.shape).clone().unbind(0)):
                state[k] = {**state[k], STEP: copy}
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's load_state_dict (hooks, checks, param_names) with this project's state
        policy: momentum state is copied at the state dtype (float32 for bfloat16/float16
        parameters), never aliased; t is read from the per-parameter "step" entries (their max:
        torch-style per-parameter steps are accepted) or from the pre-0.2 top-level state["step"].
        What a pre-hook returns and what a post-hook edits is what the next step uses."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])
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
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))

        steps: List[float] = []
        legacy = saved_state.get(LEGACY_STEP) if LEGACY_STEP not in id_map else None
        if legacy is not None:
            steps.append(check_step(legacy))
        state: Dict[Any, Dict[str, Any]] = defaultdict(dict)
        for pid, entry in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                if pid != LEGACY_STEP:   # torch keeps state of unknown keys as is
                    state[pid] = entry
                continue
            for key, value in entry.items():
                if key == STEP:
                    steps.append(check_step(value))   # (before anything changes)
                    continue
                if isinstance(value, torch.Tensor):
                    if value.is_floating_point() and value.shape != p.shape:
                        raise ValueError(
                            f"load_state_dict: state[{pid!r}][{key!r}] has shape {tuple(value.shape)} but the "
                            f"parameter it belongs to has shape {tuple(p.shape)}; the state_dict comes from a "
                            "different model (or parameter order): build the optimizer over the same parameters")
                    dtype = accumulation_dtype(p.dtype) if value.is_floating_point() else value.dtype
                    value = value.detach().to(device=p.device, dtype=dtype, copy=True)
                state[p][key] = value
        t = max(steps) if steps else 0.0

        option_defaults = self.algorithm.defaults

        def update_group(gi, group, new_group):
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in new_group:
                new_group["param_names"] = group["param_names"]
            # options the state_dict lacks (an older version's, another optimizer's) take the
            # defaults, as torch.optim's do; say so where that changes what this group had
            changed = [key for key, value in option_defaults.items()
                       if key not in new_group and key in group and not _same(group[key], value)]
            if changed:
                warnings.warn(
                    f"load_state_dict: param_groups[{gi}] of the state_dict has no "
                    f"{', '.join(map(repr, changed))} (a state_dict of another optimizer or an older version): "
                    f"they take the defaults ({', '.join(f'{k}={option_defaults[k]!r}' for k in changed)}), not this "
                    f"optimizer's ({', '.join(f'{k}={group[k]!r}' for k in changed)}); set them in param_groups "
                    "after loading to keep yours", stacklevel=5)   # (the caller of load_state_dict, past torch._disable_dynamo)
            for key, value in option_defaults.items():
                new_group.setdefault(key, value)
            return new_group

        param_groups = []
        for gi, (g, ng) in enumerate(zip(self.param_groups, saved_groups)):
            param_groups.append(update_group(gi, g, ng))
        self.__setstate__({"state": state, "param_groups": param_groups})
        self._load_step(t)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
        self._after_load()

    def _load_step(self, t: float) -> None:
        """Adopt t as the step count and point every state entry's "step" at it."""
        raise NotImplementedError

    def _after_load(self) -> None:
        """After load_state_dict's post-hooks: a post-hook may have replaced "step" entries."""
        if any(isinstance(st, dict) and STEP in st for st in self.state.values()):
            self._load_step(self._max_step(self.state))

    @staticmethod
    def _max_step(state: Dict[Any, Dict[str, Any]]) -> float:
        """t from per-parameter "step" entries (0 when there are none)."""
        steps = [check_step(st[STEP]) for st in state.values() if isinstance(st, dict) and STEP in st]
        return max(steps) if steps else 0.0
