"""Contract suite: what torch's generic optimizer tests (test/test_optim.py::TestOptimRenewed, driven
by optim_db) check, written for this project's optimizers and driven by the case database in
tests/optim_cases.py (one case per class x backend x device, several hyperparameter sets each):
TVLARS, LARS and LAMB, fused on every backend and the eager reference. What differs between the
algorithms (state keys, default weight decay, invalid options, lr's default) comes from the case.

It tests the target contract of docs/SPEC.md (per-parameter "step", state keyed by parameters only,
named parameters, copies that keep working, ...). Comparisons between two runs of the same
optimizer are exact (torch.equal); between different classes (fused vs reference) float64 within
1e-12, the project's rule (tests/parity.py).

Parametrization: `case` params (the case's default hyperparameters) or `case, inp` params (every
hyperparameter set), ids like `fused-cpu-TVLARS-paper`, `ref-LARS-default`, `fused-torch-LAMB-l2`
(on a GPU `fused-cuda@cuda-LAMB-...`). Triton cases run under the Triton interpreter on CPU: only
their first set and first variant run by default (TVLARS, LARS; LAMB's none), the rest are marked
slow (`pytest -m slow`, `make test-all`).

The torch SGD control case (TVLARS_CONTRACT_CONTROL=1 pytest tests/test_contract.py -k control; see
optim_cases.py) runs every generic test here, to show the tests encode torch's behaviour; the tests
of the project's own contract (PROJECT_CASES, FUSED_CASES, ...) are not parametrized over it.
"""
from __future__ import annotations

import copy
import inspect
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn import Parameter
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook, required

import tvlars_fused
from tvlars_fused import reference

from conftest import requires_cuda
from optim_cases import OPTIM_DB, case_input_params, case_params
from parity import max_err

# What TestOptimRenewed checks that does not apply here (torch test name -> reason).
NOT_APPLICABLE = {
    "test_optim_infos_do_not_specify_global_cliquey_kwargs":
        "there are no foreach/fused/differentiable flags; the implementation is chosen by `backend`",
    "test_foreach_matches_forloop / test_fused_matches_forloop / test_fused_cpu_matches_cuda":
        "no foreach/fused flags; backend-vs-reference parity is tests/parity.py's job "
        "(test_fused.py, test_triton.py, test_extension.py)",
    "test_mixed_device_dtype / test_set_default_dtype_works_with_foreach":
        "foreach/fused flags (mixed dtypes in one optimizer: test_mixed_dtypes_match_separate_optimizers)",
    "test_foreach_large_tensor / test_fused_large_tensor / test_peak_memory_foreach":
        "foreach/fused flags; 64-72 GB tensors",
    "test_defaults_changed_to_foreach": "no foreach implementation to default to",
    "test_fused_error_on_params_on_meta": "no fused=True flag",
    "test_cpu_load_state_dict": "fused/capturable flags (CPU -> CUDA loading: test_state_dict_from_cpu_params)",
    "TestDifferentiableOptimizer / differentiable=True": "no differentiable flag (step() is no_grad)",
    "capturable": "no capturable flag (a tensor lr + on-device t is the CUDA-graph path)",
    "test_complex / test_complex_2d":
        "complex parameters are not supported: rejected with a clear error (test_complex_params_rejected)",
    "test_rosenbrock_sparse":
        "sparse gradients are not supported (the layer norms need the dense gradient): rejected "
        "(test_sparse_grad_rejected)",
    "test_second_order_optims_return_consistent_types": "not a second-order optimizer (no required closure)",
    "test_can_load_older_state_dict":
        "torch deletes maximize/foreach/fused/differentiable/capturable from the groups; none exist here. "
        "The project's own older format (top-level 'step') is test_load_previous_format",
    "test_step_is_noop_for_zero_grads (with weight_decay != 0)":
        "weight decay moves parameters whose gradient is all zeros (TVLARS's default is 5e-4; torch "
        "exempts AdamW the same way): test_zero_grad_step_moves_only_with_weight_decay checks both sides",
    "lr default (optim_cls(params), test_param_group_with_lrscheduler_goes_right_direction's "
    "top-level lr, SGD(params) in test_step_all_hooks for the case under test)":
        "lr is torch's `required` in TVLARS/LARS (optional only where every group gives its own): every "
        "case passes it (test_lr_is_required); LAMB's "
        "default (1e-3, as torch's Adam) is checked by test_lr_default_is_documented",
    "integer parameters (test_step_pre_hook/test_step_post_hook use int tensors)":
        "only floating-point parameters can be optimized: the hook tests use float tensors",
    "test_state_dict_pre_hook / test_load_state_dict_post_hook writing optimizer.state['test']":
        "optimizer.state is keyed by parameters only: the hooks here edit param_groups/state entries",
    "test_forloop_goes_right_direction_multigpu": "one device per case (multi-GPU is test_distributed.py's)",
    "test_fused_does_not_step_if_foundinf (fused=True)":
        "applies to the fused classes through GradScaler's protocol without a flag: test_found_inf_skips_step",
}

TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
HAS_NAMED_PARAMS = TORCH_VERSION >= (2, 6)
requires_named = pytest.mark.skipif(not HAS_NAMED_PARAMS, reason="named parameters need torch >= 2.6")

STEPS = 3          # steps per phase: the triton cases run under the (slow) interpreter

CASES = case_params()
INPUTS = case_input_params()
PROJECT_CASES = case_params(lambda c: c.project)
FUSED_CASES = case_params(lambda c: c.fused)
FUSED_INPUTS = case_input_params(lambda c, i: c.fused)
FLOAT_LR_INPUTS = case_input_params(lambda c, i: not i.tensor_lr)


# -- helpers -----------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def trained(case, inp, seed):
    """A Problem, its parameters and an optimizer of the case (hyperparameter set inp, or the
    case's default) that has taken STEPS steps on it."""
    prob = Problem(case.device, seed=seed)
    params = prob.params()
    opt = case.make(params, **(inp or case.default_input).make_kwargs(case.device))
    prob.run(opt, params, range(STEPS))
    return prob, params, opt


def step_both(prob, run_a, run_b, steps):
    """Step two (optimizer, params) runs on the same fresh inputs; their parameters stay equal."""
    for s in steps:
        prob.step(*run_a, s)
        prob.step(*run_b, s)
        assert_params_equal(run_a[1], run_b[1], f"step {s}")


def _quadratic_closure(opt, W, b, x):
    """The closure of torch's right-direction tests: loss = sum((W x + b)^2), gradients fresh."""
    def closure():
        opt.zero_grad()
        loss = (W.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss
    return closure


class Problem:
    """loss_s = sum((W x_s + b)^2) + sum_i (e_i * c_{s,i}) over parameters [W, b, e_0, ...], x_s and
    c_s fresh random inputs of step s (the same for every run with the same seed)."""

    def __init__(self, device="cpu", dtype=torch.float32, seed=0, extra=()):
        self.device, self.dtype, self.seed = device, dtype, seed
        g = _gen(seed)
        shapes = [(6, 4), (6,)] + list(extra)
        self.init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

    def params(self):
        return [Parameter(x.to(device=self.device, dtype=self.dtype).clone()) for x in self.init]

    def data(self, s, like):
        g = _gen(self.seed * 7919 + 13 * s + 1)
        return torch.randn(like, generator=g, dtype=torch.float64).to(device=self.device, dtype=self.dtype)

    def loss(self, params, s, use=None):
        W, b = params[0], params[1]
        loss = (W.mv(self.data(s, 4)) + b).pow(2).sum()
        for i, p in enumerate(params[2:], start=2):
            if use is None or use(i):
                loss = loss + (p * self.data(1000 + 31 * s + i, p.shape).to(p.dtype)).sum()
        return loss

    def step(self, opt, params, s, use=None):
        opt.zero_grad()
        self.loss(params, s, use).backward()
        opt.step()

    def run(self, opt, params, steps, use=None):
        for s in steps:
            self.step(opt, params, s, use)


def _param(x, device):
    """A new Parameter with its own storage (x.to() returns x itself when nothing changes)."""
    return Parameter(x.detach().to(device).clone())


def clones(params):
    return [Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params]


def opt_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def assert_params_equal(a, b, what=""):
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: param {i} shape/dtype differ"
        if not torch.equal(x.detach(), y.detach()):
            d = float((x.detach().double() - y.detach().double()).abs().max())
            raise AssertionError(f"{what}: param {i} differs (max abs diff {d:.3e})")


def assert_tree_equal(a, b, path="state_dict"):
    """Exact structural equality: same keys, same types, tensors equal in dtype, shape and bits."""
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert set(a.keys()) == set(b.keys()), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__} ({b!r})"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert a.device.type == b.device.type, f"{path}: on {a.device} vs {b.device}"
        assert torch.equal(a, b), f"{path}: values differ"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def assert_tree_close(a, b, tol, path="state_dict"):
    """Like assert_tree_equal, tensors within tol (compared on the host in float64)."""
    if isinstance(a, dict):
        assert set(a.keys()) == set(b.keys()), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_tree_close(a[k], b[k], tol, f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        x, y = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
        assert x.shape == y.shape, path
        assert float((x - y).abs().max()) <= tol if x.numel() else True, f"{path}: differs by more than {tol}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_int_state_keys(sd):
    keys = list(sd["state"])
    assert all(type(k) is int for k in keys), f"state_dict()['state'] must be keyed by ints only, got {keys}"


def check_state_layout(case, opt, kwargs, updated, t):
    """The target state layout after `t` steps; `updated`: the parameters updated at least once."""
    params = opt_params(opt)
    ids = {id(p) for p in params}
    stray = [k for k in opt.state.keys() if not (isinstance(k, torch.Tensor) and id(k) in ids)]
    assert not stray, f"optimizer.state has non-parameter keys {stray!r}"
    keys = case.state_keys(kwargs)
    for p in updated:
        st = opt.state[p]
        assert set(st) == keys, f"state[p] keys {sorted(st)} != {sorted(keys)}"
        if "step" in keys:
            step = st["step"]
            assert isinstance(step, torch.Tensor), f"state[p]['step'] must be a tensor, got {type(step).__name__}"
            assert step.dim() == 0 and step.dtype == torch.float32, f"step: {step.dtype}{tuple(step.shape)}"
            assert step.device.type == case.step_device_type(p), f"step on {step.device}"
            assert float(step) == t, f"state[p]['step'] = {float(step)}, expected t = {t}"
    assert_int_state_keys(opt.state_dict())


# ===============================================================================================
# The update goes the right direction (test_forloop_goes_right_direction)
# ===============================================================================================
@pytest.mark.parametrize("case, inp, contiguous",
                         case_input_params(variants=[(True, "contiguous"), (False, "noncontiguous")]))
def test_step_goes_right_direction(case, inp, contiguous):
    dev = case.device
    g = _gen(1)
    if contiguous:
        W, b = _param(torch.randn(6, 4, generator=g), dev), _param(torch.randn(6, generator=g), dev)
    else:
        W = Parameter(torch.randn(6, 4, 2, generator=g).to(dev)[..., 0])
        b = Parameter(torch.randn(6, 2, generator=g).to(dev)[..., 0])
        assert not W.is_contiguous() and not b.is_contiguous()
    x = torch.randn(4, generator=g).to(dev)
    opt = case.make([W, b], **inp.make_kwargs(dev))
    closure = _quadratic_closure(opt, W, b, x)
    initial = closure().item()
    for _ in range(STEPS + 2):
        opt.step(closure)
    assert closure().item() < initial


@pytest.mark.parametrize("case", CASES)
def test_maximize_goes_the_other_direction(case):
    """torch's maximize (test_forloop_goes_right_direction with maximize=True): the loss grows; and a
    step with maximize on gradients g is bit for bit a step without it on -g (g' = -g, exact)."""
    dev = case.device
    kw = case.default_input.make_kwargs(dev)
    W, b = Problem(dev, seed=42).params()
    x = torch.randn(4, generator=_gen(43)).to(dev)
    opt = case.make([W, b], maximize=True, **kw)
    closure = _quadratic_closure(opt, W, b, x)
    initial = closure().item()
    for _ in range(STEPS + 2):
        opt.step(closure)
    assert closure().item() > initial
    prob = Problem(dev, seed=44)
    pa, pb = prob.params(), prob.params()
    a, b_ = case.make(pa, maximize=True, **kw), case.make(pb, **kw)
    for s in range(3):
        for opt, ps, sign in ((a, pa, 1.0), (b_, pb, -1.0)):
            opt.zero_grad()
            (sign * prob.loss(ps, s)).backward()
            opt.step()
        assert_params_equal(pa, pb, f"step {s}")


@pytest.mark.parametrize("case, sched", case_params(variants=["steplr", "plateau"]))
def test_param_group_with_lr_scheduler_goes_right_direction(case, sched):
    dev = case.device
    kw = case.default_input.make_kwargs(dev)
    W, b = Problem(dev, seed=2).params()
    x = torch.randn(4, generator=_gen(3)).to(dev)
    lr = kw.pop("lr")
    opt = case.make([{"params": [W]}, {"params": [b], "lr": 0.05}], lr=lr, **kw)
    s = (torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9) if sched == "steplr"
         else torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    closure = _quadratic_closure(opt, W, b, x)
    initial = closure().item()
    for _ in range(STEPS + 2):
        loss = opt.step(closure)
        s.step(loss.item()) if sched == "plateau" else s.step()
    assert closure().item() < initial


# ===============================================================================================
# Parameter groups (test_param_groups_lr, test_param_groups_weight_decay)
# ===============================================================================================
@pytest.mark.parametrize("case, inp", INPUTS)
def test_param_groups_lr(case, inp):
    dev = case.device
    kw = inp.make_kwargs(dev)
    W, b, irrelevant = Problem(dev, seed=4, extra=[(2,)]).params()
    before = irrelevant.detach().clone()
    x = torch.randn(4, generator=_gen(5)).to(dev)
    group_kw = dict(kw)
    outer = {k: v for k, v in kw.items() if k != "lr"}
    opt = case.make([dict(params=[W, b], **group_kw), dict(params=[irrelevant])], **{**outer, "lr": 1e-28})
    g = _gen(6)
    initial = (W.mv(x) + b).pow(2).sum().item()
    for _ in range(STEPS + 2):
        opt.zero_grad()
        loss = (W.mv(x) + b).pow(2).sum()
        loss.backward()
        irrelevant.grad = torch.rand(irrelevant.shape, generator=g).to(dev)
        opt.step()
    assert (W.mv(x) + b).pow(2).sum().item() < initial
    assert torch.equal(irrelevant.detach(), before), "a group's lr of 1e-28 must leave its parameter unchanged"


@pytest.mark.parametrize("case, inp", INPUTS)
def test_param_groups_weight_decay(case, inp):
    """Each group's weight_decay is honoured: with all-zero gradients a weight_decay > 0 group moves,
    a weight_decay = 0 group does not; with real gradients the loss goes down."""
    dev = case.device
    kw = inp.make_kwargs(dev)
    W, b = Problem(dev, seed=7).params()
    w0, b0 = W.detach().clone(), b.detach().clone()
    lr = kw.pop("lr")
    opt = case.make([dict(params=[W], weight_decay=1e-2), dict(params=[b], weight_decay=0.0)], lr=lr, **kw)
    W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
    opt.step()
    assert not torch.equal(W.detach(), w0), "weight_decay=1e-2 group: zero grad must still decay"
    assert torch.equal(b.detach(), b0), "weight_decay=0 group: zero grad must not move the parameter"

    W2, b2 = Problem(dev, seed=7).params()
    kw2 = inp.make_kwargs(dev)
    wkw = dict(kw2)
    bkw = dict(kw2, weight_decay=0.0)
    opt2 = case.make([dict(params=[W2], **wkw), dict(params=[b2], **bkw)], **kw2)
    x = torch.randn(4, generator=_gen(8)).to(dev)
    initial = (W2.mv(x) + b2).pow(2).sum().item()
    for _ in range(STEPS + 2):
        opt2.zero_grad()
        (W2.mv(x) + b2).pow(2).sum().backward()
        opt2.step()
    assert (W2.mv(x) + b2).pow(2).sum().item() < initial


@pytest.mark.parametrize("case", CASES)
def test_add_param_group_after_steps(case):
    """add_param_group after k steps == the group present from the start with grad None for k steps
    (bit for bit: t is optimizer-wide, so the new parameter's first update sees the same t)."""
    dev = case.device
    kw = case.default_input.make_kwargs(dev)
    prob = Problem(dev, seed=9)
    only_w = lambda s: s < 2   # noqa: E731

    def loss(params, s):
        W, b = params
        return (W.mv(prob.data(s, 4))).pow(2).sum() if only_w(s) else prob.loss(params, s)

    pa, pb = prob.params(), prob.params()
    group = {"lr": 0.25, "weight_decay": 1e-3}
    a = case.make([pa[0]], **kw)
    b = case.make([{"params": [pb[0]]}, {"params": [pb[1]], **group}], **case.default_input.make_kwargs(dev))
    for s in range(2 + STEPS):
        if s == 2:
            a.add_param_group({"params": [pa[1]], **group})
            assert set(a.param_groups[1]) == set(b.param_groups[1]), "the added group gets the defaults"
        for opt, ps in ((a, pa), (b, pb)):
            opt.zero_grad()
            loss(ps, s).backward()
            opt.step()
        assert_params_equal(pa, pb, f"step {s}")
    assert_tree_equal(a.state_dict(), b.state_dict())
    with pytest.raises(ValueError):
        a.add_param_group({"params": [pa[0]]})


# ===============================================================================================
# state_dict (test_state_dict_deterministic, test_load_nontensor_step, test_save_load_equality...)
# ===============================================================================================
@pytest.mark.parametrize("case, inp", INPUTS)
def test_state_dict_round_trip_is_deterministic(case, inp):
    dev = case.device
    prob, pa, a = trained(case, inp, seed=10)
    pb = clones(pa)
    b = case.make(pb, **inp.make_kwargs(dev))
    saved = copy.deepcopy(a.state_dict())
    given = copy.deepcopy(saved)
    b.load_state_dict(given)
    assert_tree_equal(given, saved, "the state_dict given to load_state_dict (must not be modified)")
    assert_tree_equal(b.state_dict(), saved, "state_dict() right after load_state_dict")
    step_both(prob, (a, pa), (b, pb), range(STEPS, 2 * STEPS))
    assert_tree_equal(a.state_dict(), b.state_dict())
    # repeated parameters have identical representation (torch #36831)
    b.param_groups.extend(b.param_groups)
    assert_tree_equal(a.state_dict()["param_groups"][-1], b.state_dict()["param_groups"][-1])


@pytest.mark.parametrize("case, inp", INPUTS)
def test_load_nontensor_step(case, inp):
    """A state_dict whose per-parameter "step" values are Python numbers loads and continues
    identically (torch-style checkpoints)."""
    dev = case.device
    prob, pa, a = trained(case, inp, seed=11)
    sd = copy.deepcopy(a.state_dict())
    converted = 0
    for st in sd["state"].values():
        if isinstance(st, dict) and torch.is_tensor(st.get("step")):
            st["step"] = st["step"].item()
            converted += 1
    if case.project:
        assert converted == len(pa), "every updated parameter's state must hold a tensor 'step'"
    pb = clones(pa)
    b = case.make(pb, **inp.make_kwargs(dev))
    b.load_state_dict(sd)
    if case.project:
        check_state_layout(case, b, inp.kwargs, pb, STEPS)
    step_both(prob, (a, pa), (b, pb), range(STEPS, STEPS + 2))


@pytest.mark.parametrize("case", CASES)
def test_save_load_equality_with_weights_only(case):
    prob, p, opt = trained(case, None, seed=12)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert_tree_equal(torch.load(buf, weights_only=False), sd)
    buf.seek(0)
    assert_tree_equal(torch.load(buf, weights_only=True), sd)


@pytest.mark.parametrize("case, inp", INPUTS)
def test_state_layout(case, inp):
    """opt.state is keyed by parameters only; after a parameter's first update its entry holds
    "step" (0-dim float32 t, the same for every parameter; on the parameter's device for the fused
    classes, on the host for the reference) and the algorithm's state tensors ("momentum_buffer" or
    "m"; LAMB: "exp_avg" and "exp_avg_sq"), nothing else; the
    state_dict's "state" keys are ints (and every entry is non-empty: torch's test_non_empty_state)."""
    dev = case.device
    kw = inp.make_kwargs(dev)
    prob = Problem(dev, seed=13)
    p = prob.params()
    opt = case.make(p, **kw)
    check_state_layout(case, opt, kw, [], 0)
    prob.run(opt, p, range(2))
    check_state_layout(case, opt, kw, p, 2)
    for st in opt.state.values():
        assert len(st) > 0
    q = clones(p)
    opt2 = case.make(q, **inp.make_kwargs(dev))
    opt2.load_state_dict(opt.state_dict())
    check_state_layout(case, opt2, kw, q, 2)


@pytest.mark.parametrize("case, inp", case_input_params(lambda c, i: c.project))
def test_load_per_parameter_steps(case, inp):
    """torch-style per-parameter steps load as t: Python ints/floats or tensors; where they differ
    t is their maximum."""
    dev = case.device
    prob, pa, a = trained(case, inp, seed=14)
    assert_int_state_keys(a.state_dict())
    variants = {
        "int": lambda i, st: STEPS,
        "float": lambda i, st: float(STEPS),
        "cpu-tensor": lambda i, st: torch.tensor(float(STEPS)),
        "differ": lambda i, st: (torch.tensor(1.0) if i == 0 else STEPS),   # max wins
    }
    for name, step_of in variants.items():
        sd = copy.deepcopy(a.state_dict())
        for i, st in sd["state"].items():
            st["step"] = step_of(i, st)
        pb = clones(pa)
        b = case.make(pb, **inp.make_kwargs(dev))
        b.load_state_dict(sd)
        check_state_layout(case, b, inp.kwargs, pb, STEPS)
        pa2 = clones(pa)                     # a's twin, loaded with a's own state_dict
        a2 = case.make(pa2, **inp.make_kwargs(dev))
        a2.load_state_dict(copy.deepcopy(a.state_dict()))
        for s in range(STEPS, STEPS + 1):         # (phi(t) and the state differ from the first step)
            prob.step(a2, pa2, s)
            prob.step(b, pb, s)
            assert_params_equal(pa2, pb, f"{name}: step {s}")


@pytest.mark.parametrize("case, inp", case_input_params(lambda c, i: c.project))
def test_load_previous_format(case, inp):
    """The project's previous state_dict format (a top-level state["step"] = t, per-parameter
    entries without "step") loads; the optimizer then saves the new format and continues
    identically."""
    dev = case.device
    prob, pa, a = trained(case, inp, seed=15)
    new = copy.deepcopy(a.state_dict())
    assert_int_state_keys(new)
    old = copy.deepcopy(new)
    for st in old["state"].values():
        st.pop("step", None)
    old["state"]["step"] = torch.tensor(float(STEPS), device=pa[0].device if case.fused else "cpu")
    pb = clones(pa)
    b = case.make(pb, **inp.make_kwargs(dev))
    b.load_state_dict(old)
    check_state_layout(case, b, inp.kwargs, pb, STEPS)
    assert_tree_equal(b.state_dict(), new, "state_dict() after loading the previous format")
    step_both(prob, (a, pa), (b, pb), range(STEPS, STEPS + 2))


@pytest.mark.parametrize("case, inp", FUSED_INPUTS)
def test_state_dict_fused_and_reference_interchange(case, inp):
    """A fused state_dict loads into the reference class and vice versa (same keys); the runs
    continue alike (float64, within 1e-12)."""
    dev = case.device
    prob = Problem(dev, dtype=torch.float64, seed=16)
    ref_prob = Problem("cpu", dtype=torch.float64, seed=16)
    pf = prob.params()
    f = case.make(pf, **inp.make_kwargs(dev))
    prob.run(f, pf, range(STEPS))
    # fused -> reference
    pr = [Parameter(p.detach().cpu().clone()) for p in pf]
    r = case.reference_cls(pr, **inp.make_kwargs("cpu"))
    r.load_state_dict(copy.deepcopy(f.state_dict()))
    check_state_layout(OPTIM_REF[case.name], r, inp.kwargs, pr, STEPS)
    for s in range(STEPS, 2 * STEPS):
        prob.step(f, pf, s)
        ref_prob.step(r, pr, s)
        assert max_err(pf, pr) < 1e-12, f"fused -> reference: step {s}"
    assert_tree_close(f.state_dict(), r.state_dict(), 1e-12)
    # reference -> fused
    pf2 = [Parameter(p.detach().to(dev).clone()) for p in pr]
    f2 = case.make(pf2, **inp.make_kwargs(dev))
    f2.load_state_dict(copy.deepcopy(r.state_dict()))
    check_state_layout(case, f2, inp.kwargs, pf2, 2 * STEPS)
    for s in range(2 * STEPS, 3 * STEPS):
        prob.step(f2, pf2, s)
        ref_prob.step(r, pr, s)
        assert max_err(pf2, pr) < 1e-12, f"reference -> fused: step {s}"


OPTIM_REF = {c.name: c for c in OPTIM_DB if c.kind == "ref" and c.device == "cpu"}


@pytest.mark.parametrize("case", CASES)
def test_state_dict_steps_are_per_parameter_tensors(case, tmp_path):
    """As torch's Adam: every parameter's "step" in state_dict() is its own tensor holding t (the
    live entries share one counter: safetensors refuses aliased tensors), the live state is left
    as it was, and editing the state_dict in place does not touch the optimizer."""
    dev = case.device
    prob = Problem(dev, seed=39, extra=[(3,)])
    p = prob.params()
    opt = case.make_default(p)
    prob.run(opt, p, range(2))
    live = {id(q): dict(opt.state[q]) for q in p}
    sd = opt.state_dict()
    steps = [st["step"] for st in sd["state"].values()]
    assert len(steps) == len(p) and len({id(s) for s in steps}) == len(p)
    assert all(float(s) == 2 for s in steps)
    for q in p:
        assert all(opt.state[q][k] is v for k, v in live[id(q)].items()), "state_dict() changed the live state"
    steps[0].zero_()
    assert float(opt.state[p[0]]["step"]) == 2
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({f"{i}.{k}": v.detach().cpu() for i, st in opt.state_dict()["state"].items()
                           for k, v in st.items()}, str(tmp_path / "optim.safetensors"))


@requires_cuda
@pytest.mark.parametrize("case", case_params(lambda c: c.device != "cpu"))
def test_state_dict_from_cpu_params(case):
    """torch's test_state_dict_with_cuda_params: a CPU run's state_dict loads into the same class
    over CUDA parameters; both continue alike (float64, within 1e-12; exactly for the same math is
    not promised across devices)."""
    kw_cpu = case.default_input.make_kwargs("cpu")
    cpu_case = next(c for c in OPTIM_DB if c.device == "cpu" and c.kind == case.kind and c.name == case.name
                    and (not c.fused or c.backend != "triton"))
    prob_c, prob_d = Problem("cpu", torch.float64, seed=17), Problem(case.device, torch.float64, seed=17)
    pc = prob_c.params()
    oc = cpu_case.make(pc, **kw_cpu)
    prob_c.run(oc, pc, range(STEPS))
    pd = [Parameter(p.detach().to(case.device).clone()) for p in pc]
    od = case.make(pd, **case.default_input.make_kwargs(case.device))
    saved = copy.deepcopy(oc.state_dict())
    given = copy.deepcopy(saved)
    od.load_state_dict(given)
    assert_tree_equal(given, saved, "the given state_dict")
    for p in pd:
        if "step" in od.state[p]:
            assert od.state[p]["step"].device.type == case.step_device_type(p)
    for s in range(STEPS, 2 * STEPS):
        prob_c.step(oc, pc, s)
        prob_d.step(od, pd, s)
        assert max_err(pc, pd) < 1e-12, f"step {s}"


# ===============================================================================================
# deepcopy / pickle (test_deepcopy_copies_all_public_attrs, and: the copies work)
# ===============================================================================================
@pytest.mark.parametrize("case, inp, how", case_input_params(variants=["deepcopy", "pickle"]))
def test_copied_optimizer_continues_identically(case, inp, how):
    prob, pa, a = trained(case, inp, seed=18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # (pickling a Parameter that has hooks warns)
        b = copy.deepcopy(a) if how == "deepcopy" else pickle.loads(pickle.dumps(a))
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}   # noqa: E731
    assert public(a) == public(b)
    pb = opt_params(b)
    assert len(pb) == len(pa) and all(x is not y for x, y in zip(pa, pb))
    assert_params_equal(pa, pb, "right after the copy")
    assert_tree_equal(a.state_dict(), b.state_dict())
    for s in range(STEPS, 2 * STEPS):
        prob.step(a, pa, s)
        prob.step(b, pb, s)
        assert_params_equal(pa, pb, f"{how}: step {s}")
    assert_tree_equal(a.state_dict(), b.state_dict())
    if case.fused:
        assert a.grad_copies == 0, "copying the optimizer must not take the original off its fast path"


# ===============================================================================================
# Gradients: None, zero, user-assigned (test_step_is_noop_*, test_grads_are_never_inplaced_into)
# ===============================================================================================
@pytest.mark.parametrize("case, inp", INPUTS)
def test_zero_grad_step_moves_only_with_weight_decay(case, inp):
    """torch's test_step_is_noop_for_zero_grads where it applies (weight_decay == 0), and the
    contract where it does not: weight decay moves a parameter whose gradient is all zeros."""
    dev = case.device
    kw = inp.make_kwargs(dev)
    p = Parameter(torch.randn(5, 1, generator=_gen(19)).to(dev))
    old = p.detach().clone()
    opt = case.make([p], **kw)
    p.grad = torch.zeros_like(p)
    opt.step(lambda: torch.tensor([1.0]))
    if case.weight_decay(kw) == 0:
        assert torch.equal(p.detach(), old), "an all-zero gradient without weight decay must not move p"
    else:
        assert not torch.equal(p.detach(), old), "weight decay must move p even with an all-zero gradient"


@pytest.mark.parametrize("case", CASES)
def test_step_is_noop_when_params_have_no_grad(case):
    dev = case.device
    params = [torch.randn(2, 3, generator=_gen(20 + i)).to(dev) for i in range(2)]   # requires_grad=False
    old = [p.clone() for p in params]
    opt = case.make_default(params)
    opt.step(lambda: torch.tensor([1.0]))
    opt.step()
    for p, o in zip(params, old):
        assert torch.equal(p, o)
        assert not (set(opt.state.get(p, {})) & case.all_state_tensor_keys)


@pytest.mark.parametrize("case, inp", INPUTS)
def test_params_with_grad_none_are_skipped(case, inp):
    """A parameter whose .grad is None is skipped: value and state tensors (momentum; LAMB's two
    moments) untouched (its "step" shows the optimizer-wide t); a parameter never given a gradient
    gets no state tensors."""
    dev = case.device
    kw = inp.make_kwargs(dev)
    prob = Problem(dev, seed=21, extra=[(3, 3), (4,)])
    p = prob.params()
    opt = case.make(p, **kw)
    keys = case.state_tensor_keys(kw)
    prob.run(opt, p, range(2), use=lambda i: i == 2)          # p[3] never used
    skipped = p[2]
    value, state = skipped.detach().clone(), {k: v.clone() for k, v in opt.state[skipped].items()}
    prob.run(opt, p, range(2, 4), use=lambda i: False)         # p[2] skipped for two steps
    assert skipped.grad is None
    assert torch.equal(skipped.detach(), value), "a parameter with grad None must not change"
    for key in keys:
        assert torch.equal(opt.state[skipped][key], state[key]), f"its state[{key!r}] must not change"
    if case.project:
        assert float(opt.state[skipped]["step"]) == 4, "'step' is the optimizer-wide t"
    never = p[3]
    assert torch.equal(never.detach(), prob.params()[3].detach())
    assert never not in opt.state or not (set(opt.state[never]) & case.all_state_tensor_keys)


@pytest.mark.parametrize("case", CASES)
def test_autograd_grad_leaves_grads_alone(case):
    """torch.autograd.grad (gradient penalties, gradient-norm probes, MAML inner loops) returns
    gradients without touching .grad: after it every .grad is still None, so step() moves nothing
    (as torch's SGD); backward(inputs=[...]) fills only the listed parameters' .grad."""
    dev = case.device
    prob = Problem(dev, seed=31, extra=[(3,)])
    p = prob.params()
    opt = case.make_default(p)
    prob.run(opt, p, range(2))
    opt.zero_grad()
    before = [q.detach().clone() for q in p]
    grads = torch.autograd.grad(prob.loss(p, 2), p)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(q.grad is None for q in p), "autograd.grad must not set .grad"
    opt.step()
    assert_params_equal(p, before, "a step after autograd.grad only")
    prob.loss(p, 3).backward(inputs=[p[0]])
    assert p[0].grad is not None and p[1].grad is None and p[2].grad is None
    opt.step()
    assert not torch.equal(p[0].detach(), before[0])
    assert_params_equal(p[1:], before[1:], "parameters left out of backward(inputs=...)")


@pytest.mark.parametrize("case", CASES)
def test_grad_data_swapped_is_used(case):
    """`p.grad.data = x` (and module._apply, which converts gradients that way: model.float();
    model.double() with gradients present) gives .grad new memory under the same tensor: the step
    uses the new values, as torch's do. The fused classes once kept reading their own buffer."""
    dev = case.device
    prob = Problem(dev, dtype=torch.float64, seed=40)
    pa, pb = prob.params(), prob.params()
    a, b = case.make_default(pa), case.make_default(pb)
    for s in range(3):
        for opt, ps in ((a, pa), (b, pb)):
            opt.zero_grad()
            prob.loss(ps, s).backward()
            if opt is a:
                for q in ps:
                    q.grad.data = q.grad.data * 0.5
            else:
                for q in ps:
                    q.grad = q.grad * 0.5
            opt.step()
        assert_params_equal(pa, pb, f"step {s}")
    for opt, ps in ((a, pa), (b, pb)):   # grads moved by dtype round trips, then accumulated into
        opt.zero_grad()
        prob.loss(ps, 3).backward()
        for q in ps:
            if opt is a:
                q.grad.data = q.grad.data.float().double()
            else:
                q.grad = q.grad.float().double()
        prob.loss(ps, 4).backward()
        opt.step()
    assert_params_equal(pa, pb, "after the dtype round trip")


@pytest.mark.parametrize("case", CASES)
def test_step_under_inference_mode(case):
    """step() under torch.inference_mode(), as under no_grad, including a step that has to set up
    a parameter unfrozen since the optimizer was built."""
    dev = case.device
    prob = Problem(dev, dtype=torch.float64, seed=41)
    pa, pb = prob.params(), prob.params()
    for q in (pa[1], pb[1]):
        q.requires_grad_(False)
    a, b = case.make_default(pa), case.make_default(pb)
    step_both(prob, (a, pa), (b, pb), range(1))
    for q in (pa[1], pb[1]):
        q.requires_grad_(True)
    for s in range(1, 3):
        for opt, ps in ((a, pa), (b, pb)):
            opt.zero_grad()
            prob.loss(ps, s).backward()
            with torch.inference_mode():
                opt.step()
        assert_params_equal(pa, pb, f"step {s}")


@pytest.mark.parametrize("case, inp", INPUTS)
def test_grads_are_never_inplaced_into(case, inp):
    """step() never writes to gradients: after it, p.grad is the same tensor object with the same
    values, whether backward produced it or the user assigned it."""
    dev = case.device
    prob = Problem(dev, seed=22)
    p = prob.params()
    opt = case.make(p, **inp.make_kwargs(dev))
    g = _gen(23)
    for s in range(STEPS):
        if s % 2 == 0:
            opt.zero_grad()
            prob.loss(p, s).backward()
        else:
            for q in p:
                q.grad = torch.randn(q.shape, generator=g).to(dev)
        grads = [q.grad for q in p]
        values = [x.clone() for x in grads]
        opt.step()
        for i, q in enumerate(p):
            assert q.grad is grads[i], f"step {s}: p.grad was replaced by another tensor"
            assert torch.equal(q.grad, values[i]), f"step {s}: p.grad was modified in place"


@pytest.mark.parametrize("case, inp", INPUTS)
def test_user_grad_refilled_in_place_is_used(case, inp):
    """p.grad = g once, then g.copy_(new) before each step: each step uses the new values (as if
    p.grad = new had been assigned)."""
    dev = case.device
    prob = Problem(dev, seed=24)
    pa, pb = prob.params(), prob.params()
    a, b = case.make(pa, **inp.make_kwargs(dev)), case.make(pb, **inp.make_kwargs(dev))
    mine = [torch.zeros_like(q) for q in pa]
    for q, m in zip(pa, mine):
        q.grad = m
    g = _gen(25)
    for s in range(STEPS):
        new = [torch.randn(q.shape, generator=g).to(dev) for q in pa]
        for m, n in zip(mine, new):
            m.copy_(n)
        for q, n in zip(pb, new):
            q.grad = n.clone()
        a.step()
        b.step()
        assert_params_equal(pa, pb, f"step {s}")


@pytest.mark.parametrize("case", CASES)
def test_zero_grad_semantics(case):
    """zero_grad() / zero_grad(set_to_none=True) sets every .grad to None; set_to_none=False zeroes
    the existing .grad tensors in place (same objects, the user's own included), and the next
    backward fills them with exactly the fresh gradient."""
    dev = case.device
    prob = Problem(dev, seed=26, extra=[(3,)])
    p = prob.params()
    opt = case.make_default(p)
    prob.run(opt, p, range(1))
    opt.zero_grad()
    assert all(q.grad is None for q in p)
    prob.loss(p, 1).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(q.grad is None for q in p)
    prob.loss(p, 2).backward()
    mine = torch.randn(p[2].shape, generator=_gen(27)).to(dev)
    p[2].grad = mine                        # a user-assigned gradient
    grads = [q.grad for q in p]
    opt.zero_grad(set_to_none=False)
    for q, g in zip(p, grads):
        assert q.grad is g, "zero_grad(set_to_none=False) must keep the .grad tensor"
        assert not q.grad.any(), "zero_grad(set_to_none=False) must zero it"
    expected = torch.autograd.grad(prob.loss(p, 3), p)
    prob.loss(p, 3).backward()
    for q, g, e in zip(p, grads, expected):
        assert q.grad is g
        assert torch.equal(q.grad, e), "after zero_grad(set_to_none=False), backward gives the fresh gradient"


@pytest.mark.parametrize("case", FUSED_CASES)
def test_readme_loop_takes_the_fast_path(case):
    """In the plain README loop no gradient is ever copied (opt.grad_copies stays 0)."""
    prob = Problem(case.device, seed=28, extra=[(3, 2)])
    p = prob.params()
    opt = case.make_default(p)
    assert isinstance(opt.grad_copies, int)
    prob.run(opt, p, range(STEPS))
    assert opt.grad_copies == 0


@pytest.mark.parametrize("case", case_params(lambda c: c.kind == "ref"))
def test_reference_has_no_grad_copies(case):
    assert not hasattr(case.make_default([Parameter(torch.randn(3))]), "grad_copies")


@pytest.mark.parametrize("case", FUSED_CASES)
def test_found_inf_skips_step(case):
    """GradScaler's protocol (torch's test_fused_does_not_step_if_foundinf): with found_inf set the
    step changes nothing, t included; the next step is the first one."""
    dev = case.device
    prob = Problem(dev, seed=29)
    pa, pb = prob.params(), prob.params()
    a, b = case.make_default(pa), case.make_default(pb)
    old = [q.detach().clone() for q in pa]
    for q in pa:
        q.grad = torch.randn(q.shape, generator=_gen(30)).to(dev)
    a.grad_scale = None
    a.found_inf = torch.ones((), device=dev)
    a.step()
    assert_params_equal(pa, old, "a step with found_inf")
    for q in pa:
        if "step" in a.state.get(q, {}):
            assert float(a.state[q]["step"]) == 0
    a.found_inf = None
    prob.step(a, pa, 0)
    prob.step(b, pb, 0)
    assert_params_equal(pa, pb, "the first real step")


@pytest.mark.parametrize("case", CASES)
def test_zero_size_and_scalar_params(case):
    """A zero-size parameter and a 0-dim one (torch's derived-optimizer tests add them) step like the
    others, and an empty parameter changes nothing for the rest."""
    dev = case.device
    prob = Problem(dev, seed=31, extra=[(0,), ()])
    pa = prob.params()
    pb = [q for i, q in enumerate(prob.params()) if i != 2]
    a, b = case.make_default(pa), case.make_default(pb)
    for s in range(STEPS):
        prob.step(a, pa, s)
        b.zero_grad()
        W, bb, sc = pb
        loss = prob.loss([W, bb], s) + (sc * prob.data(1000 + 31 * s + 3, sc.shape)).sum()
        loss.backward()
        b.step()
        assert_params_equal([pa[0], pa[1], pa[3]], pb, f"step {s}")
    assert pa[2].numel() == 0


@pytest.mark.parametrize("case", CASES)
def test_mixed_dtypes_match_separate_optimizers(case):
    """float32 and float64 parameters in one optimizer update exactly as in one optimizer each."""
    dev = case.device
    g = _gen(32)
    W0, c0 = torch.randn(5, 3, generator=g), torch.randn(4, generator=g, dtype=torch.float64)
    W, c = _param(W0, dev), _param(c0, dev)
    W1, c1 = _param(W0, dev), _param(c0, dev)
    one = case.make_default([W, c])
    sep = [case.make_default([W1]), case.make_default([c1])]
    for s in range(STEPS):
        x = torch.randn(3, generator=_gen(33 + s)).to(dev)
        y = torch.randn(4, generator=_gen(43 + s), dtype=torch.float64).to(dev)
        for opts, (w, cc) in (([one], (W, c)), (sep, (W1, c1))):
            for o in opts:
                o.zero_grad()
            (w.mv(x).pow(2).sum() + (cc * y).sum() + cc.pow(2).sum()).backward()
            for o in opts:
                o.step()
        assert_params_equal([W, c], [W1, c1], f"step {s}")


# ===============================================================================================
# Learning rate: tensor lr (test_tensor_lr incl. a 2-D one-element lr), LR schedulers
# ===============================================================================================
@pytest.mark.parametrize("case, inp", FLOAT_LR_INPUTS)
def test_tensor_lr_matches_float_lr(case, inp):
    """A float lr and a tensor lr of the same value step identically (LAMB: the float is a float32
    value, see optim_cases.LAMB_LR). The reference LAMB once formed lr * s in float32 for a tensor
    lr instead of in float64 rounded once (SPEC "LAMB"): the "pytorch-optimizer" set, where s =
    1/(1 - beta1^t), differed in the last bit from step 2."""
    dev = case.device
    prob = Problem(dev, seed=34)
    pa, pb = prob.params(), prob.params()
    kw = inp.make_kwargs(dev)
    a = case.make(pa, **kw)
    b = case.make(pb, **dict(inp.make_kwargs(dev), lr=torch.tensor(kw["lr"], device=dev)))
    step_both(prob, (a, pa), (b, pb), range(STEPS))


@pytest.mark.parametrize("case", CASES)
def test_lr_switched_between_tensor_and_float(case):
    """A group's lr switched between a tensor and floats (0.0 included: a frozen group) steps as a
    float lr of the same values throughout. The fused classes once kept the last tensor lr after a
    switch to the float 0.0 (both wrote 0 into the table row, so nothing was re-uploaded)."""
    dev = case.device
    prob = Problem(dev, seed=37)
    pa, pb = prob.params(), prob.params()
    kw = case.default_input.make_kwargs(dev)
    v = float(kw.pop("lr"))
    a = case.make(pa, lr=torch.tensor(v, device=dev), **kw)
    b = case.make(pb, lr=v, **kw)
    for s, lr in enumerate([v, 0.0, torch.tensor(v / 2, device=dev), 0.0, v / 4]):
        a.param_groups[0]["lr"] = lr
        b.param_groups[0]["lr"] = float(lr)
        frozen = [q.detach().clone() for q in pa] if float(lr) == 0.0 else None
        step_both(prob, (a, pa), (b, pb), [s])
        if frozen is not None and case.weight_decay(kw) == 0:
            assert_params_equal(pa, frozen, f"step {s}: lr 0.0")


@pytest.mark.parametrize("case", CASES)
def test_numpy_scalar_hyperparameters(case):
    """numpy scalars (a sweep's np.logspace values, a numpy schedule) are numbers, as in torch.optim:
    np.float32 / np.float64 hyperparameters and np.bool_ flags, at construction and written into
    param_groups between steps, step exactly as the Python values."""
    np = pytest.importorskip("numpy")
    dev = case.device
    prob = Problem(dev, seed=38)
    pa, pb = prob.params(), prob.params()
    kw = case.default_input.make_kwargs(dev)
    lr, wd = float(np.float32(kw.pop("lr"))), float(np.float32(0.01))
    kw.pop("weight_decay", None)
    kw.pop("maximize", None)
    a = case.make(pa, lr=np.float32(lr), weight_decay=np.float32(wd), maximize=np.bool_(False), **kw)
    b = case.make(pb, lr=lr, weight_decay=wd, maximize=False, **kw)
    step_both(prob, (a, pa), (b, pb), range(2))
    a.param_groups[0]["lr"] = np.float64(lr / 2)
    b.param_groups[0]["lr"] = lr / 2
    step_both(prob, (a, pa), (b, pb), range(2, 4))


@pytest.mark.parametrize("case", CASES)
def test_tensor_lr_num_dim_2(case):
    """lr = torch.tensor([[v]]) (a 2-D one-element tensor) with 1-D parameters == lr = v."""
    dev = case.device
    kw = case.default_input.make_kwargs(dev)
    v = float(kw.pop("lr"))
    g = _gen(35)
    init = [torch.randn(7, generator=g), torch.randn(5, generator=g)]
    pa = [_param(x, dev) for x in init]
    pb = [_param(x, dev) for x in init]
    a = case.make(pa, lr=v, **kw)
    b = case.make(pb, lr=torch.tensor([[v]], device=dev), **kw)
    for s in range(STEPS):
        c = [torch.randn(x.shape, generator=_gen(36 + s)).to(dev) for x in init]
        for opt, ps in ((a, pa), (b, pb)):
            opt.zero_grad()
            sum((q * cc).sum() + q.pow(2).sum() for q, cc in zip(ps, c)).backward()
            opt.step()
        assert_params_equal(pa, pb, f"step {s}")


@pytest.mark.parametrize("case, inp", INPUTS)
def test_lr_scheduler_drives_lr(case, inp):
    """A scheduler-driven run equals a run whose lr is set by hand to the same values."""
    dev = case.device
    prob = Problem(dev, seed=37)
    pa, pb = prob.params(), prob.params()
    a, b = case.make(pa, **inp.make_kwargs(dev)), case.make(pb, **inp.make_kwargs(dev))
    sched = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    lrs = []
    for s in range(STEPS + 1):
        lr = float(a.param_groups[0]["lr"])
        lrs.append(lr)
        g = b.param_groups[0]
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr
        prob.step(a, pa, s)
        prob.step(b, pb, s)
        sched.step()
        assert_params_equal(pa, pb, f"step {s}")
    assert len(set(lrs)) == len(lrs), f"the scheduler must change lr: {lrs}"


# ===============================================================================================
# step(): closure, hooks (test_step_pre_hook, test_step_post_hook, test_step_all_hooks)
# ===============================================================================================
@pytest.mark.parametrize("case", CASES)
def test_step_with_closure_returns_the_loss(case):
    dev = case.device
    prob = Problem(dev, seed=38)
    p = prob.params()
    opt = case.make_default(p)
    seen = []

    def closure():
        opt.zero_grad()
        loss = prob.loss(p, 0)
        loss.backward()
        seen.append(loss)
        return loss

    assert opt.step(closure) is seen[-1]
    with torch.no_grad():   # step() runs the closure with grad enabled
        assert opt.step(closure) is seen[-1]
    assert opt.step() is None


@pytest.mark.parametrize("case", CASES)
def test_step_pre_and_post_hooks(case):
    dev = case.device
    params = [Parameter(torch.randn(2, generator=_gen(39)).to(dev))]
    opt = case.make_default(params)
    data = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: data.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: data.append(("post", o is opt)))
    params[0].grad = torch.randn(2, generator=_gen(40)).to(dev)
    opt.step()
    opt.step()
    assert data == [("pre", True), ("post", True)] * 2
    pre.remove()
    post.remove()
    opt.step()
    assert len(data) == 4


@pytest.mark.parametrize("case", CASES)
def test_step_all_hooks(case):
    dev = case.device
    params = [Parameter(torch.randn(2, generator=_gen(41)).to(dev))]
    opt = case.make_default(params)
    other = torch.optim.SGD(params, lr=1e-3)
    data = []
    handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
               register_optimizer_step_post_hook(lambda *a: data.append(5))]
    try:
        for o in (opt, other):
            handles.append(o.register_step_pre_hook(lambda *a: data.append(1)))
            handles.append(o.register_step_post_hook(lambda *a: data.append(2)))
        opt.step()
        assert data == [0, 1, 2, 5]
        other.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step()
    other.step()
    assert data == [0, 1, 2, 5] * 3


# ===============================================================================================
# state_dict / load_state_dict hooks
# ===============================================================================================
@pytest.mark.parametrize("case", CASES)
def test_state_dict_pre_and_post_hooks(case):
    dev = case.device
    p = Problem(dev, seed=42).params()
    opt = case.make_default(p)
    calls = []

    def pre(o):
        calls.append("pre")
        o.param_groups[0]["lr"] = 0.125       # what a pre-hook does to the optimizer is saved

    def post(o, sd):
        calls.append("post")
        assert sd["param_groups"][0]["lr"] == 0.125
        sd["edited"] = True                   # edited in place, returns None

    def post_returning(o, sd):
        calls.append("post2")
        out = dict(sd)
        out["returned"] = True                # a returned dict replaces the state_dict
        return out

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    opt.register_state_dict_post_hook(post_returning)
    sd = opt.state_dict()
    assert calls == ["pre", "post", "post2"]
    assert sd["param_groups"][0]["lr"] == 0.125 and sd["edited"] and sd["returned"]


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_pre_hook_and_prepend(case):
    dev = case.device
    p = Problem(dev, seed=43).params()
    opt = case.make_default(p)
    sd = opt.state_dict()

    def hook_in_place(o, s):
        s["param_groups"][0]["lr"] = 0.002

    def hook_returning(o, s):
        s = copy.deepcopy(s)
        s["param_groups"][0]["lr"] = 0.003
        return s

    opt.register_load_state_dict_pre_hook(hook_in_place)
    opt.load_state_dict(copy.deepcopy(sd))
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(hook_returning, prepend=True)
    opt.load_state_dict(copy.deepcopy(sd))
    assert opt.param_groups[0]["lr"] == 0.002, "prepended hook runs first, the in-place hook overrides it"
    opt2 = case.make_default(Problem(dev, seed=43).params())
    opt2.register_load_state_dict_pre_hook(hook_in_place)
    opt2.register_load_state_dict_pre_hook(hook_returning)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["lr"] == 0.003, "the later hook's returned state_dict is the one loaded"


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_post_hook(case):
    dev = case.device
    p = Problem(dev, seed=44).params()
    opt = case.make_default(p)
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, s: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("post", o.param_groups[0]["lr"])))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.003
    opt.load_state_dict(sd)
    assert seen == ["pre", ("post", 0.003)]


@pytest.mark.parametrize("case, where", case_params(variants=[
    ("pre-hook returns", "pre-hook-returns"), ("post-hook edits in place", "post-hook-edits-in-place"),
    ("post-hook replaces", "post-hook-replaces")]))
def test_load_state_dict_hook_changes_are_used(case, where):
    """What a load_state_dict pre-hook returns, or a post-hook edits (lr and every state tensor:
    momentum, LAMB's exp_avg and exp_avg_sq; in place or by assigning a new tensor), is what the
    optimizer then uses: the run equals one edited by hand after load_state_dict."""
    dev = case.device
    kw = case.default_input.make_kwargs(dev)
    keys = case.state_tensor_keys(kw)
    prob = Problem(dev, seed=45)
    p0 = prob.params()
    opt0 = case.make(p0, **kw)
    prob.run(opt0, p0, range(STEPS))
    sd = opt0.state_dict()

    def pre(o, s):
        s = copy.deepcopy(s)
        s["param_groups"][0]["lr"] = 0.125
        for st in s["state"].values():
            for key in keys:
                if isinstance(st, dict) and key in st:
                    st[key].mul_(0.5)
        return s

    def post(o, replace=False):
        o.param_groups[0]["lr"] = 0.125
        for p in opt_params(o):
            st = o.state.get(p, {})
            for key in keys:
                if key in st:
                    if replace:
                        st[key] = st[key] * 0.5
                    else:
                        st[key].mul_(0.5)

    ph, pm, pu = clones(p0), clones(p0), clones(p0)
    hooked = case.make(ph, **case.default_input.make_kwargs(dev))
    by_hand = case.make(pm, **case.default_input.make_kwargs(dev))
    unchanged = case.make(pu, **case.default_input.make_kwargs(dev))
    if where == "pre-hook returns":
        hooked.register_load_state_dict_pre_hook(pre)
    else:
        hooked.register_load_state_dict_post_hook(lambda o: post(o, replace=where == "post-hook replaces"))
    for o in (hooked, by_hand, unchanged):
        o.load_state_dict(copy.deepcopy(sd))
    post(by_hand)
    for s in range(STEPS, STEPS + 2):
        for o, ps in ((hooked, ph), (by_hand, pm), (unchanged, pu)):
            prob.step(o, ps, s)
        assert_params_equal(ph, pm, f"{where}: step {s}")
    assert max_err(ph, pu) > 0, "(the edit must matter for this test to mean anything)"


# ===============================================================================================
# Named parameters (torch >= 2.6: test_state_dict_deterministic/test_can_load_from_to_named_state_dict)
# ===============================================================================================
def _named_model(dev, seed=46):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dev)


def _model_step(model, opt, s, dev):
    opt.zero_grad()
    x = torch.randn(5, 4, generator=_gen(47 + s)).to(dev)
    model(x).pow(2).sum().backward()
    opt.step()


@requires_named
@pytest.mark.parametrize("case", CASES)
def test_named_parameters(case):
    dev = case.device
    m1 = _named_model(dev)
    m2 = copy.deepcopy(m1)
    names = [n for n, _ in m1.named_parameters()]
    o1 = case.make_default(m1.named_parameters())
    o2 = case.make_default(m2.parameters())
    for s in range(STEPS):
        _model_step(m1, o1, s, dev)
        _model_step(m2, o2, s, dev)
        assert_params_equal(list(m1.parameters()), list(m2.parameters()), f"step {s}")
    sd1, sd2 = o1.state_dict(), o2.state_dict()
    assert sd1["param_groups"][0]["param_names"] == names
    assert "param_names" not in sd2["param_groups"][0]
    sd1["param_groups"][0].pop("param_names")
    assert_tree_equal(sd1, sd2)


@requires_named
@pytest.mark.parametrize("case", CASES)
def test_named_param_groups(case):
    dev = case.device
    m = _named_model(dev)
    named = list(m.named_parameters())
    opt = case.make_default([{"params": named[:2]}, {"params": named[2:], "lr": 0.25}])
    for s in range(2):
        _model_step(m, opt, s, dev)
    groups = opt.state_dict()["param_groups"]
    assert groups[0]["param_names"] == ["0.weight", "0.bias"]
    assert groups[1]["param_names"] == ["2.weight", "2.bias"]
    assert groups[1]["lr"] == 0.25


@requires_named
@pytest.mark.parametrize("case, named", case_params(variants=[
    ((True, False), "named-to-unnamed"), ((False, True), "unnamed-to-named"),
    ((True, True), "named-to-named"), ((False, False), "unnamed-to-unnamed")]))
def test_load_between_named_and_unnamed(case, named):
    named0, named1 = named
    dev = case.device
    m = _named_model(dev)
    o = case.make_default(m.named_parameters() if named0 else m.parameters())
    for s in range(STEPS):
        _model_step(m, o, s, dev)
    m2 = copy.deepcopy(m)
    o2 = case.make_default(m2.named_parameters() if named1 else m2.parameters())
    o2.load_state_dict(copy.deepcopy(o.state_dict()))
    for s in range(STEPS, STEPS + 2):
        _model_step(m, o, s, dev)
        _model_step(m2, o2, s, dev)
        assert_params_equal(list(m.parameters()), list(m2.parameters()), f"step {s}")
    if named0 or named1:
        assert o2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


@requires_named
@pytest.mark.parametrize("case", CASES)
def test_named_and_unnamed_mixed_raises(case):
    dev = case.device
    a, b = Parameter(torch.randn(2, 2).to(dev)), Parameter(torch.randn(2, 2).to(dev))
    with pytest.raises(ValueError):
        case.make_default([("weight", a), b])
    with pytest.raises(ValueError):
        case.make_default([{"params": [a]}, {"params": [("weight", b)]}])


# ===============================================================================================
# Construction: errors (test_errors), repr, signature, class relations
# ===============================================================================================
@pytest.mark.parametrize("case", CASES)
def test_optimizer_can_be_printed(case):
    dev = case.device
    opt = case.make_default([Parameter(torch.randn(2, 3).to(dev)) for _ in range(2)])
    r = repr(opt)
    assert type(opt).__name__ in r and "Parameter Group 0" in r and "lr" in r


@pytest.mark.parametrize("case", CASES)
def test_errors(case):
    dev = case.device
    a, b = Parameter(torch.randn(2, 2).to(dev)), Parameter(torch.randn(2, 2).to(dev))
    with pytest.raises(ValueError):            # empty parameter list (and an exhausted generator)
        case.make_default([])
    with pytest.raises(ValueError):
        case.make_default(p for p in [])
    with pytest.raises(TypeError):             # a bare tensor is not an iterable of parameters
        case.make_default(a)
    with pytest.raises(ValueError):            # one parameter in two groups
        case.make_default([{"params": [a]}, {"params": [a, b]}])
    with pytest.raises(ValueError):            # lr must have one element
        case.make_default([a], lr=torch.tensor([0.1, 0.1]))
    for bad in case.invalid_kwargs:
        with pytest.raises(ValueError):
            case.make_default([a], **bad)
    # a parameter twice in one group: torch warns, this project refuses; either way it is flagged
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            case.make_default([a, a])
            raised = False
        except ValueError:
            raised = True
    assert raised or any("duplicate" in str(x.message) for x in w)


@pytest.mark.parametrize("case", case_params(lambda c: c.project and not c.lr_has_default))
def test_lr_is_required(case):
    """lr is torch.optim's `required` (as SGD's was): a group without its own lr is refused with an
    error that says what to do, and a constructor without lr works when every group gives one,
    stepping exactly as the same lrs given otherwise."""
    with pytest.raises(ValueError, match=r"lr is required \(in param_groups\[0\]\): pass lr="):
        case.make([Parameter(torch.randn(2).to(case.device))])
    prob = Problem(case.device, seed=49)
    pa, pb = prob.params(), prob.params()
    a = case.make([{"params": pa[:1], "lr": 0.05}, {"params": pa[1:], "lr": 0.02}])
    b = case.make([{"params": pb[:1]}, {"params": pb[1:], "lr": 0.02}], lr=0.05)
    with pytest.raises(ValueError, match=r"lr is required \(in param_groups\[2\]\)"):
        a.add_param_group({"params": [Parameter(torch.randn(2).to(case.device))]})
    step_both(prob, (a, pa), (b, pb), range(3))


LR_DEFAULTS = {"LAMB": 1e-3}   # docs/SPEC.md's signature (torch's Adam, apex FusedLAMB)


@pytest.mark.parametrize("case", case_params(lambda c: c.project and c.lr_has_default))
def test_lr_default_is_documented(case):
    """Where lr has a default (LAMB), the optimizer built without one steps exactly as one given
    that default, and the group says so."""
    dev = case.device
    prob = Problem(dev, seed=48)
    pa, pb = prob.params(), prob.params()
    a = case.make(pa)
    b = case.make(pb, lr=LR_DEFAULTS[case.name])
    assert a.param_groups[0]["lr"] == LR_DEFAULTS[case.name]
    step_both(prob, (a, pa), (b, pb), range(2))


@pytest.mark.parametrize("case", PROJECT_CASES)
def test_complex_params_rejected(case):
    p = torch.randn(3, 2, dtype=torch.complex64, device=case.device, requires_grad=True)
    with pytest.raises((ValueError, TypeError), match="complex"):
        case.make_default([p])


@pytest.mark.parametrize("case", PROJECT_CASES)
def test_sparse_grad_rejected(case):
    p = Parameter(torch.randn(4, 3).to(case.device))
    opt = case.make_default([p])
    old = p.detach().clone()
    p.grad = torch.randn(4, 3).to(case.device).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients are not supported \(the layer-wise trust ratio") as e:
        opt.step()
    assert "LARS" not in str(e.value) or case.cls.__name__ != "LAMB"   # names no other optimizer
    assert torch.equal(p.detach(), old)


HYPERPARAMETERS = {
    "TVLARS": ["params", "lr", "momentum", "weight_decay", "eta", "lmbda", "delay_steps", "alpha",
               "gamma_min", "weight_decay_filter", "lars_adaptation_filter", "norm_clip", "momentum_form"],
    "LARS": ["params", "lr", "momentum", "weight_decay", "eta", "weight_decay_filter",
             "lars_adaptation_filter", "norm_clip", "momentum_form"],
    "LAMB": ["params", "lr", "betas", "eps", "weight_decay", "bias_correction", "weight_decay_mode",
             "grad_averaging", "weight_norm_clip", "ratio_eps", "adapt", "always_adapt", "weight_decay_filter",
             "adaptation_filter", "maximize", "trust_clip"],
}


@pytest.mark.parametrize("case", PROJECT_CASES)
def test_signature_lists_the_hyperparameters(case):
    sig = inspect.signature(case.cls.__init__)
    kinds = [p.kind for p in sig.parameters.values()]
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds, str(sig)
    names = list(sig.parameters)
    assert names[:3] == ["self", "params", "lr"], str(sig)
    if case.lr_has_default:
        assert sig.parameters["lr"].default == LR_DEFAULTS[case.name], str(sig)
    else:
        assert sig.parameters["lr"].default is required, "lr is torch's required"
    missing = [n for n in HYPERPARAMETERS[case.name] if n not in names]
    assert not missing, f"{case.cls.__qualname__}{sig} lacks {missing}"
    assert ("backend" in names) == case.fused, str(sig)
    if case.fused:
        assert sig.parameters["backend"].default == "auto"


@pytest.mark.parametrize("case", PROJECT_CASES)
def test_signature_defaults_are_the_algorithm_defaults(case):
    """The defaults are written three times: the fused and the reference signatures (explicit, as
    torch's optimizers) and the algorithm's defaults table, which load_state_dict fills into
    param groups saved before an option existed. They must agree, option by option."""
    sig = inspect.signature(case.cls.__init__).parameters
    in_signature = {k: p.default for k, p in sig.items() if k not in ("self", "params", "lr", "backend")}
    table = {k: v for k, v in case.cls.algorithm.defaults.items() if k != "lr"}
    assert in_signature == table, (case.cls.__qualname__, set(in_signature.items()) ^ set(table.items()))


@pytest.mark.parametrize("case", PROJECT_CASES)
def test_fused_and_reference_are_siblings(case):
    fused_cls, ref_cls = getattr(tvlars_fused, case.name), getattr(reference, case.name)
    assert issubclass(fused_cls, torch.optim.Optimizer) and issubclass(ref_cls, torch.optim.Optimizer)
    assert not issubclass(fused_cls, ref_cls) and not issubclass(ref_cls, fused_cls)
    opt = case.make_default([Parameter(torch.randn(3).to(case.device))])
    assert not isinstance(opt, ref_cls if case.fused else fused_cls)


_TORCH_ERROR_INPUTS = r"""
import pytest
import torch
from torch.nn import Parameter
from torch.testing._internal.common_optimizers import get_error_inputs_for_all_optims
import tvlars_fused
from tvlars_fused import reference
inputs = get_error_inputs_for_all_optims("cpu", torch.float32)
assert len(inputs) >= 5, len(inputs)
for module in (tvlars_fused, reference):
    for name, lr in (("TVLARS", 0.1), ("LARS", 0.1), ("LAMB", 1e-3)):
        for backend in (("cpu", "torch") if module is tvlars_fused else (None,)):
            cls = getattr(module, name)
            for err in inputs:
                inp = err.optimizer_error_input
                params = inp.params if inp.params is not None else [Parameter(torch.randn(2, 2))]
                error_type, regex = err.error_type, err.error_regex
                if error_type is UserWarning and "duplicate parameters" in regex:
                    error_type = ValueError   # refused here (torch warns, then updates it twice)
                kwargs = {"lr": lr, **inp.kwargs, **({"backend": backend} if backend else {})}
                with pytest.raises(error_type, match=regex):
                    cls(params, **kwargs)
                print("ok", module.__name__, name, backend, inp.desc)
"""


def test_torch_generic_error_inputs():
    """torch's own generic error inputs (common_optimizers.get_error_inputs_for_all_optims, the
    inputs of its test_errors) raise the error type torch expects, with torch's wording, for every
    class. One deliberate difference: a parameter listed twice in one group is an error here (torch
    only warns, then updates it twice per step). In a subprocess: importing torch's test utilities
    freezes torch.backends flags for the whole process."""
    pytest.importorskip("expecttest")   # torch.testing._internal needs it (make test installs it)
    out = subprocess.run([sys.executable, "-c", _TORCH_ERROR_INPUTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.count("ok ") >= 9 * 5, out.stdout
