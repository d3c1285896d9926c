"""The case database of the contract suite (tests/test_contract.py), in the role torch's
`OptimizerInfo` / `optim_db` (torch/testing/_internal/common_optimizers.py) plays for
test/test_optim.py::TestOptimRenewed.

One `OptimCase` per optimizer class configuration:

- kind "fused": `tvlars_fused.TVLARS`, `tvlars_fused.LARS` and `tvlars_fused.LAMB` on every backend
  that can run CPU tensors (`available_backends("cpu")`: triton under the Triton interpreter, the C++ "cpu" op,
  "torch"); on a CUDA machine also every backend of `available_backends("cuda")` on CUDA tensors.
  The device is part of the case.
- kind "ref": the eager `tvlars_fused.reference.TVLARS` / `.LARS` / `.LAMB` (on CPU, and on CUDA when
  present).
- kind "control": `torch.optim.SGD(momentum=0.9)`, a known-correct torch optimizer. It is left out
  of a normal run; with the environment variable TVLARS_CONTRACT_CONTROL=1 it is included, so

      TVLARS_CONTRACT_CONTROL=1 pytest tests/test_contract.py -k control

  runs every generic test on torch's own SGD: a generic test that fails there encodes something
  torch does not do. Tests of the project's own contract skip the control case (`case.project`).

Each case carries several hyperparameter sets (`OptimInput`, torch's `OptimizerInput`); `lr` is
required in TVLARS/LARS, so every set names it (LAMB's default, 1e-3, is too small for the few
steps these tests take).

What differs between the algorithms is asked of the case, not spelled out in the tests: the state
keys (`state_keys`, `state_tensor_keys`, `all_state_tensor_keys`), the default weight decay, the
invalid hyperparameters that must raise (`invalid_kwargs`), whether lr has a default. Under the Triton interpreter (triton kernels on
CPU tensors, about 50 ms a step) only the sets in FAST_UNDER_INTERPRETER of the classes in
INTERPRETED_BY_DEFAULT run by default; the others are marked `slow` (`make test-all` / `pytest -m
slow` runs them): LAMB's interpreted cases are slow as a whole (`fused-triton-LAMB-*`; the default
run holds its Triton kernels to the oracle in tests/test_lamb.py).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

if not torch.cuda.is_available():   # (conftest.py does the same; kept for imports outside pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tvlars_fused  # noqa: E402
from tvlars_fused import reference  # noqa: E402
from tvlars_fused.kernels import available_backends  # noqa: E402

CONTROL_ENV = "TVLARS_CONTRACT_CONTROL"
INCLUDE_CONTROL = os.environ.get(CONTROL_ENV, "") not in ("", "0")

# Hyperparameter sets that run by default on interpreted (triton-on-CPU) cases; there, the other
# sets, and every variant of a test but the first (see `variants` below), are marked slow.
FAST_UNDER_INTERPRETER = ("default",)
# The classes whose interpreted cases run (their FAST_UNDER_INTERPRETER sets) by default
INTERPRETED_BY_DEFAULT = ("TVLARS", "LARS")


@dataclass(frozen=True)
class OptimInput:
    """Constructor keyword arguments of one configuration (everything but params)."""
    desc: str
    kwargs: Dict[str, Any]
    slow: bool = False

    def make_kwargs(self, device="cpu") -> Dict[str, Any]:
        """A fresh copy (a tensor lr is a new tensor on `device`), safe to mutate."""
        out = {}
        for k, v in self.kwargs.items():
            out[k] = v.detach().clone().to(device) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        return out

    @property
    def tensor_lr(self) -> bool:
        return isinstance(self.kwargs.get("lr"), torch.Tensor)


# The state tensors (besides "step") an algorithm's entry may hold, over all its options.
ALL_STATE_TENSOR_KEYS = {
    "TVLARS": frozenset({"momentum_buffer", "m"}),
    "LARS": frozenset({"momentum_buffer", "m"}),
    "LAMB": frozenset({"exp_avg", "exp_avg_sq"}),
    "SGD": frozenset({"momentum_buffer"}),
}


@dataclass(frozen=True)
class OptimCase:
    kind: str                          # "fused" | "ref" | "control"
    name: str                          # "TVLARS" | "LARS" | "LAMB" | "SGD"
    cls: type
    device: str = "cpu"
    backend: Optional[str] = None      # fused only
    inputs: Tuple[OptimInput, ...] = ()
    default_weight_decay: float = 0.0
    interpreted: bool = False          # triton kernels under TRITON_INTERPRET (slow)
    slow: bool = False                 # the whole case is slow (LAMB on the Triton interpreter)
    extra_marks: Tuple[Any, ...] = field(default_factory=tuple)

    # -- what kind of optimizer ------------------------------------------------------------
    @property
    def control(self) -> bool:
        return self.kind == "control"

    @property
    def project(self) -> bool:
        """A tvlars_fused class (fused or reference): the project's own contract applies."""
        return self.kind in ("fused", "ref")

    @property
    def fused(self) -> bool:
        return self.kind == "fused"

    @property
    def tvlars(self) -> bool:
        return self.name == "TVLARS"

    @property
    def lamb(self) -> bool:
        return self.name == "LAMB"

    @property
    def lr_has_default(self) -> bool:
        """LAMB's lr defaults to 1e-3 (torch's Adam, apex FusedLAMB); TVLARS/LARS require it."""
        return self.lamb

    @property
    def id(self) -> str:
        dev = "" if self.device == "cpu" else f"@{self.device}"
        if self.kind == "fused":
            return f"fused-{self.backend}{dev}-{self.name}"
        return f"{self.kind}{dev}-{self.name}"

    @property
    def default_input(self) -> OptimInput:
        return self.inputs[0]

    # -- construction ----------------------------------------------------------------------
    def make(self, params, **kwargs):
        if self.fused:
            return self.cls(params, backend=self.backend, **kwargs)
        return self.cls(params, **kwargs)

    def make_default(self, params, **overrides):
        return self.make(params, **{**self.default_input.make_kwargs(self.device), **overrides})

    @property
    def reference_cls(self) -> Optional[type]:
        """The eager reference class with the same algorithm (None for the control)."""
        return getattr(reference, self.name) if self.project else None

    @property
    def invalid_kwargs(self) -> List[Dict[str, Any]]:
        """Hyperparameters the constructor must reject with ValueError (torch's test_errors)."""
        common = [dict(lr=-0.1), dict(weight_decay=-1e-3)]
        if self.lamb:
            return common + [dict(betas=(-0.5, 0.999)), dict(betas=(0.9, 1.0)), dict(eps=-1e-8)]
        return common + [dict(momentum=-0.5)]

    # -- the expected state layout (docs/SPEC.md, the target contract) ----------------------
    @staticmethod
    def momentum_key(kwargs: Dict[str, Any]) -> str:
        """TVLARS/LARS: the momentum state's key for these constructor arguments."""
        return "m" if kwargs.get("momentum_form", "heavy_ball") == "paper" else "momentum_buffer"

    def state_tensor_keys(self, kwargs: Dict[str, Any]) -> Tuple[str, ...]:
        """The state tensors (every key but "step") of opt.state[p] after p's first update."""
        if self.control:
            return ("momentum_buffer",)   # torch.optim.SGD with momentum != 0 (every control input)
        if self.lamb:
            return ("exp_avg", "exp_avg_sq")
        return (self.momentum_key(kwargs),)

    @property
    def all_state_tensor_keys(self) -> frozenset:
        """Every state tensor key this class may hold, whatever its options."""
        return ALL_STATE_TENSOR_KEYS[self.name]

    def state_keys(self, kwargs: Dict[str, Any]) -> set:
        """The keys of opt.state[p] after p's first update."""
        keys = set(self.state_tensor_keys(kwargs))
        return keys if self.control else keys | {"step"}

    def step_device_type(self, p: torch.Tensor) -> str:
        """Where state[p]["step"] lives: the parameter's device (fused), the host (reference)."""
        return p.device.type if self.fused else "cpu"

    def weight_decay(self, kwargs: Dict[str, Any]) -> float:
        return float(kwargs.get("weight_decay", self.default_weight_decay))


LR = 0.3   # not a power of two: lr * x must round (a power of two hides rounding differences)


def _lars_family_inputs(name: str) -> List[OptimInput]:
    common = [
        OptimInput("default", dict(lr=LR)),
        OptimInput("paper", dict(lr=LR, momentum_form="paper")),
        # TensorFlow's momentum keeps a "momentum_buffer" too (the fused classes once named it "m")
        OptimInput("lr-scaled", dict(lr=LR, momentum_form="lr_scaled")),
        # 1-D parameters get plain SGD (no adaptation): a smaller lr keeps that stable
        OptimInput("filters", dict(lr=0.1, weight_decay_filter=True, lars_adaptation_filter=True)),
        OptimInput("clip", dict(lr=LR, norm_clip=1.0)),
        OptimInput("tensor-lr", dict(lr=torch.tensor(LR))),
        OptimInput("no-momentum", dict(lr=LR, momentum=0.0)),
    ]
    if name == "TVLARS":
        common.append(OptimInput("schedule", dict(lr=LR, lmbda=0.05, delay_steps=3, alpha=0.5,
                                                  gamma_min=0.1, eta=2e-3)))
    else:
        common.append(OptimInput("weight-decay", dict(lr=LR, weight_decay=1e-2)))
    return common


# LAMB's step moves each layer by about lr * ||w|| (the trust ratio), Adam's (adapt off) each element
# by about lr: ~0.04 trains the tests' small problems in a few steps without overshooting. LAMB forms
# lr * s and 1 - lr * wd in float64 (docs/SPEC.md, "LAMB"), so a float32 tensor lr acts as the float lr
# only when that is a float32 value: 5/128 is one (and not a power of two: lr * x must round).
LAMB_LR = 5 / 128


def _lamb_inputs() -> List[OptimInput]:
    return [
        OptimInput("default", dict(lr=LAMB_LR)),   # the paper / apex FusedLAMB: wd 0.01 in the update
        OptimInput("tensor-lr", dict(lr=torch.tensor(LAMB_LR))),
        OptimInput("decoupled", dict(lr=LAMB_LR, weight_decay_mode="decoupled", weight_decay=0.1)),
        OptimInput("l2", dict(lr=LAMB_LR, weight_decay_mode="l2")),   # apex adam_w_mode=False
        OptimInput("filters", dict(lr=LAMB_LR, weight_decay_filter=True, adaptation_filter=True)),
        OptimInput("no-bias-correction", dict(lr=LAMB_LR, bias_correction="none")),
        OptimInput("step-size", dict(lr=LAMB_LR, bias_correction="step_size", grad_averaging=False)),
        # pytorch-optimizer's Lamb (docs/SPEC.md, "LAMB")
        OptimInput("pytorch-optimizer", dict(lr=LAMB_LR, bias_correction="first_moment",
                                             weight_decay_mode="decoupled", weight_norm_clip=10.0, ratio_eps=1e-6)),
        # apex's use_nvlamb=False without weight decay: no trust ratio, Adam (zero grads stay put)
        OptimInput("adam", dict(lr=LAMB_LR, weight_decay=0.0, always_adapt=False)),
    ]


def _inputs(name: str) -> List[OptimInput]:
    return _lamb_inputs() if name == "LAMB" else _lars_family_inputs(name)


def _control_inputs() -> List[OptimInput]:
    return [
        OptimInput("momentum", dict(lr=0.05, momentum=0.9)),
        OptimInput("tensor-lr", dict(lr=torch.tensor(0.05), momentum=0.9)),
        OptimInput("weight-decay", dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
        OptimInput("nesterov", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ]


def _mark_slow(inputs: List[OptimInput], interpreted: bool) -> Tuple[OptimInput, ...]:
    if not interpreted:
        return tuple(inputs)
    return tuple(OptimInput(i.desc, i.kwargs, slow=i.slow or i.desc not in FAST_UNDER_INTERPRETER)
                 for i in inputs)


DEFAULT_WEIGHT_DECAY = {"TVLARS": 5e-4, "LARS": 0.0, "LAMB": 0.01, "SGD": 0.0}
NAMES = ("TVLARS", "LARS", "LAMB")


def build_db(include_control: bool = INCLUDE_CONTROL) -> List[OptimCase]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases: List[OptimCase] = []
    for dev in devices:
        for backend in available_backends(dev):
            interpreted = backend == "triton" and dev == "cpu"
            for name in NAMES:
                cases.append(OptimCase(
                    "fused", name, getattr(tvlars_fused, name), dev, backend,
                    _mark_slow(_inputs(name), interpreted), DEFAULT_WEIGHT_DECAY[name], interpreted,
                    slow=interpreted and name not in INTERPRETED_BY_DEFAULT))
        for name in NAMES:
            cases.append(OptimCase("ref", name, getattr(reference, name), dev, None,
                                   tuple(_inputs(name)), DEFAULT_WEIGHT_DECAY[name]))
        if include_control:
            cases.append(OptimCase("control", "SGD", torch.optim.SGD, dev, None,
                                   tuple(_control_inputs()), 0.0))
    return cases


OPTIM_DB: List[OptimCase] = build_db()


def _marks(case: OptimCase, inp: Optional[OptimInput] = None, first_variant: bool = True) -> list:
    slow = case.slow or (inp is not None and inp.slow) or (case.interpreted and not first_variant)
    return ([pytest.mark.slow] if slow else []) + list(case.extra_marks)


def _variant_list(variants) -> List[Tuple[Any, str]]:
    return [v if isinstance(v, tuple) else (v, str(v)) for v in variants]


def case_params(where: Optional[Callable[[OptimCase], bool]] = None, variants=None) -> list:
    """pytest params over cases (each test uses the case's default input): ids `fused-cpu-TVLARS`.
    With `variants` (values, or (value, id) pairs), params over (case, variant): on interpreted
    cases only the first variant runs by default."""
    cases = [c for c in OPTIM_DB if where is None or where(c)]
    if variants is None:
        return [pytest.param(c, id=c.id, marks=_marks(c)) for c in cases]
    vs = _variant_list(variants)
    return [pytest.param(c, v, id=f"{c.id}-{vid}", marks=_marks(c, first_variant=j == 0))
            for c in cases for j, (v, vid) in enumerate(vs)]


def case_input_params(where: Optional[Callable[[OptimCase, OptimInput], bool]] = None, variants=None) -> list:
    """pytest params over (case, input) pairs: ids `fused-cpu-TVLARS-paper`; with `variants`, over
    (case, input, variant): ids `fused-cpu-TVLARS-paper-pickle`."""
    pairs = [(c, i) for c in OPTIM_DB for i in c.inputs if where is None or where(c, i)]
    if variants is None:
        return [pytest.param(c, i, id=f"{c.id}-{i.desc}", marks=_marks(c, i)) for c, i in pairs]
    vs = _variant_list(variants)
    return [pytest.param(c, i, v, id=f"{c.id}-{i.desc}-{vid}", marks=_marks(c, i, first_variant=j == 0))
            for c, i in pairs for j, (v, vid) in enumerate(vs)]
