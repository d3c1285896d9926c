"""The fused optimizer's buckets and torch.optim behaviour, for every backend that runs here.
(Kernel-specific tests live in test_triton.py and test_extension.py.)"""
import copy

import numpy as np
import pytest
import torch

import tvlars_fused
from tvlars_fused import reference
from tvlars_fused.kernels import available_backends

from parity import SHAPES, assert_parity_fp32, bits, grads_for_step, make_init, max_err, train


def _backends():
    return available_backends("cpu", ("torch", "cpu", "triton"))


BACKENDS = _backends()
HYPER = dict(lr=0.7, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=3)


def fused(cls_name, backend, **kw):
    return lambda ps: getattr(tvlars_fused, cls_name)(ps, backend=backend, **kw)


def ref(cls_name, **kw):
    return lambda ps: getattr(reference, cls_name)(ps, **kw)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)
        self.unused = torch.nn.Linear(5, 5)   # an unused branch: its grads stay None

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _loop(model, opt, steps, seed=0, zero=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        (zero or opt.zero_grad)()
        x = torch.randn(8, 3, 6, 6, generator=g, dtype=next(model.parameters()).dtype)
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_views_and_unused_branch(backend):
    torch.manual_seed(0)
    m_ref = Net().double()
    m = copy.deepcopy(m_ref)
    params = list(m.parameters())
    opt = tvlars_fused.TVLARS(m.parameters(), backend=backend, **HYPER)
    o_ref = reference.TVLARS(m_ref.parameters(), **HYPER)
    _loop(m_ref, o_ref, 6)
    _loop(m, opt, 6)
    assert list(m.parameters()) == params  # same Parameter objects
    b = opt._buckets[0]
    assert opt.grad_copies == 0, "standard loop must take the fast path"
    for p, gv in zip(b.params, b.grad_views):
        if p.grad is not None:
            assert p.grad is gv
    # the parameters keep their own memory (the kernels reach them through the offsets table)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params)
    # the unused branch never got a grad: untouched, no state, as in the reference
    assert m.unused.weight.grad is None
    assert torch.equal(m.unused.weight, m_ref.unused.weight)
    assert m.unused.weight not in opt.state or not opt.state[m.unused.weight]
    assert max_err(m.parameters(), m_ref.parameters()) < 1e-12
    assert float(opt.step_count) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_fp32_groups_filters_forms(backend):
    init = make_init(SHAPES)
    kw = dict(weight_decay_filter=True, lars_adaptation_filter=True, norm_clip=5.0)

    def groups(cls, **extra):
        def make(ps):
            return cls([{"params": ps[:4], "momentum_form": "paper"},
                        {"params": ps[4:], "lr": 0.3, "weight_decay": 0.0}], **HYPER, **kw, **extra)
        return make

    def used(step, i):
        return not (i == 2 and step % 3 == 0)   # some None grads

    def run(make, dtype):
        return train(make, init, dtype, 12, used=used)[0]

    r64 = run(groups(reference.TVLARS), torch.float64)
    r32 = run(groups(reference.TVLARS), torch.float32)
    f32 = run(groups(tvlars_fused.TVLARS, backend=backend), torch.float32)
    assert_parity_fp32(f32, r32, r64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_written_and_reallocated_grads(backend):
    """A grad written by hand (assignment, copy_), or re-allocated after model.zero_grad(), is a
    real update; it is copied into the bucket (counted) and left as it is (torch's semantics:
    step() neither writes into .grad nor replaces it)."""
    init = make_init([(5, 3), (4,), (6,)])
    ps_f = [torch.nn.Parameter(x.clone()) for x in init]
    ps_r = [torch.nn.Parameter(x.clone()) for x in init]
    opt = tvlars_fused.LARS(ps_f, backend=backend, lr=0.5, weight_decay=0.01)
    o_ref = reference.LARS(ps_r, lr=0.5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in init]
        for opt_, ps in ((opt, ps_f), (o_ref, ps_r)):
            opt_.zero_grad()
            ps[0].grad = assigned = grads[0].clone()      # assignment
            ps[1].grad = torch.zeros_like(ps[1])          # a zero grad is a real update
            if step % 2:
                ps[1].grad.copy_(grads[1])                # in-place write by hand
            # ps[2]: no grad -> skipped
            opt_.step()
            assert ps[0].grad is assigned and torch.equal(assigned, grads[0])
    assert max_err(ps_f, ps_r) < 1e-12
    assert torch.equal(ps_f[2], init[2])
    assert opt.grad_copies == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_zero_grad_and_set_to_none_false(backend):
    torch.manual_seed(1)
    m_ref = Net().double()
    m = copy.deepcopy(m_ref)
    opt = tvlars_fused.TVLARS(m.parameters(), backend=backend, **HYPER)
    o_ref = reference.TVLARS(m_ref.parameters(), **HYPER)
    _loop(m_ref, o_ref, 3, zero=m_ref.zero_grad)          # module.zero_grad: grads set to None
    _loop(m, opt, 3, zero=m.zero_grad)
    assert max_err(m.parameters(), m_ref.parameters()) < 1e-12
    # zero_grad(set_to_none=False): every param that had a grad now has a zero grad -> updated
    for o in (opt, o_ref):
        o.zero_grad(set_to_none=False)
        o.step()
    assert max_err(m.parameters(), m_ref.parameters()) < 1e-12
    assert m.unused.weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_roundtrip_between_fused_and_reference(backend):
    torch.manual_seed(2)
    base = Net().double()
    for src_fused in (True, False):
        m_a, m_b = copy.deepcopy(base), copy.deepcopy(base)
        mk_a = (lambda ps: tvlars_fused.TVLARS(ps, backend=backend, momentum_form="paper", **HYPER)) if src_fused \
            else (lambda ps: reference.TVLARS(ps, momentum_form="paper", **HYPER))
        mk_b = (lambda ps: reference.TVLARS(ps, momentum_form="paper", **HYPER)) if src_fused \
            else (lambda ps: tvlars_fused.TVLARS(ps, backend=backend, momentum_form="paper", **HYPER))
        o_a = mk_a(m_a.parameters())
        _loop(m_a, o_a, 4)
        sd = copy.deepcopy(o_a.state_dict())
        m_b.load_state_dict(m_a.state_dict())
        o_b = mk_b(m_b.parameters())
        o_b.load_state_dict(sd)
        assert set(o_b.state_dict()["state"]) == set(sd["state"])
        _loop(m_a, o_a, 3, seed=9)
        _loop(m_b, o_b, 3, seed=9)
        assert max_err(m_a.parameters(), m_b.parameters()) < 1e-12
        assert float(o_a.step_count) == float(o_b.step_count) == 7
        keys = {k for st in o_b.state_dict()["state"].values() for k in st}
        assert keys == {"m", "step"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_and_channels_last(backend):
    torch.manual_seed(3)
    m_ref = Net().double().to(memory_format=torch.channels_last)
    m = copy.deepcopy(m_ref)
    opt = tvlars_fused.TVLARS(m.parameters(), backend=backend, **HYPER)
    o_ref = reference.TVLARS(m_ref.parameters(), **HYPER)
    s = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 2, gamma=0.5)
    for _ in range(5):
        _loop(m, opt, 1)
        _loop(m_ref, o_ref, 1)
        s.step()
        s_ref.step()
    assert m.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert max_err(m.parameters(), m_ref.parameters()) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_data_reassigned_rebuilds(backend):
    init = make_init([(4, 4), (3,)])
    ps_f = [torch.nn.Parameter(x.clone()) for x in init]
    ps_r = [torch.nn.Parameter(x.clone()) for x in init]

    def run(opt, ps, replace):
        for step in range(4):
            opt.zero_grad()
            (ps[0] * 1.5).sum().backward() if step % 2 else (ps[0].square().sum() + ps[1].sum()).backward()
            opt.step()
            if step == 1 and replace:
                new.append(torch.full((4, 4), 0.25, dtype=torch.float64))
                ps[0].data = new[-1]
    new = []
    opt = tvlars_fused.TVLARS(ps_f, backend=backend, **HYPER)
    run(opt, ps_f, True)
    o_ref = reference.TVLARS(ps_r, **HYPER)
    run(o_ref, ps_r, True)
    assert max_err(ps_f, ps_r) < 1e-12
    # the step updated the tensor the user assigned, in place (no rebuild: only its address changed)
    assert ps_f[0].data_ptr() == new[0].data_ptr() and torch.equal(ps_f[0], new[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_stats(backend):
    init = make_init([(6, 5), (5,)])
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = tvlars_fused.TVLARS(ps, backend=backend, **HYPER)
    opt.zero_grad()
    (ps[0].square().sum() + ps[1].sum()).backward()
    g0 = ps[0].grad.clone()
    opt.step()
    st = opt.layer_stats()[ps[0]]
    d = g0 + HYPER["weight_decay"] * init[0]
    ph = tvlars_fused.phi(0, HYPER["lmbda"], HYPER["delay_steps"], 1.0, 0.0)
    wn, dn, gn = float(init[0].norm()), float(d.norm()), float(g0.norm())
    # [weight_norm, update_norm, trust_ratio, phi, grad_norm, weight_decay applied]
    expected = torch.tensor([wn, dn, HYPER["eta"] * ph * wn / dn, ph, gn, HYPER["weight_decay"]],
                            dtype=torch.float64)
    assert torch.allclose(st, expected, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_trust_clip_at_lr_zero_with_vanished_phi(backend):
    """trust_clip with lr = 0 where phi(t) has underflowed to 0 in float32 (gamma_min = 0, lmbda*t
    large), so q = 0: min(q/lr, 1) is 1 (docs/SPEC.md), not 0/0 = NaN in the momentum buffer."""
    init = [x.float() for x in make_init([(6, 5), (5,)])]
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    kw = dict(lr=0.0, momentum=0.9, weight_decay=1e-3, lmbda=200.0, gamma_min=0.0, trust_clip=True)
    opt = reference.TVLARS(ps, **kw) if backend == "reference" else tvlars_fused.TVLARS(ps, backend=backend, **kw)
    assert tvlars_fused.phi(1, 200.0, 0.0, 1.0, 0.0) < 1e-80   # 0 in float32
    grads = []
    for _ in range(2):
        opt.zero_grad()
        (ps[0].square().sum() + ps[1].sum()).backward()
        grads.append([p.grad.clone() for p in ps])
        opt.step()
    for p, x, g0, g1 in zip(ps, init, *grads):
        assert torch.equal(p.detach(), x)   # lr = 0: nothing moves
        buf = opt.state[p]["momentum_buffer"]
        # both steps clipped to q = 1: buf = 0.9*(g0 + wd*w) + (g1 + wd*w)
        expected = 0.9 * (g0 + 1e-3 * x) + (g1 + 1e-3 * x)
        assert torch.isfinite(buf).all() and torch.allclose(buf, expected, rtol=1e-6, atol=0), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_step(backend, monkeypatch):
    init = make_init(SHAPES[:5])
    ps = [torch.nn.Parameter(x.clone().float()) for x in init]
    opt = tvlars_fused.TVLARS(ps, backend=backend, **HYPER)

    def loss():
        return sum((p * p).sum() for p in ps)
    opt.zero_grad()
    loss().backward()
    opt.step()  # builds the buckets

    def boom(*a, **k):
        raise AssertionError("host sync in step()")
    for name in ("item", "__bool__", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for _ in range(2):
        opt.zero_grad()
        loss().backward()
        opt.step()
    monkeypatch.undo()
    assert float(opt.step_count) == 3


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_backend_slices_change_nobits(dtype, amp, monkeypatch):
    """backend="torch" works through a bucket in slices of whole chunks. One-chunk slices (which
    cut segments, some with no active part) give the same bits as one slice for the whole bucket:
    both momentum forms, the weight-decay filter, None grads, and with AMP a grad_scale and one
    vetoed step (found_inf)."""
    from tvlars_fused.kernels import torch_backend
    init = make_init(SHAPES)

    def make(ps):
        opt = tvlars_fused.TVLARS([{"params": ps[:5], "momentum_form": "paper"}, {"params": ps[5:]}],
                                  backend="torch", weight_decay_filter=True, **HYPER)
        if amp:
            opt.grad_scale, opt.found_inf = torch.full((1,), 4.0), torch.zeros(1)
        return opt

    def per_step(step, opt, ps):
        if amp:
            opt.found_inf.fill_(float(step == 2))   # vetoes the fourth step

    def used(step, i):
        return not ((i == 2 and step % 3 == 0) or (i == 8 and step % 2))

    runs = []
    backend = torch_backend.BACKEND
    for slice_elems in (1 << 40, backend.CHUNK_ELEMS):
        monkeypatch.setattr(backend, "SLICE_ELEMS", slice_elems)
        ps, opt = train(make, init, dtype, 7, used=used, grad_scale=4.0 if amp else 1.0, per_step=per_step)
        b = opt._buckets[0]
        sizes = [sl.n for sl in torch_backend.slices(b.view)]
        assert len(sizes) == 1 if slice_elems > b.numel else max(sizes) <= backend.CHUNK_ELEMS
        runs.append([bits(p) for p in ps] + [bits(v) for p in ps for v in opt.state[p].values()]
                    + [bits(b.stats), bits(opt.step_count)])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.parametrize("mixed", [False, True], ids=["zero-size-only", "mixed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_params_stats(backend, mixed):
    """Zero-size parameters (a bucket of only those, or among others): the step counts and each one's
    stats are (0, 0, 1, phi(t)) on every backend, as the C++ kernels write them."""
    params = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(0, 3))]
    if mixed:
        params = [torch.nn.Parameter(torch.randn(40, 30)), *params, torch.nn.Parameter(torch.randn(9000))]
    opt = tvlars_fused.TVLARS(params, lr=0.1, lmbda=0.05, delay_steps=3, backend=backend)
    for _ in range(3):
        opt.zero_grad()
        sum(p.sum() for p in params).backward()
        opt.step()
    assert float(opt.step_count) == 3
    phi2 = tvlars_fused.phi(2, 0.05, 3, 1.0, 0.0)
    for p in params:
        st = opt.layer_stats()[p]
        if p.numel() == 0:
            assert st[:3].tolist() == [0.0, 0.0, 1.0] and abs(float(st[3]) - phi2) < 1e-6, st
        else:
            assert float(st[0]) > 0 and abs(float(st[3]) - phi2) < 1e-6, st


def spec_segment_sum(partials, tile):
    """docs/SPEC.md, "The segment sum", written out independently: tiles of `tile` chunk partials
    in chunk order, each summed as a pairwise tree (v[i] = v[2i] + v[2i+1], +0 past the end),
    the tiles added in order, all in float32."""
    total = np.float32(0.0)
    for base in range(0, len(partials), tile):
        v = [np.float32(x) for x in partials[base:base + tile]] + [np.float32(0.0)] * (tile - len(partials[base:base + tile]))
        while len(v) > 1:
            v = [np.float32(v[2 * i] + v[2 * i + 1]) for i in range(len(v) // 2)]
        total = np.float32(total + v[0])
    return total


# backend -> (chunk elements, reduce tile: small where the backend reads it at run time; the C++
# kernel's is compiled in)
ORDER_SETUP = {"torch": (64, 4), "triton": (64, 4), "cpu": (16, 1024)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_order_is_the_spec(backend, monkeypatch):
    """stats = sqrt of each segment's chunk partials added in SPEC's order (tiles of a pairwise
    tree, tiles in chunk order), bit for bit, whoever finishes last; each partial is its chunk's
    sum of squares. Segment 1 makes the order show: a first chunk summing to 2^24, then chunks of
    0.75 each (below half an ulp of 2^24 one at a time, not in pairs): sequential, reversed or
    untiled orders give other bits."""
    from tvlars_fused import stats as S
    from tvlars_fused.kernels import resolve
    chunk, tile = ORDER_SETUP[backend]
    monkeypatch.setattr(resolve(backend, torch.device("cpu")), "CHUNK_ELEMS", chunk)
    monkeypatch.setattr(S, "REDUCE_TILE", tile)
    if backend == "triton":
        monkeypatch.setattr(resolve(backend, torch.device("cpu")), "REDUCE_TILE", tile)
    n_chunks = 3 * tile + 2 if tile < 1024 else tile + 76          # several tiles, the last one partial
    shapes = [(700,), (n_chunks * chunk,), (33, 20), (5,), (chunk,)]
    init = make_init(shapes)
    g = grads_for_step(shapes, 0)
    per = chunk
    for t in (init[1], g[1]):
        t.fill_((0.75 / per) ** 0.5)
        t[:per] = 0.0
        t[0] = 4096.0
    ps = [torch.nn.Parameter(x.float()) for x in init]
    opt = tvlars_fused.LARS(ps, lr=0.1, weight_decay=1e-2, backend=backend)
    for p, c in zip(ps, g):
        p.grad = c.float()
    b = opt._buckets[0]
    assert b.chunk_elems == chunk
    w0 = [p.detach().double().clone().reshape(-1) for p in ps]
    opt.step()
    seg = b.seg_table.tolist()
    chunks = b.chunk_table.tolist()
    partials = b.partials.numpy()
    stats = b.stats.numpy()
    for s, (off, end, numel, _, _, first, n) in enumerate(seg):
        assert n == -(-(end - off) // chunk)
        d0 = g[s].reshape(-1).float().double() + 1e-2 * w0[s]
        for c in range(first, first + n):
            lo, hi = chunks[c][0] - off, min(chunks[c][0] + chunk, off + numel) - off
            np.testing.assert_allclose(partials[c, 0], float((w0[s][lo:hi] ** 2).sum()), rtol=1e-5)
            np.testing.assert_allclose(partials[c, 1], float((d0[lo:hi] ** 2).sum()), rtol=1e-5)
        sw = spec_segment_sum(partials[first:first + n, 0], tile)
        sd = spec_segment_sum(partials[first:first + n, 1], tile)
        assert stats[s, 0] == np.sqrt(sw), s   # bit for bit: sqrt is correctly rounded everywhere
        assert stats[s, 1] == np.sqrt(sd), s
        if s == 1:   # the order shows: other orders give other bits here
            seq = np.float32(0.0)
            for x in partials[first:first + n, 0]:
                seq = np.float32(seq + x)
            assert np.sqrt(seq) != stats[s, 0]
            assert spec_segment_sum(partials[first:first + n, 0], 2 * tile) != sw or tile >= 1024
    assert int(b.counters.sum()) == 0   # counters are back to zero between launches


# Every LARS option of docs/SPEC.md, alone or with the ones it is used with (issue: the LARS people
# already run). Layer 4 starts at zero (||w|| = 0) and layer 5 always gets a zero gradient.
OPTION_SETS = [
    dict(denominator="grad"), dict(denominator="grad", eps=1e-3), dict(eps=1e-2), dict(trust_clip=True, lr=0.3),
    dict(trust_clip=True, lr=2.0, denominator="grad"), dict(adapt=False), dict(always_adapt=False, weight_decay=0.0),
    dict(plain_step_on_zero_norm=True, denominator="grad"), dict(plain_step_on_zero_norm=True, trust_clip=True, lr=2.0),
    dict(nesterov=True), dict(dampening=0.3), dict(maximize=True), dict(momentum_form="lr_scaled"),
    dict(momentum_form="lr_scaled", nesterov=True), dict(hold_steps=3),
    dict(weight_decay_filter=True, lars_adaptation_filter=True, denominator="grad", norm_clip=3.0),
]
FAST_ON_TRITON = (0, 9)   # the interpreter is slow: the other sets run with `make test-all`


def _options_cases():
    out = []
    for b in BACKENDS:
        for k, opts in enumerate(OPTION_SETS):
            marks = [pytest.mark.slow] if b == "triton" and k not in FAST_ON_TRITON else []
            out.append(pytest.param(b, opts, marks=marks, id=f"{b}-" + ",".join(f"{n}={v}" for n, v in opts.items())))
    return out


@pytest.mark.parametrize("backend,opts", _options_cases())
def test_options_match_reference_and_parity(backend, opts):
    """float64: fused == reference within 1e-12; float32: the parity rule against float64."""
    init = make_init(SHAPES)
    init[4].zero_()

    def run(cls, dtype):
        def make_opt(ps):
            if cls is reference.TVLARS:
                return cls(ps, **{**HYPER, **opts})
            return cls(ps, backend=backend, **{**HYPER, **opts})
        ps, _ = train(make_opt, init, dtype, 6, used=lambda step, i: i != 2 or step % 3, zero_grad=(5,))
        return ps

    r64 = run(reference.TVLARS, torch.float64)
    assert max_err(run(tvlars_fused.TVLARS, torch.float64), r64) <= 1e-12 * max(1.0, max(float(p.abs().max()) for p in r64))
    assert_parity_fp32(run(tvlars_fused.TVLARS, torch.float32), run(reference.TVLARS, torch.float32), r64, str(opts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_engages_and_notices_every_change(backend, monkeypatch):
    """In a steady loop (same parameters, gradients in the optimizer's views, state untouched) a
    step does no per-parameter Python work; a parameter moved (p.data = ...) is followed through
    the offsets table; any other change behind its back takes the full path that step: a gradient
    assigned by hand, a gradient left None, a state entry replaced (momentum and step), the
    momentum form changed. Every step equals the reference's."""
    from tvlars_fused.buckets import Bucket
    slow = []
    orig = Bucket._prepare_params
    monkeypatch.setattr(Bucket, "_prepare_params", lambda self, *a: slow.append(1) or orig(self, *a))
    init = make_init([(6, 5), (5,), (4, 4), (7,)])
    runs = []
    for make_opt in (fused("TVLARS", backend, **HYPER), ref("TVLARS", **HYPER)):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        runs.append((ps, make_opt(ps)))
    (ps, opt), (ps_r, opt_r) = runs
    gen = torch.Generator().manual_seed(4)

    def step(change=None, use=(0, 1, 2, 3)):
        cs = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in init]
        for params, o in runs:
            o.zero_grad()
            sum((params[i] * cs[i]).sum() for i in use).backward()
            if change is not None:
                change(params, o)
            o.step()
        assert max_err(ps, ps_r) < 1e-12
        return len(slow)

    for _ in range(3):
        step()
    slow.clear()
    assert step() == 0, "a steady step must take the fast path"

    def move(params, o):
        params[2].data = params[2].data.clone()

    def hand_grad(params, o):
        params[1].grad = params[1].grad.clone()

    def new_momentum(params, o):
        o.state[params[0]]["momentum_buffer"] = torch.full_like(params[0], 0.01)

    def new_step(params, o):
        o.state[params[3]] = {"momentum_buffer": o.state[params[3]]["momentum_buffer"].clone(),
                              "step": torch.tensor(40.0)}

    def paper(params, o):
        o.param_groups[0]["momentum_form"] = "paper"

    slow.clear()
    step(move)   # followed without per-parameter work: only the offsets table changes
    assert opt._buckets[0].weights[2].data_ptr() == ps[2].data_ptr() and not slow
    for change, use in ((hand_grad, (0, 1, 2, 3)), (None, (0, 1, 3)), (new_momentum, (0, 1, 2, 3)),
                        (new_step, (0, 1, 2, 3)), (paper, (0, 1, 2, 3))):
        before = len(slow)
        assert step(change, use) > before, getattr(change, "__name__", "a None gradient")
    assert float(opt.step_count) == float(opt_r.step_count) == 42   # t set to 40, then two steps
    for _ in range(2):
        step()
    slow.clear()
    assert step() == 0, "back to the fast path"


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_stays_zero_after_a_non_finite_step(backend):
    """The flat buffers' padding is zero and never written (docs/SPEC.md), even when a step goes
    non-finite (an overflowed weight: ||w||^2 = inf, q = inf). Once the weights are restored, the
    layer's norms are those of its weights again (a NaN padding would have made them NaN and q 1)."""
    shapes = [(7,), (3, 5), (40,)]
    ps = [torch.nn.Parameter(x.float()) for x in make_init(shapes)]
    good = [p.detach().clone() for p in ps]
    opt = tvlars_fused.TVLARS(ps, backend=backend, **HYPER)
    b = opt._buckets[0]
    seg = b.seg_table.tolist()

    def padding():
        return torch.cat([torch.cat([b.grad_buf[o + n:e], b.state_buf[:, o + n:e].flatten()]) for o, e, n, *_ in seg])

    for p in ps:
        p.grad = torch.ones_like(p)
    with torch.no_grad():
        ps[0][0] = 3e38                      # its square overflows float32
    opt.step()
    assert not torch.isfinite(ps[0]).all() and torch.equal(padding(), torch.zeros_like(padding()))
    with torch.no_grad():                    # restored in place; the broken state reset
        for p, g in zip(ps, good):
            p.copy_(g)
    for p in ps:
        del opt.state[p]
    opt.step()
    assert torch.equal(padding(), torch.zeros_like(padding()))
    wn = float(opt.layer_stats()[ps[0]][0])
    assert wn == pytest.approx(float(good[0].double().norm()), rel=1e-6), wn


def _backward_steps(opt, model, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=g, dtype=torch.float64)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_newest_optimizer_owns_the_gradients(backend):
    """A second optimizer built over the same parameters while the first is alive (an LR finder,
    then the real run) takes the fast path: the newest one's views receive the gradients; the
    older one still steps correctly (its gradients are copied in)."""
    torch.manual_seed(3)
    model = torch.nn.Linear(3, 2).double()
    old = tvlars_fused.TVLARS(model.parameters(), backend=backend, **HYPER)
    _backward_steps(old, model, 2)
    new = tvlars_fused.TVLARS(model.parameters(), backend=backend, **HYPER)
    ref_model = copy.deepcopy(model)
    ref = reference.TVLARS(ref_model.parameters(), **HYPER)
    _backward_steps(new, model, 3)
    _backward_steps(ref, ref_model, 3)
    assert new.grad_copies == 0
    assert max_err(model.parameters(), ref_model.parameters()) < 1e-12
    _backward_steps(old, model, 1)   # the old one is still a working optimizer (copies its gradients)
    assert old.grad_copies == len(list(model.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_unfrozen_after_construction_takes_the_fast_path(backend):
    """A parameter frozen when the optimizer was built (fine-tuning that unfreezes layers later) has
    its gradient copied in once, then backward accumulates into the optimizer's view."""
    torch.manual_seed(4)
    model = torch.nn.Linear(3, 2).double()
    model.weight.requires_grad_(False)
    opt = tvlars_fused.TVLARS(model.parameters(), backend=backend, **HYPER)
    _backward_steps(opt, model, 1)
    assert opt.grad_copies == 0
    model.weight.requires_grad_(True)
    _backward_steps(opt, model, 1)
    assert opt.grad_copies == 1
    _backward_steps(opt, model, 3)
    assert opt.grad_copies == 1


def test_gradient_hooks_go_with_the_optimizer():
    """Deleting an optimizer removes its gradient hooks (none pile up on the parameters) and frees
    its buckets."""
    import gc
    import weakref
    model = torch.nn.Linear(3, 2)
    opt = tvlars_fused.TVLARS(model.parameters(), lr=0.1)
    bucket = opt._buckets[0]
    hooks, alive = bucket._hooks, weakref.ref(bucket)
    assert len(hooks) == 2
    del opt, bucket
    gc.collect()
    assert alive() is None and hooks == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_form_switches_match_reference(backend):
    """momentum_form changed between steps (paper -> heavy_ball -> lr_scaled -> paper ->
    heavy_ball with dampening): the fused classes and the reference agree step for step (a switch
    to or from "paper" starts the new form's state afresh in both; the reference once kept the old
    buffer and resumed it when switched back)."""
    init = make_init([(5, 3), (4,)])
    runs = []
    for make in (lambda ps: tvlars_fused.TVLARS(ps, backend=backend, **HYPER), lambda ps: reference.TVLARS(ps, **HYPER)):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps)
        gen = torch.Generator().manual_seed(9)
        for form, dampening in (("heavy_ball", 0.0), ("paper", 0.0), ("heavy_ball", 0.0), ("lr_scaled", 0.0),
                                ("paper", 0.0), ("heavy_ball", 0.2), ("heavy_ball", 0.2)):
            opt.param_groups[0].update(momentum_form=form, dampening=dampening)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        runs.append(ps)
        assert sorted(opt.state[ps[0]]) == ["momentum_buffer", "step"]
    assert max_err(*runs) < 1e-13


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_after_a_parameter_is_resized(backend):
    """p.data = a tensor of another shape (model surgery, a resized embedding): the next backward
    works (the optimizer keeps no autograd node of the old shape alive) and, once the stale state is
    reset as the step's error says, training goes on."""
    torch.manual_seed(5)
    lin = torch.nn.Linear(3, 4).double()
    opt = tvlars_fused.TVLARS(lin.parameters(), backend=backend, **HYPER)
    _backward_steps(opt, lin, 2)
    opt.zero_grad()
    lin.weight.data = torch.randn(4, 5, dtype=torch.float64)
    lin.in_features = 5
    lin(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    assert lin.weight.grad.shape == (4, 5)
    with pytest.raises(ValueError, match="changed shape"):
        opt.step()
    del opt.state[lin.weight]
    opt.step()
    opt.zero_grad()
    lin(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    assert torch.isfinite(lin.weight).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_undefined_incoming_gradient(backend):
    """A custom autograd Function that returns None for a parameter's gradient: backward works and
    that parameter is skipped (its .grad stays None), as with torch."""
    class Half(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x * 0.5 + w.sum() * 0

        @staticmethod
        def backward(ctx, g):
            return g * 0.5, None

    w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = tvlars_fused.TVLARS([w, b], backend=backend, **HYPER)
    before = w.detach().clone()
    Half.apply(b * 2, w).sum().backward()
    assert w.grad is None and b.grad is not None
    opt.step()
    assert torch.equal(w.detach(), before)
