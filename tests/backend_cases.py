"""The (device, backend) cases of the suites that run each test on every fused backend of every
device present (tests/test_dropin.py, tests/test_reliability.py):

- the CPU: every backend of `available_backends("cpu")` ("torch", the C++ "cpu" op once
  tvlars_fused._C is built, "triton" under the Triton interpreter, that is without a GPU); test
  ids are the backend's name: `[torch]`, `[cpu]`, `[triton]`;
- a CUDA device, when present: every backend of `available_backends("cuda")` ("triton", the C++
  "cuda" ops, "torch"); ids name the device: `[cuda-triton]`, `[cuda-cuda]`, `[cuda-torch]`.

`case.reference` is the eager tvlars_fused.reference optimizer on the case's device (ids
`[reference]`, `[cuda-reference]`); `case.optimizer(cls, **hyper)` builds either.

Each case also names the optimizer class it runs (`case.algo`: "TVLARS" or "LAMB"), so one test body
covers every layer-wise algorithm: what differs between them (the state keys, how the state
starts, the option sets that take different paths, the bad and contradictory options, the
layer_stats() columns) is asked of `case.spec`, an `AlgorithmSpec` of ALGORITHMS, never spelled out
with if/else in a test. TVLARS cases keep the ids above; the others add the class:
`[torch-LAMB]`, `[reference-LAMB]`, `[cuda-triton-LAMB]` (so `-k cuda` selects every CUDA case, of
every algorithm). `CASES` holds every algorithm's cases, TVLARS's first.

The tests build their tensors on the CPU (CPU generators, torch.manual_seed: the same numbers on
every device) and move them with `.to(case.device)`; they compare results after moving them to the
CPU (parity.max_err does).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():   # (conftest.py does the same; kept for imports outside pytest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tvlars_fused  # noqa: E402
from tvlars_fused import reference as _reference  # noqa: E402
from tvlars_fused.kernels import available_backends  # noqa: E402

# The fused backends, in the order of the cases (and of the test ids) on each device.
FUSED_BACKENDS = ("torch", "cpu", "cuda", "triton")
REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """What the suites need to know of one layer-wise optimizer class (docs/SPEC.md), written from
    the spec, not read from the library: a test asks this instead of naming an algorithm.

    - `state_tensor_keys`: the state tensors (besides "step") of an updated parameter, in the
      library's slot order; `keys_if`: (option, value, keys) where an option's value replaces them
      (TVLARS: momentum_form="paper" keeps "m");
    - `forms`: (id, options) pairs, two option sets that take different paths through the state
      (TVLARS: the heavy-ball buffer, the paper's m = w; LAMB: the paper's weight decay in the
      update, and "l2" with pytorch-optimizer's bias correction), for the tests that run "each form";
    - `other_form`: options of a second param group that differ from the first one's in every way
      the class allows (the checkpoint and long-run models' 1-D group: both ndim == 1 filters and a
      form);
    - `stat_names`: layer_stats()'s columns (docs/SPEC.md);
    - `option_changes`: (option, old, new) written into param_groups after some steps;
    - `added_groups`: the options of two groups add_param_group adds after some steps;
    - `bad_options`: (name, value, regex of the message) each rejected at construction and in a
      param group; `siblings`: other classes that validate those options (by name) the same way;
    - `contradictions`: (options, regex): each option valid alone, together rejected."""
    name: str
    state_tensor_keys: Tuple[str, ...]
    forms: Tuple[Tuple[str, Dict[str, Any]], ...]
    other_form: Dict[str, Any]
    stat_names: Tuple[str, ...]
    option_changes: Tuple[Tuple[str, Any, Any], ...]
    added_groups: Tuple[Dict[str, Any], Dict[str, Any]]
    bad_options: Tuple[Tuple[str, Any, str], ...] = ()
    siblings: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    contradictions: Tuple[Tuple[Dict[str, Any], str], ...] = ()
    keys_if: Tuple[Tuple[str, Any, Tuple[str, ...]], ...] = ()

    def state_keys(self, options: Optional[Dict[str, Any]] = None) -> Tuple[str, ...]:
        """The state tensors (besides "step") of a parameter updated with these group options."""
        options = options or {}
        for option, value, keys in self.keys_if:
            if options.get(option) == value:
                return keys
        return self.state_tensor_keys

    def initial_state(self, key: str, w: torch.Tensor) -> torch.Tensor:
        """What state[key] holds before the parameter's first update is applied: the paper form's
        m starts as w, every other state tensor at zeros."""
        return w.detach().clone() if key == "m" else torch.zeros_like(w)

    def form(self, form_id: str) -> Dict[str, Any]:
        return dict(dict(self.forms)[form_id])


_LARS_BAD = (
    ("lr", -0.1, r"Invalid lr: -0\.1.*>= 0"),
    ("lr", float("nan"), r"lr must be finite"),
    ("lr", torch.tensor([0.1, 0.2]), r"lr must be a number or a one-element tensor"),
    ("lr", torch.tensor(0.1 + 0j), r"Tensor lr must be real: got dtype torch.complex64"),
    ("momentum", 1.0, r"Invalid momentum: 1\.0.*\[0, 1\)"),
    ("momentum", "0.9", r"momentum must be a real number"),
    ("momentum", 1e-46, r"Invalid momentum: 1e-46.*rounds to 0 in float32: use 0"),
    ("weight_decay", -1e-4, r"Invalid weight_decay.*>= 0"),
    ("eta", 0.0, r"Invalid eta.*> 0"),
    ("eta", torch.tensor(1e-3), r"eta must be a Python number.*only lr may be a tensor"),
    ("lmbda", -1.0, r"Invalid lmbda.*>= 0"),
    ("alpha", -1.0, r"Invalid alpha.*>= 0"),
    ("gamma_min", -0.5, r"Invalid gamma_min.*>= 0"),
    ("delay_steps", float("inf"), r"delay_steps must be finite"),
    ("norm_clip", 0.0, r"Invalid norm_clip.*None for no clipping"),
    ("momentum_form", "nesterov", r"Invalid momentum_form.*heavy_ball"),
    ("weight_decay_filter", 1, r"Invalid weight_decay_filter.*True or False"),
    ("lars_adaptation_filter", None, r"Invalid lars_adaptation_filter.*True or False"),
    ("eps", -1e-8, r"Invalid eps.*>= 0"),
    ("denominator", "sum", r"Invalid denominator: 'sum'.*'update'.*'grad'"),
    ("dampening", 1.5, r"Invalid dampening.*\[0, 1\]"),
    ("hold_steps", -1, r"Invalid hold_steps.*>= 0"),
    ("trust_clip", "yes", r"Invalid trust_clip.*True or False"),
    ("nesterov", 1, r"Invalid nesterov.*True or False"),
    ("maximize", None, r"Invalid maximize.*True or False"),
    # with lmbda=1, delay_steps=200 (OVERFLOW in tests/test_reliability.py): phi(0) = 1/(0 + e^-200)
    ("alpha", 0.0, r"Invalid lmbda/delay_steps/alpha.*overflows float32.*alpha > 0"),
)
_LARS_OPTIONS = ("lr", "momentum", "weight_decay", "eta", "norm_clip", "momentum_form", "eps", "denominator",
                 "dampening", "trust_clip", "nesterov", "maximize")
_LARS_CONTRADICTIONS = (
    (dict(nesterov=True, dampening=0.1), r"nesterov=True.*requires momentum > 0 and dampening = 0"),
    (dict(nesterov=True, momentum=0.0), r"nesterov=True.*requires momentum > 0"),
    (dict(nesterov=True, momentum_form="paper"), r"nesterov/dampening with momentum_form='paper'"),
    (dict(dampening=0.2, momentum_form="paper"), r"nesterov/dampening with momentum_form='paper'"),
    (dict(dampening=0.2, momentum_form="lr_scaled"), r"dampening with momentum_form='lr_scaled'"),
    (dict(trust_clip=True, adapt=False), r"trust_clip=True.*adapt=False"),
)
_LAMB_BAD = (   # docs/SPEC.md "LAMB", Checks
    ("lr", -0.1, r"Invalid lr: -0\.1.*>= 0"),
    ("lr", float("nan"), r"lr must be finite"),
    ("lr", torch.tensor([0.1, 0.2]), r"lr must be a number or a one-element tensor"),
    ("lr", torch.tensor(0.1 + 0j), r"Tensor lr must be real: got dtype torch.complex64"),
    ("betas", (1.0, 0.999), r"Invalid betas\[0\]: 1\.0.*\[0, 1\)"),
    ("betas", (0.9, -1e-3), r"Invalid betas\[1\]: -0\.001.*\[0, 1\)"),
    ("betas", 0.9, r"Invalid betas: 0\.9.*pair"),
    ("betas", (0.9, "0.999"), r"betas\[1\] must be a real number"),
    ("eps", -1e-8, r"Invalid eps.*>= 0"),
    ("eps", torch.tensor(1e-6), r"eps must be a Python number.*only lr may be a tensor"),
    ("weight_decay", -1e-4, r"Invalid weight_decay.*>= 0"),
    ("weight_decay", float("inf"), r"weight_decay must be finite"),
    ("ratio_eps", -1.0, r"Invalid ratio_eps.*>= 0"),
    ("weight_norm_clip", 0.0, r"Invalid weight_norm_clip.*> 0.*None"),
    ("bias_correction", "debias", r"Invalid bias_correction: 'debias'.*'moments'"),
    ("weight_decay_mode", "adamw", r"Invalid weight_decay_mode: 'adamw'.*'update'.*'l2'.*'decoupled'"),
    ("grad_averaging", 1, r"Invalid grad_averaging.*True or False"),
    ("adapt", "yes", r"Invalid adapt.*True or False"),
    ("always_adapt", None, r"Invalid always_adapt.*True or False"),
    ("weight_decay_filter", 0, r"Invalid weight_decay_filter.*True or False"),
    ("adaptation_filter", 1.0, r"Invalid adaptation_filter.*True or False"),
    ("maximize", "False", r"Invalid maximize.*True or False"),
    ("trust_clip", 1, r"Invalid trust_clip.*True or False"),
)
_LAMB_CONTRADICTIONS = (
    (dict(trust_clip=True, adapt=False), r"trust_clip=True.*adapt=False"),
)

ALGORITHMS: Dict[str, AlgorithmSpec] = {
    "TVLARS": AlgorithmSpec(
        "TVLARS", state_tensor_keys=("momentum_buffer",), keys_if=(("momentum_form", "paper", ("m",)),),
        forms=(("heavy_ball", dict(momentum_form="heavy_ball")), ("paper", dict(momentum_form="paper"))),
        other_form=dict(momentum_form="paper", weight_decay_filter=True, lars_adaptation_filter=True),
        stat_names=("weight_norm", "update_norm", "trust_ratio", "phi", "grad_norm", "weight_decay"),
        option_changes=(("momentum_form", "heavy_ball", "paper"), ("momentum_form", "paper", "heavy_ball")),
        added_groups=(dict(momentum_form="paper"), dict(lmbda=0.5)),
        bad_options=_LARS_BAD, siblings=(("LARS", _LARS_OPTIONS),), contradictions=_LARS_CONTRADICTIONS),
    "LAMB": AlgorithmSpec(
        "LAMB", state_tensor_keys=("exp_avg", "exp_avg_sq"),
        # (the second form keeps weight decay in the direction: with "decoupled" a parameter whose
        # gradient is rounding noise, as a conv bias before a BatchNorm, gets the noise's direction
        # scaled to lr * ||w|| by the trust ratio, which no two runs share)
        forms=(("update", dict(weight_decay_mode="update")),
               ("l2", dict(weight_decay_mode="l2", bias_correction="first_moment"))),
        other_form=dict(weight_decay_mode="decoupled", bias_correction="step_size", weight_decay_filter=True,
                        adaptation_filter=True),
        stat_names=("weight_norm", "update_norm", "trust_ratio", "step_scale", "grad_norm", "weight_decay"),
        option_changes=(("weight_decay_mode", "update", "l2"), ("bias_correction", "moments", "none")),
        added_groups=(dict(weight_decay_mode="decoupled"), dict(betas=(0.8, 0.99), bias_correction="step_size")),
        bad_options=_LAMB_BAD, contradictions=_LAMB_CONTRADICTIONS),
}


@dataclasses.dataclass(frozen=True)
class BackendCase:
    """One fused backend (or the eager reference) on one device, running one optimizer class."""
    device: str
    backend: str   # a fused backend name, or "reference"
    algo: str = "TVLARS"   # a key of ALGORITHMS

    @property
    def id(self) -> str:
        base = self.backend if self.device == "cpu" else f"{self.device}-{self.backend}"
        return base if self.algo == "TVLARS" else f"{base}-{self.algo}"

    def __str__(self) -> str:
        return self.id

    @classmethod
    def from_id(cls, case_id: str) -> "BackendCase":
        """The case with this id ("triton": the CPU; "cuda-triton": device "cuda"; "cuda-triton-LAMB":
        LAMB on it)."""
        rest, _, last = case_id.rpartition("-")
        algo = "TVLARS"
        if last in ALGORITHMS:
            algo, case_id = last, rest
        device, _, backend = case_id.rpartition("-")
        return cls(device or "cpu", backend, algo)

    @property
    def spec(self) -> AlgorithmSpec:
        return ALGORITHMS[self.algo]

    @property
    def fused(self) -> bool:
        return self.backend != REFERENCE

    @property
    def interpreted(self) -> bool:
        """Triton kernels on CPU tensors, under the Triton interpreter (~0.2 s a step)."""
        return self.backend == "triton" and torch.device(self.device).type == "cpu"

    @property
    def reference(self) -> "BackendCase":
        """The eager reference on this case's device."""
        return dataclasses.replace(self, backend=REFERENCE)

    def optimizer(self, cls: Optional[str] = None, **hyper) -> Callable:
        """A factory params -> optimizer: tvlars_fused.<cls> (default: the case's class) with this
        backend (the parameters must be on this case's device), or tvlars_fused.reference.<cls>."""
        cls = cls or self.algo

        def build(params):
            if not self.fused:
                return getattr(_reference, cls)(params, **hyper)
            return getattr(tvlars_fused, cls)(params, backend=self.backend, **hyper)
        return build


def devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(on: Optional[Sequence[str]] = None, names: Sequence[str] = FUSED_BACKENDS,
                  algos: Sequence[str] = tuple(ALGORITHMS)) -> List[BackendCase]:
    """The cases of the backends among `names` that can run tensors on each device of `on`
    (default: every device present), for each class of `algos` (all of them, TVLARS's first)."""
    return [BackendCase(dev, b, a) for a in algos for dev in (devices() if on is None else on)
            for b in available_backends(dev, tuple(names))]


def with_reference(cases: Iterable[BackendCase]) -> List[BackendCase]:
    """The cases, then the reference on each of their devices (once per device)."""
    cases = list(cases)
    refs: List[BackendCase] = []
    for c in cases:
        if all(r.id != c.reference.id for r in refs):
            refs.append(c.reference)
    return cases + refs


def params(cases: Iterable[BackendCase], slow: Optional[Callable[[BackendCase], bool]] = None) -> list:
    """pytest params, one per case, with the case's id; those where slow(case) marked slow."""
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if slow is not None and slow(c) else [])
            for c in cases]


def params_with(cases: Iterable[BackendCase], variants: Callable[[BackendCase], Sequence[Tuple[str, Any]]],
                slow: Optional[Callable[[BackendCase, str], bool]] = None) -> list:
    """pytest params (case, value) over each case's own variants ((id, value) pairs, which depend
    on the case's algorithm): ids `<variant>-<case>`, as two stacked parametrize decorators give."""
    return [pytest.param(c, v, id=f"{vid}-{c.id}",
                         marks=[pytest.mark.slow] if slow is not None and slow(c, vid) else [])
            for c in cases for vid, v in variants(c)]


def extra_interpreted(case: BackendCase, *_) -> bool:
    """The slow rule of the suites: a class other than TVLARS on the Triton interpreter (TVLARS's
    interpreted cases run by default; tests/test_lamb.py holds LAMB's Triton kernels to the oracle)."""
    return case.interpreted and case.algo != "TVLARS"


# Every fused backend on every device present, and those on the CPU only (for the tests that are
# CPU-only by nature; each test file lists its own with the reason); every class.
CASES: List[BackendCase] = backend_cases()
CPU_CASES: List[BackendCase] = backend_cases(["cpu"])
