"""backend="triton" (tvlars_fused/kernels/triton_backend.py): parity with the reference and the torch
backend, determinism and the chunk-order reduction, two launches per bucket, no host sync, AMP
(found_inf / grad_scale), and an ahead-of-time compile for sm_80/sm_90 (registers, spills, 128-bit
loads). Without a GPU the kernels run on CPU tensors under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1); the CUDA variants run whenever a GPU is present.

    pytest -q tests/test_triton.py -rP        # -rP shows the register/spill table of the AOT test
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tvlars_fused
from tvlars_fused import reference

from conftest import requires_cuda
from parity import init_with_zero, used, weights_flat  # noqa: E402
from parity import (SHAPES, assert_close_ulps, assert_parity_fp32, grads_for_step, make_init, max_err,
                    train)

triton_backend = pytest.importorskip("tvlars_fused.kernels.triton_backend", reason="triton is not installed")
from tvlars_fused.kernels import triton_math  # noqa: E402

TRITON = triton_backend.BACKEND

ROOT = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(
    not TRITON.available(torch.device("cpu")),
    reason="CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before triton is imported, triton >= 3.7)")
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=requires_cuda)]

HYPER = dict(lr=0.7, momentum=0.9, weight_decay=1e-3, eta=2e-3)
TV_ONLY = dict(lmbda=0.05, delay_steps=3)

# SHAPES plus a zero-initialised weight (wn == 0 -> q == 1 on its first step)
SH = SHAPES + [(6, 8)]
ZERO = len(SH) - 1
# fewer segments for the slower low-precision runs (the interpreter's cost is per program)
SH_SMALL = SHAPES[:5] + [(6, 8), (1,), (9, 3)]
ZERO_SMALL = 5


def init_params(shapes=SH, zero=ZERO):
    return init_with_zero(shapes, zero)


def make_groups(cls, tvlars: bool, backend=None):
    """Three groups: paper momentum with both filters and a norm_clip that bites; heavy ball with
    its own lr/eta/schedule and no weight decay; heavy ball with a weight-decay filter only."""
    base = dict(HYPER, **(TV_ONLY if tvlars else {}))
    kw = {} if backend is None else {"backend": backend}

    def make(ps):
        g0 = {"params": ps[0:4], "momentum_form": "paper", "weight_decay_filter": True,
              "lars_adaptation_filter": True, "norm_clip": 5.0}
        g1 = {"params": ps[4:6], "lr": 0.3, "weight_decay": 0.0, "eta": 5e-3}
        g2 = {"params": ps[6:], "momentum": 0.5, "weight_decay": 1e-2, "weight_decay_filter": True,
              "norm_clip": 40.0}
        if tvlars:
            g1.update(lmbda=0.2, delay_steps=10)
            g2.update(alpha=2.0, gamma_min=0.1)
        return cls([g0, g1, g2], **base, **kw)
    return make


def states(opt, params):
    out = []
    for p in params:
        st = opt.state.get(p, {})
        out.append(st["momentum_buffer"] if "momentum_buffer" in st else st.get("m", torch.zeros(0)))
    return out


def run(name, tvlars, dtype, steps, device="cpu", backend=None, init=None, **kw):
    """name: "fused" (tvlars_fused with `backend`) or "ref" (tvlars_fused.reference)."""
    mod = tvlars_fused if name == "fused" else reference
    cls = mod.TVLARS if tvlars else mod.LARS
    init = init_params() if init is None else init
    params, opt = train(make_groups(cls, tvlars, backend), init, dtype, steps, device=device, used=used, **kw)
    return params, opt


# -- parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tvlars", [True, False], ids=["TVLARS", "LARS"])
def test_parity_fp32(device, tvlars):
    steps = 32
    first = {}

    def keep_first_stats(s, opt, params):
        if s == 0:
            first.update({i: opt.layer_stats()[p].cpu().clone() for i, p in enumerate(params)})

    f32, opt = run("fused", tvlars, torch.float32, steps, device, "triton", per_step=keep_first_stats)
    t32, opt_t = run("fused", tvlars, torch.float32, steps, device, "torch")
    r32, opt32 = run("ref", tvlars, torch.float32, steps)
    r64, opt64 = run("ref", tvlars, torch.float64, steps)
    assert opt.backends == ["triton"] and opt_t.backends == ["torch"]

    # The parity rule, applied to each parameter (and its state) on its own: the large 1-D
    # parameters of group 0 (filtered, so plain SGD) would otherwise set the scale for all.
    s_f, s_32, s_64, s_t = states(opt, f32), states(opt32, r32), states(opt64, r64), states(opt_t, t32)
    eps = torch.finfo(torch.float32).eps
    rows = []
    for i in range(len(SH)):
        what = f"triton {device} param {i} {SH[i]}"
        e_fused, e_ref = assert_parity_fp32([f32[i]], [r32[i]], [r64[i]], what)
        assert_parity_fp32([s_f[i]], [s_32[i]], [s_64[i]], what + " state")
        e_torch, _ = assert_parity_fp32([t32[i]], [r32[i]], [r64[i]], f"torch backend param {i}")
        # the two fused backends agree as closely as either agrees with the float64 reference
        floor = 4 * eps * float(r64[i].detach().abs().max())
        e_tt = max_err([f32[i]], [t32[i]])
        assert e_tt <= 2 * e_ref + floor, f"{what}: triton vs torch {e_tt:.3e} > 2 x {e_ref:.3e} + {floor:.1e}"
        assert max_err([s_f[i]], [s_t[i]]) <= 2 * max_err([s_32[i]], [s_64[i]]) + 4 * eps * float(
            s_64[i].abs().max()), what + " state vs torch backend"
        rows.append((e_fused, e_ref, e_torch, e_tt, float(r64[i].detach().abs().max())))
    print(f"\nfp32 {device} {'TVLARS' if tvlars else 'LARS'} {steps} steps, per parameter: "
          "triton-ref64 / ref32-ref64 / torchbackend-ref64 / triton-torchbackend (max |w|)")
    for i, r in enumerate(rows):
        print(f"  {str(SH[i]):<14} {r[0]:.3e} / {r[1]:.3e} / {r[2]:.3e} / {r[3]:.3e}  ({r[4]:.2f})")

    # layer stats (wn, dn, q, phi) agree with the torch backend's, and with the reference's phi
    st, st_t = opt.layer_stats(), opt_t.layer_stats()
    for p, pt in zip(f32, t32):
        torch.testing.assert_close(st[p].cpu(), st_t[pt].cpu(), rtol=2e-5, atol=1e-30)
    if tvlars:
        t_last = steps - 1   # every parameter of group 1 had a gradient on the last step
        phi = tvlars_fused.phi(t_last, 0.2, 10, 1.0, 0.0)   # group 1's schedule, x = 4.2
        # float32 evaluation: a few roundings (interpreter: numpy's exp); on the GPU tl.exp is
        # ex2.approx(x*log2(e)): 2^-22 relative plus |x*log2(e)| * 2^-24 * ln 2 from the argument
        rel = 4e-7 if device == "cpu" else 1e-6
        assert abs(float(st[f32[4]][3]) - phi) <= rel * phi
    assert float(opt.step_count) == steps
    # the zero-initialised weight: wn == 0 -> q == 1 on its first step
    assert first[ZERO][0] == 0 and first[ZERO][2] == 1
    assert float(torch.linalg.vector_norm(f32[ZERO].detach().double())) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_parity_low_precision(device, dtype):
    """bfloat16/float16 parameters with float32 state: within a few ulps of the reference run in
    the same dtype (same float32 math, w rounded to nearest even)."""
    steps = 30
    init = init_params(SH_SMALL, ZERO_SMALL)
    tri, opt = run("fused", True, dtype, steps, device, "triton", init=init)
    ref, opt_r = run("ref", True, dtype, steps, init=init)
    assert opt._buckets[0].state_buf.dtype == torch.float32
    worst = assert_close_ulps(tri, ref, dtype, 2.0, f"triton {device} {dtype} params")
    worst_s = max_err(states(opt, tri), states(opt_r, ref))
    scale = max(float(s.abs().max()) for s in states(opt_r, ref) if s.numel())
    assert worst_s <= 1e-3 * scale, f"state: {worst_s:.3e} (scale {scale:.3e})"
    moved = max_err(tri, [x.to(dtype) for x in init])
    assert moved > 0
    print(f"\n{dtype} {device} {steps} steps: worst {worst:.2f} ulps (params), state max err {worst_s:.3e}")


@pytest.mark.parametrize("device", DEVICES)
def test_parity_fp64(device):
    f64, _ = run("fused", True, torch.float64, 8, device, "triton")
    r64, _ = run("ref", True, torch.float64, 8)
    assert max_err(f64, r64) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_bitwise(device, dtype):
    """Pass 2 against the spec's formulas evaluated op by op in float32 (one rounding per
    operation; the kernels are compiled without FMA contraction), with q read back from the
    stats of the same step: the same bits, and bfloat16 stores rounded to nearest even."""
    shapes = [(37,), (8, 9), (300,), (5, 7)]
    init = make_init(shapes)
    ps = [torch.nn.Parameter(x.to(device=device, dtype=dtype)) for x in init]
    hb = dict(lr=0.37, momentum=0.9, weight_decay=3e-2, weight_decay_filter=True)
    paper = dict(lr=0.21, momentum=0.6, weight_decay=1e-2, momentum_form="paper")
    opt = tvlars_fused.TVLARS([dict(params=ps[:2], **hb), dict(params=ps[2:], **paper)], lr=0.1,
                              eta=0.05, backend="triton")
    opt.grad_scale = torch.full((1,), 4.0, device=device)
    for step in range(3):
        for p, c in zip(ps, grads_for_step(shapes, step, scale=4.0)):
            p.grad = c.to(device=device, dtype=dtype)
        b = opt._buckets[0]
        w0 = [p.detach().float().cpu().clone() for p in ps]
        s0 = [v[0].detach().cpu().clone() for v in b.state_views]
        g0 = [p.grad.detach().float().cpu().clone() for p in ps]
        new_state = [not b.has_state[i] for i in range(len(ps))]
        opt.step()
        q = b.stats[:, 2].cpu()
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        for i, p in enumerate(ps):
            grp = hb if i < 2 else paper
            w, s, g = w0[i], s0[i], g0[i]
            if new_state[i] and grp is paper:
                s = w.clone()            # m starts equal to w (host side, before the launch)
            wd = 0.0 if (grp.get("weight_decay_filter") and p.ndim == 1) else grp["weight_decay"]
            d = g * f32(0.25)
            d = d + f32(wd) * w
            u = q[i] * d
            if grp is paper:
                s_new = w - f32(grp["lr"]) * u
                w_new = s_new + f32(grp["momentum"]) * (s_new - s)
            else:
                s_new = f32(grp["momentum"]) * s + u
                w_new = w - f32(grp["lr"]) * s_new
            assert torch.equal(b.state_views[i][0].cpu(), s_new), (step, i)
            assert torch.equal(p.detach().cpu(), w_new.to(dtype)), (step, i)   # torch rounds RNE
    assert float(opt.step_count) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_rounding_bits(device):
    """The kernels' float32 -> bfloat16 rounding (integer arithmetic, identical in the interpreter
    and on the GPU) is round-to-nearest-even, like torch: ties, carries into the exponent,
    overflow to inf, subnormals, signed zeros, infinities; NaN stays NaN."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, triton_math.bf16_rne_bits(tl.load(x_ptr + offs)).to(tl.int16, bitcast=True))

    g = torch.Generator().manual_seed(0)
    special = [0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x3FFF_8000, 0x7F7F_FFFF, 0x7F7F_7FFF,
               0x0000_8000, 0x0001_8000, 0x0000_0001, 0x8000_0000, 0x0000_0000, 0x7F80_0000, 0xFF80_0000,
               0x7FC0_0000, 0x7FFF_FFFF, 0xFF80_0001, 0x807F_8000, 0xBF80_8000, 0xC0FF_FFFF]
    bits = torch.randint(0, 2 ** 32, (4096 - len(special),), generator=g, dtype=torch.int64)
    bits = torch.cat([torch.tensor(special, dtype=torch.int64), bits])
    x = (bits - (bits >= 2 ** 31).long() * 2 ** 32).to(torch.int32).view(torch.float32)
    y = torch.empty(x.numel(), dtype=torch.int16)
    xd, yd = x.to(device), y.to(device)
    probe[(1,)](xd, yd, N=x.numel())
    got = yd.cpu().view(torch.bfloat16)
    want = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all()
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_numel_and_empty_buckets(device):
    """A parameter with no elements has no chunks; a bucket made only of such parameters has
    none at all (one program, which only advances t)."""
    a = torch.nn.Parameter(torch.randn(5, 3, device=device))
    e = torch.nn.Parameter(torch.zeros(0, device=device))
    h = torch.nn.Parameter(torch.zeros(0, 4, device=device, dtype=torch.float64))
    ra, re_, rh = (torch.nn.Parameter(x.detach().cpu().clone()) for x in (a, e, h))
    opt = tvlars_fused.TVLARS([a, e, h], lr=0.5, backend="triton")
    ref = reference.TVLARS([ra, re_, rh], lr=0.5)
    assert sorted(b.num_chunks for b in opt._buckets) == [0, 1]
    for _ in range(3):
        for o, ps in ((opt, (a, e, h)), (ref, (ra, re_, rh))):
            o.zero_grad()
            sum((p.double() ** 2).sum() for p in ps).backward()
            o.step()
    assert max_err([a], [ra]) < 1e-6
    assert [float(b.step) for b in opt._buckets] == [3.0, 3.0]


def test_available_and_requirement():
    assert TRITON.NAME == "triton" and TRITON.CHUNK_ELEMS % 16 == 0
    assert not TRITON.available(torch.device("meta"))
    assert TRITON.available(torch.device("cpu")) == (
        os.environ.get("TRITON_INTERPRET") == "1" and triton_backend._interpreted()
        and triton_backend._interpreter_ok())
    if not TRITON.available(torch.device("cpu")):
        with pytest.raises(RuntimeError, match="Triton interpreter"):
            tvlars_fused.TVLARS([torch.nn.Parameter(torch.ones(3))], lr=0.1, backend="triton")


# -- determinism and the chunk-order reduction ----------------------------------------------------

def _small_chunks(monkeypatch, elems=64):
    """Buckets built with small chunks: every segment of a few hundred elements spans several."""
    monkeypatch.setattr(TRITON, "CHUNK_ELEMS", elems)


@pytest.mark.parametrize("device", DEVICES)
def test_determinism_same_bits(device, monkeypatch):
    _small_chunks(monkeypatch)
    shapes = [(700,), (33, 20), (5,), (30,), (16,)]

    def once():
        params, opt = train(make_groups(tvlars_fused.TVLARS, True, "triton"), init_params(shapes, None),
                            torch.float32, 3, device=device)
        b = opt._buckets[0]
        assert b.num_chunks >= 20
        return [p.detach().clone() for p in params] + [b.state_buf.clone(), b.stats.clone(), b.step.clone()]

    a, b = once(), once()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# -- launches -------------------------------------------------------------------------------------

class LaunchCounter:
    """Counts Triton kernel launches (JITFunction.run, or the interpreter's) by kernel name."""

    def __init__(self, monkeypatch):
        self.counts = {}
        for k in triton_backend.KERNELS:
            cls = type(k)
            if getattr(cls.run, "_counting", False):
                continue
            orig = cls.run
            counter = self

            def counting_run(self_, *args, _orig=orig, **kwargs):
                if not kwargs.get("warmup", False):
                    name = getattr(self_, "__name__", None) or self_.fn.__name__
                    counter.counts[name] = counter.counts.get(name, 0) + 1
                return _orig(self_, *args, **kwargs)
            counting_run._counting = True
            monkeypatch.setattr(cls, "run", counting_run)
        # the launches after a bucket's first go straight to the compiled kernels (_Bound)
        bind = triton_backend._Bound.bind

        def counting_bind(self_, launches, *args, **kwargs):
            bind(self_, launches, *args, **kwargs)
            self_.runs = tuple((counter._counting(run, kernel.fn.__name__), values)
                               for (run, values), (kernel, _, _) in zip(self_.runs, launches))
        monkeypatch.setattr(triton_backend._Bound, "bind", counting_bind)

    def _counting(self, run, name):
        def counted(*args):
            self.counts[name] = self.counts.get(name, 0) + 1
            return run(*args)
        return counted

    def reset(self):
        self.counts = {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nparams", [3, 300])
def test_two_launches_per_bucket(device, nparams, monkeypatch):
    counter = LaunchCounter(monkeypatch)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (17,), (2, 2, 5)] * (nparams // 3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    opt = tvlars_fused.TVLARS(ps, lr=0.5, backend="triton")
    active = ps if nparams <= 30 else ps[::10]   # (the interpreter is slow: 30 of 300 get grads)
    before = [p.detach().clone() for p in ps]
    for step in range(2):
        counter.reset()
        opt.zero_grad()
        sum((p * p).sum() for p in active).backward()
        opt.step()
        assert counter.counts == {"_norms_kernel": 1, "_update_kernel": 1}, counter.counts
    assert len(opt._buckets) == 1 and opt._buckets[0].num_segments == nparams
    act = {id(p) for p in active}
    for p, p0 in zip(ps, before):
        assert torch.equal(p, p0) != (id(p) in act)
    print(f"\n{nparams} params on {device}: launches per step {counter.counts}")


@pytest.mark.parametrize("device", DEVICES)
def test_two_launches_per_bucket_two_buckets(device, monkeypatch):
    counter = LaunchCounter(monkeypatch)
    ps = [torch.nn.Parameter(torch.randn(5, 3).to(device)), torch.nn.Parameter(torch.randn(9).to(device)),
          torch.nn.Parameter(torch.randn(4, 4).to(device=device, dtype=torch.bfloat16))]
    opt = tvlars_fused.LARS(ps, lr=0.5, backend="triton")
    opt.zero_grad()
    sum((p.float() * p.float()).sum() for p in ps).backward()
    opt.step()
    assert len(opt._buckets) == 2
    assert counter.counts == {"_norms_kernel": 2, "_update_kernel": 2}, counter.counts


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: CompiledKernel[grid] gives the launch callable."""

    def __init__(self, signature):
        self.src = type("Src", (), {"signature": signature})()
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return ("runner", grid)


def test_bound_launch_passes_every_argument_in_order_pointers_as_integers():
    """_Bound binds the arguments as Triton's JIT passes them to the launcher: every parameter of
    the kernel in order (constexprs and defaults included), each tensor as its address; it binds
    nothing (every launch then goes through the JIT) where the compiled kernel's argument list
    differs, or this Triton has no CompiledKernel[grid]."""
    def kernel_fn(a, b, n, C, D=7):   # (C, D: the constexprs of a real kernel)
        pass
    kernel = type("Jit", (), {"signature": inspect.signature(kernel_fn)})()
    x, y = torch.arange(4.0), torch.zeros(3)
    launches = [(kernel, (x, y, 5), dict(C=2, num_warps=4, enable_fp_fusion=False))] * 2
    sig = dict.fromkeys(["a", "b", "n", "C", "D"], "*fp32")
    bound = triton_backend._Bound(None)
    compiled = [_FakeCompiled(sig), _FakeCompiled(sig)]
    bound.bind(launches, compiled, (9,), ("v",))
    assert bound.key == ("v",)
    assert [r for r, _ in bound.runs] == [("runner", (9, 1, 1))] * 2
    assert [v for _, v in bound.runs] == [[x.data_ptr(), y.data_ptr(), 5, 2, 7]] * 2

    # (the key is recorded: the bucket does not try to bind it again every step)
    bound.bind(launches, [_FakeCompiled(sig), _FakeCompiled(dict(sig, E="i32"))], (9,), ("w",))
    assert bound.key == ("w",) and bound.runs == ()
    bound.bind(launches, [object(), object()], (9,), ("u",))
    assert bound.key == ("u",) and bound.runs == ()


def _bound_scenario(monkeypatch, device, bind_launches, shapes):
    """Ten LARS steps through what invalidates a binding: the first parameter (the kernels' base
    address) moved at step 3, Nesterov on at 5 (a new variant), an AMP step at 6 (through the JIT),
    a Triton knob that picks the compiled kernel changed at 8. Returns (parameters, optimizer)."""
    monkeypatch.setattr(TRITON, "bind_launches", bind_launches)
    monkeypatch.setattr(triton_backend, "_compile_knobs", lambda: (None, None))
    ps = [torch.nn.Parameter(x.float().to(device)) for x in make_init(shapes)]
    opt = tvlars_fused.LARS(ps, backend="triton", **HYPER)
    for step in range(10):
        for i, p in enumerate(ps):
            p.grad = grads_for_step([p.shape], step + 10 * i)[0].to(p)
        if step == 3:
            ps[0].data = ps[0].data.clone()
        if step == 5:
            opt.param_groups[0]["nesterov"] = True
        if step == 6:
            for p in ps:
                p.grad.mul_(4.0)
            opt.grad_scale, opt.found_inf = torch.full((1,), 4.0, device=device), torch.zeros(1, device=device)
        if step == 8:   # (as triton.knobs.runtime.debug = True would)
            monkeypatch.setattr(triton_backend, "_compile_knobs", lambda: (True, None))
        opt.step()
        opt.grad_scale = opt.found_inf = None
    return [p.detach().clone() for p in ps], opt


@needs_interpreter
def test_bound_launch_dispatch_rebinds_after_a_move_and_a_key_change(monkeypatch):
    """bucket_step's use of _Bound, on the CPU: the interpreter compiles nothing, so here a binding
    replays the JIT launch with the arguments of the step it was bound at (as the integers of a
    real binding would). A binding is made at the first step, after a parameter moved, after the
    variant changed and after a Triton knob that picks the compiled kernel changed, never for an
    AMP step, and used at every other step: the bits equal steps through the JIT only (a stale
    binding would step the old memory)."""
    monkeypatch.setattr(triton_backend, "_bindable", lambda b, gs, fi: gs is None and fi is None)
    made, used = [], []

    def replay_bind(self, launches, compiled, grid, key):
        self.key = key

        def replay(kernel, args, kw):   # (detached: the memory each tensor has now, as an address)
            args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            return lambda *values: used.append(kernel) or kernel[grid](*args, **kw)
        self.runs = tuple((replay(*launch), ()) for launch in launches)
        made.append(key)
    monkeypatch.setattr(triton_backend._Bound, "bind", replay_bind)

    def run_with(bind_launches):
        return _bound_scenario(monkeypatch, "cpu", bind_launches, SHAPES[:4])[0]

    jit = run_with(False)
    assert made == [] and used == []
    bound = run_with(True)
    # bound at steps 0, 3 (moved), 5 (Nesterov), 8 (a knob); used at steps 1, 2, 4, 7 and 9
    assert len(made) == 4 and made[0] == made[1] != made[2] != made[3], made
    assert len(used) == 2 * 5
    for a, b in zip(jit, bound):
        assert torch.equal(a, b)


@requires_cuda
def test_bound_launches_same_bits_as_the_jit(monkeypatch):
    """Steps through the bound launches give the bits of steps through Triton's JIT, across what
    invalidates a binding (_bound_scenario: the base parameter moved, a new variant, an AMP step,
    a Triton knob)."""
    counter = LaunchCounter(monkeypatch)

    def run_with(bind_launches):
        return _bound_scenario(monkeypatch, "cuda", bind_launches, SHAPES)

    counter.reset()
    jit, _ = run_with(False)
    assert counter.counts == {"_norms_kernel": 10, "_update_kernel": 10}
    counter.reset()
    bound, opt = run_with(True)
    assert counter.counts == {"_norms_kernel": 10, "_update_kernel": 10}
    for a, b in zip(jit, bound):
        assert torch.equal(a, b)
    plan = opt._buckets[0].view.plan("triton-bound", None)
    assert plan.runs and plan.key[0] == opt._buckets[0].variant, "the last steps went through the bound launches"


# -- no host sync ---------------------------------------------------------------------------------

def _loss(ps):
    return sum((p.float() * p.float()).sum() for p in ps)


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_sync(device, monkeypatch):
    """step() never reads a device value on the host: Tensor.item/__bool__/tolist/cpu/... raise
    (from the very first step, AMP tensors included); on CUDA, sync debug mode "error" too."""
    init = make_init(SHAPES[:5])
    ps = [torch.nn.Parameter(x.float().to(device)) for x in init]
    opt = tvlars_fused.TVLARS(ps, backend="triton", **HYPER, **TV_ONLY)
    opt.grad_scale = torch.full((1,), 8.0, device=device)
    opt.found_inf = torch.zeros(1, device=device)

    def boom(*a, **k):
        raise AssertionError("host sync in step()")
    for _ in range(3):
        opt.zero_grad()
        _loss(ps).backward()
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "tolist", "cpu", "__float__", "__int__", "numpy"):
                m.setattr(torch.Tensor, name, boom)
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    assert float(opt.step_count) == 3


# -- AMP: found_inf / grad_scale -------------------------------------------------------------------

def _snapshot(opt):
    b = opt._buckets[0]
    return [weights_flat(b), b.state_buf.clone(), b.stats.clone(), b.step.clone(), opt.step_count.clone()]


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_step_bit_for_bit(device):
    init = make_init(SHAPES[:6])
    ps = [torch.nn.Parameter(x.float().to(device)) for x in init]
    twin = [torch.nn.Parameter(x.float().to(device)) for x in init]
    make = make_groups(tvlars_fused.TVLARS, True, "triton")
    opt, opt2 = make(ps), make(twin)
    for s in range(3):
        for o, pp in ((opt, ps), (opt2, twin)):
            o.zero_grad()
            _loss(pp).backward()
            o.step()
    before = _snapshot(opt)
    opt.found_inf = torch.ones(1, device=device)
    opt.grad_scale = torch.full((1,), 2.0, device=device)
    opt.zero_grad()
    (3 * _loss(ps)).backward()
    opt.step()
    after = _snapshot(opt)
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    # found_inf = 0 is a normal step: the same bits as the twin that never saw AMP tensors
    opt.found_inf = torch.zeros(1, device=device)
    opt.grad_scale = None
    for o, pp in ((opt, ps), (opt2, twin)):
        o.zero_grad()
        _loss(pp).backward()
        o.step()
    for x, y in zip(_snapshot(opt), _snapshot(opt2)):
        assert torch.equal(x, y)
    assert float(opt.step_count) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_unscales(device):
    """Grads multiplied by S with grad_scale = S: the same bits as plain grads for a power of two
    (GradScaler's scales); for S = 3 within the float32 parity rule."""
    shapes = SHAPES[:6]
    init = make_init(shapes)

    def with_scale(S):
        def make(ps):
            opt = make_groups(tvlars_fused.TVLARS, True, "triton")(ps)
            opt.grad_scale = torch.full((1,), S, device=device)
            return opt
        return make
    n = 3
    plain = train(make_groups(tvlars_fused.TVLARS, True, "triton"), init, torch.float32, n, device=device)[0]
    scaled = train(with_scale(1024.0), init, torch.float32, n, device=device, grad_scale=1024.0)[0]
    for x, y in zip(plain, scaled):
        assert torch.equal(x, y)
    three = train(with_scale(3.0), init, torch.float32, n, device=device, grad_scale=3.0)[0]
    r32 = train(make_groups(reference.TVLARS, True), init, torch.float32, n)[0]
    r64 = train(make_groups(reference.TVLARS, True), init, torch.float64, n)[0]
    assert_parity_fp32(three, r32, r64, "grad_scale=3")
    assert max_err(three, plain) > 0   # the scale was applied (not a no-op)...
    assert max_err(three, plain) < 1e-5   # ...and removed


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_skips_inf(device):
    """torch.amp.GradScaler drives the fused protocol: a step with an inf gradient changes
    nothing, the others match a plain run."""
    init = make_init(SHAPES[:4])
    ps = [torch.nn.Parameter(x.float().to(device)) for x in init]
    opt = tvlars_fused.TVLARS(ps, backend="triton", **HYPER, **TV_ONLY)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8)
    opt.zero_grad()
    scaler.scale(_loss(ps)).backward()
    scaler.step(opt)
    scaler.update()
    before = _snapshot(opt)
    opt.zero_grad()
    scaler.scale(_loss(ps)).backward()
    ps[1].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for x, y in zip(before, _snapshot(opt)):
        assert torch.equal(x, y)
    assert float(opt.step_count) == 1 and scaler.get_scale() == 2.0 ** 7


# -- ahead-of-time compile for sm_80 / sm_90 ---------------------------------------------------------

AOT_SCRIPT = textwrap.dedent(r"""
    import json, os, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    import inspect
    import triton.backends.nvidia.compiler as nvidia_compiler
    from tvlars_fused import abi
    from tvlars_fused.kernels import triton_backend as T

    REG_ALLOC = ["--regAllocOptLevel=2"] if "regAllocOptLevel" in inspect.getsource(nvidia_compiler) else []

    PTR = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "f64": "fp64"}
    TABLES = {"chunk_tab": "i64", "seg_tab": "i64", "seg_active": "i32", "counters": "i32", "w_offsets": "i64",
              "step_ptr": "fp32", "scale_ptr": "fp32", "inf_ptr": "fp32", "group_tab": "fp64"}
    INTS = {"num_segs": "i32", "state_stride": "i64"}
    ALGOS = {"lars": abi.ALGO_LARS, "lamb": abi.ALGO_LAMB}
    # each algorithm's variant (V0, V1, V2: Algorithm.variant): the common case, and the one with
    # the most code (LARS: heavy ball / every momentum form with Nesterov and dampening; LAMB: moment
    # bias correction / plus l2 and decoupled weight decay)
    VARIANTS = {("lars", False): (0, False, False), ("lars", True): (-1, True, True),
                ("lamb", False): (False, False, True), ("lamb", True): (True, True, True)}

    def compile_one(kernel, algo, dtype, arch, amp, mixed):
        acc = "fp64" if dtype == "f64" else "fp32"
        types = dict(TABLES, w_ptr=PTR[dtype], g_ptr=PTR[dtype], s_ptr=acc, partials=acc, stats=acc)
        sig = {n: "constexpr" if n.isupper() else INTS[n] if n in INTS else "*" + types[n]
               for n in kernel.arg_names}
        block, warps = T.block_and_warps(T.BACKEND.CHUNK_ELEMS, torch.float64 if dtype == "f64" else torch.float32,
                                         ALGOS[algo])
        v0, v1, v2 = VARIANTS[(algo, mixed)]
        # the common case: parameters 16-element aligned; one ends inside a 16-element block
        consts = dict(ALGO=ALGOS[algo], CHUNK=T.BACKEND.CHUNK_ELEMS, BLOCK=block, HAS_CHUNKS=True, HAS_SCALE=amp,
                      HAS_INF=amp, W_ALIGNED=True, HAS_TAIL=True, V0=v0, V1=v1, V2=v2)
        if "TILE" in sig:
            consts["TILE"] = T.BACKEND.REDUCE_TILE
            consts["LOG2_TILE"] = T.BACKEND.REDUCE_TILE.bit_length() - 1
            consts["HAS_EMPTY"] = False   # the common case: no zero-size parameter in the bucket
        if "BF16" in sig:
            consts["BF16"] = dtype == "bf16"
        # every pointer is 16-byte aligned and the state's row stride (numel) a multiple of 16: what
        # the JIT specialises on for these arguments
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if sig[n][0] == "*" or n == "state_stride"}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=warps, enable_fp_fusion=False))
        ptx = c.asm["ptx"]
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "k.ptx")
            with open(f, "w") as fh:
                fh.write(ptx)
            # the same ptxas and flags this triton uses, with -v for the resource usage (triton >= 3.7
            # adds --regAllocOptLevel=2 for ptxas 13; the GPU machine's 3.6 does not)
            out = subprocess.run([get_ptxas(arch).path, "-v", "--fmad=false", *REG_ALLOC,
                                  f"--gpu-name={sm_arch_from_capability(arch)}", f, "-o",
                                  os.path.join(d, "k.cubin")], capture_output=True, text=True)
        log = out.stdout + out.stderr
        regs = re.search(r"Used (\d+) registers", log)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        return dict(kernel=kernel.__name__, algo=algo, dtype=dtype, arch=arch, amp=amp, mixed=mixed, warps=warps,
                    regs=int(regs.group(1)) if regs else None,
                    spill_stores=int(spill.group(1)) if spill else None,
                    spill_loads=int(spill.group(2)) if spill else None,
                    ld_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)),
                    ld_v2_b64=len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.b64", ptx)),
                    st_v4=len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)),
                    st_v2_b64=len(re.findall(r"st\.global(?:\.\w+)*\.v2\.b64", ptx)),
                    ld_v2_b32=len(re.findall(r"ld\.global(?:\.\w+)*\.v2\.b32", ptx)),
                    div_approx=len(re.findall(r"div\.(?:full|approx)\.", ptx)),
                    div_rn=len(re.findall(r"div\.rn\.", ptx)), ptxas_rc=out.returncode,
                    ptxas_log=log if out.returncode else "")

    algos, dtypes, archs, amps, mixes = json.loads(sys.argv[1])
    for arch in archs:
        for algo in algos:
            for dtype in dtypes:
                for amp in amps:
                    for mixed in mixes:
                        for kernel in T.KERNELS:
                            print("AOT " + json.dumps(compile_one(kernel, algo, dtype, arch, amp, mixed)), flush=True)
""")

# 128-bit accesses each kernel makes at least (float64: ld/st.v2.b64; others: v4.b32): pass 1 reads
# w and g (LAMB also reads and writes m and v), pass 2 reads w, g and the state and writes w and the
# state (LAMB: reads w, m, v and writes w). LAMB works 4 elements per thread (block_and_warps): its
# bfloat16/float16 w and g move 64 bits at a time (ld.v2.b32), its float32 moments 128.
MIN_VECTOR_ACCESSES = {("_norms_kernel", "lars"): (2, 0), ("_norms_kernel", "lamb"): (4, 2),
                       ("_update_kernel", "lars"): (3, 2), ("_update_kernel", "lamb"): (3, 1)}
HALF_WIDTH_WEIGHTS = {("_norms_kernel", "lamb"): 2, ("_update_kernel", "lamb"): 1}   # w, g / w


def _aot(algos, dtypes, archs, amps, mixes=(False,)):
    """mixes: False compiles each algorithm's common variant, True the one with the most code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps([algos, dtypes, archs, amps, list(mixes)])],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("AOT ")]
    assert len(rows) == len(algos) * len(dtypes) * len(archs) * len(amps) * len(mixes) * len(triton_backend.KERNELS)
    print()
    for r in rows:
        print(f"sm_{r['arch']} {r['kernel']:<15} {r['algo']} {r['dtype']:<4} amp={int(r['amp'])} mixed={int(r['mixed'])} "
              f"warps={r['warps']}: {r['regs']} registers, spill stores {r['spill_stores']} B, spill loads "
              f"{r['spill_loads']} B, ld.global.v4 x{r['ld_v4']}, ld.global.v2.b64 x{r['ld_v2_b64']}, "
              f"st.global.v4 x{r['st_v4']}, st.global.v2.b64 x{r['st_v2_b64']}, div.rn x{r['div_rn']}, "
              f"approximate div x{r['div_approx']}")
    for r in rows:
        assert r["ptxas_rc"] == 0, r["ptxas_log"]
        assert r["regs"] is not None and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["div_approx"] == 0, r   # every division IEEE round-to-nearest (phi, q, 1/scale, LAMB's r)
        key = (r["kernel"], r["algo"])
        loads, stores = MIN_VECTOR_ACCESSES[key]
        if r["dtype"] == "f64":
            assert r["ld_v2_b64"] >= loads and r["st_v2_b64"] >= stores, r
        elif r["dtype"] in ("bf16", "f16") and key in HALF_WIDTH_WEIGHTS:
            narrow = HALF_WIDTH_WEIGHTS[key]
            assert r["ld_v2_b32"] >= narrow and r["ld_v4"] >= loads - narrow, r
        else:
            assert r["ld_v4"] >= loads and r["st_v4"] >= stores, r
    return rows


def test_aot_compile_sm80_sm90():
    """Both kernels of both algorithms compile for sm_80 and sm_90 (float32 and bfloat16
    parameters, AMP on; each algorithm's common variant and the one with the most code) with no
    spills and 128-bit vector accesses; no GPU needed (triton's own ptxas)."""
    _aot(["lars", "lamb"], ["f32", "bf16"], [90, 80], [True], [False, True])


@pytest.mark.slow
def test_aot_compile_all_variants():
    _aot(["lars", "lamb"], ["f32", "bf16", "f16", "f64"], [90, 80], [True, False], [False, True])


# -- GPU-only failure modes, checked wherever the kernels run ------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_segment_counters_heal(device, monkeypatch):
    """A segment counter left non-zero (a launch interrupted, two streams stepping one optimizer)
    costs that segment at most one step's stats: pass 2 zeroes the counters again, so the next step
    reduces every segment (stats = the norms of the weights it saw)."""
    monkeypatch.setattr(TRITON, "CHUNK_ELEMS", 64)
    shapes = [(300,), (5, 7), (130,)]
    ps = [torch.nn.Parameter(x.float().to(device)) for x in make_init(shapes)]
    opt = tvlars_fused.LARS(ps, backend="triton", **HYPER)
    b = opt._buckets[0]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    b.counters[0] = 3          # as if an earlier launch of segment 0 had been cut short
    opt.step()
    assert int(b.counters.abs().sum()) == 0, "pass 2 puts every counter back to zero"
    w = [p.detach().double().cpu().clone() for p in ps]
    opt.step()
    for p, w0 in zip(ps, w):
        assert float(opt.layer_stats()[p][0]) == pytest.approx(float(w0.norm()), rel=1e-6)


def test_launch_guard_picks_the_bucket_device(monkeypatch):
    """Triton launches on the current CUDA device: a bucket on another GPU gets a device guard;
    the current device and CPU (interpreter) buckets get none."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or "guard")
    assert triton_backend._on_device(torch.device("cuda", 1)) == "guard" and seen == [torch.device("cuda", 1)]
    assert triton_backend._on_device(torch.device("cuda", 0)) is triton_backend._NO_GUARD
    assert triton_backend._on_device(torch.device("cpu")) is triton_backend._NO_GUARD


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_bucket_on_the_second_gpu_while_the_first_is_current():
    """Parameters on cuda:1 stepped while cuda:0 is current: the kernels run on cuda:1 (without the
    guard Triton raises "Pointer argument cannot be accessed" or runs unordered on GPU 0)."""
    init = make_init(SHAPES[:4])
    with torch.cuda.device(0):
        ps, _ = train(lambda p: tvlars_fused.TVLARS(p, backend="triton", **HYPER), init, torch.float64, 3,
                      device="cuda:1")
    ref, _ = train(lambda p: reference.TVLARS(p, **HYPER), init, torch.float64, 3)
    assert max_err(ps, ref) < 1e-12
