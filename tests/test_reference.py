"""The eager reference TVLARS / LARS (tvlars_fused/reference.py) against an independent float64
implementation of docs/SPEC.md written here in plain Python (lists of floats, math.sqrt), plus
hyperparameter validation, state_dict round trips and dtype handling."""
from __future__ import annotations

import io
import math
import random
import re

import pytest
import torch

from tvlars_fused.reference import LARS, TVLARS

F64 = torch.float64
REL = 1e-12


# =============================================================================================
# The independent plain-Python implementation (docs/SPEC.md), float64 throughout


def py_phi(t, lmbda, delay, alpha, gamma_min):
    """Textbook phi; the tests only use moderate lmbda*(t - delay)."""
    return 1.0 / (alpha + math.exp(lmbda * (t - delay))) + gamma_min


def py_norm(v):
    return math.sqrt(math.fsum(x * x for x in v))


class PyParam:
    def __init__(self, values, shape):
        self.w = [float(x) for x in values]
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
        self.buf = None   # heavy-ball momentum buffer
        self.m = None     # paper-form previous iterate


TV_HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=1e-3, delay_steps=0, alpha=1.0,
             gamma_min=0.0, weight_decay_filter=False, lars_adaptation_filter=False, norm_clip=None,
             momentum_form="heavy_ball")
LARS_HP = dict(lr=0.1, momentum=0.9, weight_decay=0.0, eta=1e-3, weight_decay_filter=False,
               lars_adaptation_filter=False, norm_clip=None, momentum_form="heavy_ball")


class PyLars:
    """groups: list of dicts with 'params' (PyParam list) and every hyperparameter."""

    def __init__(self, groups, tvlars=True):
        self.groups = groups
        self.tvlars = tvlars
        self.t = 0

    def step(self, grads):
        """grads: {id(PyParam): list of floats or None}; a missing entry means no gradient."""
        for group in self.groups:
            if self.tvlars:
                s = py_phi(self.t, group["lmbda"], group["delay_steps"], group["alpha"], group["gamma_min"])
            else:
                s = 1.0
            for p in group["params"]:
                g = grads.get(id(p))
                if g is None:
                    continue
                self._update(p, g, group, s)
        self.t += 1

    @staticmethod
    def _update(p, g, group, s):
        w = p.w
        d = [float(x) for x in g]
        if not (group["weight_decay_filter"] and p.ndim == 1):
            d = [di + group["weight_decay"] * wi for di, wi in zip(d, w)]
        if not (group["lars_adaptation_filter"] and p.ndim == 1):
            wn, dn = py_norm(w), py_norm(d)
            if group["norm_clip"] is not None:
                wn, dn = min(wn, group["norm_clip"]), min(dn, group["norm_clip"])
            q = group["eta"] * s * wn / dn if (wn > 0 and dn > 0) else 1.0
            d = [q * di for di in d]
        lr, mom = group["lr"], group["momentum"]
        if group["momentum_form"] == "heavy_ball":
            if p.buf is None:
                p.buf = [0.0] * len(w)
            if mom == 0:   # torch's SGD at momentum 0: the plain step, the buffer as it was
                p.w = [wi - lr * di for wi, di in zip(w, d)]
            else:
                p.buf = [mom * b + di for b, di in zip(p.buf, d)]
                p.w = [wi - lr * b for wi, b in zip(w, p.buf)]
        else:
            if p.m is None:
                p.m = list(w)
            m_new = [wi - lr * di for wi, di in zip(w, d)]
            p.w = [mn + mom * (mn - mo) for mn, mo in zip(m_new, p.m)]
            p.m = m_new


# =============================================================================================
# helpers


def rand_list(rng, n, scale=1.0):
    return [rng.uniform(-1.0, 1.0) * scale for _ in range(n)]


def numel(shape):
    return math.prod(shape) if shape else 1


def make_pair(values, shape):
    """A float64 torch parameter and its PyParam twin with the same values."""
    t = torch.tensor(values, dtype=F64).reshape(shape).requires_grad_(True)
    return t, PyParam(values, shape)


def flat(t):
    return t.detach().reshape(-1).tolist()


def assert_close(actual, expected, what=""):
    """Elementwise, relative to the larger of |expected| and the vector's max-abs."""
    assert len(actual) == len(expected), what
    scale = max([abs(x) for x in expected] + [1e-300])
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert math.isfinite(a), (what, i, a)
        assert abs(a - e) <= REL * max(abs(e), scale), (what, i, a, e)


def set_grads(pairs, grads):
    for (tp, pp) in pairs:
        g = grads.get(id(pp))
        tp.grad = None if g is None else torch.tensor(g, dtype=tp.dtype).reshape(tp.shape)


def check_state(opt, pairs, form):
    key = "momentum_buffer" if form == "heavy_ball" else "m"
    other = "m" if form == "heavy_ball" else "momentum_buffer"
    for tp, pp in pairs:
        ref = pp.buf if form == "heavy_ball" else pp.m
        if ref is None:
            assert len(opt.state.get(tp, {})) == 0
            continue
        st = opt.state[tp]
        assert key in st and other not in st
        assert st[key].shape == tp.shape
        assert_close(flat(st[key]), ref, what=key)


def build(cls, pair_groups, hps, group_overrides=None):
    """pair_groups: list (per group) of lists of (torch param, PyParam). hps: constructor kwargs.
    Returns (torch optimizer, PyLars) with identical hyperparameters."""
    tv = cls is TVLARS
    group_overrides = group_overrides or [{} for _ in pair_groups]
    torch_groups, py_groups = [], []
    for pairs, over in zip(pair_groups, group_overrides):
        torch_groups.append(dict(params=[tp for tp, _ in pairs], **over))
        full = dict(TV_HP if tv else LARS_HP)
        full.update(hps)
        full.update(over)
        py_groups.append(dict(params=[pp for _, pp in pairs], **full))
    return cls(torch_groups, **hps), PyLars(py_groups, tvlars=tv)


def run_and_compare(opt, py, pair_groups, grad_seq, form=None, check_each_step=True):
    pairs = [pr for grp in pair_groups for pr in grp]
    t0 = float(opt.step_count)
    for k, grads in enumerate(grad_seq):
        set_grads(pairs, grads)
        opt.step()
        py.step(grads)
        if check_each_step or k == len(grad_seq) - 1:
            for tp, pp in pairs:
                assert_close(flat(tp), pp.w, what=f"step {k}")
            if form is not None:
                check_state(opt, pairs, form)
        assert float(opt.step_count) == t0 + k + 1


def grad_sequence(rng, pairs, steps, scale=1.0):
    return [{id(pp): rand_list(rng, numel(pp.shape), scale) for _, pp in pairs} for _ in range(steps)]


SHAPES = [(3,), (2, 3), (), (1, 4), (5,)]


def model_pairs(rng, shapes=SHAPES, scale=1.0):
    return [make_pair(rand_list(rng, numel(s), scale), s) for s in shapes]


# =============================================================================================
# one step, checked by hand


def test_one_step_by_hand_heavy_ball():
    # w = [3, 4] (|w| = 5), g = [0.6, 0.8] (|g| = 1), weight_decay = 0, eta = 0.1, lmbda = 0:
    # phi = 1/(1 + e^0) = 0.5, q = 0.1 * 0.5 * 5 / 1 = 0.25, d = [0.15, 0.2], buf = d,
    # w = w - 0.5 * buf = [2.925, 3.9]
    w = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    w.grad = torch.tensor([0.6, 0.8], dtype=F64)
    opt = TVLARS([w], lr=0.5, momentum=0.9, weight_decay=0.0, eta=0.1, lmbda=0.0)
    opt.step()
    assert_close(flat(w), [2.925, 3.9])
    assert_close(flat(opt.state[w]["momentum_buffer"]), [0.15, 0.2])
    # second step, same gradient: |w|^2 = 2.925^2 + 3.9^2 = 23.765625 -> |w| = 4.875
    # q = 0.1 * 0.5 * 4.875 = 0.24375, d = [0.14625, 0.195], buf = 0.9*[0.15, 0.2] + d
    opt.step()
    buf = [0.9 * 0.15 + 0.14625, 0.9 * 0.2 + 0.195]
    assert_close(flat(opt.state[w]["momentum_buffer"]), buf)
    assert_close(flat(w), [2.925 - 0.5 * buf[0], 3.9 - 0.5 * buf[1]])


def test_one_step_by_hand_paper_form():
    # same numbers, paper form: m_new = w - lr*d = [2.925, 3.9]; m = w initially
    # w = m_new + 0.9 * (m_new - w) = [2.925 - 0.9*0.075, 3.9 - 0.9*0.1]
    w = torch.tensor([3.0, 4.0], dtype=F64, requires_grad=True)
    w.grad = torch.tensor([0.6, 0.8], dtype=F64)
    opt = TVLARS([w], lr=0.5, momentum=0.9, weight_decay=0.0, eta=0.1, lmbda=0.0, momentum_form="paper")
    opt.step()
    assert_close(flat(w), [2.925 - 0.9 * 0.075, 3.9 - 0.9 * 0.1])
    assert_close(flat(opt.state[w]["m"]), [2.925, 3.9])
    assert "momentum_buffer" not in opt.state[w]


def test_one_step_by_hand_weight_decay_and_phi():
    # w = [1, 0, 0], g = [0, 1, 0], wd = 0.5: d = [0.5, 1, 0], |d| = sqrt(1.25), |w| = 1
    # t = 0, lmbda = ln 3, delay = 1: phi = 1/(alpha + e^{-ln 3}) + gamma_min = 1/(1 + 1/3) + 0.25 = 1
    # q = eta * 1 * 1 / sqrt(1.25); momentum 0: w = w - lr * q * d
    w = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    w.grad = torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    opt = TVLARS([w], lr=0.2, momentum=0.0, weight_decay=0.5, eta=0.4, lmbda=math.log(3.0),
                 delay_steps=1, alpha=1.0, gamma_min=0.25)
    opt.step()
    q = 0.4 / math.sqrt(1.25)
    assert_close(flat(w), [1.0 - 0.2 * q * 0.5, -0.2 * q * 1.0, 0.0])


# =============================================================================================
# one and several steps against the plain-Python implementation


@pytest.mark.parametrize("cls", [TVLARS, LARS])
@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
@pytest.mark.parametrize("shape", [(4,), (2, 3), (3, 1)])
def test_one_step_matches_python(cls, form, shape):
    rng = random.Random(hash((cls.__name__, form, shape)) & 0xFFFF)
    pairs = [make_pair(rand_list(rng, numel(shape)), shape)]
    hps = dict(lr=0.3, momentum=0.8, weight_decay=0.01, eta=0.7, momentum_form=form)
    if cls is TVLARS:
        hps.update(lmbda=0.2, delay_steps=0, alpha=0.5, gamma_min=0.05)
    opt, py = build(cls, [pairs], hps)
    run_and_compare(opt, py, [pairs], grad_sequence(rng, pairs, 1), form=form)


@pytest.mark.parametrize("cls", [TVLARS, LARS])
@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
@pytest.mark.parametrize("wd_filter", [False, True])
@pytest.mark.parametrize("lars_filter", [False, True])
@pytest.mark.parametrize("norm_clip", [None, 0.9])
def test_several_steps_matches_python(cls, form, wd_filter, lars_filter, norm_clip):
    rng = random.Random(1234)
    pairs = model_pairs(rng)
    hps = dict(lr=0.25, momentum=0.85, weight_decay=0.05, eta=0.6, momentum_form=form,
               weight_decay_filter=wd_filter, lars_adaptation_filter=lars_filter, norm_clip=norm_clip)
    if cls is TVLARS:
        hps.update(lmbda=0.15, delay_steps=2, alpha=1.0, gamma_min=0.02)
    opt, py = build(cls, [pairs], hps)
    run_and_compare(opt, py, [pairs], grad_sequence(rng, pairs, 7), form=form)


def test_filters_only_touch_1d_params():
    """With both filters on, a 1-D parameter gets no weight decay and q = 1 (plain momentum SGD);
    0-D and 2-D parameters still get both."""
    rng = random.Random(7)
    shapes = [(4,), (), (2, 2), (1, 3)]
    pairs = model_pairs(rng, shapes)
    hps = dict(lr=0.1, momentum=0.5, weight_decay=0.3, eta=0.2, lmbda=0.0, weight_decay_filter=True,
               lars_adaptation_filter=True)
    opt, py = build(TVLARS, [pairs], hps)
    grads = grad_sequence(rng, pairs, 1)
    w0 = {id(pp): list(pp.w) for _, pp in pairs}
    run_and_compare(opt, py, [pairs], grads, form="heavy_ball")
    # by hand: the 1-D parameter took the raw gradient step, buf = g, w = w0 - lr * g
    tp, pp = pairs[0]
    g = grads[0][id(pp)]
    assert_close(flat(opt.state[tp]["momentum_buffer"]), g)
    assert_close(flat(tp), [w - 0.1 * gi for w, gi in zip(w0[id(pp)], g)])
    # the 0-D and 2-D ones did not: buf = q * (g + wd*w) with q = eta * phi * |w| / |g + wd*w|
    # (phi = 1/2 with lmbda = 0)
    for tp, pp in pairs[1:]:
        d = [gi + 0.3 * w for gi, w in zip(grads[0][id(pp)], w0[id(pp)])]
        q = 0.2 * 0.5 * py_norm(w0[id(pp)]) / py_norm(d)
        assert_close(flat(opt.state[tp]["momentum_buffer"]), [q * x for x in d])


@pytest.mark.parametrize("clip", [0.05, 0.5, 2.0, 100.0])
@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
def test_norm_clip(clip, form):
    """norm_clip below ||d|| only, below both, and above both (no effect)."""
    rng = random.Random(99)
    shapes = [(6,), (3, 3)]
    pairs = [make_pair(rand_list(rng, numel(s), scale=0.3), s) for s in shapes]   # |w| ~ 0.4-0.6
    grads = grad_sequence(rng, pairs, 6, scale=3.0)                                 # |g| ~ 4-5
    hps = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, eta=0.5, lmbda=0.1, norm_clip=clip, momentum_form=form)
    opt, py = build(TVLARS, [pairs], hps)
    run_and_compare(opt, py, [pairs], grads, form=form)
    # sensitivity: for a clip below ||d|| the clipped run really ends elsewhere than the unclipped
    if clip <= 2.0:
        rng = random.Random(99)
        pps = [PyParam(rand_list(rng, numel(s), scale=0.3), s) for s in shapes]
        unclipped = PyLars([dict(TV_HP, **dict(hps, norm_clip=None), params=pps)])
        for g in grads:
            unclipped.step({id(pp): g[id(old)] for pp, (_, old) in zip(pps, pairs)})
        assert any(abs(a - b) > 1e-6 for pp, (tp, _) in zip(pps, pairs) for a, b in zip(pp.w, flat(tp)))


@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
@pytest.mark.parametrize("cls", [TVLARS, LARS])
def test_zero_norm_param_and_zero_grad(form, cls):
    """q = 1 when ||w|| == 0 or ||d|| == 0, never nan."""
    rng = random.Random(5)
    zero_w = make_pair([0.0] * 4, (2, 2))          # ||w|| = 0
    live = make_pair(rand_list(rng, 3), (3,))
    pairs = [zero_w, live]
    hps = dict(lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.3, momentum_form=form)
    if cls is TVLARS:
        hps.update(lmbda=0.05)
    opt, py = build(cls, [pairs], hps)
    g0 = [0.5, -1.0, 2.0, 0.25]
    grads = [
        {id(zero_w[1]): g0, id(live[1]): [0.0, 0.0, 0.0]},              # zero grad, wd = 0: dn = 0
        {id(zero_w[1]): [0.0] * 4, id(live[1]): rand_list(rng, 3)},     # zero grad on a nonzero w
        {id(zero_w[1]): rand_list(rng, 4), id(live[1]): [0.0, 0.0, 0.0]},
        {id(zero_w[1]): rand_list(rng, 4), id(live[1]): rand_list(rng, 3)},
        {id(zero_w[1]): [0.0] * 4, id(live[1]): [0.0, 0.0, 0.0]},
        {id(zero_w[1]): rand_list(rng, 4), id(live[1]): rand_list(rng, 3)},
    ]
    live_before = live[0].detach().clone()
    set_grads(pairs, grads[0])
    opt.step()
    py.step(grads[0])
    # by hand: the zero parameter takes the raw gradient step (q = 1), the zero-grad one is unchanged
    if form == "heavy_ball":
        assert_close(flat(zero_w[0]), [-0.1 * g for g in g0])
    else:
        assert_close(flat(zero_w[0]), [-0.1 * g - 0.9 * 0.1 * g for g in g0])
    assert torch.equal(live[0].detach(), live_before)
    run_and_compare(opt, py, [pairs], grads[1:], form=form)
    for tp, _ in pairs:
        assert torch.isfinite(tp).all()


def test_zero_grad_with_weight_decay():
    """g = 0 but weight_decay > 0: d = wd*w, q = eta*phi/wd, so w <- w - lr*eta*phi*w."""
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=F64, requires_grad=True)
    w.grad = torch.zeros_like(w)
    lmbda, alpha, gamma_min = 0.2, 1.0, 0.0
    opt = TVLARS([w], lr=0.1, momentum=0.0, weight_decay=0.01, eta=0.5, lmbda=lmbda, alpha=alpha,
                 gamma_min=gamma_min)
    w0 = flat(w)
    opt.step()
    f = 1.0 - 0.1 * 0.5 * py_phi(0, lmbda, 0, alpha, gamma_min)
    assert_close(flat(w), [f * x for x in w0])


# =============================================================================================
# None grads


@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
def test_none_grad_skipped_and_t_still_counts(form):
    rng = random.Random(11)
    pairs = model_pairs(rng, [(3,), (2, 2), (4,)])
    skipped = pairs[1]
    hps = dict(lr=0.2, momentum=0.9, weight_decay=0.01, eta=0.4, lmbda=0.3, gamma_min=0.01, momentum_form=form)
    opt, py = build(TVLARS, [pairs], hps)
    before = skipped[0].detach().clone()
    grads = grad_sequence(rng, pairs, 7)
    for k in range(4):
        grads[k][id(skipped[1])] = None
    run_and_compare(opt, py, [pairs], grads[:4], form=form)
    # untouched: value bit-identical, no state created
    assert torch.equal(skipped[0].detach(), before)
    assert skipped[0] not in opt.state
    assert float(opt.step_count) == 4.0
    # from step t = 4 on it gets gradients: its first update uses phi(4) (checked by the python run)
    run_and_compare(opt, py, [pairs], grads[4:], form=form)
    assert float(opt.step_count) == 7.0
    # sensitivity: phi(4) really differs from phi(0) here
    assert abs(py_phi(4, 0.3, 0, 1.0, 0.01) - py_phi(0, 0.3, 0, 1.0, 0.01)) > 0.1


def test_step_with_no_grads_at_all_counts_and_changes_nothing():
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = TVLARS([w], lr=0.1)
    opt.step()
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=F64))
    assert float(opt.step_count) == 2.0
    assert w not in opt.state


# =============================================================================================
# param groups, lr schedulers, LARS == TVLARS with phi == 1


@pytest.mark.parametrize("cls", [TVLARS, LARS])
def test_param_groups_with_different_hyperparameters(cls):
    rng = random.Random(21)
    g0 = model_pairs(rng, [(3,), (2, 2)])
    g1 = model_pairs(rng, [(4,), (3, 2)])
    g2 = model_pairs(rng, [(2,), (1, 3)])
    hps = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, eta=0.5)
    over = [
        {},
        dict(lr=0.05, momentum=0.5, weight_decay=0.1, eta=0.2, momentum_form="paper",
             weight_decay_filter=True, norm_clip=1.5),
        dict(lr=0.3, momentum=0.0, weight_decay=0.0, eta=1.0, lars_adaptation_filter=True),
    ]
    if cls is TVLARS:
        hps.update(lmbda=0.1, delay_steps=1, gamma_min=0.05)
        over[1].update(lmbda=0.5, alpha=2.0, gamma_min=0.0, delay_steps=3)
        over[2].update(lmbda=0.0, alpha=0.0, gamma_min=0.2)
    opt, py = build(cls, [g0, g1, g2], hps, over)
    pairs = g0 + g1 + g2
    grads = grad_sequence(rng, pairs, 6)
    run_and_compare(opt, py, [g0, g1, g2], grads)
    check_state(opt, g0, "heavy_ball")
    check_state(opt, g1, "paper")
    check_state(opt, g2, "heavy_ball")


@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
@pytest.mark.parametrize("sched", ["step", "lambda"])
def test_lr_scheduler(form, sched):
    rng = random.Random(31)
    pairs = model_pairs(rng, [(3,), (2, 3)])
    base = 0.2
    hps = dict(lr=base, momentum=0.9, weight_decay=0.01, eta=0.5, lmbda=0.1, momentum_form=form)
    opt, py = build(TVLARS, [pairs], hps)
    steps = 7
    if sched == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        lrs = [base * 0.5 ** (k // 2) for k in range(steps)]
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
        lrs = [base / (k + 1) for k in range(steps)]
    grads = grad_sequence(rng, pairs, steps)
    for k in range(steps):
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[k], rel=1e-15)
        py.groups[0]["lr"] = lrs[k]
        set_grads(pairs, grads[k])
        opt.step()
        py.step(grads[k])
        scheduler.step()
        for tp, pp in pairs:
            assert_close(flat(tp), pp.w, what=f"step {k}")
    check_state(opt, pairs, form)


@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
def test_lars_is_tvlars_with_phi_one(form):
    """phi = 1/(0 + e^0) + 0 = 1 exactly for lmbda = alpha = gamma_min = 0, so LARS and that TVLARS
    agree bit for bit; and LARS matches the plain-Python run with phi = 1."""
    rng = random.Random(41)
    vals = [(rand_list(rng, numel(s)), s) for s in SHAPES]
    grads_l = [[rand_list(rng, numel(s)) for s in SHAPES] for _ in range(6)]
    hps = dict(lr=0.1, momentum=0.9, weight_decay=0.02, eta=0.4, momentum_form=form, norm_clip=3.0)
    a = [torch.tensor(v, dtype=F64).reshape(s).requires_grad_(True) for v, s in vals]
    b = [torch.tensor(v, dtype=F64).reshape(s).requires_grad_(True) for v, s in vals]
    opt_a = LARS(a, **hps)
    opt_b = TVLARS(b, lmbda=0.0, alpha=0.0, gamma_min=0.0, **hps)
    for gl in grads_l:
        for pa, pb, g in zip(a, b, gl):
            pa.grad = torch.tensor(g, dtype=F64).reshape(pa.shape)
            pb.grad = torch.tensor(g, dtype=F64).reshape(pb.shape)
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
    # LARS against python (tvlars=False: phi == 1)
    pairs = [make_pair(v, s) for v, s in vals]
    opt, py = build(LARS, [pairs], hps)
    grads = [{id(pp): g for (_, pp), g in zip(pairs, gl)} for gl in grads_l]
    run_and_compare(opt, py, [pairs], grads, form=form)
    for pa, (tp, _) in zip(a, pairs):
        assert torch.equal(pa, tp)


def test_lars_ignores_phi_parameters():
    """LARS has no schedule: its scale is 1 at every step, unlike default TVLARS."""
    rng = random.Random(43)
    pairs = model_pairs(rng, [(3, 2)])
    opt, py = build(LARS, [pairs], dict(lr=0.1, eta=0.5))
    grads = grad_sequence(rng, pairs, 5)
    run_and_compare(opt, py, [pairs], grads)
    # the same run through TVLARS with a decaying phi must differ (the test is sensitive to phi)
    tp2, _ = make_pair(rand_list(random.Random(43), 6), (3, 2))
    opt2 = TVLARS([tp2], lr=0.1, eta=0.5, lmbda=0.5, weight_decay=0.0)
    for g in grads:
        tp2.grad = torch.tensor(g[id(pairs[0][1])], dtype=F64).reshape(3, 2)
        opt2.step()
    assert not torch.allclose(tp2, pairs[0][0])


# =============================================================================================
# state_dict round trip


def _net(seed, dtype=F64):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    return net.to(dtype)


def _loss(net, k, dtype=F64):
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64).to(dtype)
    return ((net(x) - y) ** 2).float().mean() if dtype != F64 else ((net(x) - y) ** 2).mean()


def _make_opt(cls, net, form, **over):
    hps = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, eta=0.3, momentum_form=form,
               lars_adaptation_filter=True)
    if cls is TVLARS:
        hps.update(lmbda=0.3, delay_steps=1, gamma_min=0.01)
    hps.update(over)
    params = list(net.parameters())
    # two groups: the weights and the biases, with different lr
    return cls([dict(params=params[0::2]), dict(params=params[1::2], lr=0.05)], **hps)


def _train(net, opt, ks, dtype=F64):
    for k in ks:
        opt.zero_grad()
        _loss(net, k, dtype).backward()
        opt.step()


def _save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("cls", [TVLARS, LARS])
@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
def test_state_dict_round_trip_bit_identical(cls, form):
    n, k = 8, 3
    net_a = _net(0)
    opt_a = _make_opt(cls, net_a, form)
    _train(net_a, opt_a, range(n))
    assert float(opt_a.step_count) == n

    net_b = _net(0)
    opt_b = _make_opt(cls, net_b, form)
    _train(net_b, opt_b, range(k))
    saved = _save({"model": net_b.state_dict(), "opt": opt_b.state_dict()})
    assert sorted(saved["opt"]["state"]) == list(range(len(list(net_b.parameters()))))
    assert all(float(st["step"]) == k for st in saved["opt"]["state"].values())

    # a fresh model (different init) and optimizer (different hyperparameters): loading must
    # restore the parameters, the hyperparameters, the momentum state and t
    net_c = _net(123)
    opt_c = _make_opt(cls, net_c, form, lr=0.7, momentum=0.1)
    net_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    st = opt_c.step_count
    assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.shape == ()
    assert float(st) == k
    assert opt_c.param_groups[0]["lr"] == 0.1 and opt_c.param_groups[1]["lr"] == 0.05
    assert opt_c.param_groups[0]["momentum"] == 0.9
    key = "momentum_buffer" if form == "heavy_ball" else "m"
    for pb, pc in zip(net_b.parameters(), net_c.parameters()):
        assert torch.equal(opt_b.state[pb][key], opt_c.state[pc][key])
        assert opt_c.state[pc][key] is not opt_b.state[pb][key]
    _train(net_c, opt_c, range(k, n))
    assert float(opt_c.step_count) == n
    for pa, pc in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(pa, pc)
    # sensitivity: restarting with t = 0 (fresh optimizer, only the model loaded) gives other bits
    net_d = _net(123)
    net_d.load_state_dict(saved["model"])
    opt_d = _make_opt(cls, net_d, form)
    _train(net_d, opt_d, range(k, n))
    assert any(not torch.equal(pa, pd) for pa, pd in zip(net_a.parameters(), net_d.parameters()))


def test_state_dict_direct_load_without_serialisation():
    """Loading a live state_dict of another optimizer must not alias its tensors."""
    net_a, net_b = _net(0), _net(0)
    opt_a = _make_opt(TVLARS, net_a, "heavy_ball")
    opt_b = _make_opt(TVLARS, net_b, "heavy_ball")
    _train(net_a, opt_a, range(2))
    _train(net_b, opt_b, range(2))
    net_c = _net(0)
    net_c.load_state_dict(net_a.state_dict())
    opt_c = _make_opt(TVLARS, net_c, "heavy_ball")
    opt_c.load_state_dict(opt_a.state_dict())
    _train(net_c, opt_c, range(2, 4))
    # opt_a's own state and counter are untouched by opt_c's steps
    assert float(opt_a.step_count) == 2.0
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    _train(net_a, opt_a, range(2, 4))
    for pa, pc in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(pa, pc)


def test_step_counter_is_float32_scalar():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = TVLARS([w], lr=0.1)
    st = opt.step_count
    assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.shape == ()
    assert float(st) == 0.0
    for i in range(5):
        w.grad = torch.ones(3, dtype=F64)
        opt.step()
        assert float(opt.step_count) == i + 1
    sd = opt.state_dict()
    assert list(sd["state"]) == [0] and float(sd["state"][0]["step"]) == 5.0


# =============================================================================================
# invalid hyperparameters


TV_BAD = [
    ("lr", -0.1), ("lr", -1e-12), ("lr", float("nan")),
    ("momentum", -0.1), ("momentum", 1.0), ("momentum", 1.5),
    ("eta", 0.0), ("eta", -1e-3),
    ("weight_decay", -1e-4),
    ("lmbda", -1e-3), ("gamma_min", -0.1), ("alpha", -1.0),
    ("momentum_form", "nesterov"), ("momentum_form", "Paper"),
    ("norm_clip", 0.0), ("norm_clip", -1.0),
]
LARS_BAD = [c for c in TV_BAD if c[0] not in ("lmbda", "gamma_min", "alpha")]


def _bad_id(c):
    return f"{c[0]}={c[1]}"


@pytest.mark.parametrize("cls_name", ["TVLARS", "LARS", "LAMB"])
@pytest.mark.parametrize("module", ["reference", "fused"])
def test_ambiguous_positional_arguments_are_refused(module, cls_name):
    """The LARS codebases disagree on the third positional argument and after (torch SGD, timm,
    Lightning: lr, momentum, dampening, weight_decay; Barlow Twins, pytorch_optimizer, the TVLARS
    authors: lr, weight_decay, momentum), LAMB's after betas (torch Adam: eps; pytorch_optimizer:
    weight_decay): past lr and momentum (LAMB: lr and betas) arguments are keyword-only, so such a
    call is an error instead of silently misplaced values."""
    import tvlars_fused
    import tvlars_fused.reference as ref
    cls = getattr(ref if module == "reference" else tvlars_fused, cls_name)
    w = torch.nn.Parameter(torch.randn(3, dtype=F64))
    second = (0.9, 0.99) if cls_name == "LAMB" else 0.8
    opt = cls([w], 0.1, second)   # torch's order for the first two
    assert opt.param_groups[0]["betas" if cls_name == "LAMB" else "momentum"] == second
    with pytest.raises(TypeError, match="positional"):
        cls([w], 0.1, second, 5e-4)


@pytest.mark.parametrize("name,value", TV_BAD, ids=[_bad_id(c) for c in TV_BAD])
def test_invalid_tvlars_constructor(name, value):
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    kwargs = dict(lr=0.1)
    kwargs[name] = value
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
        TVLARS([w], **kwargs)


@pytest.mark.parametrize("name,value", LARS_BAD, ids=[_bad_id(c) for c in LARS_BAD])
def test_invalid_lars_constructor(name, value):
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    kwargs = dict(lr=0.1)
    kwargs[name] = value
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
        LARS([w], **kwargs)


@pytest.mark.parametrize("name,value", TV_BAD, ids=[_bad_id(c) for c in TV_BAD])
def test_invalid_tvlars_group_override(name, value):
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
        TVLARS([dict(params=[w], **{name: value})], lr=0.1)


@pytest.mark.parametrize("cls,name,value",
                         [(TVLARS, n, v) for n, v in TV_BAD] + [(LARS, n, v) for n, v in LARS_BAD],
                         ids=[f"TVLARS-{_bad_id(c)}" for c in TV_BAD] + [f"LARS-{_bad_id(c)}" for c in LARS_BAD])
def test_invalid_hyperparameter_set_later_raises_on_step(cls, name, value):
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = cls([w], lr=0.1, eta=0.5)
    w.grad = torch.tensor([0.3, 0.4], dtype=F64)
    opt.step()
    before = w.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[w].items()}
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=rf"\b{re.escape(name)}\b"):
        opt.step()
    # a rejected step changes nothing
    assert torch.equal(w.detach(), before)
    assert float(opt.step_count) == 1.0
    for k, v in state_before.items():
        assert torch.equal(opt.state[w][k], v)


@pytest.mark.parametrize("name", ["momentum", "eta", "weight_decay", "norm_clip", "lmbda"])
def test_tensor_hyperparameter_rejected_with_clear_error(name):
    """Only lr may be a tensor; the others get a ValueError naming them (not a TypeError)."""
    w = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        TVLARS([w], lr=0.1, **{name: torch.tensor(0.5)})


def test_valid_edge_hyperparameters_accepted():
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    # lr = 0, momentum = 0, weight_decay = 0, lmbda = 0, gamma_min = 0, alpha = 0 (with lmbda*delay
    # moderate) are all legal
    opt = TVLARS([w], lr=0.0, momentum=0.0, weight_decay=0.0, lmbda=0.0, gamma_min=0.0, alpha=0.0)
    w.grad = torch.ones(2, dtype=F64)
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0], dtype=F64))


def test_invalid_second_group_changes_nothing():
    a = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.5, 0.5], dtype=F64, requires_grad=True)
    opt = TVLARS([dict(params=[a]), dict(params=[b])], lr=0.1, eta=0.5)
    a.grad = torch.tensor([0.3, 0.4], dtype=F64)
    b.grad = torch.tensor([0.3, 0.4], dtype=F64)
    opt.param_groups[1]["lr"] = -1.0
    a_before = a.detach().clone()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(a.detach(), a_before)
    assert a not in opt.state or len(opt.state[a]) == 0


# =============================================================================================
# unsupported inputs


@pytest.mark.parametrize("cls", [TVLARS, LARS])
def test_sparse_gradient_raises(cls):
    emb = torch.nn.Embedding(5, 3, sparse=True).to(F64)
    opt = cls(emb.parameters(), lr=0.1)
    emb(torch.tensor([0, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


def test_sparse_gradient_on_later_param_changes_nothing():
    a = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    emb = torch.nn.Embedding(3, 2, sparse=True).to(F64)
    opt = TVLARS([a, emb.weight], lr=0.1, eta=0.5)
    a.grad = torch.ones(2, dtype=F64)
    emb(torch.tensor([0])).sum().backward()
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        opt.step()
    assert torch.equal(a.detach(), torch.tensor([1.0, 2.0], dtype=F64))
    assert a not in opt.state


def test_rejected_add_param_group_leaves_optimizer_unchanged():
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = TVLARS([w], lr=0.1, eta=0.5)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group(dict(params=[torch.zeros(2, dtype=F64, requires_grad=True)], lr=-1.0))
    assert len(opt.param_groups) == 1
    w.grad = torch.ones(2, dtype=F64)
    opt.step()  # the optimizer is still usable


@pytest.mark.parametrize("cls", [TVLARS, LARS])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_param_raises(cls, dtype):
    p = torch.zeros(3, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        cls([p], lr=0.1)


def test_complex_param_in_added_group_raises():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = TVLARS([w], lr=0.1)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group(dict(params=[torch.zeros(2, dtype=torch.complex64, requires_grad=True)]))


def test_integer_param_raises():
    with pytest.raises(ValueError, match="floating"):
        TVLARS([torch.zeros(3, dtype=torch.int64)], lr=0.1)


# =============================================================================================
# low precision: float32 state for bfloat16 parameters


@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
def test_bfloat16_one_step_is_float32_math_rounded(form):
    """A bfloat16 step computes in float32: one step from bf16 values equals the float32 step on
    the same (exactly representable) values, rounded to bf16."""
    rng = random.Random(51)
    shapes = [(4,), (3, 3)]
    w16 = [torch.tensor(rand_list(rng, numel(s)), dtype=torch.bfloat16).reshape(s).requires_grad_(True)
           for s in shapes]
    g16 = [torch.tensor(rand_list(rng, numel(s)), dtype=torch.bfloat16).reshape(s) for s in shapes]
    w32 = [w.detach().float().clone().requires_grad_(True) for w in w16]
    hps = dict(lr=0.1, momentum=0.9, weight_decay=0.01, eta=0.5, lmbda=0.1, momentum_form=form)
    o16, o32 = TVLARS(w16, **hps), TVLARS(w32, **hps)
    for a, b, g in zip(w16, w32, g16):
        a.grad = g.clone()
        b.grad = g.float()
    o16.step()
    o32.step()
    key = "momentum_buffer" if form == "heavy_ball" else "m"
    for a, b in zip(w16, w32):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.detach(), b.detach().to(torch.bfloat16))
        assert o16.state[a][key].dtype == torch.float32
        assert torch.equal(o16.state[a][key], o32.state[b][key])


@pytest.mark.parametrize("form", ["heavy_ball", "paper"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_state_float32_through_state_dict(form, dtype):
    n, k = 6, 3
    key = "momentum_buffer" if form == "heavy_ball" else "m"
    net_a = _net(0, dtype)
    opt_a = _make_opt(TVLARS, net_a, form)
    _train(net_a, opt_a, range(n), dtype)

    net_b = _net(0, dtype)
    opt_b = _make_opt(TVLARS, net_b, form)
    _train(net_b, opt_b, range(k), dtype)
    for p in net_b.parameters():
        assert p.dtype == dtype
        assert opt_b.state[p][key].dtype == torch.float32
    # the float32 state is not representable in the parameter dtype (else the test proves nothing)
    assert any(not torch.equal(opt_b.state[p][key], opt_b.state[p][key].to(dtype).float())
               for p in net_b.parameters())
    saved = _save({"model": net_b.state_dict(), "opt": opt_b.state_dict()})
    for v in saved["opt"]["state"].values():
        if isinstance(v, dict):
            assert v[key].dtype == torch.float32

    net_c = _net(7, dtype)
    net_c.load_state_dict(saved["model"])
    opt_c = _make_opt(TVLARS, net_c, form)
    opt_c.load_state_dict(saved["opt"])
    for pb, pc in zip(net_b.parameters(), net_c.parameters()):
        assert opt_c.state[pc][key].dtype == torch.float32
        assert torch.equal(opt_c.state[pc][key], opt_b.state[pb][key])
    assert float(opt_c.step_count) == k
    _train(net_c, opt_c, range(k, n), dtype)
    for pa, pc in zip(net_a.parameters(), net_c.parameters()):
        assert pc.dtype == dtype
        assert torch.equal(pa, pc)
    for pc in net_c.parameters():
        assert opt_c.state[pc][key].dtype == torch.float32
