"""Reliability of the fused optimizers (TVLARS and LAMB), on every fused backend of every device
present, always against tvlars_fused.reference on the same inputs (on the same device):

1. bad input: a clear error (naming the parameter or argument, saying what to do) before anything
   changes, and an optimizer that still works afterwards;
2. unusual but valid parameters: zero-size, frozen, unused, non-contiguous, channels_last, tied,
   several dtypes, groups added after steps;
3. things users do behind the optimizer's back (module.to(dtype), param.data = ..., edited
   param_groups or state, replaced parameters and gradients): detected before a wrong step;
4. non-finite values: found_inf skips bit for bit, NaN/Inf gradients give what the reference gives,
   zero norms give q = 1;
5. state: checkpoint -> fresh process -> resume is bit for bit, state_dicts move between backends
   and the reference, float32 state (momentum; LAMB's moments) of bfloat16 parameters survives
   save/load;
6. long runs: float64 tracks the reference the whole way, float32 passes the parity rule
   (tests/parity.py) in every 250-step window;
7. memory: a step allocates nothing after warm-up; the optimizer's overhead against the reference.

The library bugs this file found are fixed; each stays covered by the test that found it.

The cases (tests/backend_cases.py): on the CPU "torch", "cpu" once tvlars_fused._C is built and
"triton" under the Triton interpreter (ids [torch], [cpu], [triton]); on a CUDA machine also
"triton", "cuda" and "torch" on CUDA tensors ([cuda-triton], [cuda-cuda], [cuda-torch]); each for
TVLARS and for LAMB ([torch-LAMB], ..., [cuda-torch-LAMB]). What differs between the two (state
keys, how the state starts, the option sets, the bad options) comes from the case's
`spec` (backend_cases.ALGORITHMS); each class's hyperparameters from HYPER. LAMB on the Triton
interpreter ([triton-LAMB]) is marked slow (tests/test_lamb.py holds those kernels to the oracle
by default); TVLARS's interpreted cases run by default, as before. Tensors are made on the CPU
from CPU generators and moved to the case's device; results are compared on the CPU. The
checkpoint test's fresh process resumes the CUDA cases on the GPU too.

CPU-only tests, and why:
- test_step_allocates_nothing_after_warmup: counts allocations with torch's CPU profiler
  (profile_memory), which sees only the CPU allocator. On a GPU,
  test_cuda_step_allocates_nothing_after_warmup checks "triton" and "cuda" with the CUDA caching
  allocator's statistics.
CUDA-only (requires_cuda): test_cuda_step_allocates_nothing_after_warmup,
test_module_to_cuda_after_build (each for both classes).
"""
from __future__ import annotations

import copy
import io
import os
import random
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

from tvlars_fused.kernels import available_backends

import _ckpt_worker as ckpt
from backend_cases import (ALGORITHMS, CASES, CPU_CASES, BackendCase, extra_interpreted, params, params_with,
                           with_reference)
from conftest import requires_cuda
from parity import assert_close_ulps, assert_parity_fp32, bit_equal, make_init, max_err, train

BACKENDS = params(CASES, slow=extra_interpreted)                                # every (device, backend, class)
BACKENDS_AND_REFERENCE = params(with_reference(CASES), slow=extra_interpreted)  # ... and the references
CPU_BACKENDS = params(CPU_CASES, slow=extra_interpreted)                        # the CPU-only tests (see above)


def each_form(cases=CASES):
    """(case, form id) params: each class's two forms (AlgorithmSpec.forms)."""
    return params_with(cases, lambda c: [(f, f) for f, _ in c.spec.forms], slow=extra_interpreted)


# Per class (the case's, or one a test names): the hyperparameters every test starts from.
HYPER = {
    "TVLARS": dict(lr=0.7, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=3),
    "LARS": dict(lr=0.7, momentum=0.9, weight_decay=1e-3, eta=2e-3),
    # lr: LAMB moves each layer by about lr * ||w||; betas below the default, so that the moments
    # (and their bias correction) change visibly over the few steps these tests take. eps and
    # weight_decay keep the float64 comparisons meaningful on _ckpt_worker's conv -> BatchNorm
    # model: BatchNorm removes the conv bias, whose gradient is then rounding noise (~1e-17, a
    # different noise in each run once the weights differ in the last bit); Adam divides it by
    # eps and the trust ratio scales u = r + wd*w to lr * ||w||, so the runs end about
    # lr * (1 - beta1) * 1e-17 / (eps * wd) apart on that bias: 2e-9 with eps=1e-6, wd=1e-3 (the
    # defaults' order), 1e-13 with these.
    "LAMB": dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
}
F64_TOL = 1e-12   # fused vs reference, float64 parameters (as tests/test_fused.py)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the machine is shared, and these tiny ops only lose time to thread
    hand-offs (results do not depend on it: every backend is deterministic per thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(case, cls=None, **kw):
    """Optimizer factory for a BackendCase (case.reference: the eager reference), or for a backend
    name ("auto", ..., "reference": TVLARS on the CPU), of the case's class (or `cls`), from
    HYPER[class] updated by kw. The caller puts the parameters on the case's device."""
    if isinstance(case, str):
        case = BackendCase("cpu", case)
    cls = cls or case.algo
    return case.optimizer(cls, **{**HYPER[cls], **kw})


def state_keys(case, **options):
    """The state tensors of a parameter updated by the case's class with these group options."""
    return case.spec.state_keys(options)


def snapshot(opt) -> dict:
    """Everything a skipped or rejected step must leave alone, cloned."""
    sd = opt.state_dict()
    snap = {"params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
            "state": {k: ({n: t.detach().clone() for n, t in v.items()} if isinstance(v, dict) else v.detach().clone())
                      for k, v in sd["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
            "step": float(opt.step_count)}
    if hasattr(opt, "layer_stats"):
        snap["stats"] = [s.detach().clone() for s in opt.layer_stats().values()]
    return snap


def assert_unchanged(before: dict, after: dict, what: str = "") -> None:
    assert after["step"] == before["step"], f"{what}: step counter changed"
    assert len(after["params"]) == len(before["params"])
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert bit_equal(a, b), f"{what}: parameter {i} changed"
    assert after["state"].keys() == before["state"].keys(), f"{what}: state entries changed"
    for k, v in before["state"].items():
        if isinstance(v, dict):
            assert after["state"][k].keys() == v.keys(), f"{what}: state[{k}] keys changed"
            for n, t in v.items():
                assert bit_equal(t, after["state"][k][n]), f"{what}: state[{k}][{n!r}] changed"
        else:
            assert bit_equal(v, after["state"][k]), f"{what}: state[{k!r}] changed"
    assert after["groups"] == before["groups"], f"{what}: param_groups changed"
    for i, (a, b) in enumerate(zip(before.get("stats", []), after.get("stats", []))):
        assert bit_equal(a, b), f"{what}: layer_stats of parameter {i} changed"


def set_grads(params, step: int, seed: int = 7) -> None:
    """Hand-written gradients (a fresh tensor each time), the same for every optimizer."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)


def lockstep(params_by_run, opts, steps, start=0, seed=7, before_step=None):
    """Same hand-written gradients for several (params, optimizer) runs."""
    for s in range(start, start + steps):
        for ps, o in zip(params_by_run, opts):
            if before_step is not None:
                before_step(s, ps, o)
            set_grads(ps, s, seed)
            o.step()


def tiny_params(dtype=torch.float64, seed=0, device="cpu"):
    return [nn.Parameter(x.to(device=device, dtype=dtype)) for x in make_init([(5, 4), (4,), (3, 3)], seed)]


# ==== 1. bad input ==================================================================================

@pytest.mark.parametrize("case", BACKENDS)
def test_sparse_embedding_gradient_rejected_at_step(case):
    """nn.Embedding(sparse=True): autograd's sparse gradient reaches step(), which rejects it naming
    the parameter (the grad hook must not densify it into the bucket)."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(10, 4, sparse=True).to(case.device), nn.Linear(4, 2).to(case.device)
    params = list(emb.parameters()) + list(lin.parameters())
    opt = make(case)(params)
    before = snapshot(opt)
    lin(emb(torch.tensor([1, 3, 3], device=case.device))).sum().backward()
    assert emb.weight.grad.is_sparse, "autograd's sparse gradient was replaced by a dense one"
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse gradients.*sparse=False"):
        opt.step()
    assert_unchanged(before, snapshot(opt), "rejected sparse step")


@pytest.mark.parametrize("case", BACKENDS_AND_REFERENCE)
def test_sparse_gradient_assigned_by_hand_rejected_at_step(case):
    """A sparse .grad that reaches step() (the reference always; the fused classes when it is
    assigned by hand) is rejected before anything changes, naming the parameter."""
    ps = tiny_params(device=case.device)
    opt = make(case)(ps)
    set_grads(ps, 0)
    opt.step()
    before = snapshot(opt)
    set_grads(ps, 1)
    ps[2].grad = torch.sparse_coo_tensor([[0, 2], [1, 1]], [1.0, 2.0], (3, 3), dtype=torch.float64,
                                         device=case.device, check_invariants=True)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\].*sparse gradients.*sparse=False"):
        opt.step()
    assert_unchanged(before, snapshot(opt), "rejected sparse step")
    ps[2].grad = ps[2].grad.to_dense()   # the fix the message suggests: a dense gradient
    opt.step()
    assert snapshot(opt)["step"] == 2


@pytest.mark.parametrize("case", BACKENDS)
def test_complex_and_integer_parameters_rejected_at_construction(case):
    ps = tiny_params(device=case.device)
    cplx = nn.Parameter(torch.randn(2, 2, dtype=torch.complex64).to(case.device))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[3\].*complex parameters.*view_as_real"):
        make(case)(ps + [cplx])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*only floating-point.*int64"):
        make(case)([ps[0], torch.zeros(3, dtype=torch.int64, device=case.device)])
    # add_param_group: rejected, and the optimizer is untouched and keeps working
    opt = make(case)(ps)
    set_grads(ps, 0)
    opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*complex parameters.*view_as_real"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1
    assert_unchanged(before, snapshot(opt), "rejected add_param_group")
    ps_r = tiny_params(device=case.device)
    o_r = make(case.reference)(ps_r)
    lockstep([ps_r], [o_r], 1)
    lockstep([ps, ps_r], [opt, o_r], 2, start=1)
    assert max_err(ps, ps_r) < F64_TOL


@pytest.mark.parametrize("case", BACKENDS)
def test_parameter_in_two_groups_rejected(case):
    a, b, c = tiny_params(device=case.device)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] .*appears twice in the same group"):
        make(case)([a, b, a])
    with pytest.raises(ValueError, match=r"more than one parameter group|param_groups\[1\]"):
        make(case)([{"params": [a, b]}, {"params": [c, b]}])
    c0 = c.detach().clone()
    opt = make(case)([a, b])
    set_grads([a, b], 0)
    opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"more than one parameter group|param_groups\[1\]"):
        opt.add_param_group({"params": [c, a], "lr": 0.1})
    assert len(opt.param_groups) == 1
    assert_unchanged(before, snapshot(opt), "rejected add_param_group")
    opt.add_param_group({"params": [c], "lr": 0.1})   # the corrected call works
    set_grads([a, b, c], 1)
    opt.step()
    assert not torch.equal(c, c0) and float(opt.step_count) == 2


@pytest.mark.parametrize("case", BACKENDS)
def test_parameter_in_two_groups_error_names_it(case):
    a, b, c = tiny_params(device=case.device)
    with pytest.raises(ValueError) as info:
        make(case)([{"params": [a, b]}, {"params": [c, b]}])
    msg = str(info.value)
    assert re.search(r"param_groups\[1\]\['params'\]\[1\]", msg), msg        # the duplicate
    assert re.search(r"param_groups\[0\]\['params'\]\[1\]", msg), msg        # where it already is
    assert re.search(r"\b(remove|only one|once)\b", msg), msg                   # what to do


@pytest.mark.parametrize("case", BACKENDS)
def test_empty_parameter_list_rejected(case):
    model = nn.Linear(3, 2).to(case.device)
    params = model.parameters()
    list(params)   # a generator consumed once already: the classic way to pass nothing
    for empty in ([], params):
        with pytest.raises(ValueError, match=r"(?i)\bempty\b"):
            make(case)(empty)


@pytest.mark.parametrize("case", BACKENDS)
def test_empty_parameter_list_error_says_what_to_do(case):
    with pytest.raises(ValueError) as info:
        make(case)([])
    msg = str(info.value)
    assert re.search(r"\bparams\b", msg) and re.search(r"\b(pass|use|give|provide)\b", msg), msg


@pytest.mark.parametrize("case", BACKENDS)
def test_all_groups_empty_works_like_reference(case):
    ps, ps_r = tiny_params(device=case.device), tiny_params(device=case.device)
    opt, o_r = make(case)([{"params": []}]), make(case.reference)([{"params": []}])
    for o in (opt, o_r):
        o.step()                                   # nothing to update; t still advances
        o.add_param_group({"params": ps if o is opt else ps_r, "lr": 0.3})
    lockstep([ps, ps_r], [opt, o_r], 3)
    assert max_err(ps, ps_r) < F64_TOL
    assert float(opt.step_count) == float(o_r.step_count) == 4


# (name, bad value, regex the message must match: it names the hyperparameter and says what is valid):
# each class's AlgorithmSpec.bad_options (tests/backend_cases.py)
OVERFLOW = dict(lmbda=1.0, delay_steps=200)   # phi(0) = 1/(alpha + e^-200): overflows for alpha = 0


def _bad_id(name, value):
    return f"{name}={value!r}" if not isinstance(value, torch.Tensor) else f"{name}=tensor{tuple(value.shape)}"


BAD_HYPER = params_with(CASES, lambda c: [(_bad_id(n, v), (n, v, m)) for n, v, m in c.spec.bad_options],
                        slow=extra_interpreted)


@pytest.mark.parametrize("case,bad", BAD_HYPER)
def test_invalid_hyperparameter_rejected_at_construction(case, bad):
    name, value, msg = bad
    extra = OVERFLOW if msg.startswith("Invalid lmbda/") else {}
    with pytest.raises(ValueError, match=msg):
        make(case, **extra, **{name: value})(tiny_params(device=case.device))
    for sibling, options in case.spec.siblings:   # LARS validates its own arguments the same way
        if name in options:
            with pytest.raises(ValueError, match=msg):
                make(case, cls=sibling, **{name: value})(tiny_params(device=case.device))


@pytest.mark.parametrize("case", BACKENDS_AND_REFERENCE)
def test_tensor_lr_value_checked_when_a_group_is_added(case):
    """A tensor lr's value is read (one sync) where torch.optim reads it, in the constructor and
    add_param_group: negative, NaN or infinite is refused there, naming it; step() reads it only
    on the device."""
    for value in (-0.1, float("nan"), float("inf")):
        lr = torch.tensor(value, device=case.device)
        with pytest.raises(ValueError, match=r"Invalid lr: .*\(in the constructor arguments\).*finite and >= 0"):
            make(case, lr=lr)(tiny_params(device=case.device))
        opt = make(case, lr=0.1)(tiny_params(device=case.device))
        with pytest.raises(ValueError, match=r"Invalid lr: .*\(in param_groups\[1\]\).*finite and >= 0"):
            opt.add_param_group({"params": tiny_params(device=case.device), "lr": lr})
        assert len(opt.param_groups) == 1


# each class's AlgorithmSpec.contradictions (LAMB has none: every combination of its options is valid)
CONTRADICTIONS = params_with(CASES, lambda c: [(str(o), (o, m)) for o, m in c.spec.contradictions],
                             slow=extra_interpreted)


@pytest.mark.parametrize("case,contradiction", CONTRADICTIONS)
def test_contradictory_options_rejected(case, contradiction):
    """Each option is valid alone; together they mean nothing: a clear error at construction, and
    the same error (naming the group) when the combination is written into param_groups later."""
    options, msg = contradiction
    for cls in (case.algo, *(sibling for sibling, _ in case.spec.siblings)):
        with pytest.raises(ValueError, match=msg):
            make(case, cls=cls, **options)(tiny_params(device=case.device))
    ps = tiny_params(device=case.device)
    opt = make(case)(ps)
    opt.param_groups[0].update(options)
    sum(p.sum() for p in ps).backward()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=msg) as exc:
        opt.step()
    assert "(in param_groups[0])" in str(exc.value)
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


def test_numpy_option_values():
    """numpy scalars (a sweep config's values) are numbers: accepted, the same step as Python
    floats; a non-finite one is refused with the ValueError (no numpy RuntimeWarning first)."""
    np = pytest.importorskip("numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"momentum must be finite"):
            make("cpu", momentum=np.float64("inf"))(tiny_params())
        runs = []
        for lr, momentum in ((np.float64(0.1), np.float32(0.5)), (0.1, float(np.float32(0.5)))):
            ps = tiny_params()
            opt = make("cpu", lr=lr, momentum=momentum)(ps)
            set_grads(ps, 0)
            opt.step()
            runs.append(ps)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("case", [c for c in BACKENDS_AND_REFERENCE if c.values[0].algo == "LAMB"])
def test_option_changed_in_place_is_checked(case):
    """step() checks again only the options that changed; an option held in a list (betas given
    as [0.9, 0.999]) can change in place, so it is checked at every step: an invalid value
    written into it is refused before anything moves."""
    ps = tiny_params(device=case.device)
    opt = make(case, betas=[0.9, 0.999])(ps)
    set_grads(ps, 0)
    opt.step()
    opt.param_groups[0]["betas"][0] = 1.5
    set_grads(ps, 1)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"Invalid betas\[0\]: 1\.5 \(in param_groups\[0\]\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))


@pytest.mark.parametrize("case,bad", BAD_HYPER)
def test_invalid_hyperparameter_set_later_changes_nothing(case, bad):
    """A bad value written into param_groups after some steps: step() raises, naming the value
    and the group, and changes nothing (parameters, state, t, layer_stats); with the value put back
    the run continues exactly like the reference's."""
    name, value, msg = bad
    extra = OVERFLOW if msg.startswith("Invalid lmbda/") else {}
    runs = []
    for b in (case, case.reference):
        ps = tiny_params(device=case.device)
        opt = make(b)([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.3}])
        lockstep([ps], [opt], 2)
        runs.append((ps, opt))
    (ps, opt), (ps_r, o_r) = runs
    for o in (opt, o_r):
        saved = {k: o.param_groups[1][k] for k in [name, *extra]}
        o.param_groups[1].update(extra)
        o.param_groups[1][name] = value
        before = snapshot(o)
        set_grads(ps if o is opt else ps_r, 2)
        with pytest.raises(ValueError, match=msg) as info:
            o.step()
        assert_unchanged(before, snapshot(o), f"rejected step ({name}={value!r})")
        assert re.search(r"param_groups\[1\]", str(info.value)), f"the message does not locate the group: {info.value}"
        o.param_groups[1].update(saved)
    lockstep([ps, ps_r], [opt, o_r], 2, start=2)
    assert max_err(ps, ps_r) < F64_TOL


def _net_and_opt(case, seed=0, groups=True):
    model = ckpt.make_model(seed, case.device).double()
    if groups:
        ws = [p for p in model.parameters() if p.ndim > 1]
        vs = [p for p in model.parameters() if p.ndim == 1]
        return model, make(case)([{"params": ws}, {"params": vs, "lr": 0.2}])
    return model, make(case)(model.parameters())


def _loop(model, opt, steps, start=0):
    dev = next(model.parameters()).device
    for s in range(start, start + steps):
        x, y = ckpt.batch(s, dev)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.double()), y.double()).backward()
        opt.step()


def _saved_state(case, steps=2):
    model, opt = _net_and_opt(case)
    _loop(model, opt, steps)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


STRUCTURE_CASES = {
    # optimizer the state_dict is loaded into (the saved one has 2 groups: [conv.w, fc.w], [conv.b, bn.w, bn.b, fc.b])
    "fewer_params": lambda m: [{"params": [m.conv.weight]}, {"params": [m.conv.bias, m.bn.weight, m.bn.bias, m.fc.bias]}],
    "more_params": lambda m: [{"params": [m.conv.weight, m.fc.weight]},
                              {"params": [m.conv.bias, m.bn.weight, m.bn.bias, m.fc.bias, m.extra]}],
    "fewer_groups": lambda m: [{"params": list(m.parameters())}],
    "more_groups": lambda m: [{"params": [m.conv.weight, m.fc.weight]}, {"params": [m.conv.bias, m.bn.weight]},
                              {"params": [m.bn.bias, m.fc.bias]}],
}


def _structured(case, structure):
    model = ckpt.make_model(1, case.device).double()
    model.extra = nn.Parameter(torch.ones(3, dtype=torch.float64, device=case.device))
    return model, make(case)(STRUCTURE_CASES[structure](model))


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("structure", list(STRUCTURE_CASES))
def test_load_state_dict_wrong_structure_rejected(case, structure):
    """A state_dict with a different number of parameters or groups is rejected; the optimizer is
    unchanged and trains on exactly like one that never saw it."""
    sd = _saved_state(case)
    model, opt = _structured(case, structure)
    model_r, o_r = _structured(case.reference, structure)
    _loop(model, opt, 1)
    _loop(model_r, o_r, 1)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"parameter group|different model"):
        opt.load_state_dict(sd)
    assert_unchanged(before, snapshot(opt), "rejected load_state_dict")
    _loop(model, opt, 2, start=1)
    _loop(model_r, o_r, 2, start=1)
    assert max_err(model.parameters(), model_r.parameters()) < F64_TOL


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("structure", ["fewer_params", "more_groups"])
def test_load_state_dict_wrong_structure_error_names_it(case, structure):
    sd = _saved_state(case)
    _, opt = _structured(case, structure)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    msg = str(info.value)
    assert re.search(r"param_groups\[\d\]|\b\d+ (parameter )?groups\b|\b\d+ parameters\b", msg), msg
    assert re.search(r"same (model|parameters)|build the optimizer|parameter order", msg), msg


@pytest.mark.parametrize("case", BACKENDS)
def test_load_state_dict_wrong_shapes_rejected(case):
    """Same structure, other shapes (a (3, 4) momentum, or LAMB's moments, for a (4, 3) weight):
    rejected naming the entry and both shapes; the optimizer is unchanged and usable."""
    dev = case.device
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dev, torch.float64)
    o_src = make(case)(src.parameters())
    src(torch.randn(2, 4, dtype=torch.float64).to(dev)).sum().backward()
    o_src.step()
    sd = copy.deepcopy(o_src.state_dict())
    runs = []
    for b in (case, case.reference):
        torch.manual_seed(1)
        dst = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(dev, torch.float64)
        o = make(b)(dst.parameters())
        runs.append((dst, o))
    for dst, o in runs:
        before = snapshot(o)
        key = re.escape(repr(state_keys(case)[0]))
        with pytest.raises(ValueError, match=rf"state\[0\]\[{key}\] has shape \(3, 4\).*\(4, 3\).*different model"):
            o.load_state_dict(sd)
        assert_unchanged(before, snapshot(o), "rejected load_state_dict")
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            o.zero_grad()
            dst(torch.randn(5, 3, generator=g, dtype=torch.float64).to(dev)).square().sum().backward()
            o.step()
    assert max_err(runs[0][0].parameters(), runs[1][0].parameters()) < F64_TOL


# ==== 2. unusual but valid parameters ===============================================================

@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("mixed", [False, True], ids=["alone", "mixed"])
def test_zero_size_parameters(case, mixed):
    shapes = [(0,), (3, 4), (0, 5), (7,), (2, 0, 3)] if mixed else [(0,), (0, 5)]
    init = make_init(shapes)
    f, o = train(make(case), init, torch.float64, 4, device=case.device)
    r, o_r = train(make(case.reference), init, torch.float64, 4, device=case.device)
    assert max_err(f, r) < F64_TOL
    assert float(o.step_count) == 4
    for p in f:
        if not p.numel():
            stats = o.layer_stats()[p]
            assert float(stats[0]) == float(stats[1]) == 0.0 and float(stats[2]) == 1.0, stats
    assert len(o.state_dict()["state"]) == len(o_r.state_dict()["state"])


@pytest.mark.parametrize("case", BACKENDS)
def test_frozen_layer(case):
    """requires_grad=False parameters handed to the optimizer: never touched, no state."""
    models = []
    for b in (case, case.reference):
        model = ckpt.make_model(2, case.device).double()
        model.conv.requires_grad_(False)
        opt = make(b)(model.parameters())
        _loop(model, opt, 3)
        models.append((model, opt))
    (m, opt), (m_r, _) = models
    assert max_err(m.parameters(), m_r.parameters()) < F64_TOL
    frozen = ckpt.make_model(2, case.device).double().conv
    assert torch.equal(m.conv.weight, frozen.weight) and torch.equal(m.conv.bias, frozen.bias)
    assert m.conv.weight.grad is None and not opt.state.get(m.conv.weight)
    assert opt.grad_copies == 0


@pytest.mark.parametrize("case,form", each_form())
def test_grads_none_for_some_steps(case, form):
    """An unused branch: parameter 1 gets no gradient before step 3 (its state starts late; for the
    paper form m = w then), parameter 2 loses its gradient from step 2 on, parameter 3 every other
    step. Skipped steps leave them (and their state) untouched, as in the reference."""
    options = case.spec.form(form)
    shapes = [(6, 5), (5,), (4, 4), (9,)]
    init = make_init(shapes)

    def used(step, i):
        return not ((i == 1 and step < 3) or (i == 2 and step >= 2) or (i == 3 and step % 2))

    f, o = train(make(case, **options), init, torch.float64, 5, device=case.device, used=used)
    r, o_r = train(make(case.reference, **options), init, torch.float64, 5, device=case.device, used=used)
    assert max_err(f, r) < F64_TOL
    for key in state_keys(case, **options):
        for i, (p, p_r) in enumerate(zip(f, r)):
            assert torch.allclose(o.state[p][key], o_r.state[p_r][key], rtol=0, atol=F64_TOL), (key, i)
    assert o.grad_copies == 0


@pytest.mark.parametrize("case", BACKENDS)
def test_noncontiguous_and_channels_last_parameters(case):
    """A transposed Parameter (shape (7, 5), strides (1, 7)), a strided slice (not dense: updated
    through a dense staging copy, still a view of its base tensor), a channels_last conv weight:
    each keeps its layout and memory, autograd accumulates into the bucket, results as the reference."""
    dev = case.device
    bases = []

    def params():
        torch.manual_seed(4)
        t = nn.Parameter(torch.randn(5, 7, dtype=torch.float64).to(dev).t())
        bases.append(torch.randn(5, 14, dtype=torch.float64).to(dev))
        s = nn.Parameter(bases[-1][:, ::2])
        c = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64).to(dev, memory_format=torch.channels_last))
        return [t, s, c]
    assert not params()[0].is_contiguous() and not params()[1].is_contiguous()
    runs = []
    for b in (case, case.reference):
        ps = params()
        opt = make(b)(ps)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            opt.zero_grad()
            x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64).to(dev, memory_format=torch.channels_last)
            y = nn.functional.conv2d(x, ps[2]).mean() * (ps[0].sin().sum() + ps[1].square().sum())
            y.backward()
            opt.step()
        runs.append((ps, opt))
    (ps, opt), (ps_r, _) = runs
    assert max_err(ps, ps_r) < F64_TOL
    assert ps[0].stride() == (1, 7)
    assert ps[1].stride() == (14, 2) and torch.equal(bases[-2][:, ::2], ps[1])   # still a view of its base
    assert ps[2].is_contiguous(memory_format=torch.channels_last)
    assert opt.grad_copies == 0
    b = opt._buckets[0]
    assert list(b.staging) == [1]
    for i, (p, gv) in enumerate(zip(b.params, b.grad_views)):
        assert p.grad is gv and (i == 1 or p.grad.stride() == p.stride())


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight          # embedding / output tying

    def forward(self, idx):
        return self.out(torch.tanh(self.mix(self.emb(idx))))


def train_tied(case, steps):
    torch.manual_seed(5)
    model = TiedLM().to(case.device, torch.float64)
    opt = make(case)(model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 3), generator=g).to(case.device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("case", BACKENDS)
def test_tied_weights(case):
    runs = [train_tied(b, 4) for b in (case, case.reference)]
    (m, opt), (m_r, _) = runs
    assert m.out.weight is m.emb.weight
    assert sum(p is m.emb.weight for g in opt.param_groups for p in g["params"]) == 1
    assert max_err(m.parameters(), m_r.parameters()) < F64_TOL
    assert opt.grad_copies == 0


@pytest.mark.parametrize("case", BACKENDS)
def test_safetensors_save_model_with_tied_weights(case, tmp_path):
    """safetensors' save_model (what accelerate's save_state uses) refuses storages shared by
    tensors that do not cover them. The parameters keep their own memory, so a model with tied
    weights saves and loads as without the optimizer."""
    st = pytest.importorskip("safetensors.torch")
    model, _ = train_tied(case, 2)
    st.save_model(model, str(tmp_path / "m.safetensors"))
    fresh = TiedLM().double()   # loaded on the CPU: the file holds plain tensors, whatever the device
    st.load_model(fresh, str(tmp_path / "m.safetensors"))
    assert fresh.out.weight is fresh.emb.weight
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a.cpu(), b), n


@pytest.mark.parametrize("case", BACKENDS)
def test_partial_state_dict_saves_only_its_tensors(case):
    """torch.save(submodule.state_dict()) writes that submodule's tensors, not the other
    parameters of the bucket: its size is the submodule's bytes plus pickle overhead."""
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(8, 4)).to(case.device)
    opt = make(case)(model.parameters())
    opt.zero_grad()
    model[1](model[0](torch.randn(2, 256).to(case.device))[:, :8]).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model[1].state_dict(), buf)
    small = sum(t.numel() * t.element_size() for t in model[1].state_dict().values())
    assert buf.tell() < small + 4096, f"{buf.tell()} bytes written for {small} bytes of tensors"


@pytest.mark.parametrize("case", BACKENDS)
def test_several_dtypes_one_bucket_each(case):
    """float32 + float64 + bfloat16 parameters in one optimizer: three buckets; each dtype as the
    reference in that dtype (float32 by the parity rule, bfloat16 within 2 ulps, float64 tight)."""
    init = make_init([(6, 5), (5,), (4, 4), (3,), (5, 3), (7,)], seed=3)
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float64, torch.bfloat16, torch.bfloat16]

    def run(b, dts):
        ps = [nn.Parameter(x.clone().to(device=case.device, dtype=dt)) for x, dt in zip(init, dts)]
        opt = make(b)(ps)
        lockstep([ps], [opt], 5)
        return ps, opt
    ps, opt = run(case, dtypes)
    assert len(opt._buckets) == 3
    assert sorted(str(b.dtype) for b in opt._buckets) == ["torch.bfloat16", "torch.float32", "torch.float64"]
    ps_r, _ = run(case.reference, dtypes)
    ps_64, _ = run(case.reference, [torch.float64] * 6)
    assert_parity_fp32(ps[:2], ps_r[:2], ps_64[:2], f"{case} float32 bucket")
    assert max_err(ps[2:4], ps_r[2:4]) < F64_TOL
    assert_close_ulps(ps[4:], ps_r[4:], torch.bfloat16, 2.0, f"{case} bfloat16 bucket")
    assert {str(opt.state[p][k].dtype) for p in ps[4:] for k in state_keys(case)} == {"torch.float32"}


@pytest.mark.parametrize("case", BACKENDS)
def test_add_param_group_after_steps(case):
    """Groups added after steps (one into an existing bucket, one making a new float32 bucket):
    earlier state kept, t shared (phi, LAMB's bias correction continue), new groups' own
    hyperparameters (AlgorithmSpec.added_groups) used."""
    first, second = case.spec.added_groups

    def run(b):
        ps = tiny_params(device=case.device)
        extra = [nn.Parameter(x.to(case.device)) for x in make_init([(4, 2), (2,)], seed=9)]
        extra32 = [nn.Parameter(x.to(case.device, torch.float32)) for x in make_init([(3, 5)], seed=10)]
        opt = make(b)(ps[:2])
        lockstep([ps[:2]], [opt], 3)
        opt.add_param_group({"params": [ps[2]] + extra, "lr": 0.2, **first})
        lockstep([ps + extra], [opt], 2, start=3)
        opt.add_param_group({"params": extra32, "lr": 0.1, **second})
        lockstep([ps + extra + extra32], [opt], 3, start=5)
        return ps + extra + extra32, opt
    f, opt = run(case)
    r, o_r = run(case.reference)
    assert max_err(f[:-1], r[:-1]) < F64_TOL
    assert max_err(f[-1:], r[-1:]) < 1e-5
    assert float(opt.step_count) == 8 and len(opt._buckets) == 2
    assert all(float(b.step) == 8 for b in opt._buckets)


# ==== 3. behind the optimizer's back ================================================================

def _mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(device)


def _mlp_loop(model, opt, steps, start=0, hook=None, zero=None):
    g = torch.Generator().manual_seed(11)
    for s in range(start + steps):
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        if s < start:
            continue
        if hook is not None:
            hook(s, model, opt)
        (zero or opt.zero_grad)()
        p0 = next(model.parameters())
        model(x.to(device=p0.device, dtype=p0.dtype)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("when", ["before_any_step", "after_zero_grad", "before_zero_grad"])
def test_module_to_other_dtype_after_build(case, when):
    """module.to(torch.float64) after the optimizer was built: the Parameters stay the same objects
    (param.data is re-bound), so the optimizer must follow, like the reference does, and both take
    the momentum state to float64 (docs/SPEC.md: the state dtype follows the parameter). (The
    float32 steps before differ by float32 rounding: 1e-5 tolerance.)"""
    runs = []
    for b in (case, case.reference):
        model = _mlp(device=case.device)
        opt = make(b)(model.parameters())

        def hook(s, model, opt):
            if (when == "before_any_step" and s == 0) or (when == "before_zero_grad" and s == 3):
                model.to(torch.float64)

        calls = []

        def zero(model=model, opt=opt):
            opt.zero_grad()
            if when == "after_zero_grad" and len(calls) == 3:
                model.to(torch.float64)
            calls.append(1)
        _mlp_loop(model, opt, 6, hook=hook, zero=zero)
        runs.append(model)
        assert {v.dtype for st in opt.state.values() for k, v in st.items() if k != "step"} == {torch.float64}
    assert all(p.dtype == torch.float64 for p in runs[0].parameters())
    assert max_err(runs[0].parameters(), runs[1].parameters()) < 1e-5


@pytest.mark.parametrize("case", BACKENDS)
def test_parameters_sharing_memory_refused(case):
    """Two Parameters over one tensor's memory (Parameter(x) and Parameter(x.view(...)); not tied
    weights, which are one Parameter object) would each be updated from the other's values in one
    launch: refused at construction, naming both, and when memory becomes shared later (p.data =
    other.data) at step(), which then changes nothing. Column slices of one matrix interleave
    without sharing an element: accepted, and stepped as the reference steps them."""
    dev = case.device
    base = torch.linspace(-1, 1, 12, dtype=torch.float64, device=dev).reshape(3, 4)
    with pytest.raises(ValueError, match=r"\['params'\]\[0\].*and param_groups\[0\]\['params'\]\[1\].*share memory"):
        make(case)([nn.Parameter(base), nn.Parameter(base.view(3, 4))])
    with pytest.raises(ValueError, match=r"share memory"):
        make(case)([nn.Parameter(base[0]), nn.Parameter(base[:2, 3])])   # one element in common
    flat = torch.zeros(40, dtype=torch.float64, device=dev)
    grid = flat[:16].view(4, 4)
    for shared in ([grid[:, 0], flat[20:25], flat[23:28]],     # a pair behind a span that reaches further
                   [grid[:3, 0], grid[1:, 1], flat[8:9]]):      # the third shares grid[2, 0]
        with pytest.raises(ValueError, match=r"share memory"):
            make(case)([nn.Parameter(t) for t in shared])
    x = torch.zeros(8, dtype=torch.float32, device=dev)
    with pytest.raises(ValueError, match=r"share memory"):   # another dtype's view: another bucket
        make(case)([nn.Parameter(x), nn.Parameter(x.view(torch.bfloat16))])
    w, h = nn.Parameter(x.clone()), nn.Parameter(torch.zeros(16, dtype=torch.bfloat16, device=dev))
    opt = make(case)([w, h])
    h.data = w.detach().view(torch.bfloat16)                 # ... also when memory moves there later
    with pytest.raises(ValueError, match=r"share memory"):
        opt.step()

    ps = [nn.Parameter(torch.randn(3, 3, dtype=torch.float64, device=dev)) for _ in range(2)]
    opt = make(case)(ps)
    set_grads(ps, 0)
    opt.step()
    ps[1].data = ps[0].data
    before = [t.detach().clone() for t in [*ps, *(v for st in opt.state.values() for v in st.values())]]
    with pytest.raises(ValueError, match=r"share memory"):
        opt.step()
    after = [*ps, *(v for st in opt.state.values() for v in st.values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)

    runs = []
    for b in (case, case.reference):
        grid = torch.arange(1.0, 17.0, dtype=torch.float64, device=dev).reshape(4, 4)
        cols = [nn.Parameter(grid[:, j]) for j in range(4)]
        o = make(b)(cols)
        for s in range(3):
            for j, c in enumerate(cols):
                c.grad = torch.full_like(c, 0.1 * (j + 1 + s))
            o.step()
        runs.append(grid)
    assert max_err([runs[0]], [runs[1]]) < 1e-12


@pytest.mark.parametrize("case", BACKENDS_AND_REFERENCE)
def test_state_dict_of_another_optimizer_warns_about_options_it_resets(case):
    """A torch.optim.SGD state_dict loaded into this class (the migration the README's "Coming
    from" rows invite): its groups lack this class's options, which take the class defaults as in
    torch.optim; where that changes what the group had (eta, betas, ...) a warning names them.
    Loading the optimizer's own state_dict, or a foreign one that changes nothing, is silent."""
    ps = tiny_params(device=case.device)
    sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    opt = make(case)(ps)
    option = "eta" if case.algo != "LAMB" else "betas"
    before = opt.param_groups[0][option]
    with pytest.warns(UserWarning, match=rf"param_groups\[0\] of the state_dict has no .*'{option}'.*defaults"):
        opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0][option] != before   # (what the warning says happened)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(opt.state_dict())
        plain = case.optimizer(case.algo, lr=0.1)(tiny_params(device=case.device))   # the defaults already
        plain.load_state_dict(sgd.state_dict())


@pytest.mark.parametrize("case", [c for c in BACKENDS if c.values[0].algo != "LAMB"])
@pytest.mark.parametrize("how", ["entry", "whole"])
def test_given_buffer_is_not_a_first_update_across_a_rebuild(case, how):
    """heavy_ball with dampening at momentum 0: the first update with momentum is still to come
    (its buffer starts at u), until a buffer is given from outside (an entry or a whole state
    written, as ZeroRedundancyOptimizer's load does): that buffer is resumed, also when the
    buckets are rebuilt (add_param_group) before the next step. As the reference."""
    runs = []
    for b in (case, case.reference):
        p = nn.Parameter(torch.linspace(-1, 1, 30, dtype=torch.float64, device=case.device).reshape(6, 5))
        opt = make(b, lr=0.1, momentum=0.0, dampening=0.3, weight_decay=0.0, adapt=False)([p])
        p.grad = torch.ones_like(p)
        opt.step()
        if how == "entry":
            opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.5)
        else:
            opt.state[p] = {"momentum_buffer": torch.full_like(p, 0.5), "step": torch.tensor(1.0)}
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, dtype=torch.float64, device=case.device))]})
        opt.param_groups[0]["momentum"] = 0.9
        p.grad = torch.full_like(p, 2.0)
        opt.step()
        runs.append((p.detach().clone(), opt.state[p]["momentum_buffer"].clone()))
    (w, buf), (w_ref, buf_ref) = runs
    assert torch.allclose(buf_ref, torch.full_like(buf_ref, 0.9 * 0.5 + 0.7 * 2.0))
    assert torch.equal(buf, buf_ref) and torch.equal(w, w_ref)


@pytest.mark.parametrize("case", BACKENDS)
def test_state_entries_swapped_between_parameters(case):
    """opt.state[p0], opt.state[p1] = opt.state[p1], opt.state[p0]: each parameter continues from
    the state it was given (the fused classes copy the given views before any slot is written),
    as the reference does."""
    runs = []
    for b in (case, case.reference):
        ps = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                           .to(case.device)) for i in range(2)]
        opt = make(b)(ps)
        for s in range(2):
            set_grads(ps, s)
            opt.step()
        opt.state[ps[0]], opt.state[ps[1]] = opt.state[ps[1]], opt.state[ps[0]]
        set_grads(ps, 2)
        opt.step()
        runs.append(ps)
    assert max_err(runs[0], runs[1]) < 1e-12


def test_options_checked_after_defaults_edits_and_tensor_lr_changes():
    """step() skips checking a group whose option objects did not change; which options those
    are does not depend on opt.defaults (a user may edit it), and a tensor lr changed in place
    (lr.data = ...) to another dtype or shape is checked again."""
    ps = tiny_params()
    opt = make("cpu")(ps)
    set_grads(ps, 0)
    opt.step()
    del opt.defaults["momentum"]
    opt.step()
    opt.param_groups[0]["momentum"] = float("nan")
    with pytest.raises(ValueError, match=r"momentum must be finite"):
        opt.step()
    lr = torch.tensor(0.1)
    opt = make("cpu", lr=lr)(ps)
    opt.step()
    for value, msg in ((torch.tensor([0.1, 0.2]), r"1-element"), (torch.tensor(0.1 + 0j), r"must be real")):
        lr.data = value
        with pytest.raises(ValueError, match=msg):
            opt.step()


def test_large_disjoint_column_slices_accepted():
    """Column slices of one large matrix share no element (rectangles of rows x columns, at any
    size: 16.8M elements here)."""
    W = torch.zeros(4100, 4100)
    make("cpu")([nn.Parameter(W[:, :2050]), nn.Parameter(W[:, 2050:])])


def test_meta_parameters_are_not_taken_for_shared_memory():
    """Meta tensors have no memory (every one reports address 0): a model built on the meta device
    (deferred init) gets an optimizer, as with torch's SGD, not a "share memory" refusal."""
    import tvlars_fused
    from tvlars_fused.buckets import _shared_memory
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for cls in (tvlars_fused.TVLARS, tvlars_fused.LAMB):
        opt = cls(model.parameters(), lr=0.1)
        model(torch.randn(2, 3, device="meta")).sum().backward()
        opt.step()
        model.zero_grad()
    assert _shared_memory([torch.empty(4, device="meta"), torch.empty(4, device="meta")]) is None


def test_shared_memory_check_against_every_address():
    """The shared-memory check (buckets._shared_memory) against the sets of element addresses,
    on random column slices of one buffer (row strides 3-9, slices that wrap past a row's end)
    and random strided views."""
    from tvlars_fused.buckets import _element_addresses, _shared_memory
    rng = random.Random(5)
    for trial in range(400):
        base = torch.zeros(120)
        views = []
        for _ in range(rng.randint(2, 4)):
            if trial % 2:
                R, rows = rng.randint(3, 9), rng.randint(1, 4)
                cols = rng.randint(1, R)
                shape, strides = (rows, cols), (R, 1)
            else:
                shape = (rng.randint(1, 4), rng.randint(1, 4))
                strides = (rng.randint(1, 12), rng.randint(1, 3))
            extent = sum((n - 1) * st for n, st in zip(shape, strides)) + 1
            views.append(base.as_strided(shape, strides, rng.randint(0, 120 - extent)))
        addresses = [set(_element_addresses(v).tolist()) for v in views]
        truth = any(addresses[a] & addresses[b] for a in range(len(views)) for b in range(a + 1, len(views)))
        found = _shared_memory(views)
        assert (found is not None) == truth, (trial, [(v.shape, v.stride(), v.storage_offset()) for v in views])
        if found is not None:
            i, j, certain = found
            assert certain and addresses[i] & addresses[j]


@pytest.mark.parametrize("case", BACKENDS)
def test_lazy_modules(case):
    """Lazy modules (torch.nn.LazyLinear: no size before their first forward) take the optimizer as
    torch's optimizers do: zero_grad and step work before any forward, a lazy branch that has not
    run yet is skipped (no gradient), and the run equals the reference's. A lazy parameter joins
    the buckets at the first step after its first forward (that step copies its gradient in);
    backward accumulates into the bucket from then on."""
    runs = []
    for b in (case, case.reference):
        torch.manual_seed(0)
        model = nn.ModuleDict(dict(a=nn.LazyLinear(3), b=nn.LazyLinear(3))).to(case.device)
        opt = make(b)(model.parameters())
        opt.zero_grad()
        opt.step()
        g = torch.Generator().manual_seed(1)
        copies = []
        for s in range(6):
            x = torch.randn(4, 5, generator=g).to(case.device)
            opt.zero_grad()
            out = model["a"](x) if s < 3 else model["a"](x) + model["b"](x)
            out.square().sum().backward()
            opt.step()
            copies.append(getattr(opt, "grad_copies", 0))
        if b is case:
            assert copies[1] == copies[0] and copies[4] == copies[5] == copies[3], copies
        runs.append((model, float(opt.step_count)))
    (fused, t_fused), (ref, t_ref) = runs
    assert t_fused == t_ref == 7.0
    assert max_err(fused.parameters(), ref.parameters()) < 1e-5


def test_lazy_module_materialized_inside_a_compiled_step_is_refused():
    """Under torch.compile the step cannot rebuild its buckets: a lazy parameter that got its size
    inside the compiled region is refused with an error that says what to do (never skipped)."""
    model = nn.LazyLinear(2)
    opt = make("torch", lr=torch.tensor(0.1))(model.parameters())

    model(torch.randn(3, 4)).sum().backward()   # the forward gives the parameters their size

    @torch.compile(fullgraph=True, backend="eager")
    def compiled_step():
        type(opt).step(opt)   # (the README's fullgraph recipe)

    with pytest.raises(Exception, match="take one optimizer step outside torch.compile first"):
        compiled_step()


@pytest.mark.parametrize("case", BACKENDS)
def test_gradient_of_another_dtype_after_param_data_swap(case):
    """p.data = p.data.double() with a float32 .grad left from before: the step takes that gradient
    (converted), as the reference and torch's optimizers do."""
    runs = []
    for b in (case, case.reference):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(4, 3, device=case.device))
        opt = make(b)([p])
        (p * torch.randn(4, 3, device=case.device)).sum().backward()
        opt.step()
        p.data = p.data.double()
        assert p.grad.dtype == torch.float32
        opt.step()
        runs.append(p.detach().clone())
    assert runs[0].dtype == torch.float64 and max_err([runs[0]], [runs[1]]) < 1e-6


@pytest.mark.parametrize("case", BACKENDS)
def test_non_leaf_parameter_that_retains_grad(case):
    """A non-leaf tensor with retain_grad() is accepted as a parameter (as torch's optimizers take
    it); backward and step work and equal the reference's."""
    runs = []
    for b in (case, case.reference):
        torch.manual_seed(0)
        base = torch.randn(4, 3, device=case.device, requires_grad=True)
        w = base * 1.0
        w.retain_grad()
        opt = make(b)([w])
        for _ in range(2):
            opt.zero_grad()
            (w * w).sum().backward(retain_graph=True)
            opt.step()
        runs.append(w.detach().clone())
    assert max_err([runs[0]], [runs[1]]) < 1e-6


@pytest.mark.parametrize("case", BACKENDS)
def test_grad_dtype_other_than_the_parameters_is_refused(case):
    """torch's p.grad_dtype lets autograd produce float32 gradients for bfloat16 parameters. The
    fused buckets keep gradients in the parameter's dtype: step() refuses such a gradient with a
    clear error (backward itself still works) and changes nothing; the reference takes it as is."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("torch without grad_dtype")
    model = nn.Linear(4, 3).to(device=case.device, dtype=torch.bfloat16)
    for p in model.parameters():
        p.grad_dtype = torch.float32
    before = [p.detach().clone() for p in model.parameters()]
    for b, fails in ((case, True), (case.reference, False)):
        opt = make(b)(model.parameters())
        model(torch.randn(5, 4, device=case.device, dtype=torch.bfloat16)).float().square().sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        if fails:
            with pytest.raises(RuntimeError, match=r"gradient is torch.float32 \(p.grad_dtype = torch.float32\).*p.grad_dtype = p.dtype"):
                opt.step()
            assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
        else:
            opt.step()
            assert any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))
        del opt
        model.zero_grad()


@pytest.mark.parametrize("case", BACKENDS)
def test_swap_module_params_on_conversion(case):
    """Under torch.__future__.set_swap_module_params_on_conversion(True), module.to() and
    load_state_dict give each Parameter a new TensorImpl (torch.utils.swap_tensors, which refuses a
    tensor that has a weak reference, and leaves the tensor's hooks bound to the old TensorImpl).
    Both work with the optimizer built, the run equals the reference's, and backward accumulates
    into the bucket again after the step that follows each swap (no more gradient copies)."""
    saved = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        runs, copies = [], []
        for b in (case, case.reference):
            model = _mlp(device=case.device)
            target = {k: v.double() + 0.01 for k, v in model.state_dict().items()}
            opt = make(b)(model.parameters())

            def hook(s, model, opt):
                if s == 2:
                    model.to(torch.float64)
                if s == 4:
                    model.load_state_dict(target)
                if b is case and s >= 5:
                    copies.append(opt.grad_copies)
            _mlp_loop(model, opt, 8, hook=hook)
            runs.append(model)
        assert all(p.dtype == torch.float64 for p in runs[0].parameters())
        assert max_err(runs[0].parameters(), runs[1].parameters()) < 1e-5
        assert copies[-1] == copies[0], copies
    finally:
        torch.__future__.set_swap_module_params_on_conversion(saved)


@pytest.mark.parametrize("case", BACKENDS)
def test_param_data_other_dtype(case):
    """`p.data = p.data.double()` for the last layer's parameters: they move to a new float64
    bucket (the first layer stays float32), like the reference follows them."""
    runs = []
    for b in (case, case.reference):
        model = _mlp(device=case.device)
        opt = make(b)(model.parameters())
        g = torch.Generator().manual_seed(11)
        for s in range(5):
            if s == 2:
                for p in model[2].parameters():
                    p.data = p.data.double()
            x = torch.randn(5, 4, generator=g).to(case.device)
            opt.zero_grad()
            model[2](model[1](model[0](x)).to(model[2].weight.dtype)).square().sum().backward()
            opt.step()
        runs.append((model, opt))
    (m, opt), (m_r, _) = runs
    assert m[2].weight.dtype == torch.float64 and m[0].weight.dtype == torch.float32
    assert len(opt._buckets) == 2
    assert max_err(m.parameters(), m_r.parameters()) < 1e-5


@pytest.mark.parametrize("case", BACKENDS)
def test_param_data_transposed_in_place(case):
    runs = []
    for b in (case, case.reference):
        ps = tiny_params(device=case.device)

        def before_step(s, ps, o):
            if s == 2:
                ps[2].data = ps[2].data.t()
        opt = make(b)(ps)
        for s in range(5):
            before_step(s, ps, opt)
            opt.zero_grad()
            c = torch.randn(3, 3, generator=torch.Generator().manual_seed(s), dtype=torch.float64).to(case.device)
            ((ps[2] * c).sum() + ps[0].square().sum() + ps[1].sum()).backward()
            opt.step()
        runs.append(ps)
    assert runs[0][2].stride() == (1, 3)
    assert max_err(runs[0], runs[1]) < F64_TOL


@pytest.mark.parametrize("case", BACKENDS)
def test_param_data_other_shape_clear_error(case):
    """p.data = a tensor of another shape: its momentum no longer fits. The next zero_grad/step must
    refuse with an error naming the parameter (before anything is updated)."""
    ps = [nn.Parameter(x.to(case.device, torch.float32)) for x in make_init([(5, 4), (4,)])]
    opt = make(case)(ps)
    lockstep([ps], [opt], 2)
    before = [p.detach().clone() for p in ps[1:]]
    ps[0].data = torch.randn(3, 3).to(case.device)
    with pytest.raises((ValueError, RuntimeError), match=r"param_groups\[0\]\['params'\]\[0\].*shape"):
        opt.zero_grad()
        (ps[0].sum() + ps[1].sum()).backward()
        opt.step()
    assert bit_equal(ps[1].detach(), before[0]) and float(opt.step_count) == 2


@pytest.mark.parametrize("case", BACKENDS)
def test_module_parameter_replaced_by_new_parameter(case):
    """`model.fc.weight = nn.Parameter(...)` after the optimizer was built: the optimizer still holds
    the old Parameter, which gets no gradient any more (skipped, state frozen); the new one is not
    optimized at all. No error and no warning, in the reference and the fused classes alike: this
    documents the behaviour (see the report for a proposed warning)."""
    runs = []
    for b in (case, case.reference):
        model = _mlp(device=case.device)
        opt = make(b)(model.parameters())
        old = model[2].weight

        def hook(s, model, opt):
            if s == 2:
                model[2].weight = nn.Parameter(model[2].weight.detach().clone())
        _mlp_loop(model, opt, 5, hook=hook)
        runs.append((model, opt, old))
    (m, opt, old), (m_r, o_r, old_r) = runs
    assert max_err(m.parameters(), m_r.parameters()) < 1e-6
    assert max_err([old], [old_r]) < 1e-6
    new = m[2].weight
    assert new.grad is not None and not any(p is new for g in opt.param_groups for p in g["params"])
    assert torch.equal(new, old), "the new parameter was updated (it is not in the optimizer)"
    assert old.grad is None and float(opt.step_count) == 5


@pytest.mark.parametrize("case", BACKENDS)
def test_zero_grad_patterns(case):
    """model.zero_grad() (grads -> None), model.zero_grad(set_to_none=False), optimizer.zero_grad
    both ways, and two micro-batches accumulated per step, in one run: same as the reference, and
    every gradient still lands in the bucket (no copies)."""
    zeros = ["opt", "model", "model_keep", "opt_keep", "model", "opt"]
    runs = []
    for b in (case, case.reference):
        model = ckpt.make_model(3, case.device).double()
        opt = make(b)(model.parameters())
        for s, how in enumerate(zeros):
            {"opt": lambda: opt.zero_grad(), "opt_keep": lambda: opt.zero_grad(set_to_none=False),
             "model": lambda: model.zero_grad(), "model_keep": lambda: model.zero_grad(set_to_none=False)}[how]()
            for micro in range(2):
                x, y = ckpt.batch(10 * s + micro, case.device)
                nn.functional.mse_loss(model(x.double()), y.double()).backward()
            opt.step()
        runs.append((model, opt))
    (m, opt), (m_r, _) = runs
    assert max_err(m.parameters(), m_r.parameters()) < F64_TOL
    assert opt.grad_copies == 0


@pytest.mark.parametrize("case", BACKENDS)
def test_gradients_replaced_by_another_library(case):
    """Another library computes the gradients (torch.autograd.grad) and assigns fresh tensors to
    .grad every step, some of them non-contiguous: results as the reference, and grad_copies
    counts each one."""
    runs = []
    steps = 4
    for b in (case, case.reference):
        model = ckpt.make_model(4, case.device).double()
        params = list(model.parameters())
        opt = make(b)(params)
        for s in range(steps):
            x, y = ckpt.batch(s, case.device)
            grads = torch.autograd.grad(nn.functional.mse_loss(model(x.double()), y.double()), params)
            for p, g in zip(params, grads):
                p.grad = g.t().contiguous().t() if g.ndim == 2 else g.clone()   # (1, n) strides for 2-D
            opt.step()
        runs.append((model, opt))
    (m, opt), (m_r, _) = runs
    assert max_err(m.parameters(), m_r.parameters()) < F64_TOL
    assert opt.grad_copies == steps * len(list(m.parameters()))
    b = opt._buckets[0]
    assert not any(p.grad is gv for p, gv in zip(b.params, b.grad_views)), "the library's tensors stay .grad"


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("edit", ["append", "remove", "delete_group"])
def test_param_groups_params_edited_in_place(case, edit):
    runs = []
    for b in (case, case.reference):
        ps = tiny_params(device=case.device)
        first = [{"params": ps[:2]}, {"params": [ps[2]], "lr": 0.3}] if edit != "append" else [{"params": ps[:2]}]
        opt = make(b)(first)

        def before_step(s, ps, o):
            if s == 2:
                if edit == "append":
                    o.param_groups[0]["params"].append(ps[2])
                elif edit == "remove":
                    del o.param_groups[0]["params"][1]
                else:
                    del o.param_groups[0]
        lockstep([ps], [opt], 5, before_step=before_step)
        runs.append(ps)
    assert max_err(runs[0], runs[1]) < F64_TOL


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("how", ["clear", "assign", "delete"])
def test_state_entry_reset_by_user(case, how):
    runs = []
    for b in (case, case.reference):
        ps = tiny_params(device=case.device)
        opt = make(b)(ps)

        def before_step(s, ps, o):
            if s == 2:
                if how == "clear":
                    o.state[ps[0]].clear()
                elif how == "assign":
                    for key in state_keys(case):
                        o.state[ps[0]][key] = torch.zeros_like(ps[0])
                else:
                    del o.state[ps[0]]
        lockstep([ps], [opt], 4, before_step=before_step)
        runs.append((ps, opt))
    (ps, opt), (ps_r, o_r) = runs
    assert max_err(ps, ps_r) < F64_TOL
    for key in state_keys(case):
        assert torch.allclose(opt.state[ps[0]][key], o_r.state[ps_r[0]][key], rtol=0, atol=F64_TOL), key


@pytest.mark.parametrize("case,change", params_with(
    CASES, lambda c: [(f"{old}->{new}", (opt, old, new)) for opt, old, new in c.spec.option_changes],
    slow=extra_interpreted))
def test_group_option_changed_after_steps(case, change):
    """An option that changes the update's path (TVLARS: momentum_form; LAMB: weight_decay_mode,
    bias_correction) written into param_groups after two steps: followed like the reference."""
    option, old, new = change
    runs = []
    for b in (case, case.reference):
        ps = tiny_params(device=case.device)
        opt = make(b, **{option: old})(ps)

        def before_step(s, ps, o):
            if s == 2:
                o.param_groups[0][option] = new
        lockstep([ps], [opt], 4, before_step=before_step)
        runs.append(ps)
    assert max_err(runs[0], runs[1]) < F64_TOL


# ==== 4. non-finite values ==========================================================================

@pytest.mark.parametrize("case,form", each_form())
def test_found_inf_skips_step_bit_for_bit(case, form):
    """found_inf set (GradScaler's fused protocol): parameters, state, t and layer_stats keep their
    bits, whatever the gradients hold; the next clean step is the reference's next step."""
    dev = case.device
    ps = [nn.Parameter(x.to(dev, torch.float32)) for x in make_init([(6, 5), (5,), (0,), (4, 4)])]
    ps_r = [nn.Parameter(x.to(dev, torch.float32)) for x in make_init([(6, 5), (5,), (0,), (4, 4)])]
    options = case.spec.form(form)
    opt, o_r = make(case, **options)(ps), make(case.reference, **options)(ps_r)
    lockstep([ps, ps_r], [opt, o_r], 3)
    before = snapshot(opt)
    for scale in (1.0, 1024.0):
        set_grads(ps, 99)
        ps[0].grad[1, 1] = float("nan")
        ps[3].grad[0, 0] = float("inf")
        opt.found_inf = torch.ones(1, device=dev)   # GradScaler's are on the parameters' device
        opt.grad_scale = torch.full((1,), scale, device=dev)
        opt.step()
        assert_unchanged(before, snapshot(opt), f"step with found_inf (grad_scale {scale})")
    opt.found_inf = torch.zeros(1, device=dev)
    opt.grad_scale = torch.ones(1, device=dev)
    lockstep([ps, ps_r], [opt, o_r], 2, start=3)
    del opt.found_inf, opt.grad_scale
    lockstep([ps, ps_r], [opt, o_r], 1, start=5)
    assert max_err(ps, ps_r) < 1e-5 and float(opt.step_count) == 6


@pytest.mark.parametrize("case,form", each_form())
def test_found_inf_on_first_step_creates_only_initial_state(case, form):
    """Documents a deviation from "nothing changes": a skipped *first* step still creates the state
    entries (host-side bookkeeping cannot see the device flag without a sync). They hold the
    initial state exactly (zero momentum / m = w; LAMB: zero moments), so the run continues like
    the reference's."""
    options = case.spec.form(form)
    dev = case.device
    ps = [nn.Parameter(x.to(dev, torch.float32)) for x in make_init([(6, 5), (5,)])]
    ps_r = [nn.Parameter(x.to(dev, torch.float32)) for x in make_init([(6, 5), (5,)])]
    opt = make(case, **options)(ps)
    set_grads(ps, 0)
    opt.found_inf, opt.grad_scale = torch.ones(1, device=dev), torch.ones(1, device=dev)
    opt.step()
    for p in ps:
        for key in state_keys(case, **options):
            assert bit_equal(opt.state[p][key], case.spec.initial_state(key, p)), key
    assert float(opt.step_count) == 0
    del opt.found_inf, opt.grad_scale
    o_r = make(case.reference, **options)(ps_r)
    lockstep([ps, ps_r], [opt, o_r], 3, start=1)
    assert max_err(ps, ps_r) < 1e-5


@pytest.mark.parametrize("case", params([c for c in CASES if c.algo == "TVLARS"], slow=extra_interpreted))
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_first_update_after_found_inf_is_torchs_first_buffer(case, nesterov):
    """With dampening, torch's SGD makes the first momentum buffer the update itself (no dampening),
    and a step skipped by GradScaler is no update: the first real step still takes buf = u. (The
    fused classes once marked the first update on the host, which cannot see found_inf: a skipped
    first step used it up, and the real first step was dampened.) LARS(adapt=False) is torch's SGD
    exactly, so the float64 run is held to torch.optim.SGD itself and to the reference TVLARS."""
    dev = case.device
    dampening = 0.0 if nesterov else 0.3
    init = make_init([(6, 5), (5,)])
    runs = {}
    for who in ("fused", "torch", "reference"):
        ps = [nn.Parameter(x.to(dev, torch.float64, copy=True)) for x in init]
        kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=dampening, nesterov=nesterov)
        if who == "torch":
            opt = torch.optim.SGD(ps, **kw)
        else:
            opt = make(case if who == "fused" else case.reference, cls="LARS", adapt=False, **kw)(ps)
        for s in range(4):
            set_grads(ps, s)
            if s == 0:   # skipped: GradScaler found an inf (non-fused optimizers: step() not called)
                if who != "fused":
                    continue
                opt.found_inf, opt.grad_scale = torch.ones(1, device=dev), torch.ones(1, device=dev)
            elif s == 1 and who == "fused":
                del opt.found_inf, opt.grad_scale
            opt.step()
        runs[who] = [p.detach().cpu() for p in ps]
    assert max_err(runs["fused"], runs["torch"]) < 1e-13
    assert max_err(runs["fused"], runs["reference"]) < 1e-13


@pytest.mark.parametrize("case", params([c for c in CASES if c.algo == "TVLARS"], slow=extra_interpreted))
def test_momentum_given_after_a_skipped_first_step_is_used(case):
    """A momentum buffer written into the state after a step skipped by found_inf (a checkpoint
    loaded, ZeroRedundancyOptimizer's load_state_dict) is resumed, not replaced by torch's first
    buffer: the pending first-update mark is cleared when the state comes from outside."""
    dev = case.device
    init = make_init([(6, 5), (5,)])
    runs = []
    for who in ("fused", "reference"):
        ps = [nn.Parameter(x.to(dev, torch.float64, copy=True)) for x in init]
        kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.3)
        opt = make(case if who == "fused" else case.reference, cls="LARS", adapt=False, **kw)(ps)
        set_grads(ps, 0)
        if who == "fused":   # skipped (the reference's step is simply not called, as GradScaler does)
            opt.found_inf, opt.grad_scale = torch.ones(1, device=dev), torch.ones(1, device=dev)
            opt.step()
            del opt.found_inf, opt.grad_scale
        for p in ps:
            opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.5)
        for s in range(1, 3):
            set_grads(ps, s)
            opt.step()
        runs.append([p.detach().cpu() for p in ps])
    assert max_err(*runs) < 1e-13


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["nan", "inf", "huge"])
def test_nonfinite_gradients_match_reference(case, dtype, kind):
    """No found_inf: NaN/Inf gradients (or finite ones whose square overflows) give what the
    reference gives: NaN in the same places (q = 1 for a NaN norm, q = 0 for an Inf one), the
    finite entries as close as usual; later steps carry the NaN in the momentum the same way."""
    shapes = [(6, 5), (5,), (4, 4)]

    def run(b):
        ps = [nn.Parameter(x.to(device=case.device, dtype=dtype)) for x in make_init(shapes, seed=2)]
        opt = make(b)(ps)
        for s in range(3):
            set_grads(ps, s)
            if s == 1:
                if kind == "nan":
                    ps[0].grad[2, 3] = float("nan")
                elif kind == "inf":
                    ps[0].grad[2, 3] = float("inf")
                    ps[1].grad[0] = -float("inf")
                else:
                    ps[0].grad.mul_(1e200 if dtype == torch.float64 else 1e25)
            opt.step()
        return ps, opt
    f, opt = run(case)
    r, _ = run(case.reference)
    tol = F64_TOL if dtype == torch.float64 else 1e-5
    for i, (a, b) in enumerate(zip(f, r)):
        assert torch.equal(a.isnan(), b.isnan()), f"param {i}: NaN positions differ"
        assert torch.equal(a.isinf(), b.isinf()), f"param {i}: Inf positions differ"
        assert torch.allclose(a, b, rtol=0, atol=tol, equal_nan=True), f"param {i}"
    if kind == "nan":
        assert int(f[0].isnan().sum()) == 1 and float(opt.layer_stats()[f[0]][2]) == 1.0


@pytest.mark.parametrize("case", BACKENDS)
def test_zero_norm_weight_or_update_uses_q_one(case):
    """q = 1 when ||w|| = 0 (a zero-initialised layer) or ||d|| = 0 (zero gradient, no weight
    decay), or both, on every step; results as the reference."""
    dev = case.device

    def run(b):
        ps = [nn.Parameter(torch.zeros(4, 3, dtype=torch.float64, device=dev)),          # ||w|| = 0
              nn.Parameter(torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev)),
              nn.Parameter(torch.zeros(6, dtype=torch.float64, device=dev)),             # both zero
              nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dev))]
        opt = make(b, weight_decay=0.0)(ps)
        stats = []
        for s in range(3):
            set_grads(ps, s)
            ps[1].grad.zero_()                      # ||d|| = 0
            ps[2].grad.zero_()
            if s == 0:
                ps[0].grad.zero_()                  # w = 0 and d = 0 on the first step
            opt.step()
            if b.fused:
                stats.append({i: opt.layer_stats()[p].clone() for i, p in enumerate(ps)})
        return ps, stats
    f, stats = run(case)
    r, _ = run(case.reference)
    assert max_err(f, r) < F64_TOL
    assert float(stats[1][0][0]) == 0.0 and float(stats[1][0][2]) == 1.0    # zero weight, step 2
    for st in stats:
        for i in (1, 2):
            assert float(st[i][1]) == 0.0 and float(st[i][2]) == 1.0, (i, st[i])
        assert float(st[3][2]) != 1.0


# ==== 5. state: checkpoints, backends, dtypes =======================================================

CKPT_START, CKPT_STOP = 3, 7
CKPT_CASES = with_reference(CASES)
CKPT_TEST = "test_checkpoint_resume_in_fresh_process_bit_for_bit"


@pytest.fixture(scope="module")
def checkpoint_runs(request, tmp_path_factory):
    """Per case (each backend on each device, the reference on each device; each class) whose test
    was selected (-m, -k): train CKPT_START steps, save model/optimizer/scheduler, go on to
    CKPT_STOP (the uninterrupted run); then ONE fresh process resumes every case from its
    checkpoint, on the case's device."""
    d = tmp_path_factory.mktemp("ckpt")
    cases = [item.callspec.params["case"] for item in request.session.items
             if getattr(item, "originalname", None) == CKPT_TEST]
    straight = {}
    with ckpt.same_bits():
        for case in cases:
            model = ckpt.make_model(device=case.device)
            opt, sched = ckpt.make_optimizer(model, case)
            ckpt.train(model, opt, sched, 0, CKPT_START)
            torch.save(ckpt.checkpoint(model, opt, sched), d / f"ckpt_{case.id}.pt")
            ckpt.train(model, opt, sched, CKPT_START, CKPT_STOP)
            straight[case.id] = ckpt.result(model, opt)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, ckpt.__file__, str(d), str(CKPT_START), str(CKPT_STOP),
                           *[case.id for case in cases]], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = {case.id: torch.load(d / f"resumed_{case.id}.pt", weights_only=True) for case in cases}
    return straight, resumed


@pytest.mark.parametrize("case", params(CKPT_CASES, slow=extra_interpreted))
def test_checkpoint_resume_in_fresh_process_bit_for_bit(case, checkpoint_runs):
    straight, resumed = checkpoint_runs
    a, b = straight[case.id], resumed[case.id]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert bit_equal(a["model"][k], b["model"][k]), f"{case}: model[{k!r}] differs after resume"
    assert a["state"].keys() == b["state"].keys()
    for k, v in a["state"].items():
        if isinstance(v, dict):
            assert v.keys() == b["state"][k].keys()
            for n, t in v.items():
                assert bit_equal(t, b["state"][k][n]), f"{case}: state[{k}][{n!r}] differs after resume"
        else:
            assert bit_equal(v, b["state"][k]), f"{case}: state[{k!r}] differs"
    assert all(float(v["step"]) == CKPT_STOP for v in a["state"].values()) and a["lrs"] == b["lrs"]
    spec = case.spec   # the class under test is the case's (both groups' state keys)
    assert {k for v in a["state"].values() for k in v} == {"step", *spec.state_keys(), *spec.state_keys(spec.other_form)}


# Every ordered pair of (device, backend) cases and references of one class: on a GPU also across
# devices.
PAIRS = [(s, d) for s in with_reference(CASES) for d in with_reference(CASES) if s != d and s.algo == d.algo]


@pytest.mark.parametrize("src,dst", [pytest.param(s, d, id=f"{s}->{d}", marks=[pytest.mark.slow]
                                                  if extra_interpreted(s) or extra_interpreted(d) else [])
                                     for s, d in PAIRS])
def test_state_dict_moves_between_backends(src, dst):
    """A state_dict saved (torch.save) with one backend loads into another (and the reference),
    on the same device or (on a GPU) another one, both forms of the class, and the run goes on as
    if it had never moved."""
    (_, form0), (_, form1) = src.spec.forms
    model_a, opt_a = _net_and_opt(src, seed=6)
    for g in opt_a.param_groups[1:]:
        g.update(form1)   # set before any state exists: one group of each form
    _loop(model_a, opt_a, 3)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_b, opt_b = _net_and_opt(dst, seed=7)
    for g in opt_b.param_groups[1:]:
        g.update(form1)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    _loop(model_a, opt_a, 2, start=3)
    _loop(model_b, opt_b, 2, start=3)
    assert max_err(model_a.parameters(), model_b.parameters()) < F64_TOL
    assert float(opt_b.step_count) == 5
    state = opt_b.state_dict()["state"]
    keys = [sorted(state[k]) for k in sorted(state)]
    assert keys == ([sorted(state_keys(src, **form0) + ("step",))] * 2
                    + [sorted(state_keys(src, **form1) + ("step",))] * 4)


@pytest.mark.parametrize("case", BACKENDS)
def test_bf16_parameters_keep_float32_state_through_save_load(case):
    """bfloat16 parameters keep their state (momentum; LAMB's moments) in float32, through
    torch.save/load and load_state_dict into each backend and the reference, bit for bit."""
    keys = state_keys(case)

    def run(b, steps):
        ps = [nn.Parameter(x.to(case.device, torch.bfloat16)) for x in make_init([(6, 5), (5,), (3, 3)], seed=8)]
        opt = make(b)(ps)
        lockstep([ps], [opt], steps)
        return ps, opt
    ps, opt = run(case, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert {str(v[key].dtype) for k, v in sd["state"].items() if k != "step" for key in keys} == {"torch.float32"}
    # the state is not representable in bfloat16: a cast anywhere would lose bits
    for key in keys:
        assert any(not torch.equal(v[key], v[key].bfloat16().float())
                   for k, v in sd["state"].items() if k != "step"), key
    for b in (case, case.reference):
        ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
        o2 = make(b)(ps2)
        o2.load_state_dict(sd)
        for p, p2 in zip(ps, ps2):
            for key in keys:
                assert o2.state[p2][key].dtype == torch.float32
                assert bit_equal(o2.state[p2][key], opt.state[p][key]), key
        if b.fused:
            assert o2._buckets[0].state_buf.dtype == torch.float32
            lockstep([ps2], [o2], 2, start=3)
            assert all(o2.state[ps2[0]][key].dtype == torch.float32 for key in keys)
            ref_ps, _ = run(case, 5)     # never saved: the same bits
            assert all(bit_equal(a, b_) for a, b_ in zip(ps2, ref_ps))


# ==== 6. long runs ==================================================================================

def _long_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _long_groups(model, case):
    """The 2-D parameters with the class's defaults; the 1-D ones with both filters and the class's
    other form (AlgorithmSpec.other_form: TVLARS the paper form)."""
    return [{"params": [p for p in model.parameters() if p.ndim > 1]},
            {"params": [p for p in model.parameters() if p.ndim == 1], **case.spec.other_form}]


LONG_HYPER = {"TVLARS": dict(lr=0.5, momentum=0.9, weight_decay=5e-4, eta=2e-3, lmbda=2e-3, delay_steps=100),
              "LAMB": dict(lr=3e-3, weight_decay=1e-2)}   # (lr=1e-2 is chaotic here: float64 runs part by step 2000)


def _resync(dst_model, dst_opt, src_model, src_opt) -> None:
    """Put the float64 reference's parameters and momentum state (rounded) into a float32 run."""
    with torch.no_grad():
        for p, q in zip(dst_model.parameters(), src_model.parameters()):
            p.copy_(q)
            for key, t in src_opt.state.get(q, {}).items():
                dst_opt.state[p][key].copy_(t)


def long_run(case: BackendCase, steps: int, window: int = 250):
    """A small MLP (three Linear layers, a LayerNorm; 1-D parameters in a group with both filters and
    the class's other form: TVLARS's paper form, LAMB's decoupled weight decay) regressing a fixed target with real, parameter-dependent gradients, for `steps` steps:
    fused and reference runs in float32 and float64 in lock step.

    - fused float64 vs reference float64, uninterrupted: within 1e-9 the whole way (asserted at
      every window boundary);
    - float32, the parity rule (assert_parity_fp32) at every window boundary, on float32 runs that
      restart each window from the float64 reference's state (parameters and momentum rounded to
      float32, t shared): every uninterrupted float32 trajectory drifts away from the float64 one
      (x40 over 5000 steps here, chaotic), and which of two float32 runs ends up nearer is then a
      matter of luck, not of accuracy; per window the rule compares like with like;
    - the uninterrupted float32 runs are tracked too: their error ratio is reported, not asserted.
    The runs are on the case's device; the data stays on the CPU (moved batch by batch).
    Returns the worst values seen."""
    dev = case.device
    base = _long_model().double()
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    Y = torch.sin(3 * X[:, :4] - X[:, 4:])
    runs = {}
    for name, dtype in (("f32", torch.float32), ("r32", torch.float32), ("f32w", torch.float32),
                        ("r32w", torch.float32), ("r64", torch.float64), ("f64", torch.float64)):
        m = copy.deepcopy(base).to(dev, dtype)
        b = case if name[0] == "f" else case.reference
        opt = b.optimizer(**LONG_HYPER[case.algo])(_long_groups(m, case))
        runs[name] = (m, opt, dtype)
    worst = dict(ratio=0.0, at=0, fused32=0.0, ref32=0.0, fused64=0.0, drift_ratio=0.0, drift_fused32=0.0,
                 drift_ref32=0.0)
    t0 = time.time()
    for s in range(steps):
        if s % window == 0 and s:
            for name in ("f32w", "r32w"):
                _resync(runs[name][0], runs[name][1], runs["r64"][0], runs["r64"][1])
        idx = torch.randint(0, 256, (32,), generator=gen)
        for m, opt, dtype in runs.values():
            opt.zero_grad()
            nn.functional.mse_loss(m(X[idx].to(dev, dtype)), Y[idx].to(dev, dtype)).backward()
            opt.step()
        if (s + 1) % window == 0 or s + 1 == steps:
            P = {k: list(v[0].parameters()) for k, v in runs.items()}
            assert all(torch.isfinite(p).all() for p in P["f32"] + P["f32w"])
            e_f, e_r = assert_parity_fp32(P["f32w"], P["r32w"], P["r64"], f"{case} window ending at step {s + 1}")
            e64 = max_err(P["f64"], P["r64"])
            assert e64 <= 1e-9, f"{case} step {s + 1}: fused float64 error {e64:.3e}"
            d_f, d_r = max_err(P["f32"], P["r64"]), max_err(P["r32"], P["r64"])
            if e_r and e_f / e_r > worst["ratio"]:
                worst.update(ratio=e_f / e_r, at=s + 1)
            worst.update(fused32=max(worst["fused32"], e_f), ref32=max(worst["ref32"], e_r),
                         fused64=max(worst["fused64"], e64),
                         drift_ratio=max(worst["drift_ratio"], d_f / d_r if d_r else 0.0),
                         drift_fused32=max(worst["drift_fused32"], d_f), drift_ref32=max(worst["drift_ref32"], d_r))
    loss0 = nn.functional.mse_loss(base(X), Y).item()
    loss = nn.functional.mse_loss(runs["r64"][0](X.to(dev)), Y.to(dev)).item()
    assert loss < loss0, "the long run did not train"
    assert float(runs["f32"][1].step_count) == steps
    print(f"\nlong run {case} {steps} steps, {window}-step windows ({time.time() - t0:.0f}s): worst fused fp32 / "
          f"reference fp32 error ratio {worst['ratio']:.3f} (window ending at step {worst['at']}), worst fused fp32 "
          f"error {worst['fused32']:.3e} (reference fp32 {worst['ref32']:.3e}); fused fp64 vs reference fp64 "
          f"{worst['fused64']:.3e}; uninterrupted fp32 drift: fused {worst['drift_fused32']:.3e}, reference "
          f"{worst['drift_ref32']:.3e}, worst ratio {worst['drift_ratio']:.3f} (not asserted); "
          f"loss {loss0:.4f} -> {loss:.4f}")
    return worst


# The Triton interpreter (triton on the CPU) runs a step in ~0.2-0.3 s here: its runs are shorter
# (and say so). Triton on a GPU runs the full length.
LONG_STEPS = {True: 300, False: 5000}   # by case.interpreted
FAST_STEPS = {True: 10, False: 300}


@pytest.mark.slow
@pytest.mark.parametrize("case", BACKENDS)
def test_long_run_5000_steps_within_parity(case):
    steps = LONG_STEPS[case.interpreted]
    long_run(case, steps, window=250 if steps >= 1000 else 50)


@pytest.mark.parametrize("case", BACKENDS)
def test_long_run_300_steps_within_parity(case):
    steps = FAST_STEPS[case.interpreted]
    long_run(case, steps, window=50 if steps > 50 else 5)


# ==== 7. memory =====================================================================================

def _allocations(fn):
    """(allocation events, bytes) that torch's CPU allocator reports while fn() runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.cpu_memory_usage > 0]
    return len(events), sum(e.cpu_memory_usage for e in events)


def _profiled_step_allocations(case, steps=3):
    """Allocation events during `steps` optimizer steps after warm-up (gradients in place)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.LayerNorm(10))
    opt = make(case)(model.parameters())
    x = torch.randn(8, 64)

    def forward_backward():
        opt.zero_grad()
        model(x).square().mean().backward()
    for _ in range(3):
        forward_backward()
        opt.step()
    forward_backward()

    def run():
        for _ in range(steps):
            opt.step()
    return _allocations(run)


@pytest.mark.parametrize("case", CPU_BACKENDS)   # CPU-only: see the top of this file
def test_step_allocates_nothing_after_warmup(case):
    ctl = _allocations(lambda: torch.empty(1 << 16).fill_(1.0))
    assert ctl[0] >= 1 and ctl[1] >= 4 << 16, f"the profiler does not report allocations: {ctl}"
    n, nbytes = _profiled_step_allocations(case)
    print(f"\n{case}: {n} allocation events, {nbytes} bytes in 3 steps after warm-up")
    if case.backend == "torch":
        return   # plain torch ops: bucket-sized temporaries by design (recorded, not asserted)
    assert n == 0 and nbytes == 0, f"{case}: a step after warm-up allocated {n} times ({nbytes} bytes)"


@requires_cuda
@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_step_allocates_nothing_after_warmup(backend, algo):
    if backend not in available_backends("cuda"):
        pytest.skip(f"backend {backend!r} cannot run on this GPU")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    opt = make(BackendCase("cuda", backend, algo))(model.parameters())
    x = torch.randn(64, 256, device="cuda")
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    for key in ("num_alloc_retries", "allocation.all.allocated"):
        assert after.get(key, 0) == before.get(key, 0), f"{backend}: {key} {before.get(key)} -> {after.get(key)}"


@requires_cuda
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_module_to_cuda_after_build(algo):
    """module.cuda() after the optimizer was built (CPU buckets): it follows, like the reference."""
    runs = []
    for b in ("auto", "reference"):
        model = _mlp().double()
        opt = make(BackendCase("cpu", b, algo))(model.parameters())

        def hook(s, model, opt):
            if s == 0:   # before any state exists (the reference cannot follow a move later)
                model.cuda()
        g = torch.Generator().manual_seed(11)
        for s in range(5):
            hook(s, model, opt)
            x = torch.randn(5, 4, generator=g, dtype=torch.float64).to(next(model.parameters()).device)
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        runs.append(model)
    assert max_err(runs[0].parameters(), runs[1].parameters()) < F64_TOL


# ResNet-18's parameter shapes (conv weights, BN weight/bias, fc): 11.7M parameters, 62 tensors
def resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if s != 1 or cin != cout:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1000, 512), (1000,)]


def _tensor_bytes(t):
    return t.numel() * t.element_size()


def optimizer_overhead(opt, params) -> dict:
    """Bytes the buckets hold besides the parameters and gradients themselves: the state buffer,
    the padding of the flat gradient buffer, tables and workspace. (The parameters keep their own
    memory.)"""
    param_bytes = sum(_tensor_bytes(p) for p in params)
    out = dict(state=0, padding=0, tables=0, workspace=0)
    for b in opt._buckets:
        out["state"] += _tensor_bytes(b.state_buf)
        out["padding"] += _tensor_bytes(b.grad_buf)
        out["tables"] += sum(_tensor_bytes(t) for t in (b.seg_table, b.chunk_table, b.seg_active, b.group_table,
                                                       b.w_offsets))
        out["workspace"] += sum(_tensor_bytes(t) for t in (b.partials, b.counters, b.stats, b.step))
    out["padding"] -= param_bytes
    out["total"] = sum(out.values())
    return out


def own_storages(opt) -> set:
    """The buckets' own buffers and the parameters' memory (which they update in place)."""
    return {t.untyped_storage().data_ptr() for b in opt._buckets
            for t in (*b.weights, b.w_offsets, b.grad_buf, b.state_buf, b.seg_table, b.chunk_table, b.seg_active,
                      b.group_table, b.partials, b.counters, b.stats, b.step)}


def retained_storages(opt) -> dict:
    """data_ptr -> bytes of every distinct storage reachable from the buckets' tensors."""
    seen = {}

    def visit(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    for b in opt._buckets:
        for v in vars(b).values():
            if isinstance(v, torch.Tensor):
                visit(v)
            elif isinstance(v, (list, tuple)):
                for t in v:
                    visit(t)
    return seen


@pytest.mark.parametrize("case", BACKENDS)
def test_memory_overhead_resnet18_shapes(case):
    """The fused optimizer's memory over parameters + gradients vs the eager reference's state
    (momentum buffers; LAMB's two moments) (ResNet-18 shapes, float32). Bounded: the state equals
    the reference's, plus its padding (one row per state tensor), plus <0.5% for padding, tables
    and workspace."""
    shapes = resnet18_shapes()
    init = [torch.zeros(s, device=case.device) for s in shapes]
    params = [nn.Parameter(x) for x in init]
    opt = make(case)(params)
    numel = sum(p.numel() for p in params)
    ref_ps = [nn.Parameter(torch.zeros(s, device=case.device)) for s in shapes]
    o_r = make(case.reference)(ref_ps)
    for p in ref_ps:
        p.grad = torch.zeros_like(p)
    o_r.step()
    keys = state_keys(case)
    ref_bytes = sum(_tensor_bytes(st[k]) for p, st in o_r.state.items() if isinstance(p, torch.Tensor) for k in keys)
    over = optimizer_overhead(opt, params)
    own = own_storages(opt)
    retained = sum(n for ptr, n in retained_storages(opt).items() if ptr not in own)
    print(f"\nResNet-18 shapes ({len(shapes)} tensors, {numel / 1e6:.2f}M float32 params, {case}): "
          f"fused overhead {over['total'] / 2**20:.2f} MiB = state {over['state'] / 2**20:.2f} + padding "
          f"{over['padding'] / 2**10:.1f} KiB + tables {over['tables'] / 2**10:.1f} KiB + workspace "
          f"{over['workspace'] / 2**10:.1f} KiB; reference state {ref_bytes / 2**20:.2f} MiB; "
          f"ratio {over['total'] / ref_bytes:.4f}; other storages the buckets keep alive "
          f"{retained / 2**20:.2f} MiB (see test_buckets_retain_no_storage_besides_their_buffers)")
    assert over["state"] == ref_bytes + len(keys) * over["padding"]
    assert over["total"] <= ref_bytes * 1.005


@pytest.mark.parametrize("case", BACKENDS)
def test_buckets_retain_no_storage_besides_their_buffers(case):
    params = [nn.Parameter(torch.randn(s).to(case.device)) for s in [(256, 128), (128,), (64, 64)]]
    opt = make(case)(params)
    for _ in range(2):
        opt.zero_grad()
        sum(p.square().sum() for p in params).backward()
        opt.step()
    params[0].data = params[0].data.clone()   # moved: the bucket must follow, not keep the old memory
    opt.step()
    own = own_storages(opt)
    assert params[0].untyped_storage().data_ptr() in own
    extra = {ptr: n for ptr, n in retained_storages(opt).items() if ptr not in own}
    assert not extra, f"buckets keep {sum(extra.values())} bytes of other storages alive"


# -- host bookkeeping against the reference (found by a differential hunt) --------------------------

TVLARS_CASES = params([c for c in CASES if c.algo == "TVLARS"], slow=extra_interpreted)


def _twin_run(case, build, steps):
    """`build(factory)` -> (params, optimizer) for the case and for the reference on the same
    device; steps(params, opt, k) runs step k's edits and gradients on both before each step."""
    runs = []
    for c in (case, case.reference):
        ps, opt = build(make(c), c.device)
        for k in range(len(steps)):
            steps[k](ps, opt)
            opt.step()
        runs.append((ps, opt))
    return runs


@pytest.mark.parametrize("case", BACKENDS)
def test_grads_swapped_between_parameters_step_each_its_own(case):
    """.grad tensors swapped between two parameters (each now the other's view of the optimizer's
    buffer): each parameter steps with the gradient its .grad holds, as the reference does (the
    views were copied one after the other: the second read what the first had just written)."""
    init = make_init([(5,), (5,), (3,)], seed=3)
    gen = torch.Generator().manual_seed(4)
    gs = [[torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(3)]

    def build(factory, dev):
        ps = [nn.Parameter(x.to(dev, torch.float64, copy=True)) for x in init]
        return ps, factory(ps)

    def backward(k):
        def run(ps, opt):
            opt.zero_grad()
            (sum((p * g.to(p.device)).sum() for p, g in zip(ps, gs[k])) + ps[2].square().sum()).backward()
        return run

    def swapped(ps, opt):
        backward(1)(ps, opt)
        ps[0].grad, ps[1].grad = ps[1].grad, ps[0].grad
    (fused, _), (ref, _) = _twin_run(case, build, [backward(0), swapped, backward(2)])
    assert max_err(fused, ref) < F64_TOL


@pytest.mark.parametrize("case", BACKENDS)
def test_step_entry_replaced_while_its_parameter_has_no_gradient(case):
    """A "step" written into the state of a parameter that has no gradient at the next step (as
    ZeroRedundancyOptimizer's load writes entries) sets t at that step (docs/SPEC.md), as the
    reference does: t and phi(t) of the other parameters follow at once."""
    init = make_init([(5,), (3,)], seed=5)

    def build(factory, dev):
        ps = [nn.Parameter(x.to(dev, torch.float64, copy=True)) for x in init]
        return ps, factory(ps)

    def grads(ps, opt):
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.1 * (i + 1))

    def replace(ps, opt):
        grads(ps, opt)
        opt.state[ps[1]]["step"] = torch.tensor(10.0)
        ps[1].grad = None
    def cleared(ps, opt):   # (a parameter's state cleared while it has no gradient: it stays empty)
        grads(ps, opt)
        opt.state[ps[1]].clear()
        ps[1].grad = None
    (fused, of), (ref, orf) = _twin_run(case, build, [grads, replace, grads, cleared])
    assert float(of.step_count) == float(orf.step_count) == 13.0
    assert max_err(fused, ref) < F64_TOL
    assert of.state_dict()["state"][1] == orf.state_dict()["state"][1] == {}


def _one_parameter_twin(case, seed, steps):
    """_twin_run over one float64 parameter with a fresh gradient per step; `steps`: per step, the
    group options written before it and whether state["momentum_buffer"] is replaced then."""
    init = make_init([(8,)], seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    gs = [torch.randn(8, generator=gen, dtype=torch.float64) for _ in steps]

    def build(factory, dev):
        ps = [nn.Parameter(init[0].to(dev, torch.float64, copy=True))]
        return ps, factory(ps)

    def step(k, edit, replace):
        def run(ps, opt):
            if replace:
                opt.state[ps[0]]["momentum_buffer"] = torch.full_like(ps[0], 100.0)
            opt.param_groups[0].update(edit)
            ps[0].grad = gs[k].to(ps[0].device).clone()
        return run
    return _twin_run(case, build, [step(k, edit, replace) for k, (edit, replace) in enumerate(steps)])


@pytest.mark.parametrize("case", TVLARS_CASES)
def test_momentum_form_switch_drops_a_replaced_buffer(case):
    """A momentum_buffer the user replaced, then a switch to the paper form before the next
    update: the switch drops the other form's key whatever it holds (docs/SPEC.md), so switching
    back starts a fresh buffer, as in the reference (the replaced tensor came back as the buffer)."""
    (fused, of), (ref, orf) = _one_parameter_twin(case, 6, [
        ({}, False), (dict(momentum_form="paper"), True), (dict(momentum_form="heavy_ball"), False)])
    assert sorted(of.state[fused[0]]) == sorted(orf.state[ref[0]]) == ["momentum_buffer", "step"]
    assert max_err(fused, ref) < F64_TOL


@pytest.mark.parametrize("case", TVLARS_CASES)
@pytest.mark.parametrize("lr_scaled_momentum", [0.9, 0.0])
def test_first_update_mark_consumed_by_an_lr_scaled_update(case, lr_scaled_momentum):
    """heavy_ball with dampening at momentum 0 (its first-update mark waits), then lr_scaled with
    momentum (an update of the shared buffer: the first; at momentum 0 not an update of it), then
    heavy_ball with dampening: the buffer lr_scaled built goes on (docs/SPEC.md), in the reference
    as in the kernels."""
    (fused, of), (ref, orf) = _one_parameter_twin(case, 8, [
        (dict(momentum=0.0, dampening=0.5, adapt=False), False),
        (dict(momentum_form="lr_scaled", dampening=0.0, momentum=lr_scaled_momentum), False),
        (dict(momentum_form="heavy_ball", dampening=0.5, momentum=0.9), False), ({}, False)])
    assert max_err(fused, ref) < F64_TOL
    assert max_err([of.state[fused[0]]["momentum_buffer"]], [orf.state[ref[0]]["momentum_buffer"]]) < F64_TOL


@pytest.mark.parametrize("case", BACKENDS)
def test_one_element_parameter_norms_are_sums_of_squares(case):
    """A one-element parameter whose gradient's square underflows (float32 |g| < ~1e-19): its norm
    is 0, as the spec's sum of squares says, on every backend and in the reference (torch's
    vector_norm returns |g| for one element: the reference took a trust ratio of 1e18)."""
    outs = []
    for c in (case, case.reference):
        p = nn.Parameter(torch.tensor(1.0, device=c.device))
        opt = make(c, weight_decay=0.0)([p])
        p.grad = torch.tensor(1e-23, device=c.device)
        opt.step()
        outs.append(p.detach().cpu())
    assert torch.equal(outs[0], outs[1]), outs


@pytest.mark.parametrize("case", BACKENDS_AND_REFERENCE)
@pytest.mark.parametrize("bad", [2.5, -3.0, float("nan"), float("inf"), 2.0 ** 24 + 2])
def test_loaded_step_must_be_a_whole_count(case, bad):
    """A "step" entry that is not a whole number in [0, 2^24] (t is float32) is refused, loaded or
    written into the state: the backends truncated, raised or went NaN, each its own way."""
    p = nn.Parameter(torch.ones(3, dtype=torch.float64, device=case.device))
    opt = make(case)([p])
    p.grad = torch.full_like(p, 0.1)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(before)
    sd["state"][0]["step"] = torch.tensor(bad)
    for key in sd["state"][0]:
        if key != "step":
            sd["state"][0][key] = sd["state"][0][key] + 99.0
    with pytest.raises(ValueError, match=r"Invalid 'step'.*whole number"):
        opt.load_state_dict(sd)
    after = opt.state_dict()   # (refused before anything changed)
    assert float(after["state"][0]["step"]) == 1.0 and all(
        torch.equal(after["state"][0][k], before["state"][0][k]) for k in before["state"][0])
    legacy = {"state": {"step": bad}, "param_groups": before["param_groups"]}
    with pytest.raises(ValueError, match=r"Invalid 'step'.*whole number"):
        opt.load_state_dict(legacy)
    opt.state[p]["step"] = torch.tensor(bad)
    for _ in range(2):   # refused, and again: the bad entry is not taken over by the refused step
        with pytest.raises(ValueError, match=r"Invalid 'step'.*whole number"):
            opt.step()
    assert float(opt.step_count) == 1.0
