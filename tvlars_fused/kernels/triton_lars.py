"""backend="triton": the bucket step of docs/SPEC.md ("The bucket ABI") as exactly two Triton
kernel launches per bucket per step, whatever the number of parameters.

The weights stay in the parameters' own memory: `w_ptr` is the bucket's first parameter and
`w_offsets[seg]` the element offset of segment seg's parameter from it (buckets.py). Gradients and
state are flat, padded buffers. Elements past a parameter's end (the padding) are never read from
or written to the parameter; the state's padding is never written, so it stays zero.

Pass 1, `_lars_norms_kernel` (one program per chunk): reads w and g once and stores the chunk's
partial sums of w^2 and d^2 (d = g/grad_scale + wd*w) in `bucket.partials`, in the accumulation
dtype. A per-segment atomic counter (acq_rel) tells the program that finished a segment's last
chunk; that program adds the segment's partials in chunk order (plain loads through L2, no float
atomics: the same bits every run), evaluates phi(t) from the device step counter, writes
`stats[seg] = (wn, dn, q, phi)` and puts the counter back to 0. (Zero-size parameters have no
chunk: in buckets that hold one, the programs also finish those segments, grid-stride.)

Pass 2, `_lars_update_kernel` (one program per chunk): reads w, g and the momentum state with
128-bit vector accesses, applies u = q*d and the heavy-ball or paper momentum update, and writes w
(bfloat16: rounded to nearest even by integer arithmetic, so the interpreter and the GPU give the
same bits) and the state; program 0 advances the step counter.

grad_scale / found_inf (torch's fused AMP protocol) are read on the device: with found_inf nonzero
every program returns without writing anything. bucket_step never synchronises with the host and
allocates nothing per step (its launch arguments are cached on the bucket).

The elementwise arithmetic is compiled without FMA contraction (enable_fp_fusion=False), so each
operation rounds as written in the spec, on the GPU as in the interpreter.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .. import abi as B
from ..buckets import Bucket

NAME = "triton"
# Elements per chunk: one program of each pass handles one chunk, looping over it BLOCK_ELEMS
# elements at a time (4 warps, 16 elements per thread per step), so a small segment costs one step.
CHUNK_ELEMS = 8192
SUPPORTS_SHARDED = True   # bucket_step takes `between` (FSDP2 all-reduce between the passes)
BLOCK_ELEMS = 2048
requirement = ("the triton package and CUDA tensors (CPU tensors only under the Triton interpreter: "
               "TRITON_INTERPRET=1 set before triton is imported, triton >= 3.7)")

# The last program of a segment adds its chunk partials REDUCE_TILE at a time (docs/SPEC.md, "the
# segment sum"): the CPU and CUDA kernels use the same tile and tree.
REDUCE_TILE = B.REDUCE_TILE

# Table layouts (docs/SPEC.md "The bucket ABI"), from their single definitions in abi.py, as
# compile-time constants of the kernels.
_C = tl.constexpr
ALIGN = _C(B.ALIGN)
CHUNK_COLS, CHUNK_START, CHUNK_SEG = _C(B.CHUNK_COLS), _C(B.CHUNK_START), _C(B.CHUNK_SEG)
SEG_COLS, SEG_OFFSET, SEG_END, SEG_NUMEL = _C(B.SEG_COLS), _C(B.SEG_OFFSET), _C(B.SEG_END), _C(B.SEG_NUMEL)
SEG_GROUP, SEG_FLAGS = _C(B.SEG_GROUP), _C(B.SEG_FLAGS)
SEG_FIRST_CHUNK, SEG_NUM_CHUNKS = _C(B.SEG_FIRST_CHUNK), _C(B.SEG_NUM_CHUNKS)
PART_COLS, PART_W2, PART_D2 = _C(B.PART_COLS), _C(B.PART_W2), _C(B.PART_D2)
PART_G2 = _C(B.PART_G2)
STAT_COLS, STAT_WN, STAT_DN, STAT_Q, STAT_PHI = (_C(B.STAT_COLS), _C(B.STAT_WEIGHT_NORM), _C(B.STAT_UPDATE_NORM),
                                                 _C(B.STAT_TRUST_RATIO), _C(B.STAT_PHI))
STAT_GN, STAT_WD = _C(B.STAT_GRAD_NORM), _C(B.STAT_WEIGHT_DECAY)
G_COLS, G_LR, G_MOMENTUM, G_WD, G_ETA = (_C(B.GROUP_COLS), _C(B.COL_LR), _C(B.COL_MOMENTUM),
                                         _C(B.COL_WEIGHT_DECAY), _C(B.COL_ETA))
G_LMBDA, G_DELAY, G_ALPHA, G_GAMMA_MIN = _C(B.COL_LMBDA), _C(B.COL_DELAY), _C(B.COL_ALPHA), _C(B.COL_GAMMA_MIN)
G_NORM_CLIP, G_USE_PHI, G_FORM, G_HOLD = _C(B.COL_NORM_CLIP), _C(B.COL_USE_PHI), _C(B.COL_FORM), _C(B.COL_HOLD)
G_EPS, G_UNDAMPED, G_GRAD_SIGN, G_FLAGS = _C(B.COL_EPS), _C(B.COL_UNDAMPED), _C(B.COL_GRAD_SIGN), _C(B.COL_GFLAGS)
FORM_HEAVY_BALL, FORM_PAPER, FORM_LR_SCALED = _C(B.FORM_HEAVY_BALL), _C(B.FORM_PAPER), _C(B.FORM_LR_SCALED)
GF_GRAD_DENOM, GF_TRUST_CLIP, GF_NO_ADAPT = _C(B.GF_GRAD_DENOMINATOR), _C(B.GF_TRUST_CLIP), _C(B.GF_NO_ADAPT)
GF_PLAIN_ZERO, GF_NESTEROV = _C(B.GF_PLAIN_ZERO), _C(B.GF_NESTEROV)
F_SKIP_WD, F_SKIP_ADAPT, F_FIRST = _C(B.FLAG_SKIP_WEIGHT_DECAY), _C(B.FLAG_SKIP_ADAPTATION), _C(B.FLAG_FIRST_STEP)


@triton.jit
def _bf16_rne_bits(x):
    """float32 -> the bits of the nearest-even bfloat16, NaN kept quiet, +-Inf kept."""
    b = x.to(tl.uint32, bitcast=True)
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    is_nan = (b & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, (b >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def _div(a, b, IEEE: tl.constexpr):
    """a / b rounded to nearest: float32 `/` is approximate on the GPU (div.full), and triton 3.6
    ignores fdiv's ieee_rounding flag; div_rn is div.rn.f32. float64 `/` is already exact."""
    if IEEE:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    return tl.sqrt_rn(x) if ACC == tl.float32 else tl.sqrt(x)


@triton.jit
def _clip_ratio(q, lr, IEEE: tl.constexpr):
    """trust_clip: min(q / lr, 1), NaN staying NaN (torch.clamp)."""
    x = _div(q, lr, IEEE)
    return tl.where(x > 1.0, 1.0, x)


@triton.jit
def _write_stats(stats, seg, sw, sd, sg, grow, flags, step_ptr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """A segment's sums of w^2, d^2, g'^2 -> its stats row (docs/SPEC.md, "The trust ratio"):
    norms after norm_clip, q, phi(t), ||g'||, the weight decay pass 2 applies."""
    clip = tl.load(grow + G_NORM_CLIP)
    wn = _sqrt(sw, ACC)
    dn = _sqrt(sd, ACC)
    gn = _sqrt(sg, ACC)
    wn = tl.where(wn > clip, clip, wn)   # NaN stays NaN (torch.clamp semantics)
    dn = tl.where(dn > clip, clip, dn)
    gn = tl.where(gn > clip, clip, gn)

    # phi(t), overflow-safe: x = lmbda*(t - delay), e = exp(-|x|) <= 1 (in ACC; on the GPU
    # tl.exp is ex2.approx of a rounded product: relative error about |x|*6e-8); 1 while t < hold
    t = tl.load(step_ptr).to(ACC)
    lmbda = tl.load(grow + G_LMBDA)
    delay = tl.load(grow + G_DELAY)
    alpha = tl.load(grow + G_ALPHA)
    gamma_min = tl.load(grow + G_GAMMA_MIN)
    x = (t - delay) * lmbda
    e = tl.exp(-tl.abs(x))
    # (IEEE round-to-nearest divisions: the plain float32 `/` is approximate on the GPU)
    ph = tl.where(x > 0, _div(e, 1.0 + alpha * e, IEEE),
                  _div(tl.full((), 1.0, ACC), alpha + e, IEEE))
    ph = tl.where((tl.load(grow + G_USE_PHI) != 0) & ~(t < tl.load(grow + G_HOLD)), ph + gamma_min, 1.0).to(ACC)

    gflags = tl.load(grow + G_FLAGS).to(tl.int32)
    lr = tl.load(grow + G_LR)
    wd = tl.where((flags & F_SKIP_WD) != 0, 0.0, tl.load(grow + G_WD)).to(ACC)
    grad_form = (gflags & GF_GRAD_DENOM) != 0
    trust_clip = (gflags & GF_TRUST_CLIP) != 0
    adapt = ((gflags & GF_NO_ADAPT) == 0) & ((flags & F_SKIP_ADAPT) == 0)
    nonzero = (wn > 0) & (tl.where(grad_form, gn, dn) > 0)
    eps = tl.load(grow + G_EPS)
    denom = tl.where(grad_form, (gn + wd * wn) + eps, dn + eps)
    ratio = _div(tl.load(grow + G_ETA) * ph * wn, denom, IEEE)
    ratio = tl.where(trust_clip, _clip_ratio(ratio, lr, IEEE), ratio)
    plain = (gflags & GF_PLAIN_ZERO) != 0
    one = tl.full((), 1.0, ACC)
    fallback = tl.where(trust_clip & ~plain, _clip_ratio(one, lr, IEEE), one)
    q = tl.where(adapt, tl.where(nonzero, ratio, fallback), one).to(ACC)
    wd = tl.where(adapt & ~nonzero & plain, 0.0, wd).to(ACC)
    srow = stats + seg * STAT_COLS
    tl.store(srow + STAT_WN, wn)
    tl.store(srow + STAT_DN, dn)
    tl.store(srow + STAT_Q, q)
    tl.store(srow + STAT_PHI, ph)
    tl.store(srow + STAT_GN, gn)
    tl.store(srow + STAT_WD, wd)


@triton.jit
def _grad_multiplier(grow, scale_ptr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """g' = g * gmul: gmul = (maximize ? -1 : 1) * (1/grad_scale), the same bits as g/scale for
    GradScaler's powers of two."""
    sign = tl.load(grow + G_GRAD_SIGN).to(ACC)
    if HAS_SCALE:
        return sign * _div(tl.full((), 1.0, ACC), tl.load(scale_ptr).to(ACC), IEEE)
    else:
        return sign


@triton.jit
def _segment_weights(w_ptr, w_offsets, seg, seg_start, W_ALIGNED: tl.constexpr):
    """The pointer wp with wp + i = the address of the segment's parameter element i - seg_start,
    i a flat index of the gradient/state buffers (w_offsets: elements from w_ptr, buckets.py)."""
    delta = tl.load(w_offsets + seg) - seg_start
    if W_ALIGNED:   # every parameter 16-element aligned: 128-bit accesses
        delta = tl.multiple_of(delta, 16)
    return w_ptr + delta


@triton.jit
def _squares_block(wp, g_ptr, offs, mask, wd, gmul, ACC: tl.constexpr):
    """Pass 1 on the elements offs[mask]: w^2, d^2, g'^2 (g' = g*gmul, d = g' + wd*w, no wd*w
    where wd is 0), 0 elsewhere."""
    w = tl.load(wp + offs, mask=mask, other=0.0).to(ACC)
    gs = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * gmul
    d = tl.where(wd != 0, gs + wd * w, gs)
    return w * w, d * d, gs * gs


@triton.jit
def _heavy_ball(w, s, u, lr, mom, undamped, nesterov, first, NESTEROV: tl.constexpr, DAMPED: tl.constexpr):
    """torch's SGD momentum: s = first ? u : momentum*s + (1 - dampening)*u; w -= lr*(nesterov ?
    u + momentum*s : s). (Without dampening in the bucket, (1 - 0)*u == u: the product is left out.)"""
    if DAMPED:
        s_new = tl.where(first, u, mom * s + undamped * u)
    else:
        s_new = mom * s + u
    if NESTEROV:
        return s_new, w - lr * tl.where(nesterov, u + mom * s_new, s_new)
    else:
        return s_new, w - lr * s_new


@triton.jit
def _lr_scaled(w, s, u, lr, mom, nesterov, NESTEROV: tl.constexpr):
    """TensorFlow's ApplyMomentum: s = momentum*s + lr*u; w -= nesterov ? lr*u + momentum*s : s."""
    lu = lr * u
    s_new = mom * s + lu
    if NESTEROV:
        return s_new, w - tl.where(nesterov, lu + mom * s_new, s_new)
    else:
        return s_new, w - s_new


@triton.jit
def _paper(w, s, u, lr, mom):
    """The paper's Algorithm 1: mn = w - lr*u; w = mn + momentum*(mn - s); s = mn."""
    s_new = w - lr * u
    return s_new, s_new + mom * (s_new - s)


@triton.jit
def _update_block(wp, g_ptr, s_ptr, offs, mask, q, wd, lr, mom, undamped, gmul, nesterov, first,
                  FORM: tl.constexpr, NESTEROV: tl.constexpr, DAMPED: tl.constexpr, BF16: tl.constexpr,
                  ACC: tl.constexpr):
    """Pass 2 on the elements offs[mask]: u = q*d, the momentum form FORM (docs/SPEC.md), w
    (rounded to nearest even for bfloat16) and the state stored. NESTEROV / DAMPED: whether any
    group of the bucket uses Nesterov / dampening (compiled out otherwise)."""
    w = tl.load(wp + offs, mask=mask, other=0.0).to(ACC)
    gs = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * gmul
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = q * tl.where(wd != 0, gs + wd * w, gs)
    if FORM == FORM_PAPER:
        s_new, w_new = _paper(w, s, u, lr, mom)
    elif FORM == FORM_LR_SCALED:
        s_new, w_new = _lr_scaled(w, s, u, lr, mom, nesterov, NESTEROV)
    else:
        s_new, w_new = _heavy_ball(w, s, u, lr, mom, undamped, nesterov, first, NESTEROV, DAMPED)
    if BF16:
        tl.store(wp.to(tl.pointer_type(tl.uint16)) + offs, _bf16_rne_bits(w_new.to(tl.float32)), mask=mask)
    else:
        tl.store(wp + offs, w_new.to(wp.dtype.element_ty), mask=mask)
    tl.store(s_ptr + offs, s_new.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_chunk(wp, g_ptr, s_ptr, start, full_end, real_end, q, wd, lr, mom, undamped, gmul, nesterov, first,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_TAIL: tl.constexpr, FORM: tl.constexpr,
                  NESTEROV: tl.constexpr, DAMPED: tl.constexpr, BF16: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 of the chunk at `start`: the parameter's whole 16-element blocks, BLOCK elements a
    step, 128-bit accesses (every mask ends at a multiple of 16); then its last numel % 16
    elements, if in this chunk. Nothing past the parameter's end is read from it or written."""
    for sub in range(start, tl.minimum(start + CHUNK, full_end), BLOCK):
        offs = tl.multiple_of(sub, 16) + tl.arange(0, BLOCK)
        offs = tl.max_contiguous(tl.multiple_of(offs, 16), BLOCK)
        _update_block(wp, g_ptr, s_ptr, offs, offs < full_end, q, wd, lr, mom, undamped, gmul, nesterov, first,
                      FORM, NESTEROV, DAMPED, BF16, ACC)
    if HAS_TAIL:
        if (full_end < real_end) & (start <= full_end) & (full_end < start + CHUNK):
            offs = full_end + tl.arange(0, ALIGN)
            _update_block(wp, g_ptr, s_ptr, offs, offs < real_end, q, wd, lr, mom, undamped, gmul, nesterov,
                          first, FORM, NESTEROV, DAMPED, BF16, ACC)


@triton.jit
def _tree_sum(v, LOG2: tl.constexpr):
    """Sum of a [2**LOG2] tensor as the pairwise tree of docs/SPEC.md: v[i] = v[2i] + v[2i+1] per
    level (exactly one addition per pair, so the order is fixed)."""
    for k in tl.static_range(LOG2):
        v = tl.sum(tl.reshape(v, [v.shape[0] // 2, 2]), axis=1)
    return tl.sum(v, axis=0)


@triton.jit
def _segment_sum(partials, first, stop, col, ACC: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr):
    """A segment's chunk partials (column col) added in the order of docs/SPEC.md: tiles of TILE
    chunks, each a pairwise tree (+0 past the last chunk), the tiles in chunk order. Every tile is
    loaded by all threads at once, through L2 (.cg: written by other programs in this launch)."""
    total = tl.zeros((), dtype=ACC)
    for base in range(first, stop, TILE):
        idx = base + tl.arange(0, TILE)
        v = tl.load(partials + idx * PART_COLS + col, mask=idx < stop, other=0.0, cache_modifier=".cg")
        total += _tree_sum(v, LOG2_TILE)
    return total


@triton.jit
def _lars_norms_kernel(
    w_ptr, w_offsets, g_ptr, chunk_tab, seg_tab, seg_active, group_tab, step_ptr,
    partials, counters, stats, scale_ptr, inf_ptr, num_segs,
    CHUNK: tl.constexpr, HAS_CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr, HAS_EMPTY: tl.constexpr,
    W_ALIGNED: tl.constexpr, HAS_TAIL: tl.constexpr,
):
    ACC: tl.constexpr = stats.dtype.element_ty
    IEEE: tl.constexpr = ACC == tl.float32   # float32 needs div_rn (float64 `/` is exact-rounded)
    if HAS_CHUNKS:
        pid = tl.program_id(0)
        start = tl.multiple_of(tl.load(chunk_tab + pid * CHUNK_COLS + CHUNK_START), 16)
        seg = tl.load(chunk_tab + pid * CHUNK_COLS + CHUNK_SEG)
        go = tl.load(seg_active + seg) != 0
        if HAS_INF:
            go = go & (tl.load(inf_ptr) == 0)
        if go:
            row = seg_tab + seg * SEG_COLS
            seg_start = tl.load(row + SEG_OFFSET)
            end = tl.multiple_of(tl.load(row + SEG_END), 16)
            numel = tl.load(row + SEG_NUMEL)
            real_end = seg_start + numel
            full_end = tl.multiple_of(seg_start + numel // ALIGN * ALIGN, 16)
            group = tl.load(row + SEG_GROUP)
            flags = tl.load(row + SEG_FLAGS)
            grow = group_tab + group * G_COLS
            wd = tl.where((flags & F_SKIP_WD) != 0, 0.0, tl.load(grow + G_WD)).to(ACC)
            gmul = _grad_multiplier(grow, scale_ptr, HAS_SCALE, ACC, IEEE)
            wp = _segment_weights(w_ptr, w_offsets, seg, seg_start, W_ALIGNED)

            acc_w = tl.zeros((BLOCK,), dtype=ACC)
            acc_d = tl.zeros((BLOCK,), dtype=ACC)
            acc_g = tl.zeros((BLOCK,), dtype=ACC)
            # the parameter's whole 16-element blocks of [start, start + CHUNK), BLOCK elements a
            # step (small segments: one step), 128-bit loads (every mask ends at a multiple of 16)
            for sub in range(start, tl.minimum(start + CHUNK, full_end), BLOCK):
                offs = tl.multiple_of(sub, 16) + tl.arange(0, BLOCK)
                w2, d2, g2 = _squares_block(wp, g_ptr, offs, offs < full_end, wd, gmul, ACC)
                acc_w += w2
                acc_d += d2
                acc_g += g2
            sum_w = tl.sum(acc_w, axis=0)
            sum_d = tl.sum(acc_d, axis=0)
            sum_g = tl.sum(acc_g, axis=0)
            if HAS_TAIL:   # the parameter's last numel % 16 elements, if they fall in this chunk
                if (full_end < real_end) & (start <= full_end) & (full_end < start + CHUNK):
                    offs = full_end + tl.arange(0, ALIGN)
                    w2, d2, g2 = _squares_block(wp, g_ptr, offs, offs < real_end, wd, gmul, ACC)
                    sum_w += tl.sum(w2, axis=0)
                    sum_d += tl.sum(d2, axis=0)
                    sum_g += tl.sum(g2, axis=0)
            tl.store(partials + PART_COLS * pid + PART_W2, sum_w)
            tl.store(partials + PART_COLS * pid + PART_D2, sum_d)
            tl.store(partials + PART_COLS * pid + PART_G2, sum_g)

            # Last-block pattern: every thread's partial store happens before the release of the
            # counter increment (barrier + acq_rel at GPU scope); the last program acquires it
            # and reads the partials through L2 (.cg), so it sees every other program's sums.
            tl.debug_barrier()
            n = tl.load(row + SEG_NUM_CHUNKS)
            done = tl.atomic_add(counters + seg, 1, sem="acq_rel", scope="gpu")
            if done == n - 1:
                tl.debug_barrier()
                first = tl.load(row + SEG_FIRST_CHUNK)
                sw = _segment_sum(partials, first, first + n, PART_W2, ACC, TILE, LOG2_TILE)
                sd = _segment_sum(partials, first, first + n, PART_D2, ACC, TILE, LOG2_TILE)
                sg = _segment_sum(partials, first, first + n, PART_G2, ACC, TILE, LOG2_TILE)
                _write_stats(stats, seg, sw, sd, sg, grow, flags, step_ptr, ACC, IEEE)
                tl.store(counters + seg, 0)   # zero between launches (the ABI)

    # Active segments without chunks (zero-size parameters) have no program above: program i
    # finishes those among segments i, i + grid, ... (norms 0, q = 1, phi(t)), as the C++ kernels
    # do. Compiled only for buckets that hold such a segment (HAS_EMPTY).
    if HAS_EMPTY:
        for sid in range(tl.program_id(0), num_segs, tl.num_programs(0)):
            srow = seg_tab + sid * SEG_COLS
            empty = (tl.load(srow + SEG_NUM_CHUNKS) == 0) & (tl.load(seg_active + sid) != 0)
            if HAS_INF:
                empty = empty & (tl.load(inf_ptr) == 0)
            if empty:
                zero = tl.zeros((), dtype=ACC)
                _write_stats(stats, sid, zero, zero, zero, group_tab + tl.load(srow + SEG_GROUP) * G_COLS,
                             tl.load(srow + SEG_FLAGS), step_ptr, ACC, IEEE)


@triton.jit
def _lars_update_kernel(
    w_ptr, w_offsets, g_ptr, s_ptr, chunk_tab, seg_tab, seg_active, group_tab, stats, step_ptr,
    counters, scale_ptr, inf_ptr,
    CHUNK: tl.constexpr, HAS_CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr, BF16: tl.constexpr, W_ALIGNED: tl.constexpr, HAS_TAIL: tl.constexpr,
    FORM: tl.constexpr, NESTEROV: tl.constexpr, DAMPED: tl.constexpr,
):
    ACC: tl.constexpr = stats.dtype.element_ty
    IEEE: tl.constexpr = ACC == tl.float32
    pid = tl.program_id(0)
    if HAS_CHUNKS:
        start = tl.multiple_of(tl.load(chunk_tab + pid * CHUNK_COLS + CHUNK_START), 16)
        seg = tl.load(chunk_tab + pid * CHUNK_COLS + CHUNK_SEG)
        row = seg_tab + seg * SEG_COLS
        seg_start = tl.load(row + SEG_OFFSET)
        # Pass 1 of this launch is over (same stream): the segment's first program puts its
        # counter back to 0, so a counter left over by an interrupted step cannot stick.
        if start == seg_start:
            tl.store(counters + seg, 0)
        go = tl.load(seg_active + seg) != 0
        if HAS_INF:
            go = go & (tl.load(inf_ptr) == 0)
        if go:
            end = tl.multiple_of(tl.load(row + SEG_END), 16)
            numel = tl.load(row + SEG_NUMEL)
            real_end = seg_start + numel
            full_end = tl.multiple_of(seg_start + numel // ALIGN * ALIGN, 16)
            group = tl.load(row + SEG_GROUP)
            flags = tl.load(row + SEG_FLAGS)
            grow = group_tab + group * G_COLS
            lr = tl.load(grow + G_LR)
            mom = tl.load(grow + G_MOMENTUM)
            undamped = tl.load(grow + G_UNDAMPED)
            nesterov = (tl.load(grow + G_FLAGS).to(tl.int32) & GF_NESTEROV) != 0
            first = (flags & F_FIRST) != 0
            q = tl.load(stats + seg * STAT_COLS + STAT_Q)
            wd = tl.load(stats + seg * STAT_COLS + STAT_WD)
            gmul = _grad_multiplier(grow, scale_ptr, HAS_SCALE, ACC, IEEE)
            wp = _segment_weights(w_ptr, w_offsets, seg, seg_start, W_ALIGNED)

            # one loop per momentum form: FORM is the bucket's only one, or -1 when its groups mix
            # forms (then the segment's picks one of three loops, uniform over the program)
            if FORM == -1:
                form = tl.load(grow + G_FORM).to(tl.int32)
                if form == FORM_PAPER:
                    _update_chunk(wp, g_ptr, s_ptr, start, full_end, real_end, q, wd, lr, mom, undamped, gmul,
                                  nesterov, first, CHUNK, BLOCK, HAS_TAIL, FORM_PAPER, NESTEROV, DAMPED, BF16, ACC)
                elif form == FORM_LR_SCALED:
                    _update_chunk(wp, g_ptr, s_ptr, start, full_end, real_end, q, wd, lr, mom, undamped, gmul,
                                  nesterov, first, CHUNK, BLOCK, HAS_TAIL, FORM_LR_SCALED, NESTEROV, DAMPED, BF16,
                                  ACC)
                else:
                    _update_chunk(wp, g_ptr, s_ptr, start, full_end, real_end, q, wd, lr, mom, undamped, gmul,
                                  nesterov, first, CHUNK, BLOCK, HAS_TAIL, FORM_HEAVY_BALL, NESTEROV, DAMPED, BF16,
                                  ACC)
            else:
                _update_chunk(wp, g_ptr, s_ptr, start, full_end, real_end, q, wd, lr, mom, undamped, gmul,
                              nesterov, first, CHUNK, BLOCK, HAS_TAIL, FORM, NESTEROV, DAMPED, BF16, ACC)
    if pid == 0:
        if HAS_INF:
            if tl.load(inf_ptr) == 0:
                tl.store(step_ptr, tl.load(step_ptr) + 1.0)
        else:
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)


KERNELS = (_lars_norms_kernel, _lars_update_kernel)


def _interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_lars_update_kernel, triton.runtime.jit.JITFunction)


def available(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not _interpreted()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and _interpreted() and _interpreter_ok()
    return False


def _interpreter_ok() -> bool:
    """Triton's interpreter before 3.7 cannot use a loaded scalar as a loop bound (these kernels do)."""
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 7)


def block_and_warps(chunk_elems: int, acc_dtype: torch.dtype = torch.float32):
    """Elements per loop step of a program, and its warps: at most BLOCK_ELEMS per step (half for
    float64), with 4 warps: 16 float32 elements per thread, four 128-bit vectors of each of w, g
    and the state in flight (float64: eight elements)."""
    block = min(chunk_elems, BLOCK_ELEMS // (2 if acc_dtype == torch.float64 else 1))
    return block, max(1, min(4, block // 256))


class _Launch:
    """Everything bucket_step passes to the two kernels that does not change between steps (the
    weights list changes only when a parameter moves: the config is then rebuilt)."""

    __slots__ = ("grid", "norms_args", "num_segs", "has_empty", "update_args", "consts", "warps", "step",
                 "weights")

    def __init__(self, b: Bucket):
        ce = b.chunk_elems
        if ce < 16 or ce & (ce - 1):
            raise ValueError(f"backend='triton' needs a power-of-two chunk size >= 16, got {ce}")
        self.grid = (max(b.num_chunks, 1),)
        self.weights = b.weights
        w0 = b.weights[0]
        self.norms_args = (w0, b.w_offsets, b.grad_buf, b.chunk_table, b.seg_table, b.seg_active,
                           b.group_table, b.step, b.partials, b.counters, b.stats)
        self.num_segs = b.num_segments
        self.has_empty = any(row[B.SEG_NUM_CHUNKS] == 0 for row in b._seg_rows)
        self.update_args = (w0, b.w_offsets, b.grad_buf, b.state_buf, b.chunk_table, b.seg_table,
                            b.seg_active, b.group_table, b.stats, b.step, b.counters)
        block, self.warps = block_and_warps(ce, b.acc_dtype)
        self.consts = dict(CHUNK=ce, BLOCK=block, HAS_CHUNKS=b.num_chunks > 0, W_ALIGNED=b.w_aligned,
                           HAS_TAIL=b.has_tail)
        self.step = b.step


def _launch_config(b: Bucket) -> _Launch:
    cfg = getattr(b, "_triton_launch", None)
    if cfg is None or cfg.weights is not b.weights:
        cfg = _Launch(b)
        b._triton_launch = cfg
    return cfg


class _NoGuard:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_GUARD = _NoGuard()


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the bucket's (a bucket on cuda:1 while
    cuda:0 is current would otherwise run on the wrong GPU, or fail)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_GUARD


def _check_amp(t: Optional[torch.Tensor], name: str, b: Bucket) -> None:
    if t is not None and (t.device != b.device or t.dtype != torch.float32 or t.numel() != 1):
        raise ValueError(f"{name} must be a one-element float32 tensor on {b.device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def bucket_step(bucket: Bucket, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                between: Optional[Callable[[Bucket], None]] = None) -> None:
    """Two launches: norms/stats (pass 1), then the update and the step counter (pass 2).
    `between(bucket)`, when given, runs between them (the all-reduce of a sharded bucket)."""
    cfg = _launch_config(bucket)
    _check_amp(grad_scale, "grad_scale", bucket)
    _check_amp(found_inf, "found_inf", bucket)
    has_scale, has_inf = grad_scale is not None, found_inf is not None
    scale = grad_scale if has_scale else cfg.step   # a dummy pointer when absent (never read)
    inf = found_inf if has_inf else cfg.step
    with _on_device(bucket.device):
        _lars_norms_kernel[cfg.grid](*cfg.norms_args, scale, inf, cfg.num_segs, **cfg.consts, HAS_SCALE=has_scale,
                                     HAS_INF=has_inf, TILE=REDUCE_TILE, LOG2_TILE=REDUCE_TILE.bit_length() - 1,
                                     HAS_EMPTY=cfg.has_empty, num_warps=cfg.warps, enable_fp_fusion=False)
    if between is not None:
        between(bucket)
    form, nesterov, damped = bucket.momentum_variant
    with _on_device(bucket.device):
        _lars_update_kernel[cfg.grid](*cfg.update_args, scale, inf, **cfg.consts, HAS_SCALE=has_scale,
                                      HAS_INF=has_inf, BF16=bucket.dtype == torch.bfloat16, FORM=form,
                                      NESTEROV=nesterov, DAMPED=damped, num_warps=cfg.warps,
                                      enable_fp_fusion=False)
