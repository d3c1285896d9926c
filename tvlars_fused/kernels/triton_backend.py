"""backend="triton": the bucket step of docs/SPEC.md ("The bucket ABI") as exactly two Triton
kernel launches per bucket per step, whatever the number of parameters, for every algorithm.

The kernels here are generic: the program/chunk/segment bookkeeping, the 128-bit block loops, the
deterministic segment sum and the AMP protocol. Each algorithm supplies five jit functions
(triton_lars.py, triton_lamb.py), reached through the dispatchers below on the compile-time ALGO:
pass1_params (per-segment values of pass 1, a tuple), pass1_block (one block of elements: the
squares of the weight term, the update term and g'; may update the state), finish (a segment's
sums -> its stats row), pass2_params (from the stats row: pass 2 never reads t, which its program
0 increments) and pass2_block (the update of one block).

The weights stay in the parameters' own memory: `w_ptr` is the bucket's first parameter and
`w_offsets[seg]` the element offset of segment seg's parameter from it (buckets.py). Gradients and
state are flat, padded buffers (state: one row of `state_stride` elements per slot). Elements past
a parameter's end (the padding) are never read from or written to the parameter; the state's
padding is never written, so it stays zero.

Pass 1, `_norms_kernel` (one program per chunk): reads w and g (and the state, for LAMB) once and
stores the chunk's three partial sums in `partials`, in the accumulation dtype. A per-segment
atomic counter (acq_rel) tells the program that finished a segment's last chunk; that program adds
the segment's partials in the order of docs/SPEC.md (a tile of REDUCE_TILE chunks at a time, all
threads loading, each tile a pairwise tree; plain loads through L2, no float atomics: the same bits
every run), writes the stats row and puts the counter back to 0. (Zero-size parameters have no
chunk: in buckets that hold one, the programs also finish those segments, grid-stride.)

Pass 2, `_update_kernel` (one program per chunk): the algorithm's update with 128-bit vector
accesses; program 0 advances the step counter; each segment's first program zeroes its counter
again (so a counter left over by an interrupted launch heals).

grad_scale / found_inf (torch's fused AMP protocol) are read on the device: with found_inf nonzero
every program returns without writing anything. bucket_step never synchronises with the host and
allocates nothing per step (its launch arguments are the bucket's plan). The elementwise arithmetic
is compiled without FMA contraction (enable_fp_fusion=False), so each operation rounds as written
in the spec, on the GPU as in the interpreter.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .. import abi as B
from . import Backend
from .traced import traced_step
from .triton_lamb import finish as lamb_finish
from .triton_lamb import pass1_block as lamb_pass1_block
from .triton_lamb import pass1_params as lamb_pass1_params
from .triton_lamb import pass2_block as lamb_pass2_block
from .triton_lamb import pass2_params as lamb_pass2_params
from .triton_lars import finish as lars_finish
from .triton_lars import pass1_block as lars_pass1_block
from .triton_lars import pass1_params as lars_pass1_params
from .triton_lars import pass2_block as lars_pass2_block
from .triton_lars import pass2_params as lars_pass2_params
from .triton_math import div

# Elements of a program's loop step (block_and_warps)
BLOCK_ELEMS = 2048

# Table layouts (docs/SPEC.md "The bucket ABI"), from their single definitions in abi.py, as
# compile-time constants of the kernels.
_C = tl.constexpr
ALIGN = _C(B.ALIGN)
ALGO_LARS = _C(B.ALGO_LARS)
CHUNK_COLS, CHUNK_START, CHUNK_SEG = _C(B.CHUNK_COLS), _C(B.CHUNK_START), _C(B.CHUNK_SEG)
SEG_COLS, SEG_OFFSET, SEG_NUMEL = _C(B.SEG_COLS), _C(B.SEG_OFFSET), _C(B.SEG_NUMEL)
SEG_GROUP, SEG_FLAGS = _C(B.SEG_GROUP), _C(B.SEG_FLAGS)
SEG_FIRST_CHUNK, SEG_NUM_CHUNKS = _C(B.SEG_FIRST_CHUNK), _C(B.SEG_NUM_CHUNKS)
PART_COLS, PART_W2, PART_U2, PART_G2 = _C(B.PART_COLS), _C(B.PART_W2), _C(B.PART_U2), _C(B.PART_G2)
STAT_COLS = _C(B.STAT_COLS)
G_COLS, G_GRAD_SIGN = _C(B.GROUP_COLS), _C(B.COL_GRAD_SIGN)


# -- the algorithm seam: one dispatcher per hook -------------------------------------------------------
@triton.jit
def _pass1_params(ALGO: tl.constexpr, grow, flags, gmul, t, ACC: tl.constexpr, IEEE: tl.constexpr):
    if ALGO == ALGO_LARS:
        P = lars_pass1_params(grow, flags, gmul, t, ACC, IEEE)
    else:
        P = lamb_pass1_params(grow, flags, gmul, t, ACC, IEEE)
    return P


@triton.jit
def _pass1_block(ALGO: tl.constexpr, wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0: tl.constexpr,
                 V1: tl.constexpr, V2: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    if ALGO == ALGO_LARS:
        w2, u2, g2 = lars_pass1_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0, V1, V2, ACC, IEEE)
    else:
        w2, u2, g2 = lamb_pass1_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0, V1, V2, ACC, IEEE)
    return w2, u2, g2


@triton.jit
def _finish(ALGO: tl.constexpr, stats, seg, sw, su, sg, grow, flags, t, ACC: tl.constexpr, IEEE: tl.constexpr):
    if ALGO == ALGO_LARS:
        lars_finish(stats, seg, sw, su, sg, grow, flags, t, ACC, IEEE)
    else:
        lamb_finish(stats, seg, sw, su, sg, grow, flags, t, ACC, IEEE)


@triton.jit
def _pass2_params(ALGO: tl.constexpr, grow, flags, srow, gmul, ACC: tl.constexpr, IEEE: tl.constexpr):
    if ALGO == ALGO_LARS:
        P = lars_pass2_params(grow, flags, srow, gmul, ACC, IEEE)
    else:
        P = lamb_pass2_params(grow, flags, srow, gmul, ACC, IEEE)
    return P


@triton.jit
def _pass2_block(ALGO: tl.constexpr, wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0: tl.constexpr,
                 V1: tl.constexpr, V2: tl.constexpr, BF16: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    if ALGO == ALGO_LARS:
        lars_pass2_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0, V1, V2, BF16, ACC, IEEE)
    else:
        lamb_pass2_block(wp, g_ptr, s_ptr, state_stride, offs, mask, P, V0, V1, V2, BF16, ACC, IEEE)


# -- generic pieces ------------------------------------------------------------------------------------
@triton.jit
def _grad_multiplier(grow, scale_ptr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr):
    """g' = g * gmul: gmul = (maximize ? -1 : 1) * (1/grad_scale), the same bits as g/scale for
    GradScaler's powers of two."""
    sign = tl.load(grow + G_GRAD_SIGN).to(ACC)
    if HAS_SCALE:
        return sign * div(tl.full((), 1.0, ACC), tl.load(scale_ptr).to(ACC), IEEE)
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
def _norms_kernel(
    w_ptr, w_offsets, g_ptr, s_ptr, state_stride, chunk_tab, seg_tab, seg_active, group_tab, step_ptr,
    partials, counters, stats, scale_ptr, inf_ptr, num_segs,
    ALGO: tl.constexpr, CHUNK: tl.constexpr, HAS_CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr,
    HAS_EMPTY: tl.constexpr, W_ALIGNED: tl.constexpr, HAS_TAIL: tl.constexpr,
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr,
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
            numel = tl.load(row + SEG_NUMEL)
            real_end = seg_start + numel
            full_end = tl.multiple_of(seg_start + numel // ALIGN * ALIGN, 16)
            flags = tl.load(row + SEG_FLAGS)
            grow = group_tab + tl.load(row + SEG_GROUP) * G_COLS
            t = tl.load(step_ptr)
            P = _pass1_params(ALGO, grow, flags, _grad_multiplier(grow, scale_ptr, HAS_SCALE, ACC, IEEE), t,
                              ACC, IEEE)
            wp = _segment_weights(w_ptr, w_offsets, seg, seg_start, W_ALIGNED)

            acc_w = tl.zeros((BLOCK,), dtype=ACC)
            acc_u = tl.zeros((BLOCK,), dtype=ACC)
            acc_g = tl.zeros((BLOCK,), dtype=ACC)
            # the parameter's whole 16-element blocks of [start, start + CHUNK), BLOCK elements a
            # step (small segments: one step), 128-bit loads (every mask ends at a multiple of 16)
            for sub in range(start, tl.minimum(start + CHUNK, full_end), BLOCK):
                offs = tl.multiple_of(sub, 16) + tl.arange(0, BLOCK)
                offs = tl.max_contiguous(tl.multiple_of(offs, 16), BLOCK)
                w2, u2, g2 = _pass1_block(ALGO, wp, g_ptr, s_ptr, state_stride, offs, offs < full_end, P, V0, V1,
                                          V2, ACC, IEEE)
                acc_w += w2
                acc_u += u2
                acc_g += g2
            sum_w = tl.sum(acc_w, axis=0)
            sum_u = tl.sum(acc_u, axis=0)
            sum_g = tl.sum(acc_g, axis=0)
            if HAS_TAIL:   # the parameter's last numel % 16 elements, if they fall in this chunk
                if (full_end < real_end) & (start <= full_end) & (full_end < start + CHUNK):
                    offs = full_end + tl.arange(0, ALIGN)
                    w2, u2, g2 = _pass1_block(ALGO, wp, g_ptr, s_ptr, state_stride, offs, offs < real_end, P, V0,
                                              V1, V2, ACC, IEEE)
                    sum_w += tl.sum(w2, axis=0)
                    sum_u += tl.sum(u2, axis=0)
                    sum_g += tl.sum(g2, axis=0)
            tl.store(partials + PART_COLS * pid + PART_W2, sum_w)
            tl.store(partials + PART_COLS * pid + PART_U2, sum_u)
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
                su = _segment_sum(partials, first, first + n, PART_U2, ACC, TILE, LOG2_TILE)
                sg = _segment_sum(partials, first, first + n, PART_G2, ACC, TILE, LOG2_TILE)
                _finish(ALGO, stats, seg, sw, su, sg, grow, flags, t, ACC, IEEE)
                tl.store(counters + seg, 0)   # zero between launches (the ABI)

    # Active segments without chunks (zero-size parameters) have no program above: program i
    # finishes those among segments i, i + grid, ... (norms 0, the zero-norm trust ratio), as the
    # C++ kernels do. Compiled only for buckets that hold such a segment (HAS_EMPTY).
    if HAS_EMPTY:
        for sid in range(tl.program_id(0), num_segs, tl.num_programs(0)):
            srow = seg_tab + sid * SEG_COLS
            empty = (tl.load(srow + SEG_NUM_CHUNKS) == 0) & (tl.load(seg_active + sid) != 0)
            if HAS_INF:
                empty = empty & (tl.load(inf_ptr) == 0)
            if empty:
                zero = tl.zeros((), dtype=ACC)
                _finish(ALGO, stats, sid, zero, zero, zero, group_tab + tl.load(srow + SEG_GROUP) * G_COLS,
                        tl.load(srow + SEG_FLAGS), tl.load(step_ptr), ACC, IEEE)


@triton.jit
def _update_kernel(
    w_ptr, w_offsets, g_ptr, s_ptr, state_stride, chunk_tab, seg_tab, seg_active, group_tab, stats, step_ptr,
    counters, scale_ptr, inf_ptr,
    ALGO: tl.constexpr, CHUNK: tl.constexpr, HAS_CHUNKS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr, W_ALIGNED: tl.constexpr,
    HAS_TAIL: tl.constexpr, V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr,
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
            numel = tl.load(row + SEG_NUMEL)
            real_end = seg_start + numel
            full_end = tl.multiple_of(seg_start + numel // ALIGN * ALIGN, 16)
            flags = tl.load(row + SEG_FLAGS)
            grow = group_tab + tl.load(row + SEG_GROUP) * G_COLS
            P = _pass2_params(ALGO, grow, flags, stats + seg * STAT_COLS,
                              _grad_multiplier(grow, scale_ptr, HAS_SCALE, ACC, IEEE), ACC, IEEE)
            wp = _segment_weights(w_ptr, w_offsets, seg, seg_start, W_ALIGNED)
            # the parameter's whole 16-element blocks, BLOCK elements a step, 128-bit accesses
            # (every mask ends at a multiple of 16); then its last numel % 16 elements, if in this
            # chunk. Nothing past the parameter's end is read from it or written.
            for sub in range(start, tl.minimum(start + CHUNK, full_end), BLOCK):
                offs = tl.multiple_of(sub, 16) + tl.arange(0, BLOCK)
                offs = tl.max_contiguous(tl.multiple_of(offs, 16), BLOCK)
                _pass2_block(ALGO, wp, g_ptr, s_ptr, state_stride, offs, offs < full_end, P, V0, V1, V2, BF16, ACC,
                             IEEE)
            if HAS_TAIL:
                if (full_end < real_end) & (start <= full_end) & (full_end < start + CHUNK):
                    offs = full_end + tl.arange(0, ALIGN)
                    _pass2_block(ALGO, wp, g_ptr, s_ptr, state_stride, offs, offs < real_end, P, V0, V1, V2, BF16,
                                 ACC, IEEE)
    if pid == 0:
        if HAS_INF:
            if tl.load(inf_ptr) == 0:
                tl.store(step_ptr, tl.load(step_ptr) + 1.0)
        else:
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)


KERNELS = (_norms_kernel, _update_kernel)


def _interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_update_kernel, triton.runtime.jit.JITFunction)


def _interpreter_ok() -> bool:
    """Triton's interpreter before 3.7 cannot use a loaded scalar as a loop bound (these kernels do)."""
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 7)


def block_and_warps(chunk_elems: int, acc_dtype: torch.dtype = torch.float32, algorithm: int = B.ALGO_LARS):
    """Elements per loop step of a program, and its warps: BLOCK_ELEMS (half for float64) over 8
    warps, 8 elements per thread (two 128-bit vectors of each float32 stream); LAMB, whose elements
    carry two moments and three divisions, a quarter as many over 4 warps, 4 per thread. (With 16
    float32 elements per thread ptxas 12.8, the GPU machine's, spills in the update kernel; the
    registers: the AOT test in tests/test_triton.py.)"""
    lamb = algorithm == B.ALGO_LAMB
    block = min(chunk_elems, BLOCK_ELEMS // ((2 if acc_dtype == torch.float64 else 1) * (4 if lamb else 1)))
    return block, max(1, min(8, block // (128 if lamb else 256)))


class _Launch:
    """Everything bucket_step passes to the two kernels that does not change between steps (the
    bucket's plan: rebuilt when a parameter moves)."""

    __slots__ = ("grid", "norms_args", "num_segs", "update_args", "consts", "warps", "step")

    def __init__(self, b):
        ce = b.chunk_elems
        if ce < 16 or ce & (ce - 1):
            raise ValueError(f"backend='triton' needs a power-of-two chunk size >= 16, got {ce}")
        self.grid = (max(b.num_chunks, 1),)
        w0, state_stride = b.weights[0], b.state_buf.stride(0)
        self.norms_args = (w0, b.w_offsets, b.grad_buf, b.state_buf, state_stride, b.chunk_table, b.seg_table,
                           b.seg_active, b.group_table, b.step, b.partials, b.counters, b.stats)
        self.num_segs = b.num_segments
        self.update_args = (w0, b.w_offsets, b.grad_buf, b.state_buf, state_stride, b.chunk_table, b.seg_table,
                            b.seg_active, b.group_table, b.stats, b.step, b.counters)
        block, self.warps = block_and_warps(ce, b.acc_dtype, b.algorithm.id)
        self.consts = dict(ALGO=b.algorithm.id, CHUNK=ce, BLOCK=block, HAS_CHUNKS=b.num_chunks > 0,
                           W_ALIGNED=b.w_aligned, HAS_TAIL=b.has_tail)
        self.step = b.step


class _Bound:
    """The bucket's two launches with every argument bound once, pointers as integers, called
    straight on the compiled kernels (CompiledKernel[grid]: Triton's own launch of a compiled
    kernel, launch hooks included). Triton's JIT launch binds and specializes every argument, and
    its launcher calls data_ptr() and cuPointerGetAttribute for every tensor argument, on every
    launch: about half of step()'s host time at 161 tensors on an H200 (bench/RESULTS.md). The
    integers stay right for the plan's life: the bucket's own buffers never change memory, and
    every plan is rebuilt when a parameter moves (Bucket._set_weights). Bound again when what
    chooses the compiled kernels changes (`key`: the bucket's variant, Triton's debug and
    instrumentation knobs); never with AMP tensors (the caller's, new ones any step)."""

    __slots__ = ("key", "runs")

    def __init__(self, view):
        self.key, self.runs = None, ()

    def bind(self, launches, compiled, grid, key) -> None:
        """The runs of `launches` (TritonBackend.launches) on their `compiled` kernels; none (every
        launch with this key through the JIT) where this Triton lacks what binding relies on."""
        self.key, self.runs = key, ()
        runs = []
        for (kernel, args, kw), k in zip(launches, compiled):
            if not hasattr(type(k), "__getitem__") or not hasattr(kernel, "signature"):
                return   # a Triton without these: every launch through the JIT
            names = kernel.signature.parameters
            call = kernel.signature.bind(*args, **{n: v for n, v in kw.items() if n in names})
            call.apply_defaults()
            values = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in call.arguments.values()]
            if len(values) != len(getattr(getattr(k, "src", None), "signature", ())):
                return   # the launcher takes another argument list than this Triton's JIT passes it
            runs.append((k[tuple(grid) + (1,) * (3 - len(grid))], values))
        self.runs = tuple(runs)


def _compile_knobs() -> tuple:
    """Triton's settings that its JIT reads at every launch to pick the compiled kernel (a debug
    build, a sanitizer's or profiler's instrumentation)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return ()
    return (getattr(knobs.runtime, "debug", None), getattr(knobs.compilation, "instrumentation_mode", None))


def _bindable(b, grad_scale, found_inf) -> bool:
    """Whether the step may go through _Bound: a CUDA bucket (the interpreter compiles nothing) and
    no AMP tensors. (Inside torch.compile the step goes through traced.py's op instead.)"""
    return grad_scale is None and found_inf is None and b.device.type == "cuda"


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


def _check_amp(t: Optional[torch.Tensor], name: str, b) -> None:
    if t is not None and (t.device != b.device or t.dtype != torch.float32 or t.numel() != 1):
        raise ValueError(f"{name} must be a one-element float32 tensor on {b.device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _variant(b) -> tuple:
    """The bucket's Algorithm.variant as the kernels' V0, V1, V2 (LARS: its only momentum form
    or -1, any Nesterov, any dampening; LAMB: any l2 / decoupled weight decay, any moment bias
    correction)."""
    v = tuple(b.variant) + (0,) * (3 - len(b.variant))
    return dict(V0=v[0], V1=v[1], V2=v[2])


class TritonBackend(Backend):
    NAME = "triton"
    # Elements per chunk: one program of each pass handles one chunk, looping over it BLOCK_ELEMS
    # elements at a time, so a small segment costs one step.
    CHUNK_ELEMS = 8192
    SUPPORTS_SHARDED = True
    requirement = ("the triton package and CUDA tensors (CPU tensors only under the Triton interpreter: "
                   "TRITON_INTERPRET=1 set before triton is imported, triton >= 3.7)")
    # The last program of a segment adds its chunk partials REDUCE_TILE at a time (docs/SPEC.md, "The
    # segment sum"): the CPU and CUDA kernels use the same tile and tree.
    REDUCE_TILE = B.REDUCE_TILE
    # Launches after a bucket's first go straight to the compiled kernels (_Bound); False: every
    # launch through Triton's JIT (bench/profile_step.py's fused-triton-jit compares the two)
    bind_launches = True

    def available(self, device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available() and not _interpreted()
        if device.type == "cpu":
            return os.environ.get("TRITON_INTERPRET") == "1" and _interpreted() and _interpreter_ok()
        return False

    def launches(self, b, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> tuple:
        """The step's two launches as (kernel, positional args, keyword args) for kernel[grid]:
        norms/stats (pass 1), then the update and the step counter (pass 2)."""
        cfg = b.plan("triton", _Launch)
        _check_amp(grad_scale, "grad_scale", b)
        _check_amp(found_inf, "found_inf", b)
        has_scale, has_inf = grad_scale is not None, found_inf is not None
        scale = grad_scale if has_scale else cfg.step   # a dummy pointer when absent (never read)
        inf = found_inf if has_inf else cfg.step
        common = dict(**cfg.consts, **_variant(b), HAS_SCALE=has_scale, HAS_INF=has_inf, num_warps=cfg.warps,
                      enable_fp_fusion=False)
        tile = self.REDUCE_TILE
        return ((_norms_kernel, (*cfg.norms_args, scale, inf, cfg.num_segs),
                 dict(common, TILE=tile, LOG2_TILE=tile.bit_length() - 1, HAS_EMPTY=b.has_empty)),
                (_update_kernel, (*cfg.update_args, scale, inf), dict(common, BF16=b.dtype == torch.bfloat16)))

    def bucket_step(self, b, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                    between: Optional[Callable] = None) -> None:
        """Two launches (launches()); `between(view)`, when given, runs between them (the all-reduce
        of a sharded bucket). On CUDA without AMP tensors, the launches after the first go through
        the bucket's _Bound plan; under torch.compile, through the op traced_bucket_step
        (traced.py)."""
        if torch.compiler.is_compiling():
            return traced_step(self, b, grad_scale, found_inf, between)
        bound = key = None
        if self.bind_launches and _bindable(b, grad_scale, found_inf):
            bound, key = b.plan("triton-bound", _Bound), (b.variant, _compile_knobs())
            if bound.key == key and not bound.runs:
                bound = None   # this Triton cannot (_Bound.bind): through the JIT, not bound again
            elif bound.key == key:
                (norms, norms_args), (update, update_args) = bound.runs
                with _on_device(b.device):
                    norms(*norms_args)
                if between is not None:
                    between(b)
                with _on_device(b.device):
                    update(*update_args)
                return
        grid = b.plan("triton", _Launch).grid
        launches = self.launches(b, grad_scale, found_inf)
        (norms, norms_args, norms_kw), (update, update_args, update_kw) = launches
        with _on_device(b.device):
            compiled = [norms[grid](*norms_args, **norms_kw)]
        if between is not None:
            between(b)
        with _on_device(b.device):
            compiled.append(update[grid](*update_args, **update_kw))
        if bound is not None:
            bound.bind(launches, compiled, grid, key)


BACKEND = TritonBackend()
