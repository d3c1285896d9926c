"""LAMB (docs/SPEC.md, "## LAMB"), tested from the paper, not from this project's code.

tests/lamb_oracle.py is an independent LAMB written from You et al. 2019, Algorithm 2
(arXiv 1904.00962), and the SPEC's options: per parameter, plain torch ops, float64. This file

1. checks the oracle itself against the implementations the SPEC names (the `self_check` tests):
   pytorch-optimizer's Lamb (the SPEC's mapping; its weight_decouple, grad_averaging, adam, maximize
   and param groups), torch.optim.AdamW (adapt=False, weight_decay_mode="decoupled") and
   torch.optim.Adam (weight_decay_mode="l2"; always_adapt=False without weight decay), each to
   1e-12 in float64 over 20 steps, with foreach off and on;
2. holds tvlars_fused.reference.LAMB and tvlars_fused.LAMB (every backend that runs CPU tensors:
   "triton" under the Triton interpreter, its expensive cases marked slow) to the oracle: float64
   within 1e-12 of each parameter's size over an option matrix, float32 and bfloat16 by the parity
   rule (tests/parity.py) per parameter;
3. checks the behaviour around the step: state keys and dtypes, state_dicts across the reference and
   the backends, AMP (found_inf, grad_scale, GradScaler), layer_stats, None and zero-size
   parameters, tensor lr and schedulers, argument checks, determinism, and the SPEC's recipe for a
   global gradient clip (clip_grad_norm_ before step()).
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Callable, Optional, Sequence

import pytest
import torch

from lamb_oracle import OracleLAMB
from parity import SHAPES, assert_parity_fp32, bit_equal, grads_for_step, make_init, rel_err
from parity import used as some_none_grads

F64 = torch.float64
TOL = 1e-12          # float64 agreement, relative to each parameter's size (max(1, max|w|))
STEPS = 8
HYPER = dict(lr=0.02, weight_decay=0.05)
STATE_KEYS = {"step", "exp_avg", "exp_avg_sq"}


try:   # (guarded only so that the oracle's self-checks run while the package does not import)
    import tvlars_fused
    from tvlars_fused import reference
    from tvlars_fused.kernels import available_backends
    BACKENDS = available_backends("cpu")
    CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []
    IMPORT_ERROR = None
except Exception as exc:   # every test of tvlars_fused then fails with this error; none is skipped
    tvlars_fused = reference = None
    BACKENDS = ["triton", "cpu", "torch"]
    CUDA_BACKENDS = []
    IMPORT_ERROR = exc


# ==== helpers =======================================================================================

def lamb(impl: str, groups: Optional[Callable] = None, **kw) -> Callable:
    """A factory params -> optimizer: "oracle" (tests/lamb_oracle.py), "reference"
    (tvlars_fused.reference.LAMB) or a fused backend (tvlars_fused.LAMB(backend=impl)).
    `groups(params)` turns the parameter list into param groups."""
    def build(params):
        ps = groups(params) if groups is not None else params
        if impl == "oracle":
            return OracleLAMB(ps, **kw)
        if IMPORT_ERROR is not None:
            raise ImportError(f"tvlars_fused does not import: {IMPORT_ERROR!r}") from IMPORT_ERROR
        if impl == "reference":
            return reference.LAMB(ps, **kw)
        return tvlars_fused.LAMB(ps, backend=impl, **kw)
    return build


def impl_params(impls: Sequence[str], fast_on_triton: bool = False) -> list:
    """pytest params; the Triton interpreter's cases are slow unless `fast_on_triton`."""
    return [pytest.param(b, id=b, marks=[pytest.mark.slow] if b == "triton" and not fast_on_triton else [])
            for b in impls]


IMPLS = ["reference"] + list(BACKENDS)


def train(make_opt: Callable, init: Sequence[torch.Tensor], dtype: torch.dtype, steps: int, *,
          round_to: Optional[torch.dtype] = None, used: Optional[Callable[[int, int], bool]] = None,
          zero_grad: Sequence[int] = (), seed: int = 1, grad_scale: float = 1.0,
          before_step: Optional[Callable] = None, after_step: Optional[Callable] = None, device: str = "cpu"):
    """parity.train's loop (loss sum_p (p * c_p).sum(), so grad = c_p exactly; backward, the fast
    path) with the initial weights and the gradients rounded through `round_to` first: runs in
    float64 and in `round_to` then start from the same weights and see the same gradients, and
    their difference is the arithmetic's alone. Gradients are multiplied by `grad_scale` (exact
    for powers of two); `used(step, i)` False leaves parameter i's .grad None on that step."""
    def rnd(t):
        return t.to(round_to).to(F64) if round_to is not None else t
    params = [torch.nn.Parameter(rnd(x).to(device=device, dtype=dtype, copy=True)) for x in init]
    opt = make_opt(params)
    shapes = [tuple(x.shape) for x in init]
    for s in range(steps):
        opt.zero_grad()
        cs = [rnd(c).to(device) for c in grads_for_step(shapes, s, seed)]
        terms = [(p * (torch.zeros_like(c) if i in zero_grad else c * grad_scale).to(dtype)).sum()
                 for i, (p, c) in enumerate(zip(params, cs)) if used is None or used(s, i)]
        if terms:
            torch.stack([t.to(F64) for t in terms]).sum().backward()
        if before_step is not None:
            before_step(s, opt, params)
        opt.step()
        if after_step is not None:
            after_step(s, opt, params)
    return params, opt


def assert_match(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], what: str,
                 init: Optional[Sequence[torch.Tensor]] = None, tol: float = TOL) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"{what}: parameter {i} shape"
        err = rel_err(a, e)
        assert err <= tol, f"{what}: parameter {i} {tuple(e.shape)}: relative error {err:.3e} > {tol:.0e}"
    if init is not None:   # the run must move the parameters, else agreement shows nothing
        moved = max(rel_err(e, x) for e, x in zip(expected, init))
        assert moved > 1e-3, f"{what}: the parameters barely moved ({moved:.1e})"


def assert_states_match(opt, oracle, params, oracle_params, what: str) -> None:
    """exp_avg and exp_avg_sq of every parameter the oracle updated within 1e-12; "step" == t."""
    for i, (p, po) in enumerate(zip(params, oracle_params)):
        so = oracle.state.get(po, {})
        st = opt.state.get(p, {})
        if not so:
            assert not st, f"{what}: parameter {i} was never updated but has state {set(st)}"
            continue
        assert set(st) == STATE_KEYS, f"{what}: parameter {i} state keys {set(st)}"
        for key in ("exp_avg", "exp_avg_sq"):
            err = rel_err(st[key], so[key])
            assert err <= TOL, f"{what}: state[{i}][{key!r}] relative error {err:.3e}"
    assert float(opt.step_count) == oracle.t, f"{what}: t = {float(opt.step_count)}, expected {oracle.t}"


def everything(opt, params) -> list:
    """Parameters, state tensors (in parameter order) and t: what two identical runs must share."""
    out = [p.detach().clone() for p in params]
    for p in params:
        for k in sorted(opt.state.get(p, {})):
            out.append(torch.as_tensor(opt.state[p][k]).detach().clone())
    out.append(torch.as_tensor(opt.step_count).detach().clone())
    return out


def assert_same_bits(a: list, b: list, what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} tensors"
    for i, (x, y) in enumerate(zip(a, b)):
        assert bit_equal(x, y), f"{what}: tensor {i} {tuple(x.shape)} differs"


def assert_parity_per_param(fused, ref, r64, what: str) -> None:
    """The parity rule (tests/parity.py) for each parameter on its own: the fused run's error against
    the float64 oracle at most 2x the reference's in the same dtype, plus 4 float32 ulps of the
    parameter's size."""
    for i, (f, r, e) in enumerate(zip(fused, ref, r64)):
        assert_parity_fp32([f], [r], [e], f"{what}, parameter {i} {tuple(e.shape)}")


# ==== 1. the oracle against pytorch-optimizer and torch.optim (these run without tvlars_fused.LAMB) ====

SELF_SHAPES = [(7,), (16, 9), (4, 3, 3, 3), (70, 130), (1,), (33,)]   # (70, 130): ||w|| ~ 95 > 10, clipped
SELF_STEPS = 20


def self_check_run(make_opt: Callable, steps: int = SELF_STEPS, per_step: Optional[Callable] = None):
    """Fresh float64 parameters (randn) and gradients; each optimizer gets its own gradient tensors
    (pytorch-optimizer negates them in place for maximize)."""
    init = make_init(SELF_SHAPES, seed=5)
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make_opt(params)
    for s in range(steps):
        if per_step is not None:
            per_step(s, opt)
        for p, c in zip(params, grads_for_step(SELF_SHAPES, s, seed=7)):
            p.grad = c.clone()
        opt.step()
    return [p.detach() for p in params], init


def one_dim(params):
    return [p for p in params if p.ndim == 1]


def multi_dim(params):
    return [p for p in params if p.ndim != 1]


def three_groups(params, **last):
    return [{"params": params[:2]}, {"params": params[2:4], "lr": 0.05, "weight_decay": 0.2, "betas": (0.8, 0.95)},
            {"params": params[4:], "lr": 0.003, "weight_decay": 0.0, "eps": 1e-3, **last}]


# variant -> (pytorch_optimizer.Lamb kwargs and groups, oracle kwargs and groups). The SPEC's mapping
# for Lamb(adam_debias=True): bias_correction="none", weight_decay_mode="decoupled",
# weight_norm_clip=10, ratio_eps=eps; by default (adam_debias=False) pytorch-optimizer 4.1.0 divides
# the step by 1 - beta1^k: bias_correction="first_moment" (test_pytorch_optimizer_default_lamb).
PO_LR, PO_WD, PO_EPS = 0.05, 0.02, 1e-6
PO_MAPPING = dict(bias_correction="none", weight_decay_mode="decoupled", weight_norm_clip=10.0, ratio_eps=PO_EPS)
PO_VARIANTS = {
    "decoupled": (dict(), dict()),
    "update": (dict(weight_decouple=False), dict(weight_decay_mode="update")),   # r + wd*w, Algorithm 2
    "maximize": (dict(maximize=True), dict(maximize=True)),
    "no_grad_averaging": (dict(grad_averaging=False), dict(grad_averaging=False)),
    "adam": (dict(adam=True), dict(adapt=False)),
    "no_weight_decay": (dict(weight_decay=0.0), dict(weight_decay=0.0)),
    # the filters: pytorch-optimizer's way is a param group of the 1-D parameters
    "filters": (dict(groups=lambda ps: [{"params": multi_dim(ps)},
                                        {"params": one_dim(ps), "weight_decay": 0.0, "adam": True}]),
                dict(weight_decay_filter=True, adaptation_filter=True)),
    "groups": (dict(groups=three_groups), dict(groups=lambda ps: three_groups(ps, ratio_eps=1e-3))),   # ratio_eps = eps
}


def pytorch_optimizer_lamb(foreach: bool, groups: Optional[Callable] = None, **kw) -> Callable:
    from pytorch_optimizer import Lamb

    def build(params):
        return Lamb(groups(params) if groups else params,
                    **{**dict(lr=PO_LR, weight_decay=PO_WD, eps=PO_EPS, foreach=foreach, adam_debias=True), **kw})
    return build


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("variant", list(PO_VARIANTS))
def test_self_check_pytorch_optimizer(variant, foreach):
    """The oracle with the SPEC's mapping equals pytorch-optimizer's Lamb (adam_debias=True) to 1e-12."""
    po_kw, oracle_kw = PO_VARIANTS[variant]
    theirs, init = self_check_run(pytorch_optimizer_lamb(foreach, **po_kw))
    ours, _ = self_check_run(lamb("oracle", **{**dict(lr=PO_LR, weight_decay=PO_WD, eps=PO_EPS), **PO_MAPPING,
                                               **oracle_kw}))
    assert max(float(x.norm()) for x in init) > 10 > min(float(x.norm()) for x in init), "the clip at 10 must matter"
    assert_match(ours, theirs, f"pytorch-optimizer Lamb {variant} foreach={foreach}", init)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_self_check_pytorch_optimizer_default_divides_step_by_bc1(foreach):
    """pytorch-optimizer 4.1.0's default Lamb (adam_debias=False) is the SPEC's mapping with the step
    divided by 1 - beta1^k: feeding it lr*(1 - beta1^k) and weight_decay/(1 - beta1^k) each step
    gives the oracle's run to 1e-12; the mapping as written is far from it."""
    beta1 = 0.9

    def compensate(s, opt):
        bc1 = 1.0 - beta1 ** (s + 1)
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = PO_LR * bc1, PO_WD / bc1

    oracle_kw = {**dict(lr=PO_LR, weight_decay=PO_WD, eps=PO_EPS), **PO_MAPPING}
    ours, init = self_check_run(lamb("oracle", **oracle_kw))
    theirs, _ = self_check_run(pytorch_optimizer_lamb(foreach, adam_debias=False), per_step=compensate)
    assert_match(ours, theirs, f"pytorch-optimizer default Lamb, compensated, foreach={foreach}", init)
    literal, _ = self_check_run(pytorch_optimizer_lamb(foreach, adam_debias=False))
    assert max(rel_err(a, b) for a, b in zip(ours, literal)) > 1e-3


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_self_check_pytorch_optimizer_default_is_first_moment(foreach):
    """pytorch-optimizer's default Lamb (adam_debias=False) is the mapping with
    bias_correction="first_moment" (the step divided by 1 - beta1^k), to 1e-12."""
    theirs, init = self_check_run(pytorch_optimizer_lamb(foreach, adam_debias=False))
    ours, _ = self_check_run(lamb("oracle", **{**dict(lr=PO_LR, weight_decay=PO_WD, eps=PO_EPS), **PO_MAPPING,
                                               "bias_correction": "first_moment"}))
    assert_match(ours, theirs, f"pytorch-optimizer default Lamb foreach={foreach}", init)


@pytest.mark.parametrize("impl", IMPLS)
def test_pytorch_optimizer_default_lamb(impl):
    """Users arriving from pytorch-optimizer's Lamb (defaults, 4.1.0) find its exact math:
    bias_correction="first_moment", weight_decay_mode="decoupled", weight_norm_clip=10,
    ratio_eps=eps, float64 to 1e-12 on the reference and every backend."""
    theirs, init = self_check_run(pytorch_optimizer_lamb(False, adam_debias=False))
    ours, _ = self_check_run(lamb(impl, lr=PO_LR, weight_decay=PO_WD, eps=PO_EPS, bias_correction="first_moment",
                                  weight_decay_mode="decoupled", weight_norm_clip=10.0, ratio_eps=PO_EPS))
    assert_match(ours, theirs, f"{impl} vs pytorch-optimizer's default Lamb", init)


T_LR, T_WD, T_EPS = 0.01, 0.05, 1e-7


def lr_at(step: int, base: float) -> float:
    """Changes every step: linear warm-up over 4 steps, then a quadratic decay."""
    return base * (step + 1) / 4 if step < 4 else base * (1 - (step - 4) / 40) ** 2


def lambda_lr(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, 1.0))


# variant -> (torch optimizer class and kwargs, oracle kwargs, per-step hook for both or None)
TORCH_VARIANTS = {
    "adamw": (torch.optim.AdamW, dict(), dict(adapt=False, weight_decay_mode="decoupled")),
    "adamw_maximize": (torch.optim.AdamW, dict(maximize=True),
                       dict(adapt=False, weight_decay_mode="decoupled", maximize=True)),
    "adamw_groups": (torch.optim.AdamW, dict(groups=three_groups),
                     dict(adapt=False, weight_decay_mode="decoupled", groups=three_groups)),
    "adamw_tensor_lr": (torch.optim.AdamW, dict(lr=torch.tensor(T_LR, dtype=F64)),
                        dict(adapt=False, weight_decay_mode="decoupled")),
    "adam_l2": (torch.optim.Adam, dict(), dict(adapt=False, weight_decay_mode="l2")),
    # always_adapt=False without weight decay never adapts: Adam, whatever the mode
    "adam_always_adapt_false": (torch.optim.Adam, dict(weight_decay=0.0),
                                dict(always_adapt=False, weight_decay=0.0)),
    "adam_betas_zero": (torch.optim.Adam, dict(betas=(0.0, 0.5)),
                        dict(adapt=False, weight_decay_mode="l2", betas=(0.0, 0.5))),
}


@pytest.mark.parametrize("variant,foreach", [
    pytest.param(v, f, id=f"{v}-{'foreach' if f else 'loop'}") for v in list(TORCH_VARIANTS) + ["adamw_scheduler"]
    for f in (False, True) if not (v == "adamw_tensor_lr" and f)])   # torch: no tensor lr with foreach
def test_self_check_torch_adam(variant, foreach):
    """adapt=False is Adam: with weight_decay_mode="decoupled" torch's AdamW, with "l2" torch's Adam
    (bias_correction="moments"); AdamW's m_hat / (sqrt(v) / sqrt(bc2) + eps) is the SPEC's r."""
    cls, t_kw, o_kw = TORCH_VARIANTS["adamw" if variant == "adamw_scheduler" else variant]
    t_kw, o_kw = dict(t_kw), dict(o_kw)
    t_groups, o_groups = t_kw.pop("groups", None), o_kw.pop("groups", None)
    per_step, scheds = None, {}
    if variant == "adamw_scheduler":
        def per_step(s, opt):   # one LambdaLR per optimizer, stepped after each step
            if id(opt) not in scheds:
                scheds[id(opt)] = lambda_lr(opt)
            elif s > 0:
                scheds[id(opt)].step()

    def torch_opt(params):
        return cls(t_groups(params) if t_groups else params,
                   **{**dict(lr=T_LR, weight_decay=T_WD, eps=T_EPS, foreach=foreach), **t_kw})
    theirs, init = self_check_run(torch_opt, per_step=per_step)
    ours, _ = self_check_run(lamb("oracle", groups=o_groups, **{**dict(lr=T_LR, weight_decay=T_WD, eps=T_EPS), **o_kw}),
                             per_step=per_step)
    assert_match(ours, theirs, f"torch {cls.__name__} {variant} foreach={foreach}", init)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_self_check_step_size_is_adams_efficient_form(foreach):
    """bias_correction="step_size" (s = sqrt(1 - beta2^k) / (1 - beta1^k), Kingma & Ba's "more
    efficient" order) with eps_k = eps * sqrt(1 - beta2^k) is AdamW with eps exactly (real arithmetic)."""
    betas = (0.9, 0.999)

    def eps_k(s, opt):
        if isinstance(opt, OracleLAMB):
            for g in opt.param_groups:
                g["eps"] = T_EPS * math.sqrt(1.0 - betas[1] ** (s + 1))

    theirs, init = self_check_run(lambda ps: torch.optim.AdamW(ps, lr=T_LR, weight_decay=T_WD, eps=T_EPS,
                                                               betas=betas, foreach=foreach))
    ours, _ = self_check_run(lamb("oracle", lr=T_LR, weight_decay=T_WD, eps=T_EPS, betas=betas, adapt=False,
                                  weight_decay_mode="decoupled", bias_correction="step_size"), per_step=eps_k)
    assert_match(ours, theirs, "step_size vs AdamW", init)


def test_self_check_oracle_one_step_by_hand():
    """One step of Algorithm 2 from the paper's formulas, written out with numbers: 2 elements,
    every option that changes the arithmetic on (l2 decay into the moments, bias correction,
    clipped ||w||, ratio_eps)."""
    w0, g = torch.tensor([3.0, -4.0], dtype=F64), torch.tensor([0.5, 0.25], dtype=F64)
    lr, b1, b2, eps, wd, clip, reps = 0.1, 0.8, 0.9, 1e-3, 0.1, 4.0, 0.25
    p = torch.nn.Parameter(w0.clone())
    opt = OracleLAMB([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, weight_decay_mode="l2",
                     weight_norm_clip=clip, ratio_eps=reps)
    p.grad = g.clone()
    opt.step()
    x = [0.5 + 0.1 * 3.0, 0.25 + 0.1 * -4.0]                     # g + wd*w
    m = [(1 - b1) * xi for xi in x]
    v = [(1 - b2) * xi * xi for xi in x]
    r = [(mi / (1 - b1)) / (math.sqrt(vi / (1 - b2)) + eps) for mi, vi in zip(m, v)]   # = x / (|x| + eps)
    q = min(5.0, clip) / (math.hypot(*r) + reps)
    expected = torch.tensor([3.0 - lr * q * r[0], -4.0 - lr * q * r[1]], dtype=F64)
    assert_match([p.detach()], [expected], "one step by hand")
    assert opt.stats[p]["trust_ratio"] == pytest.approx(q, rel=1e-15)


# ==== 2. tvlars_fused's LAMB against the oracle ====================================================

# Every option of the SPEC, alone or with the ones it goes with. The runs (tests/parity.py's SHAPES:
# 1-D, 4-D, several chunks) have a zero layer (4: ||w|| = 0 at first, q = 1), a layer whose gradient
# is always exactly zero (5) and None gradients (2 every third step, 3 from step 4 on: its moments
# start at t = 4, 7 on odd steps).
OPTION_SETS = [
    dict(),                                                   # the paper, apex FusedLAMB's defaults
    dict(bias_correction="step_size"),
    dict(bias_correction="first_moment"),
    dict(bias_correction="none"),
    dict(bias_correction=True),
    dict(bias_correction=False),
    dict(weight_decay_mode="l2"),
    dict(weight_decay_mode="decoupled", weight_decay=0.2),
    dict(grad_averaging=False),
    dict(weight_norm_clip=2.0),                               # clips every layer with ||w|| > 2
    dict(trust_clip=True),                                    # timm's lambc: q = min(q, 1)
    dict(ratio_eps=0.5, eps=1e-3),
    dict(adapt=False),
    dict(always_adapt=False, weight_decay=0.0),               # no trust ratio anywhere: Adam
    dict(always_adapt=False, weight_decay_filter=True),       # adapts (the group has weight decay), 1-D: wd 0
    dict(weight_decay_filter=True, adaptation_filter=True),
    dict(weight_decay=0.0),
    dict(maximize=True),
    dict(betas=(0.0, 0.9)),
    dict(betas=(0.5, 0.9), lr=0.05, weight_decay=0.1, weight_decay_mode="decoupled", bias_correction="step_size",
         weight_norm_clip=3.0, ratio_eps=1e-3, grad_averaging=False, maximize=True),
]
OPTION_IDS = [",".join(f"{k}={v}" for k, v in o.items()) or "defaults" for o in OPTION_SETS[:-1]] + ["combined"]
FAST_ON_TRITON = (0,)   # the interpreter takes ~0.4 s a step here: the other sets run with `make test-all`
ZERO_LAYER, ZERO_GRAD = 4, (5,)


def _init_options():
    init = make_init(SHAPES)
    init[ZERO_LAYER].zero_()
    return init


def run_options(impl: str, k: int, dtype: torch.dtype, round_to: Optional[torch.dtype] = None, device: str = "cpu"):
    return train(lamb(impl, **{**HYPER, **OPTION_SETS[k]}), _init_options(), dtype, STEPS, round_to=round_to,
                 used=some_none_grads, zero_grad=ZERO_GRAD, device=device)


@functools.lru_cache(maxsize=None)
def oracle_options(k: int, round_to: Optional[torch.dtype] = None):
    return run_options("oracle", k, F64, round_to)


@functools.lru_cache(maxsize=None)
def reference_options(k: int, dtype: torch.dtype):
    return [p.detach() for p in run_options("reference", k, dtype, dtype)[0]]


def _option_cases(impls):
    out = []
    for b in impls:
        for k, ident in enumerate(OPTION_IDS):
            slow = b == "triton" and k not in FAST_ON_TRITON
            out.append(pytest.param(b, k, id=f"{b}-{ident}", marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("impl,k", _option_cases(IMPLS))
def test_options_fp64_match_oracle(impl, k):
    """float64: parameters, exp_avg, exp_avg_sq within 1e-12 of the oracle's; t the same."""
    ps_o, o = oracle_options(k)
    ps, opt = run_options(impl, k, F64)
    what = f"{impl} {OPTION_IDS[k]}"
    assert_match(ps, [p.detach() for p in ps_o], what, _init_options())
    assert_states_match(opt, o, ps, ps_o, what)


@pytest.mark.parametrize("backend,k", _option_cases(BACKENDS))
def test_options_fp32_parity(backend, k):
    """float32: the fused run's error against the float64 oracle (same rounded start and gradients)
    at most 2x the reference's float32 error, per parameter."""
    r64 = [p.detach() for p in oracle_options(k, torch.float32)[0]]
    f32 = [p.detach() for p in run_options(backend, k, torch.float32)[0]]
    assert_parity_per_param(f32, reference_options(k, torch.float32), r64, f"{backend} fp32 {OPTION_IDS[k]}")


CUDA_SETS = ("defaults", "bias_correction=first_moment", "weight_decay_mode=l2",
             "weight_decay_mode=decoupled,weight_decay=0.2", "weight_decay_filter=True,adaptation_filter=True",
             "combined")


def _cuda_cases():
    """Every CUDA backend present (ids "cuda-<backend>", which .ci/gpu selects) over the option
    sets that reach different kernel code (the rest run with `make test-all`)."""
    return [pytest.param(b, k, id=f"cuda-{b}-{ident}", marks=[] if ident in CUDA_SETS else [pytest.mark.slow])
            for b in CUDA_BACKENDS for k, ident in enumerate(OPTION_IDS)]


@pytest.mark.parametrize("backend,k", _cuda_cases())
def test_cuda_options_fp64_and_fp32(backend, k):
    """On a GPU: float64 within 1e-12 of the oracle (parameters, moments, t) and the float32 parity
    rule against the reference's float32 run, for every option set."""
    ps_o, o = oracle_options(k)
    ps, opt = run_options(backend, k, F64, device="cuda")
    what = f"cuda-{backend} {OPTION_IDS[k]}"
    cpu = [p.detach().cpu() for p in ps]
    assert_match(cpu, [p.detach() for p in ps_o], what, _init_options())
    for p in ps:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].device.type == "cuda"
    r64 = [p.detach() for p in oracle_options(k, torch.float32)[0]]
    f32 = [p.detach().cpu() for p in run_options(backend, k, torch.float32, device="cuda")[0]]
    assert_parity_per_param(f32, reference_options(k, torch.float32), r64, f"{what} fp32")


BF16_SETS = tuple(OPTION_IDS.index(i) for i in ("defaults", "weight_decay_mode=decoupled,weight_decay=0.2", "combined"))


@pytest.mark.parametrize("k", BF16_SETS, ids=[OPTION_IDS[k] for k in BF16_SETS])
@pytest.mark.parametrize("backend", impl_params(BACKENDS))
def test_options_bf16_parity(backend, k):
    """bfloat16 parameters (float32 moments): the parity rule against the float64 oracle run from the
    same bfloat16 start and gradients, per parameter, the reference's bfloat16 run as the yardstick."""
    r64 = [p.detach() for p in oracle_options(k, torch.bfloat16)[0]]
    ps, opt = run_options(backend, k, torch.bfloat16)
    for p in ps:
        assert p.dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):
            if opt.state.get(p):
                assert opt.state[p][key].dtype == torch.float32, key
    assert_parity_per_param([p.detach() for p in ps], reference_options(k, torch.bfloat16), r64,
                            f"{backend} bf16 {OPTION_IDS[k]}")


def four_groups(params):
    """Groups that differ in every option (parameters of SHAPES in four groups)."""
    return [
        {"params": params[0:3], "bias_correction": "step_size", "weight_decay_mode": "decoupled", "weight_decay": 0.1},
        {"params": params[3:5], "lr": 0.01, "weight_decay": 0.0, "grad_averaging": False, "always_adapt": False},
        {"params": params[5:7], "weight_decay_mode": "l2", "weight_norm_clip": 1.5, "maximize": True,
         "betas": (0.8, 0.95), "ratio_eps": 0.1},
        {"params": params[7:], "adapt": False, "bias_correction": "none", "eps": 1e-4, "weight_decay_filter": True},
    ]


@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_param_groups_with_different_options(impl):
    init = _init_options()

    def run(name, dtype, round_to=None):
        return train(lamb(name, groups=four_groups, **HYPER), init, dtype, STEPS, round_to=round_to,
                     used=some_none_grads, zero_grad=ZERO_GRAD)
    ps_o, o = run("oracle", F64)
    ps, opt = run(impl, F64)
    assert_match(ps, [p.detach() for p in ps_o], f"{impl} groups", init)
    assert_states_match(opt, o, ps, ps_o, f"{impl} groups")
    if impl != "reference":
        r64 = [p.detach() for p in run("oracle", F64, torch.float32)[0]]
        r32 = [p.detach() for p in run("reference", torch.float32)[0]]
        assert_parity_per_param([p.detach() for p in run(impl, torch.float32)[0]], r32, r64, f"{impl} groups fp32")


@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_none_grad_parameters_untouched(impl):
    """A parameter whose .grad is None is skipped: its value and moments keep their bits, and a
    parameter not yet updated has no state; t counts every step (the late one's first bias
    correction uses k = 5). The run equals the oracle's."""
    init = make_init(SHAPES)
    snaps, checked = {}, []

    def before(s, opt, ps):
        snaps.clear()
        for i, p in enumerate(ps):
            if p.grad is None:
                st = opt.state.get(p, {})
                snaps[i] = (p.detach().clone(),
                            {k: st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq") if k in st})

    def after(s, opt, ps):
        checked.extend(snaps)
        for i, (w, st) in snaps.items():
            assert bit_equal(ps[i].detach(), w), f"step {s}: parameter {i} (None grad) changed"
            now = opt.state.get(ps[i], {})
            if not st:
                assert not now or set(now) <= {"step"}, f"step {s}: parameter {i} got state before its first update"
            for k, t in st.items():
                assert bit_equal(now[k], t), f"step {s}: state[{i}][{k!r}] of a None-grad parameter changed"

    ps_o, o = train(lamb("oracle", **HYPER), init, F64, STEPS, used=some_none_grads)
    ps, opt = train(lamb(impl, **HYPER), init, F64, STEPS, used=some_none_grads, before_step=before, after_step=after)
    assert sorted(set(checked)) == [2, 3, 7] and len(checked) == 11, checked   # 3 + 4 + 4 skips
    assert_match(ps, [p.detach() for p in ps_o], f"{impl} None grads", init)
    assert_states_match(opt, o, ps, ps_o, f"{impl} None grads")


@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_tensor_lr(impl):
    """A 0-dim tensor lr, changed in place between steps (as schedulers do with tensor lrs)."""
    init = make_init(SHAPES[:6])
    lrs = [0.03125, 0.03125, 0.015625, 0.0625, 0.0625, 0.0078125]   # float32 values

    def set_lr(s, opt, ps):
        for g in opt.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lrs[s])
            else:
                g["lr"] = lrs[s]

    ps_o, _ = train(lamb("oracle", lr=lrs[0], weight_decay=0.05), init, F64, len(lrs), before_step=set_lr)
    lr = torch.tensor(lrs[0])
    ps, opt = train(lamb(impl, lr=lr, weight_decay=0.05), init, F64, len(lrs), before_step=set_lr)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert_match(ps, [p.detach() for p in ps_o], f"{impl} tensor lr", init)


@pytest.mark.parametrize("sched", ["lambda", "onecycle"])
@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_lr_scheduler(impl, sched):
    """An LR scheduler changing lr every step (two groups with different base lrs)."""
    init = make_init(SHAPES[:6])
    scheds = {}

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.01}]

    def make_sched(opt):
        if sched == "lambda":
            return lambda_lr(opt)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.02], total_steps=STEPS + 1,
                                                   cycle_momentum=False)

    def after(s, opt, ps):
        scheds[id(opt)].step()

    def before(s, opt, ps):
        if s == 0:
            scheds[id(opt)] = make_sched(opt)

    runs = [train(lamb(name, groups=groups, **HYPER), init, F64, STEPS, before_step=before, after_step=after)[0]
            for name in ("oracle", impl)]
    assert_match(runs[1], [p.detach() for p in runs[0]], f"{impl} {sched}", init)


# ==== 3. behaviour ====================================================================================

@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("impl", impl_params(IMPLS, fast_on_triton=True))
def test_state_keys_and_dtypes(impl, dtype):
    """"step" (0-dim float32, t, the same in every entry), "exp_avg", "exp_avg_sq" (the parameter's
    dtype, float32 for bfloat16), and nothing else; state_dict() holds the same keys."""
    ps, opt = train(lamb(impl, **HYPER), make_init([(6, 5), (5,)]), dtype, 2)
    acc = torch.float32 if dtype == torch.bfloat16 else dtype
    for p in ps:
        st = opt.state[p]
        assert set(st) == STATE_KEYS, set(st)
        step = torch.as_tensor(st["step"])
        assert step.dtype == torch.float32 and step.dim() == 0 and float(step) == 2.0, step
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].dtype == acc and st[key].shape == p.shape, (key, st[key].dtype)
        assert float(st["exp_avg_sq"].min()) >= 0.0
    assert float(opt.step_count) == 2.0
    sd = opt.state_dict()
    assert all(set(v) == STATE_KEYS for v in sd["state"].values()) and len(sd["state"]) == 2


SD_STEPS, SD_MORE = 3, 3
SD_OPTS = dict(lr=0.02, weight_decay=0.05, bias_correction="step_size")


def _continue(make_opt, init, sd, dtype, start):
    """Fresh parameters from `init`, a fresh optimizer loaded with `sd`, SD_MORE more steps (the
    gradients of steps start, start + 1, ...)."""
    params = [torch.nn.Parameter(x.clone().to(dtype)) for x in init]
    opt = make_opt(params)
    opt.load_state_dict(copy.deepcopy(sd))
    shapes = [tuple(x.shape) for x in init]
    for s in range(start, start + SD_MORE):
        opt.zero_grad()
        cs = grads_for_step(shapes, s)
        torch.stack([(p * c.to(dtype)).sum().to(F64) for p, c in zip(params, cs)]).sum().backward()
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_state_dict_resume_same_bits(impl, dtype):
    """save after 3 steps, load into a fresh optimizer of the same kind, 3 more steps: the same
    bits (parameters, moments, t) as the run that never stopped; the float32 moments of bfloat16
    parameters are loaded as float32."""
    shapes = SHAPES[:6]
    init = make_init(shapes)
    ps, opt = train(lamb(impl, **SD_OPTS), init, dtype, SD_STEPS)
    sd = copy.deepcopy(opt.state_dict())
    assert all(set(v) == STATE_KEYS for v in sd["state"].values())
    saved = [p.detach().clone() for p in ps]
    ps_b, opt_b = _continue(lamb(impl, **SD_OPTS), saved, sd, dtype, SD_STEPS)
    # the uninterrupted run: the same 3 more steps on the original optimizer
    for s in range(SD_STEPS, SD_STEPS + SD_MORE):
        opt.zero_grad()
        torch.stack([(p * c.to(dtype)).sum().to(F64) for p, c in zip(ps, grads_for_step(shapes, s))]).sum().backward()
        opt.step()
    assert_same_bits(everything(opt, ps), everything(opt_b, ps_b), f"{impl} resumed")
    assert float(opt_b.step_count) == SD_STEPS + SD_MORE


SD_PAIRS = [(a, b) for b in BACKENDS for a, b in (("reference", b), (b, "reference"))] + \
           [(a, b) for a in BACKENDS for b in BACKENDS if a != b]


@pytest.mark.parametrize("src,dst", [pytest.param(a, b, id=f"{a}->{b}",
                                                  marks=[pytest.mark.slow] if "triton" in (a, b) else [])
                                     for a, b in SD_PAIRS])
def test_state_dict_across_reference_and_backends(src, dst):
    """A state_dict of one loads into the other and the run continues as the oracle's uninterrupted
    run (float64, 1e-12), t included."""
    shapes = SHAPES[:6]
    init = make_init(shapes)
    ps, opt = train(lamb(src, **SD_OPTS), init, F64, SD_STEPS)
    ps_b, opt_b = _continue(lamb(dst, **SD_OPTS), [p.detach().clone() for p in ps], opt.state_dict(), F64, SD_STEPS)
    ps_o, o = train(lamb("oracle", **SD_OPTS), init, F64, SD_STEPS + SD_MORE)
    assert_match(ps_b, [p.detach() for p in ps_o], f"{src}->{dst}", init)
    assert_states_match(opt_b, o, ps_b, ps_o, f"{src}->{dst}")


FUSED = impl_params(BACKENDS)


@pytest.mark.parametrize("backend", impl_params(BACKENDS, fast_on_triton=True))
def test_found_inf_skips_everything(backend):
    """found_inf != 0 (GradScaler's fused protocol): parameters, moments, t and layer_stats keep
    their bits whatever the gradients hold; found_inf = 0 continues as the oracle that never saw
    the skipped step (float64, 1e-12)."""
    shapes = [(6, 5), (5,), (4, 4)]
    init = make_init(shapes)
    ps_o, o = train(lamb("oracle", **HYPER), init, F64, 4)
    ps, opt = train(lamb(backend, **HYPER), init, F64, 2)
    before = everything(opt, ps) + [s.detach().clone() for s in opt.layer_stats().values()]
    for scale in (1.0, 1024.0):
        for p, c in zip(ps, grads_for_step(shapes, 99)):
            p.grad = c.clone()
        ps[0].grad[1, 1] = float("nan")
        ps[2].grad[0, 0] = float("inf")
        opt.found_inf = torch.ones(1)
        opt.grad_scale = torch.full((1,), scale)
        opt.step()
        after = everything(opt, ps) + [s.detach().clone() for s in opt.layer_stats().values()]
        assert_same_bits(before, after, f"{backend}: step with found_inf (grad_scale {scale})")
    opt.found_inf, opt.grad_scale = torch.zeros(1), torch.ones(1)
    for s in (2, 3):
        opt.zero_grad()
        for p, c in zip(ps, grads_for_step(shapes, s)):
            p.grad = c.clone()
        opt.step()
    assert_match(ps, [p.detach() for p in ps_o], f"{backend} after found_inf", init)
    assert_states_match(opt, o, ps, ps_o, f"{backend} after found_inf")


@pytest.mark.parametrize("backend", FUSED)
def test_grad_scale_divides(backend):
    """g is divided by grad_scale: a power of two gives the bits of the unscaled run (float32); 3
    (float64) the oracle's run on the unscaled gradients."""
    init = make_init(SHAPES[:6])

    def with_scale(scale):
        def make(ps):
            opt = lamb(backend, **HYPER)(ps)
            opt.grad_scale, opt.found_inf = torch.full((1,), scale), torch.zeros(1)
            return opt
        return make

    ps_a, opt_a = train(lamb(backend, **HYPER), init, torch.float32, 4)
    ps_b, opt_b = train(with_scale(1024.0), init, torch.float32, 4, grad_scale=1024.0)
    assert_same_bits(everything(opt_a, ps_a), everything(opt_b, ps_b), f"{backend} grad_scale 1024")
    ps_o, _ = train(lamb("oracle", **HYPER), init, F64, 4)
    ps_c, opt_c = train(with_scale(3.0), init, F64, 4, grad_scale=3.0)
    assert_match(ps_c, [p.detach() for p in ps_o], f"{backend} grad_scale 3", init)
    last = grads_for_step([tuple(x.shape) for x in init], 3)
    for p, c in zip(ps_c, last):   # the layer statistics see the unscaled gradient
        assert float(opt_c.layer_stats()[p][4]) == pytest.approx(float(c.norm()), rel=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_grad_scaler_end_to_end(backend):
    """torch.amp.GradScaler drives the fused protocol: a forced overflow at step 3 skips the step (t
    included) and lowers the scale; every step equals the oracle fed the unscaled gradients and
    skipping step 3 (float64, 1e-12)."""
    shapes = [(6, 5), (5,), (4, 3, 3), (9,)]
    init = make_init(shapes)
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    ps_o = [torch.nn.Parameter(x.clone()) for x in init]
    opt, o = lamb(backend, **HYPER)(ps), OracleLAMB(ps_o, **HYPER)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    scales = []
    for s in range(7):
        cs = grads_for_step(shapes, s)
        opt.zero_grad()
        scaler.scale(torch.stack([(p * c).sum() for p, c in zip(ps, cs)]).sum()).backward()
        if s == 3:
            ps[0].grad[0, 0] = float("inf")
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        scales.append((scale_before, scaler.get_scale()))
        if s != 3:
            for p, c in zip(ps_o, cs):
                p.grad = c.clone()
            o.step()
        assert_match(ps, [p.detach() for p in ps_o], f"{backend} GradScaler step {s}")
    assert scales[3][1] < scales[3][0], "the overflow must lower the scale"
    assert float(opt.step_count) == o.t == 6


STATS_CASES = {
    "update": dict(),
    "decoupled": dict(weight_decay_mode="decoupled", weight_decay=0.5, lr=0.2),    # ||w'|| != ||w||
    "l2": dict(weight_decay_mode="l2"),
    "step_size": dict(bias_correction="step_size"),
    "clip": dict(weight_norm_clip=1.5),
    "ratio_eps": dict(ratio_eps=0.3),
    "filters": dict(weight_decay_filter=True, adaptation_filter=True),
    "no_adapt": dict(adapt=False),
    "maximize": dict(maximize=True),
}
STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "step_scale", "grad_norm", "weight_decay")


@pytest.mark.parametrize("case", list(STATS_CASES))
@pytest.mark.parametrize("backend", FUSED)
def test_layer_stats_match_oracle(backend, case):
    """layer_stats()[p] after each step = [||w'|| (clipped), ||u||, q, s, ||g'||, wd] as the oracle
    computes them (1e-12); the norms of a layer that does not adapt are not checked, its q is 1."""
    opts = {**HYPER, **STATS_CASES[case]}
    init = make_init([(6, 5), (5,), (3, 4, 2)])
    shapes = [tuple(x.shape) for x in init]
    ps_o = [torch.nn.Parameter(x.clone()) for x in init]
    o = OracleLAMB(ps_o, **opts)

    def adapts(p):
        return (opts.get("adapt", True) and (opts.get("always_adapt", True) or opts["weight_decay"] != 0)
                and not (opts.get("adaptation_filter", False) and p.ndim == 1))

    def check(s, opt, ps):
        for p_o, c in zip(ps_o, grads_for_step(shapes, s)):
            p_o.grad = c.clone()
        o.step()
        assert_match(ps, [p.detach() for p in ps_o], f"{case} step {s}")
        for i, (p, p_o) in enumerate(zip(ps, ps_o)):
            got = opt.layer_stats()[p].detach().to(F64)
            want = o.stats[p_o]
            names = STAT_NAMES if adapts(p) else ("trust_ratio", "step_scale", "grad_norm", "weight_decay")
            if not adapts(p):
                assert want["trust_ratio"] == 1.0
            for n in names:
                j = STAT_NAMES.index(n)
                assert float(got[j]) == pytest.approx(want[n], rel=1e-12, abs=1e-300), \
                    f"{case} step {s} parameter {i}: {n} {float(got[j])!r} != {want[n]!r}"

    train(lamb(backend, **opts), init, F64, 3, after_step=check)
    if case == "clip":
        assert max(o.stats[p]["weight_norm"] for p in ps_o) == 1.5
    if case == "decoupled":
        assert o.stats[ps_o[0]]["weight_norm"] < 0.95 * float(init[0].norm())


@pytest.mark.parametrize("impl", impl_params(IMPLS, fast_on_triton=True))
def test_zero_size_parameters(impl):
    """Zero-size parameters among others: t counts, the others follow the oracle; a zero-size one
    has layer_stats (0, 0, 1, ...) on the fused backends."""
    shapes = [(6, 5), (0,), (0, 3), (7,)]
    init = make_init(shapes)
    ps_o, _ = train(lamb("oracle", **HYPER), init, F64, 3)
    ps, opt = train(lamb(impl, **HYPER), init, F64, 3)
    assert_match(ps, [p.detach() for p in ps_o], f"{impl} zero-size", init)
    assert float(opt.step_count) == 3
    assert all(p.numel() == 0 for p in (ps[1], ps[2]))
    if impl != "reference":
        for p in (ps[1], ps[2]):
            st = opt.layer_stats()[p]
            assert st[:3].tolist() == [0.0, 0.0, 1.0], st


# (kwargs, the argument the message must name)
BAD = [
    (dict(lr=-0.1), "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    (dict(betas=(1.0, 0.999)), "betas?|beta1"),
    (dict(betas=(-0.1, 0.999)), "betas?|beta1"),
    (dict(betas=(0.9, 1.0)), "betas?|beta2"),
    (dict(betas=(0.9, -1e-3)), "betas?|beta2"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(ratio_eps=-1.0), "ratio_eps"),
    (dict(weight_norm_clip=0.0), "weight_norm_clip"),
    (dict(weight_norm_clip=-1.0), "weight_norm_clip"),
    (dict(bias_correction="debias"), "bias_correction"),
    (dict(weight_decay_mode="adamw"), "weight_decay_mode"),
    (dict(grad_averaging=1), "grad_averaging"),
    (dict(adapt="yes"), "adapt"),
    (dict(always_adapt=None), "always_adapt"),
    (dict(weight_decay_filter=0), "weight_decay_filter"),
    (dict(adaptation_filter=1.0), "adaptation_filter"),
    (dict(maximize="False"), "maximize"),
]


def _bad_id(kw: dict) -> str:
    return ",".join(f"{k}={'tensor' if isinstance(v, torch.Tensor) else repr(v)}" for k, v in kw.items())


@pytest.mark.parametrize("impl", impl_params(IMPLS, fast_on_triton=True))
@pytest.mark.parametrize("kw,name", [pytest.param(kw, n, id=_bad_id(kw)) for kw, n in BAD])
def test_validation_names_the_argument(impl, kw, name):
    """A bad value raises ValueError naming the argument, at construction and in a param group."""
    pattern = rf"(?<![A-Za-z0-9_])({name})(?![A-Za-z0-9_])"
    a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=pattern):
        lamb(impl, **kw)([a, b])
    with pytest.raises(ValueError, match=pattern):
        lamb(impl, groups=lambda ps: [{"params": ps[:1]}, {"params": ps[1:], **kw}])([a, b])
    lamb(impl)([a, b])   # the defaults are valid


@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_determinism_two_runs_same_bits(impl):
    """Two identical float32 runs (several chunks, None grads, a zero layer): the same bits."""
    runs = []
    for _ in range(2):
        ps, opt = run_options(impl, 0, torch.float32)
        runs.append(everything(opt, ps) + ([s.detach().clone() for s in opt.layer_stats().values()]
                                           if impl != "reference" else []))
    assert_same_bits(runs[0], runs[1], f"{impl} twice")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension (tvlars_fused._C)")
def test_cpu_backend_threads_same_bits():
    """backend="cpu" with 1 and 2 intra-op threads: the same bits (the norms' order is fixed)."""
    shapes = SHAPES + [(300, 1000)]
    init = make_init(shapes)
    before = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ps, opt = train(lamb("cpu", **HYPER), init, torch.float32, 4, used=some_none_grads)
            runs.append(everything(opt, ps) + [s.detach().clone() for s in opt.layer_stats().values()])
    finally:
        torch.set_num_threads(before)
    assert_same_bits(runs[0], runs[1], "threads 1 vs 2")


@pytest.mark.parametrize("impl", impl_params(IMPLS))
def test_clip_grad_norm_recipe(impl):
    """The SPEC's global clip: torch.nn.utils.clip_grad_norm_ before step() is the oracle fed the
    clipped gradients g * max_norm / (||g||_total + 1e-6), computed here (float64, 1e-12)."""
    shapes = SHAPES[:6]
    init = make_init(shapes)
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    ps_o = [torch.nn.Parameter(x.clone()) for x in init]
    opt, o = lamb(impl, **HYPER)(ps), OracleLAMB(ps_o, **HYPER)
    for s in range(5):
        cs = grads_for_step(shapes, s)
        total = math.sqrt(sum(float((c * c).sum()) for c in cs))
        max_norm = 0.3 * total
        opt.zero_grad()
        torch.stack([(p * c).sum() for p, c in zip(ps, cs)]).sum().backward()
        torch.nn.utils.clip_grad_norm_(ps, max_norm)
        opt.step()
        coef = max_norm / (total + 1e-6)
        assert coef < 0.5, "the clip must clip"
        for p, c in zip(ps_o, cs):
            p.grad = c * coef
        o.step()
        assert_match(ps, [p.detach() for p in ps_o], f"{impl} clip step {s}")
    assert_match(ps, [p.detach() for p in ps_o], f"{impl} clip", init)
