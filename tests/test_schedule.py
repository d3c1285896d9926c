"""phi(t), the TVLARS time-varying scale (docs/SPEC.md), checked against the textbook formula

    phi(t) = 1 / (alpha + exp(lmbda * (t - delay_steps))) + gamma_min

written out here with math.exp, never against values copied from the implementation."""
from __future__ import annotations

import math

import pytest
import torch

from tvlars_fused.schedule import phi

REL = 1e-14  # float64 agreement with the textbook formula for moderate arguments


def textbook(t, lmbda, delay, alpha, gamma_min):
    """The paper's formula, evaluated naively (only for moderate lmbda*(t-delay))."""
    return 1.0 / (alpha + math.exp(lmbda * (t - delay))) + gamma_min


def peak(lmbda, delay, alpha, gamma_min):
    """phi(0), the largest value: 1/(alpha + exp(-lmbda*delay)) + gamma_min."""
    return 1.0 / (alpha + math.exp(-lmbda * delay)) + gamma_min


# (lmbda, delay_steps, alpha, gamma_min) -- a spread of shapes of the curve
PARAM_SETS = [
    (1e-3, 0.0, 1.0, 0.0),      # the defaults
    (5e-3, 100.0, 1.0, 0.0),    # delayed decay
    (1e-2, 0.0, 0.5, 0.1),      # alpha < 1, floor at 0.1
    (0.05, 30.0, 2.0, 1e-3),
    (0.2, 10.0, 1.0, 0.25),     # fast decay, saturates at gamma_min within the range
    (1e-3, 0.0, 0.0, 0.0),      # alpha = 0: phi = exp(-lmbda*t)
    (0.0, 0.0, 1.0, 0.3),       # lmbda = 0: constant 1/(alpha+1) + gamma_min
    (0.01, -50.0, 1.0, 0.0),    # negative delay: already in the decaying branch at t = 0
]


# ---------------------------------------------------------------------------------------------
# values by hand


def test_exact_hand_values():
    # x = 0: 1/(alpha + 1) + gamma_min
    assert phi(0, 1e-3, 0, 1.0, 0.0) == 0.5
    assert phi(7, 0.3, 7, 3.0, 0.25) == 1.0 / 4.0 + 0.25
    # lmbda = 0: constant for every t
    for t in (0, 1, 10, 10_000):
        assert phi(t, 0.0, 0, 1.0, 0.0) == 0.5
    # exp(ln 2 * 1) = 2  ->  1/(1 + 2) = 1/3 ;  exp(ln 2 * -1) = 1/2  ->  1/(1 + 1/2) = 2/3
    assert phi(1, math.log(2.0), 0, 1.0, 0.0) == pytest.approx(1.0 / 3.0, rel=REL)
    assert phi(0, math.log(2.0), 1, 1.0, 0.0) == pytest.approx(2.0 / 3.0, rel=REL)
    # exp(ln 3 * 2) = 9  ->  1/(1 + 9) + 0.5 = 0.6
    assert phi(12, math.log(3.0), 10, 1.0, 0.5) == pytest.approx(0.6, rel=REL)
    # alpha = 0.5, exp(ln 4 * (-1)) = 1/4  ->  1/(0.5 + 0.25) = 4/3
    assert phi(2, math.log(4.0), 3, 0.5, 0.0) == pytest.approx(4.0 / 3.0, rel=REL)


# moderate arguments only (|lmbda*(t - delay)| <= 50), where the naive formula is accurate
MODERATE_CASES = [(t,) + ps for ps in PARAM_SETS for t in (0, 1, 2, 5, 17, 100, 250, 1000, 4321)
                  if abs(ps[0] * (t - ps[1])) <= 50]


@pytest.mark.parametrize("t,lmbda,delay,alpha,gamma_min", MODERATE_CASES)
def test_matches_textbook_formula(t, lmbda, delay, alpha, gamma_min):
    got = phi(t, lmbda, delay, alpha, gamma_min)
    assert isinstance(got, float)
    assert got == pytest.approx(textbook(t, lmbda, delay, alpha, gamma_min), rel=REL, abs=0.0)


@pytest.mark.parametrize("t", [0.0, 0.5, 3.25, 99.9])
def test_non_integer_t(t):
    assert phi(t, 0.1, 2.0, 1.5, 0.05) == pytest.approx(textbook(t, 0.1, 2.0, 1.5, 0.05), rel=REL)


# ---------------------------------------------------------------------------------------------
# bounds and monotonicity


@pytest.mark.parametrize("lmbda,delay,alpha,gamma_min", PARAM_SETS)
def test_bounds_and_monotone_decrease(lmbda, delay, alpha, gamma_min):
    ts = list(range(0, 3000))
    vals = [phi(t, lmbda, delay, alpha, gamma_min) for t in ts]
    hi = peak(lmbda, delay, alpha, gamma_min)
    for t, v in zip(ts, vals):
        assert math.isfinite(v)
        assert gamma_min <= v <= hi * (1 + 4e-16), (t, v, gamma_min, hi)
    # monotone non-increasing (allow one rounding step of slack), and strictly decreasing over
    # any stretch where the textbook value itself drops by far more than rounding
    for t in ts[:-1]:
        assert vals[t + 1] <= vals[t] * (1 + 4e-16), (t, vals[t], vals[t + 1])
    for a, b in [(0, 50), (50, 500), (100, 2999)]:
        if textbook(a, lmbda, delay, alpha, gamma_min) - textbook(b, lmbda, delay, alpha, gamma_min) > 1e-9 \
                and abs(lmbda * (b - delay)) < 700:
            assert vals[b] < vals[a]


def test_decay_reaches_floor_and_starts_at_peak():
    lmbda, delay, alpha, gamma_min = 0.05, 20, 1.0, 0.01
    assert phi(0, lmbda, delay, alpha, gamma_min) == pytest.approx(1 / (1 + math.exp(-1.0)) + 0.01, rel=REL)
    # far past the delay phi is within 1e-12 of the floor
    assert phi(1000, lmbda, delay, alpha, gamma_min) - gamma_min < 1e-12
    # during the delay (t < delay_steps) phi stays above 1/(alpha+1) + gamma_min
    for t in range(0, 20):
        assert phi(t, lmbda, delay, alpha, gamma_min) > 0.5 + gamma_min


# ---------------------------------------------------------------------------------------------
# overflow: huge lmbda*(t - delay) gives exactly gamma_min


@pytest.mark.parametrize("gamma_min", [0.0, 1e-3, 0.1, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("t,lmbda,delay", [
    (1, 1e6, 0),          # x = 1e6
    (1e6, 1.0, 0),        # x = 1e6
    (2e6, 1.0, 1e6),      # x = 1e6 after a delay
    (800, 1.0, 0),        # exp(800) overflows a double
    (1e10, 1e300, 0),     # x = inf
])
def test_huge_argument_python(t, lmbda, delay, alpha, gamma_min):
    v = phi(t, lmbda, delay, alpha, gamma_min)
    assert isinstance(v, float)
    assert v == gamma_min


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma_min", [0.0, 1e-3, 0.1])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("lmbda", [1e6, 1e30, 1e300])
def test_huge_argument_tensor(dtype, gamma_min, alpha, lmbda):
    # t - delay > 0 everywhere; lmbda * (t - delay) is >= 1e6 (inf in float32 for the big lmbda)
    t = torch.tensor([1.0, 2.0, 10.0, 1e6], dtype=dtype)
    v = phi(t, lmbda, 0, alpha, gamma_min)
    assert isinstance(v, torch.Tensor)
    assert v.dtype == dtype and v.shape == t.shape
    assert torch.isfinite(v).all()
    expected = torch.full_like(v, gamma_min)  # gamma_min rounded to the result dtype
    assert torch.equal(v, expected), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_negative_argument_tensor_and_python(dtype):
    # x -> -inf: 1/(alpha + 0) + gamma_min, finite for alpha > 0
    assert phi(0, 1e6, 1, 2.0, 0.5) == 1.0
    v = phi(torch.tensor([0.0, 1.0], dtype=dtype), 1e6, 10, 2.0, 0.5)
    assert torch.equal(v, torch.tensor([1.0, 1.0], dtype=dtype))


# ---------------------------------------------------------------------------------------------
# alpha = 0


@pytest.mark.parametrize("gamma_min", [0.0, 0.2])
@pytest.mark.parametrize("t,lmbda,delay", [(0, 1e-3, 0), (10, 0.1, 0), (3, 0.5, 10), (100, 0.01, 40),
                                           (5, 2.0, 0), (0, 0.3, 20)])
def test_alpha_zero_is_exp(t, lmbda, delay, gamma_min):
    x = lmbda * (t - delay)
    expected = math.exp(-x) + gamma_min
    assert phi(t, lmbda, delay, 0.0, gamma_min) == pytest.approx(expected, rel=REL)
    tt = torch.tensor(float(t), dtype=torch.float64)
    assert phi(tt, lmbda, delay, 0.0, gamma_min).item() == pytest.approx(expected, rel=REL)


# ---------------------------------------------------------------------------------------------
# tensor t


@pytest.mark.parametrize("lmbda,delay,alpha,gamma_min", PARAM_SETS)
def test_tensor_float64_agrees_with_python(lmbda, delay, alpha, gamma_min):
    ts = [0, 1, 2, 3, 10, 49, 50, 51, 99, 100, 101, 500, 1234, 5000, 10 ** 6]
    t = torch.tensor(ts, dtype=torch.float64)
    v = phi(t, lmbda, delay, alpha, gamma_min)
    assert v.dtype == torch.float64 and v.shape == t.shape
    for ti, vi in zip(ts, v.tolist()):
        assert vi == pytest.approx(phi(ti, lmbda, delay, alpha, gamma_min), rel=REL, abs=0.0)


@pytest.mark.parametrize("lmbda,delay,alpha,gamma_min", PARAM_SETS)
@pytest.mark.parametrize("tdtype", [torch.float32, torch.int64, torch.int32, torch.bfloat16])
def test_tensor_float32_agrees_with_python(lmbda, delay, alpha, gamma_min, tdtype):
    ts = [0, 1, 2, 3, 10, 50, 100, 128, 250]
    t = torch.tensor(ts, dtype=tdtype)
    v = phi(t, lmbda, delay, alpha, gamma_min)
    assert v.dtype == torch.float32 and v.shape == t.shape
    for ti, vi in zip(ts, v.tolist()):
        assert vi == pytest.approx(phi(ti, lmbda, delay, alpha, gamma_min), rel=2e-6, abs=1e-30)


def test_tensor_zero_dim_and_2d():
    t0 = torch.tensor(5.0, dtype=torch.float64)
    v0 = phi(t0, 0.1, 0, 1.0, 0.0)
    assert v0.shape == () and v0.dtype == torch.float64
    assert v0.item() == pytest.approx(textbook(5, 0.1, 0, 1.0, 0.0), rel=REL)
    t2 = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    v2 = phi(t2, 0.1, 2, 1.0, 0.05)
    assert v2.shape == (2, 3)
    for ti, vi in zip(range(6), v2.reshape(-1).tolist()):
        assert vi == pytest.approx(textbook(ti, 0.1, 2, 1.0, 0.05), rel=REL)


def test_tensor_does_not_modify_input():
    t = torch.tensor([3.0, 4.0], dtype=torch.float64)
    before = t.clone()
    phi(t, 0.5, 1, 1.0, 0.0)
    assert torch.equal(t, before)


def _raise(*args, **kwargs):
    raise AssertionError("phi(tensor) synchronised with the host")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_phi_does_not_sync(monkeypatch, dtype):
    t = torch.tensor([0.0, 3.0, 100.0, 1e7], dtype=dtype)
    t0 = torch.tensor(42.0, dtype=dtype)
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy"):
            m.setattr(torch.Tensor, name, _raise)
        # the patch works: these now raise
        with pytest.raises(AssertionError):
            bool(t0 > 0)
        with pytest.raises(AssertionError):
            t0.item()
        v = phi(t, 0.05, 10, 1.0, 0.01)
        v0 = phi(t0, 0.05, 10, 0.0, 0.0)
        assert isinstance(v, torch.Tensor) and isinstance(v0, torch.Tensor)
    for ti, vi in zip([0.0, 3.0, 100.0, 1e7], v.tolist()):
        assert vi == pytest.approx(phi(ti, 0.05, 10, 1.0, 0.01), rel=2e-6)
    assert v0.item() == pytest.approx(math.exp(-0.05 * 32), rel=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_phi_stays_on_device():
    t = torch.tensor([0.0, 5.0], device="cuda")
    v = phi(t, 0.1, 0, 1.0, 0.0)
    assert v.device == t.device
    assert v.cpu().tolist() == pytest.approx([textbook(0, 0.1, 0, 1.0, 0.0), textbook(5, 0.1, 0, 1.0, 0.0)],
                                             rel=2e-6)
