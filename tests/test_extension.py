"""backend="cpu" / backend="cuda": the C++/CUDA extension tvlars_fused._C (csrc/).

Parity with the eager reference (float64, float32 by the 2x rule, bfloat16/float16 in ulps of the
reference run in the same dtype) and with backend="torch"; bit-for-bit independence of the thread
count; AMP (found_inf skips bit for bit, grad_scale unscales); many segments; empty buckets; the op
under torch.compile(fullgraph=True) and torch.library.opcheck; input checks. The CUDA tests run
whenever a GPU and a CUDA build of the extension are present. Skipped as a whole when the extension
is not built (pip install --no-build-isolation -e .).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_extension.py
    PYTHONPATH=. .venv/bin/python tests/test_extension.py --bench    # the CPU step benchmark
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

_C = pytest.importorskip(
    "tvlars_fused._C",
    reason="the C++ extension tvlars_fused._C is not built (pip install --no-build-isolation -e .)")

import tvlars_fused  # noqa: E402
from tvlars_fused import reference  # noqa: E402
from tvlars_fused import abi  # noqa: E402
from tvlars_fused.abi import STAT_SCALE, STAT_TRUST_RATIO, STAT_UPDATE_NORM, STAT_WEIGHT_NORM  # noqa: E402
from tvlars_fused.kernels import extension as ext  # noqa: E402
from tvlars_fused.kernels import resolve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import requires_cuda  # noqa: E402
from parity import init_with_zero, used, weights_flat  # noqa: E402
from parity import (SHAPES, assert_parity_fp32, make_init, max_err,  # noqa: E402
                    train)

OP = torch.ops.tvlars_fused.bucket_step.default
LARS, LAMB = abi.ALGO_LARS, abi.ALGO_LAMB
HYPER = dict(lr=0.7, momentum=0.9, weight_decay=1e-3, eta=2e-3, norm_clip=50.0)
TV_ONLY = dict(lmbda=0.05, delay_steps=3)
FORMS = ["heavy_ball", "paper"]

# SHAPES (multi-chunk, odd sizes), a zero-initialised weight (wn == 0 -> q == 1), a zero-size
# parameter, a 1-D one for the filters of group 1, and one segment above the CPU kernel's "small
# segment" size (the batched path).
SH = SHAPES + [(6, 8), (0,), (777,), (300, 700)]
ZERO = len(SHAPES)
BIG = len(SH) - 1

needs_cuda_ext = pytest.mark.skipif(not ext.WITH_CUDA,
                                    reason="tvlars_fused._C was built without its CUDA kernels")
CUDA = [pytest.param("cuda", marks=[requires_cuda, needs_cuda_ext])]
DEVICES = ["cpu"] + CUDA


def backend_for(device):
    return "cpu" if device == "cpu" else "cuda"


def init_params(shapes=SH, zero=ZERO):
    return init_with_zero(shapes, zero)


def groups_of(cls, form, tvlars=True, both=False, **kw):
    """Two param groups with different lr / weight decay / momentum form; the second one filters
    1-D parameters (weight decay and adaptation); group 0 takes `form`, group 1 the other one
    (the same one with both=True)."""
    other = form if both else ("paper" if form == "heavy_ball" else "heavy_ball")
    extra = dict(TV_ONLY) if tvlars else {}

    def make(ps):
        return cls([{"params": ps[:5], "momentum_form": form},
                    {"params": ps[5:], "momentum_form": other, "lr": 0.3, "weight_decay": 5e-3,
                     "weight_decay_filter": True, "lars_adaptation_filter": True, "norm_clip": None}],
                   **HYPER, **extra, **kw)
    return make


def run(kind, dtype, steps, form="heavy_ball", tvlars=True, device="cpu", backend=None, init=None,
        shapes=SH, both=False, **kw):
    name = "TVLARS" if tvlars else "LARS"
    cls = getattr(reference, name) if kind == "ref" else getattr(tvlars_fused, name)
    if kind != "ref":
        kw["backend"] = backend or backend_for(device)
    init = init_params(shapes) if init is None else init
    params, opt = train(groups_of(cls, form, tvlars, both, **kw), init, dtype, steps,
                        device="cpu" if kind == "ref" else device, used=used)
    return params, opt


def states(opt, params):
    out = []
    for p in params:
        st = opt.state.get(p, {})
        out.append(st.get("momentum_buffer", st.get("m", torch.zeros(0))))
    return out


# -- the backend objects ------------------------------------------------------------------------

def test_backend_objects():
    cpu, cuda = ext.CPU_BACKEND, ext.CUDA_BACKEND
    assert cpu.NAME == "cpu" and cuda.NAME == "cuda"
    for b in (cpu, cuda):
        assert b.CHUNK_ELEMS % 16 == 0 and isinstance(b.requirement, str) and callable(b.bucket_step)
    assert cpu.available(torch.device("cpu")) and not cpu.available(torch.device("meta"))
    assert not cuda.available(torch.device("cpu"))
    assert cuda.available(torch.device("cuda")) == ext.WITH_CUDA
    assert resolve("cpu", torch.device("cpu")) is cpu
    assert resolve("auto", torch.device("cpu")) is cpu    # auto prefers the extension on CPU
    if not ext.WITH_CUDA:
        with pytest.raises(RuntimeError, match="cannot run parameters on cuda"):
            resolve("cuda", torch.device("cuda"))
    assert _C.WITH_CUDA in (0, 1)


def test_package_works_without_the_extension():
    """With tvlars_fused._C missing (simulated in a fresh interpreter), the package imports, auto
    picks the torch backend, and backend='cpu' says why it cannot run."""
    code = textwrap.dedent("""
        import sys
        sys.modules["tvlars_fused._C"] = None        # import tvlars_fused._C -> ImportError
        import torch, tvlars_fused
        from tvlars_fused.kernels import resolve
        assert resolve("auto", torch.device("cpu")).NAME == "torch"
        try:
            resolve("cpu", torch.device("cpu"))
        except RuntimeError as e:
            assert "tvlars_fused._C is not built" in str(e), e
        else:
            raise AssertionError("backend='cpu' must be refused")
        p = torch.nn.Parameter(torch.ones(4))
        opt = tvlars_fused.TVLARS([p], lr=0.1)
        p.grad = torch.ones(4)
        opt.step()
        assert opt.backends == ["torch"] and not torch.equal(p, torch.ones(4))
        print("ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


# -- parity with the reference ------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tvlars", [True, False], ids=["tvlars", "lars"])
@pytest.mark.parametrize("form", FORMS)
def test_parity_fp64(device, form, tvlars):
    f64, opt = run("fused", torch.float64, 10, form, tvlars, device)
    r64, opt_r = run("ref", torch.float64, 10, form, tvlars)
    scale = max(float(x.detach().abs().max()) for x in r64 if x.numel())
    err = max_err(f64, r64)
    # a few float64 roundings per step (the reference's FMA-free order differs from ATen's in
    # places): far below anything a float32 accumulation or a wrong formula would give (>1e-7)
    assert err <= 64 * torch.finfo(torch.float64).eps * scale, err
    assert max_err(states(opt, f64), states(opt_r, r64)) <= 64 * torch.finfo(torch.float64).eps * scale
    assert max_err(f64, init_params()) > 1e-3   # it moved
    assert float(opt.step_count) == 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tvlars", [True, False], ids=["tvlars", "lars"])
@pytest.mark.parametrize("form", FORMS)
def test_parity_fp32(device, form, tvlars):
    r64, _ = run("ref", torch.float64, 12, form, tvlars)
    r32, _ = run("ref", torch.float32, 12, form, tvlars)
    f32, opt = run("fused", torch.float32, 12, form, tvlars, device)
    assert opt.backends == [backend_for(device)]
    e_fused, e_ref = assert_parity_fp32(f32, r32, r64, f"{device} {form}")
    # the zero-size and the never-updated padding stay exactly as they were
    b = opt._buckets[0]
    seg = b.seg_table.cpu()
    for i in range(len(SH)):
        off, end, numel = (int(v) for v in seg[i, :3])
        assert not b.grad_buf[off + numel:end].any() and not b.state_buf[:, off + numel:end].any()


def _ulps_and_fraction(actual, expected, dtype, scale):
    """Worst |a - e| in ulps (in dtype) of max(|e|, |scale|), and the fraction of elements that
    differ. The floor `scale` (the weights before the step, or at the start) is the magnitude the
    float32 arithmetic works at: where w - lr*u cancels to almost 0, an ulp of the tiny result says
    nothing about the rounding of the operands (both runs are equally far from the exact value)."""
    worst, differ, total = 0.0, 0, 0
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for a, e, m in zip(actual, expected, scale):
        if not e.numel():
            continue
        a64, e64 = a.detach().double().cpu(), e.detach().double().cpu()
        ulp = torch.clamp(torch.maximum(e64.abs(), m.detach().double().cpu().abs()) * eps, min=tiny)
        worst = max(worst, float(((a64 - e64).abs() / ulp).max()))
        differ += int((a64 != e64).sum())
        total += e.numel()
    return worst, differ / total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("form", FORMS)
def test_low_precision_lockstep(device, dtype, form):
    """Each step from the same bfloat16/float16 weights and float32 state as the reference: w
    within 1 ulp (of max(|w|, |w before the step|), see _ulps_and_fraction). Both round float32
    values to nearest even; they differ where ATen's fused multiply-add in the reference's
    w.sub(x, alpha=lr) versus the kernel's separate multiply and add, or the norms' summation
    order, put the float32 value on the other side of a rounding boundary. Such flips must be rare
    (a truncating rounding would change about half of the weights). The float32 state within a
    few float32 roundings."""
    init = init_params()
    mk_f = groups_of(tvlars_fused.TVLARS, form, both=True, backend=backend_for(device))
    mk_r = groups_of(reference.TVLARS, form, both=True)
    pf = [torch.nn.Parameter(x.clone().to(device=device, dtype=dtype)) for x in init]
    pr = [torch.nn.Parameter(x.clone().to(dtype=dtype)) for x in init]
    of, orf = mk_f(pf), mk_r(pr)
    from parity import grads_for_step
    shapes = [tuple(x.shape) for x in init]
    worst_all, frac_all = 0.0, 0.0
    for s in range(12):
        cs = grads_for_step(shapes, s)
        before = [p.detach().clone() for p in pr]
        for opt, ps in ((of, pf), (orf, pr)):
            opt.zero_grad()
            for i, (p, c) in enumerate(zip(ps, cs)):
                if used(s, i):
                    p.grad = c.to(device=p.device, dtype=dtype)
            opt.step()
        worst, frac = _ulps_and_fraction(pf, pr, dtype, before)
        assert worst <= 1.0, f"step {s}: {worst:.2f} ulps"
        assert frac <= 1e-3, f"step {s}: {frac:.2e} of the weights differ"
        sf, sr = states(of, pf), states(orf, pr)
        scale = max(float(x.abs().max()) for x in sr if x.numel())
        assert max_err(sf, sr) <= 8 * torch.finfo(torch.float32).eps * scale, f"step {s}: state"
        worst_all, frac_all = max(worst, worst_all), max(frac, frac_all)
        with torch.no_grad():   # continue both from the reference's values
            for a, b in zip(pf, pr):
                a.copy_(b)
            for a, b in zip(sf, sr):
                a.copy_(b)
    print(f"\n{device} {dtype} {form}: worst {worst_all:.2f} ulps, at most {frac_all:.1e} of the weights differ")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("form", FORMS)
def test_parity_low_precision(device, dtype, form):
    """30 free-running steps against the reference run in the same dtype.

    The lockstep test above bounds one step to 1 ulp with rare flips. Over many steps a flip does
    not feed back in the heavy-ball form (bound 2 ulps), but in the paper form
    w_{t+1} = (1+mu) mn_t - mu mn_{t-1} carries it on: a 1-ulp difference in w settles at
    1/(1-mu) ulps (10 for mu = 0.9). Bound: three such flips on one weight, and still rare."""
    steps = 30
    tri, opt = run("fused", dtype, steps, form, True, device, both=True)
    ref, opt_r = run("ref", dtype, steps, form, True, both=True)
    mu = HYPER["momentum"]
    bound = 2.0 if form == "heavy_ball" else 3.0 / (1.0 - mu)
    worst, frac = _ulps_and_fraction(tri, ref, dtype, [x.to(dtype) for x in init_params()])
    assert worst <= bound, f"{device} {dtype} {form}: {worst:.2f} ulps > {bound}"
    assert frac <= 2e-3, f"{frac:.2e} of the weights differ"
    assert opt._buckets[0].state_buf.dtype == torch.float32
    s_f, s_r = states(opt, tri), states(opt_r, ref)
    if form == "heavy_ball":   # float32 buffers; w enters only through weight_decay * w
        scale = max(float(s.abs().max()) for s in s_r if s.numel())
        assert max_err(s_f, s_r) <= 1e-6 * scale
    else:                      # m = the previous mn, a float32 copy of w's trajectory: same bound
        worst_m, _ = _ulps_and_fraction(s_f, s_r, dtype, [x.to(dtype) for x in init_params()])
        assert worst_m <= bound, f"state m: {worst_m:.2f} ulps > {bound}"
    assert max_err(tri, [x.to(dtype) for x in init_params()]) > 0
    print(f"\n{device} {dtype} {form}: worst {worst:.2f} ulps (bound {bound:g}), {frac:.1e} differ")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_every_bit_pattern(device, dtype):
    """w = 0 - 1 * (g / 3) for every 16-bit pattern g (normals, subnormals, zeros, infinities,
    NaNs): the kernel's float32 -> bfloat16/float16 store must equal torch's conversion (round
    to nearest even) bit for bit; NaN stays NaN."""
    g = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    p = torch.nn.Parameter(torch.zeros(g.numel(), dtype=dtype, device=device))
    opt = tvlars_fused.LARS([p], lr=1.0, momentum=0.0, weight_decay=0.0, weight_decay_filter=True,
                            lars_adaptation_filter=True, backend=backend_for(device))  # 1-D: q = 1
    p.grad = g.to(device)
    opt.grad_scale = torch.full((1,), 3.0, device=device)
    opt.step()
    expected = (0.0 - 1.0 * (g.float() / 3.0)).to(dtype)
    got = p.detach().cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("form", FORMS)
def test_matches_torch_backend(dtype, form):
    """The same bucket step in plain torch ops: params, state and layer stats agree."""
    steps = 8
    f, opt = run("fused", dtype, steps, form, True, "cpu", "cpu", both=True)
    t, opt_t = run("fused", dtype, steps, form, True, "cpu", "torch", both=True)
    if dtype == torch.float64:
        assert max_err(f, t) < 1e-12
    elif dtype == torch.float32:
        assert max_err(f, t) < 1e-5
    else:   # as test_parity_low_precision: the two differ only in the norms' summation order
        bound = 2.0 if form == "heavy_ball" else 3.0 / (1.0 - HYPER["momentum"])
        worst, frac = _ulps_and_fraction(f, t, dtype, [x.to(dtype) for x in init_params()])
        assert worst <= bound and frac <= 2e-3, (worst, frac)
    st, st_t = opt.layer_stats(), opt_t.layer_stats()
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for p, pt in zip(f, t):
        a, b = st[p].double(), st_t[pt].double()
        assert torch.allclose(a, b, rtol=rel, atol=0), (p.shape, a, b)
    assert float(opt.step_count) == float(opt_t.step_count) == steps


def test_layer_stats_values():
    """stats = (wn, dn, q, phi) of the last step that updated each segment: check them by hand
    for one step of plain TVLARS."""
    init = init_params()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, eta=2e-3, lmbda=0.05, delay_steps=3)
    params, opt = train(lambda ps: tvlars_fused.TVLARS(ps, backend="cpu", **kw), init, torch.float64, 1)
    from parity import grads_for_step
    gs = grads_for_step([tuple(x.shape) for x in init], 0)
    phi0 = tvlars_fused.phi(0, 0.05, 3, 1.0, 0.0)
    st = opt.layer_stats()
    for p, w, g in zip(params, init, gs):
        d = g + 1e-2 * w
        wn, dn = float(w.norm()), float(d.norm())
        q = 2e-3 * phi0 * wn / dn if wn > 0 and dn > 0 else 1.0
        s = st[p]
        assert abs(float(s[STAT_WEIGHT_NORM]) - wn) <= 1e-12 * max(wn, 1)
        assert abs(float(s[STAT_UPDATE_NORM]) - dn) <= 1e-12 * max(dn, 1)
        assert abs(float(s[STAT_TRUST_RATIO]) - q) <= 1e-12 * q
        assert abs(float(s[STAT_SCALE]) - phi0) <= 1e-15
    assert float(st[params[ZERO]][STAT_TRUST_RATIO]) == 1.0   # wn == 0
    assert float(st[params[ZERO + 1]][STAT_TRUST_RATIO]) == 1.0   # zero-size: wn == dn == 0


# -- determinism ----------------------------------------------------------------------------------

def _snapshot(opt):
    b = opt._buckets[0]
    return [weights_flat(b), *(t.clone() for t in (b.state_buf, b.stats, b.step))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_thread_count_bit_for_bit(dtype):
    """1, 2 and 3 threads (3 > cores: uneven splits) give the same bits: chunk partials are a fixed
    function of the chunk, added in chunk order."""
    shapes = SH + [(1024, 1100), (257, 33, 3, 3)]   # large segments: the batched parallel path
    init = init_params(shapes)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _, opt = run("fused", dtype, 4, "paper", True, "cpu", "cpu", init=init, shapes=shapes)
            results.append(_snapshot(opt))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_dynamic_schedule_stress():
    """The CPU kernel runs the step in one parallel region: small segments claimed whole, large ones
    split into one part per thread with work stealing, pass 2 of a segment waiting for its pass 1.
    Many steps with 3 and 7 threads on 2 cores (preemption mid-step, so threads steal from each
    other) on a bucket of many large and small segments give exactly the 1-thread bits every step."""
    shapes = [(70_000,)] * 12 + [(1000,)] * 60 + [(1_500_000,)] + [(33, 4097)] * 3
    init = make_init(shapes, seed=5)
    old = torch.get_num_threads()
    snaps = {}
    try:
        for n in (1, 3, 7):
            torch.set_num_threads(n)
            _, opt = train(lambda ps: tvlars_fused.TVLARS(ps, backend="cpu", **HYPER, **TV_ONLY), init,
                           torch.float32, 2)
            b = opt._buckets[0]
            args = op_args(b)
            out = []
            for _ in range(15):
                OP(*args, None, None, b.chunk_elems, LARS)
                out.append(torch.cat([weights_flat(b), b.state_buf.flatten(), b.stats.flatten()]).clone())
            snaps[n] = out
    finally:
        torch.set_num_threads(old)
    for n in (3, 7):
        for a, b in zip(snaps[1], snaps[n]):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_instruction_sets_bit_for_bit(dtype, monkeypatch):
    """The CPU kernels are compiled for baseline x86-64, AVX2+F16C and AVX-512 and the best one
    the CPU has is used; TVLARS_FUSED_CPU_ISA caps it. Every copy gives the same bits (one lane
    layout, no FMA contraction; float16 via F16C or the exact integer conversion)."""
    init = init_params()
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        monkeypatch.setenv("TVLARS_FUSED_CPU_ISA", isa)
        _, opt = run("fused", dtype, 4, "paper", True, "cpu", "cpu", init=init)
        results[isa] = _snapshot(opt)
    for isa in ("avx2", "avx512"):
        for a, b in zip(results["baseline"], results[isa]):
            assert torch.equal(a, b), isa
    monkeypatch.setenv("TVLARS_FUSED_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="TVLARS_FUSED_CPU_ISA must be"):
        run("fused", dtype, 1, "paper", True, "cpu", "cpu", init=init)


def test_repeated_runs_bit_for_bit():
    a = _snapshot(run("fused", torch.float32, 5, "heavy_ball", True, "cpu")[1])
    b = _snapshot(run("fused", torch.float32, 5, "heavy_ball", True, "cpu")[1])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# -- AMP ------------------------------------------------------------------------------------------

def _amp_twins(device, dtype=torch.float32):
    init = init_params()
    mk = groups_of(tvlars_fused.TVLARS, "paper", backend=backend_for(device))
    p1, o1 = train(mk, init, dtype, 3, device=device, used=used)
    p2, o2 = train(mk, init, dtype, 3, device=device, used=used)
    return (p1, o1), (p2, o2)


def _full_snapshot(opt):
    b = opt._buckets[0]
    return [weights_flat(b), *(t.clone() for t in (b.state_buf, b.stats, b.step, b.counters))]


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_bit_for_bit(device):
    (p1, o1), (p2, o2) = _amp_twins(device)
    grads = [None if p.grad is None else p.grad.clone() for p in p1]
    for p in p1:     # new, finite gradients that would move everything
        if p.grad is not None:
            p.grad.add_(1.0)
    before = _full_snapshot(o1)
    o1.found_inf = torch.ones(1, device=device)
    o1.grad_scale = torch.full((1,), 2.0, device=device)
    o1.step()
    after = _full_snapshot(o1)
    for a, b in zip(before, after):
        assert torch.equal(a, b), "found_inf must leave params, state, stats and step untouched"
    # found_inf = 0 with no grad_scale is an ordinary step: the twin's bits
    o1.found_inf, o1.grad_scale = torch.zeros(1, device=device), None
    for p, g in zip(p1, grads):
        if g is not None:
            p.grad.copy_(g)
    o1.step()
    o2.step()
    for a, b in zip(_full_snapshot(o1), _full_snapshot(o2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_unscales(device):
    """A power-of-two scale divides exactly: the same bits as unscaled gradients. Any other
    scale: the same result as the torch backend, which divides the same way."""
    (p1, o1), (p2, o2) = _amp_twins(device)
    for p in p1:
        if p.grad is not None:
            p.grad.mul_(1024.0)
    o1.grad_scale = torch.full((1,), 1024.0, device=device)
    o1.step()
    o2.step()
    for a, b in zip(_full_snapshot(o1), _full_snapshot(o2)):
        assert torch.equal(a, b)

    init = init_params()
    scaled = {}
    for backend in (backend_for(device), "torch"):
        mk = groups_of(tvlars_fused.TVLARS, "heavy_ball", backend=backend)
        params = [torch.nn.Parameter(x.clone().to(device=device, dtype=torch.float32)) for x in init]
        opt = mk(params)
        for s in range(4):
            opt.zero_grad()
            for i, p in enumerate(params):
                if used(s, i):
                    p.grad = (3.0 * torch.randn(p.shape, generator=torch.Generator().manual_seed(s * 100 + i),
                                                dtype=torch.float64)).to(device=device, dtype=torch.float32)
            opt.grad_scale = torch.full((1,), 3.0, device=device)
            opt.step()
        scaled[backend] = params
    a, b = scaled.values()
    assert max_err(a, b) < 1e-5


def test_grad_scaler_integration():
    """torch.amp.GradScaler drives the fused protocol: an injected inf skips the step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = tvlars_fused.TVLARS(model.parameters(), lr=0.1, backend="cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(4, 5)
    scaler.scale(model(x).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert float(opt.step_count) == 1
    w = model.weight.detach().clone()
    opt.zero_grad()
    scaler.scale(model(x).square().sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert float(opt.step_count) == 1 and torch.equal(model.weight, w)
    assert scaler.get_scale() == 128.0


# -- bucket shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_many_segments(device):
    """500 parameters of assorted sizes (incl. zero-size ones) and 3 groups."""
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 300, (500,), generator=g).tolist()
    shapes = [(n,) if i % 3 else (n // 10 + 1, 10) for i, n in enumerate(sizes)]
    init = make_init(shapes, seed=4)

    def make(cls, **kw):
        return lambda ps: cls([{"params": ps[:200]}, {"params": ps[200:400], "lr": 0.2},
                               {"params": ps[400:], "momentum_form": "paper", "weight_decay_filter": True}],
                              **HYPER, **kw)

    def use(s, i):
        return (i + s) % 7 != 0

    r64, _ = train(make(reference.TVLARS), init, torch.float64, 5, used=use)
    r32, _ = train(make(reference.TVLARS), init, torch.float32, 5, used=use)
    f32, opt = train(make(tvlars_fused.TVLARS, backend=backend_for(device)), init, torch.float32, 5,
                     device=device, used=use)
    t32, _ = train(make(tvlars_fused.TVLARS, backend="torch"), init, torch.float32, 5, used=use)
    assert opt._buckets[0].num_segments == 500
    assert_parity_fp32(f32, r32, r64, "500 segments")
    assert max_err(f32, t32) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_empty_bucket_only_zero_size(device):
    """Only zero-size parameters: no chunks, a bucket of 0 elements. The step still counts, and
    each active segment's stats are (0, 0, 1, phi(t))."""
    params = [torch.nn.Parameter(torch.zeros(0, device=device)), torch.nn.Parameter(torch.zeros(0, 3, device=device))]
    opt = tvlars_fused.TVLARS(params, lr=0.1, lmbda=0.05, delay_steps=3, backend=backend_for(device))
    for s in range(3):
        opt.zero_grad()
        (params[0].sum() + params[1].sum()).backward()
        opt.step()
    b = opt._buckets[0]
    assert b.numel == 0 and b.num_chunks == 0
    assert float(opt.step_count) == 3
    phi2 = tvlars_fused.phi(2, 0.05, 3, 1.0, 0.0)
    for p in params:
        st = opt.layer_stats()[p].cpu()
        assert st[:3].tolist() == [0.0, 0.0, 1.0]
        assert abs(float(st[3]) - phi2) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_zero_size_and_regular(device):
    shapes = [(0,), (40,), (0, 5), (3, 4097), (0,)]
    init = make_init(shapes)
    kw = dict(HYPER, **TV_ONLY)
    r64, _ = train(lambda ps: reference.TVLARS(ps, **kw), init, torch.float64, 4)
    r32, _ = train(lambda ps: reference.TVLARS(ps, **kw), init, torch.float32, 4)
    f32, opt = train(lambda ps: tvlars_fused.TVLARS(ps, backend=backend_for(device), **kw), init,
                     torch.float32, 4, device=device)
    assert_parity_fp32(f32, r32, r64, "zero-size mix")
    st = opt.layer_stats()
    assert st[f32[0]][:3].tolist() == [0.0, 0.0, 1.0]


# -- the op itself: torch.compile, opcheck, input checks -----------------------------------------

def op_args(b):
    """The op's arguments over a bucket's own tensors (the grad_scale, found_inf and chunk_elems
    left out)."""
    return [list(b.weights), b.w_offsets, b.grad_buf, b.state_buf, b.seg_table, b.seg_active, b.chunk_table,
            b.group_table, b.step, b.partials, b.counters, b.stats]


def clone_args(args):
    return [[w.clone() for w in a] if isinstance(a, list) else a.clone() for a in args]


def flat_args(args):
    return [t for a in args for t in (a if isinstance(a, list) else [a])]


def _bucket_args(dtype=torch.float32, device="cpu", algorithm="TVLARS"):
    """A prepared bucket (2 groups, None grads, zero-size) and the op's arguments over clones of
    its tensors."""
    if algorithm == "LAMB":
        _, opt = train(lambda ps: tvlars_fused.LAMB(ps, lr=1e-2, backend="cpu"), init_params(), dtype, 2,
                       device=device)
    else:
        _, opt = run("fused", dtype, 2, "paper", True, device)
    b = opt._buckets[0]
    return clone_args(op_args(b)), b.chunk_elems


def test_compile_fullgraph_matches_eager():
    """The op traces without a graph break (fake-tensor kernel from the Meta registration;
    mutations functionalized) and the compiled call gives the eager bits."""
    torch._dynamo.reset()
    args, chunk = _bucket_args()
    scale = torch.full((1,), 2.0)

    def step(params, offsets, grads, state, seg, active, chunks, groups, t, partials, counters, stats, gs):
        torch.ops.tvlars_fused.bucket_step(params, offsets, grads.mul(gs), state, seg, active, chunks, groups, t,
                                           partials, counters, stats, gs, None, chunk, LARS)
        return stats[:, 2] * 2

    eager = clone_args(args)
    comp = clone_args(args)
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        le = step(*eager, scale)
        lc = compiled(*comp, scale)
        assert torch.equal(le, lc)
    for a, b in zip(flat_args(eager), flat_args(comp)):
        assert torch.equal(a, b)
    assert not torch.equal(eager[0][0], args[0][0]), "the step must have changed the parameters"
    assert float(comp[8]) == float(args[8]) + 2


def test_opcheck():
    args, chunk = _bucket_args()
    torch.library.opcheck(OP, (*args, torch.full((1,), 4.0), torch.zeros(1), chunk, LARS))
    args, chunk = _bucket_args(torch.bfloat16)
    torch.library.opcheck(OP, (*args, None, None, chunk, LARS))
    args, chunk = _bucket_args(algorithm="LAMB")
    torch.library.opcheck(OP, (*args, torch.full((1,), 4.0), torch.zeros(1), chunk, LAMB))


def test_meta_checks_shapes():
    args, chunk = _bucket_args()
    meta = [[w.to("meta") for w in a] if isinstance(a, list) else a.to("meta") for a in args]
    OP(*meta, None, None, chunk, LARS)   # shapes only: fine
    bad = list(meta)
    bad[3] = torch.empty(bad[3].numel(), dtype=torch.float64, device="meta")
    with pytest.raises(RuntimeError, match="state must be"):
        OP(*bad, None, None, chunk, LARS)
    bad = list(meta)
    bad[0] = bad[0][:-1]
    with pytest.raises(RuntimeError, match="params must list one tensor per segment"):
        OP(*bad, None, None, chunk, LARS)


def test_input_checks():
    args, chunk = _bucket_args()
    with pytest.raises(RuntimeError, match="chunk_elems must be a positive multiple of 16"):
        OP(*args, None, None, 1000, LARS)
    bad = clone_args(args)
    bad[2] = bad[2].double()
    with pytest.raises(RuntimeError, match="grads must be"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[0][1] = bad[0][1].double()
    with pytest.raises(RuntimeError, match=r"params\[1\] is Double"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[0][1] = torch.zeros(bad[0][1].numel() + 1)   # a parameter that does not match its segment
    with pytest.raises(RuntimeError, match=r"params\[1\] .* seg_table's numel"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[0][1] = torch.zeros(2 * bad[0][1].numel())[::2]   # not dense in memory
    with pytest.raises(RuntimeError, match=r"params\[1\] .* must be dense"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[4][1, 1] = bad[2].numel() + 16      # a segment end past the buffer
    with pytest.raises(RuntimeError, match="invalid range"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[4][1, :3] = bad[4][0, :3]           # segment 1 on top of segment 0 (threads would race)
    with pytest.raises(RuntimeError, match="inside the previous segment|seg_table's numel"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[6][3, 0] += 16                      # a chunk start that does not match its segment
    with pytest.raises(RuntimeError, match="chunk_table row 3"):
        OP(*bad, None, None, chunk, LARS)
    bad = clone_args(args)
    bad[4][0, 3] = 7                        # a group index past the group table
    with pytest.raises(RuntimeError, match="names group 7"):
        OP(*bad, None, None, chunk, LARS)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element float32"):
        OP(*args, torch.ones(1, dtype=torch.float64), None, chunk, LARS)
    with pytest.raises(RuntimeError, match="algorithm must be 0 .LARS. or 1 .LAMB., got 7"):
        OP(*args, None, None, chunk, 7)
    with pytest.raises(RuntimeError, match=r"state must have one row per state slot of the algorithm \(2\), got 1"):
        OP(*args, None, None, chunk, LAMB)      # a LARS bucket's one state row, run as LAMB
    bad = clone_args(args)
    bad[7] = bad[7].float()
    with pytest.raises(RuntimeError, match="group_table must be Double"):
        OP(*bad, None, None, chunk, LARS)
    # nothing was changed by the rejected calls (w_offsets: addresses, other in every build)
    ref_args, _ = _bucket_args()
    for a, b in zip(flat_args(args[:1] + args[2:]), flat_args(ref_args[:1] + ref_args[2:])):
        assert torch.equal(a, b)


# -- CUDA (whenever a GPU and the CUDA build are present) ----------------------------------------

@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_cuda_deterministic_and_close_to_cpu_kernel(device, dtype):
    """Two CUDA runs agree bit for bit (the last-block reduction runs in chunk order whatever
    block finishes last); the CUDA and CPU kernels share csrc/algo/*.h and differ only in the
    norms' summation order (bounds as in the tests against the reference)."""
    shapes = SH + [(1024, 1100)]
    init = init_params(shapes)
    pa, oa = run("fused", dtype, 6, "paper", True, device, init=init, shapes=shapes, both=True)
    pb, ob = run("fused", dtype, 6, "paper", True, device, init=init, shapes=shapes, both=True)
    for x, y in zip(_snapshot(oa), _snapshot(ob)):
        assert torch.equal(x, y)
    assert int(oa._buckets[0].counters.abs().sum()) == 0   # workspace back to zero
    pc, oc = run("fused", dtype, 6, "paper", True, "cpu", init=init, shapes=shapes, both=True)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        scale = max(float(x.detach().abs().max()) for x in pc if x.numel())
        assert max_err(pa, pc) <= tol * scale
    else:
        worst, frac = _ulps_and_fraction(pa, pc, dtype, [x.to(dtype) for x in init])
        assert worst <= 3.0 / (1.0 - HYPER["momentum"]) and frac <= 2e-3, (worst, frac)
    sa, sc = oa.layer_stats(), oc.layer_stats()
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for p, q in zip(pa, pc):
        assert torch.allclose(sa[p].cpu().double(), sc[q].double(), rtol=rel, atol=0)


@pytest.mark.parametrize("device", CUDA)
def test_cuda_no_host_sync(device):
    init = init_params()
    params = [torch.nn.Parameter(x.to(device=device, dtype=torch.float32)) for x in init]
    opt = groups_of(tvlars_fused.TVLARS, "heavy_ball", backend="cuda")(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()   # builds buckets, uploads tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.grad_scale = torch.full((1,), 2.0, device=device)
        opt.found_inf = torch.zeros(1, device=device)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.step_count) == 3
    assert int(opt._buckets[0].counters.abs().sum()) == 0   # workspace back to zero


# -- benchmark: python tests/test_extension.py --bench ------------------------------------------

def resnet50_shapes():
    """torchvision ResNet-50's 161 parameter tensors (25,557,032 parameters)."""
    def bn(c):
        return [(c,), (c,)]
    shapes = [(64, 3, 7, 7)] + bn(64)
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            shapes += [(planes, inplanes, 1, 1)] + bn(planes)
            shapes += [(planes, planes, 3, 3)] + bn(planes)
            shapes += [(planes * 4, planes, 1, 1)] + bn(planes * 4)
            if s != 1 or inplanes != planes * 4:
                shapes += [(planes * 4, inplanes, 1, 1)] + bn(planes * 4)
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def bench(steps=20, warmup=3, dtype=torch.float32, which=("sgd_foreach", "cpu", "torch", "reference")):
    """Median opt.step() time per optimizer over a ResNet-50-sized parameter set; the optimizers
    are timed in interleaved rounds so that background load hits all of them alike."""
    shapes = resnet50_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032
    kw = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    makers = {
        "sgd_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
        "cpu": lambda ps: tvlars_fused.TVLARS(ps, backend="cpu", **kw),
        "torch": lambda ps: tvlars_fused.TVLARS(ps, backend="torch", **kw),
        "reference": lambda ps: reference.TVLARS(ps, **kw),
    }
    opts = {}
    for name in which:
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opts[name] = makers[name](ps)
        for _ in range(warmup):
            opts[name].step()
    times = {name: [] for name in which}
    for _ in range(steps):
        for name in which:
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


if __name__ == "__main__":
    if "--bench" in sys.argv:
        threads = [int(a.split("=")[1]) for a in sys.argv if a.startswith("--threads=")]
        if threads:
            torch.set_num_threads(threads[0])
        res = bench()
        print(f"ResNet-50 parameter set (161 tensors, 25.6M float32), {torch.get_num_threads()} threads, "
              f"median of 20 steps:")
        for name, ms in res.items():
            print(f"  {name:12s} {ms:9.2f} ms   {ms / res['sgd_foreach']:5.2f}x SGD foreach")
    else:
        sys.exit(pytest.main([__file__, "-q"] + sys.argv[1:]))
