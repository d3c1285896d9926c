"""Exactly rounded arithmetic and table access for the Triton kernels (the counterpart of
csrc/arith.h): every algorithm's jit functions (triton_lars.py, triton_lamb.py) and the generic
kernels (triton_backend.py) use these, so that each operation rounds as docs/SPEC.md says on the
GPU as in the interpreter. The kernels are compiled without FMA contraction
(enable_fp_fusion=False)."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import abi as B

_C = tl.constexpr
ALIGN = _C(B.ALIGN)
STAT_COLS = _C(B.STAT_COLS)
STAT_WN, STAT_UN, STAT_Q, STAT_SCALE = _C(B.STAT_WEIGHT_NORM), _C(B.STAT_UPDATE_NORM), _C(B.STAT_TRUST_RATIO), \
    _C(B.STAT_SCALE)
STAT_GN, STAT_WD = _C(B.STAT_GRAD_NORM), _C(B.STAT_WEIGHT_DECAY)


@triton.jit
def col(grow, c, ACC: tl.constexpr):
    """Column c of a group-table row (float64, exact), rounded once to ACC."""
    return tl.load(grow + c).to(ACC)


@triton.jit
def div(a, b, IEEE: tl.constexpr):
    """a / b rounded to nearest: float32 `/` is approximate on the GPU (div.full), and triton 3.6
    ignores fdiv's ieee_rounding flag; div_rn is div.rn.f32. float64 `/` is already exact."""
    if IEEE:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def sqrt(x, ACC: tl.constexpr):
    return tl.sqrt_rn(x) if ACC == tl.float32 else tl.sqrt(x)


@triton.jit
def pow_int(beta, k):
    """beta^k in float64 for an integer 0 < k < 2^25, by binary exponentiation (docs/SPEC.md,
    "LAMB"): the same multiplications as csrc/arith.h's pow_int."""
    r = tl.full((), 1.0, tl.float64)
    b = beta.to(tl.float64)
    for i in tl.static_range(25):
        r = tl.where(((k >> i) & 1) != 0, r * b, r)
        b = b * b
    return r


@triton.jit
def bf16_rne_bits(x):
    """float32 -> the bits of the nearest-even bfloat16, NaN kept quiet, +-Inf kept."""
    b = x.to(tl.uint32, bitcast=True)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    is_nan = (b & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (b >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def store_weights(wp, offs, w_new, mask, BF16: tl.constexpr):
    """w rounded once to the parameters' dtype (bfloat16 to nearest even by integer arithmetic,
    so the interpreter and the GPU give the same bits)."""
    if BF16:
        tl.store(wp.to(tl.pointer_type(tl.uint16)) + offs, bf16_rne_bits(w_new.to(tl.float32)), mask=mask)
    else:
        tl.store(wp + offs, w_new.to(wp.dtype.element_ty), mask=mask)


@triton.jit
def store_stats(stats, seg, wn, un, q, scale, gn, wd):
    srow = stats + seg * STAT_COLS
    tl.store(srow + STAT_WN, wn)
    tl.store(srow + STAT_UN, un)
    tl.store(srow + STAT_Q, q)
    tl.store(srow + STAT_SCALE, scale)
    tl.store(srow + STAT_GN, gn)
    tl.store(srow + STAT_WD, wd)
