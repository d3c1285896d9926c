"""Buckets: the parameters of one (device, dtype), with their gradients and optimizer state in flat
buffers, and the tables the kernels read (docs/SPEC.md, "The bucket ABI"; layouts in abi.py).

Parameters keep their own storage: the kernels reach each one through a table of element offsets
(from the bucket's first parameter), so nothing about the model changes (safetensors, partial
state_dict saves, ZeRO's bucket views and FSDP2's shards all see ordinary tensors). A parameter that
is not dense in memory (a strided slice) is staged: copied into a dense tensor of the bucket's
before the kernels and back after. A parameter moved behind the optimizer's back (p.data = ...,
ZeroRedundancyOptimizer(parameters_as_bucket_view=True)) with the same shape, strides, dtype and
device just gets its offset updated; any other change rebuilds the buckets (optimizer.py).

Gradients and momentum state live in flat buffers whose segments start at multiples of ALIGN
elements; padding is zero and stays zero. Each parameter's gradient and state are views with the
parameter's own (dense) strides, so element k of a segment is element k of the parameter's memory.

Gradients follow torch's semantics: a parameter whose .grad is None is skipped, and whatever .grad
is at step() is what the step uses; step() neither writes into .grad nor replaces it. The fast path
avoids copies: zero_grad() zeroes the grad buffer in place and sets each .grad to None; a tensor
hook, which autograd runs before it writes .grad, attaches the (zeroed) bucket view as .grad the
first time backward() produces a gradient (not in torch.autograd.grad, which must leave .grad
alone), so autograd accumulates straight into the bucket.
(model.zero_grad() sets None too: the same path.) Any other .grad (assigned by hand, produced by
a compiled backward, owned by another library) is copied in at step time and counted in
`Bucket.grad_copies`.
"""
from __future__ import annotations

import math
import weakref
from itertools import count, repeat
from operator import attrgetter, is_
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.graph import get_gradient_edge

from .abi import (ALIGN, CHUNK_COLS, COL_LR, GROUP_COLS, PART_COLS, SEG_COLS, SEG_FLAGS, STAT_COLS,
                  STAT_TRUST_RATIO)
from .algorithms import Algorithm
from .algorithms.base import WEIGHTS
from .base import STEP, accumulation_dtype, check_grad, check_step, grad_ok
from .sharding import is_sharded, local, shard_groups
from .stats import ReducePlan

Layout = Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype, torch.device]
_GRAD, _SHAPE = attrgetter("grad"), attrgetter("shape")
_CDATA = attrgetter("_cdata")


def _load_step_signature():
    """The extension's step_signature (csrc/host_checks.cpp): per parameter its data pointer, the
    identity of its .grad and the grad's data pointer, sizes and strides in one C++ pass. None
    without the extension (the same checks then run as Python-level passes)."""
    try:
        from ._C import step_signature
        return step_signature
    except (ImportError, AttributeError):
        return None


_step_signature = _load_step_signature()


def _dense_strides(p: torch.Tensor) -> Tuple[int, ...]:
    """The parameter's strides when it is dense (e.g. channels_last), else contiguous ones."""
    return tuple(torch.empty_like(p, device="meta").stride())  # preserve_format does exactly this


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) exactly (in some
    order of the dimensions), so the kernels can treat the memory as a flat array."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes [first, end) a tensor's elements lie in."""
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _element_addresses(t: torch.Tensor) -> torch.Tensor:
    """Each element's address (shape and strides only: computed on the CPU, never reads t)."""
    size = t.element_size()
    addresses = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        addresses = addresses.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * (st * size)
    return addresses.reshape(-1) + t.data_ptr()


_MAX_CHECKED_ELEMENTS = 1 << 24   # (128 MiB of addresses)


def _column_slice(t: torch.Tensor) -> Optional[Tuple[int, int, int, int]]:
    """A column slice of a matrix (shape (rows, cols), strides (R, 1), cols <= R) as (R, first
    element, rows, cols), else None."""
    if t.ndim != 2 or t.stride(1) != 1 or t.stride(0) < t.shape[1] or t.data_ptr() % t.element_size():
        return None
    return t.stride(0), t.data_ptr() // t.element_size(), t.shape[0], t.shape[1]


def _shared_in_cluster(tensors: Sequence[torch.Tensor], members: List[int]) -> Optional[Tuple[int, int, bool]]:
    """Two members with memory in common, as (i, j, certain), else None: dense tensors fill their
    spans; column slices of one matrix (row stride R) are rectangles of rows x columns counted
    from the cluster's first element (a slice that wraps past column R is two), which share
    memory where two of them overlap; anything else is decided element by element (sorted
    addresses), up to a size past which the first pair is refused as not verified."""
    if all(_is_dense(tensors[i]) for i in members):
        return members[0], members[1], True
    slices = [_column_slice(tensors[i]) for i in members]
    if all(slices) and len({(sl[0], tensors[i].element_size()) for sl, i in zip(slices, members)}) == 1:
        row_stride = slices[0][0]
        origin = min(sl[1] for sl in slices)
        rects = []   # (owner, first row, rows, first column, columns)
        for i, (_, first, rows, cols) in zip(members, slices):
            q, u = divmod(first - origin, row_stride)
            rects.append((i, q, rows, u, min(cols, row_stride - u)))
            if u + cols > row_stride:
                rects.append((i, q + 1, rows, 0, u + cols - row_stride))
        owner, r0, nr, c0, nc = (torch.tensor(col) for col in zip(*rects))
        overlap = ((r0[:, None] < (r0 + nr)[None, :]) & (r0[None, :] < (r0 + nr)[:, None])
                   & (c0[:, None] < (c0 + nc)[None, :]) & (c0[None, :] < (c0 + nc)[:, None])
                   & (owner[:, None] != owner[None, :]))
        pairs = overlap.nonzero()
        return (int(owner[pairs[0, 0]]), int(owner[pairs[0, 1]]), True) if pairs.numel() else None
    if (len({tensors[i].element_size() for i in members}) > 1
            or sum(tensors[i].numel() for i in members) > _MAX_CHECKED_ELEMENTS):
        return members[0], members[1], False
    addresses = torch.cat([_element_addresses(tensors[i]) for i in members])
    owners = torch.cat([torch.full((tensors[i].numel(),), i, dtype=torch.int64) for i in members])
    addresses, order = torch.sort(addresses, stable=True)
    owners = owners[order]
    same = ((addresses[1:] == addresses[:-1]) & (owners[1:] != owners[:-1])).nonzero()
    if not same.numel():
        return None
    k = int(same[0])
    return int(owners[k]), int(owners[k + 1]), True


def _shared_memory(tensors: Sequence[torch.Tensor]) -> Optional[Tuple[int, int, bool]]:
    """Two tensors with memory in common (Parameter(x) and Parameter(x.view(...))), as (i, j,
    certain), else None. Tensors whose byte spans overlap form a cluster, decided by
    _shared_in_cluster."""
    # (meta tensors have no memory: every one of them reports address 0)
    spans = sorted((*_span(t), i) for i, t in enumerate(tensors) if t.numel() and t.device.type != "meta")
    clusters: List[List[int]] = []
    end = -1
    for first, stop, i in spans:
        if first >= end:
            clusters.append([])
        clusters[-1].append(i)
        end = max(end, stop)
    for members in clusters:
        found = _shared_in_cluster(tensors, members) if len(members) > 1 else None
        if found is not None:
            i, j, certain = found
            return min(i, j), max(i, j), certain
    return None


def refuse_shared_memory(tensors: Sequence[torch.Tensor], where: Sequence[str]) -> None:
    """The error for parameters that share memory (each named as `where` gives it)."""
    shared = _shared_memory(tensors)
    if shared is not None:
        i, j, certain = shared
        raise ValueError(
            f"{where[i]} and {where[j]} {'share' if certain else 'may share (too large an interleaving to check)'} "
            "memory (two Parameters over one tensor's storage, such as Parameter(x) and Parameter(x.view(...))): the "
            "fused step would update each from the other's values in an order nobody chose. Tie the modules to "
            "one Parameter object (module_b.weight = module_a.weight), or use tvlars_fused.reference, which "
            "updates them one after the other")


def _layout(t: torch.Tensor) -> Layout:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def upload(dst: torch.Tensor, rows) -> None:
    """Copy host values into a device table without a host sync: through pinned memory when the
    table is on a CUDA device (the caching host allocator keeps the staging block alive until the
    copy has run)."""
    src = torch.tensor(rows, dtype=dst.dtype).reshape(dst.shape)
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


class Bucket:
    """Flat gradient/state buffers and tables for the parameters of one (device, dtype)."""

    def __init__(self, params: Sequence[torch.Tensor], group_index: Sequence[int],
                 param_groups: List[dict], chunk_elems: int, t: float, algorithm: Algorithm,
                 optimizer_state: Dict, where: Sequence[str]):
        assert len(params) > 0
        self.params = list(params)
        # Sharded (DTensor) parameters: the kernels update FSDP2's local shards in place.
        self.sharded = is_sharded(params[0])
        self.group_index = list(group_index)
        self.where = list(where)
        with torch.no_grad():
            targets = [local(p) for p in self.params]
        self.device = targets[0].device
        self.dtype = targets[0].dtype
        self.acc_dtype = accumulation_dtype(self.dtype)
        self.chunk_elems = int(chunk_elems)
        self.algorithm = algorithm
        # A parameter whose shape changed (p.data = ...) no longer fits its state: refuse before
        # anything is built.
        known_keys = sorted({key for keys in algorithm.key_sets for key in keys})
        for i, p in enumerate(self.params):
            st = optimizer_state.get(p)
            for key in known_keys:
                v = st.get(key) if st is not None else None
                if isinstance(v, torch.Tensor) and local(v).shape != targets[i].shape:
                    raise ValueError(
                        f"{self.where[i]} has shape {tuple(p.shape)} but its optimizer state[{key!r}] has shape "
                        f"{tuple(v.shape)}: the parameter changed shape after the optimizer was built; reset "
                        "its state (del optimizer.state[p]) or build a new optimizer")
        self.grad_copies = 0      # grads that were not the bucket's view at step time
        self.grad_rezeroed = 0    # views that had to be zeroed one by one (no optimizer.zero_grad())

        # layout of the flat buffers
        offsets, numels, ends = [], [], []
        off = 0
        for p in targets:
            n = p.numel()
            offsets.append(off)
            numels.append(n)
            off += ALIGN * math.ceil(n / ALIGN)
            ends.append(off)
        self.numel = off
        dev = self.device
        self.grad_buf = torch.zeros(self.numel, dtype=self.dtype, device=dev)
        # one row per state slot of the algorithm (LARS: the momentum buffer; LAMB: m, v)
        self.state_buf = torch.zeros(algorithm.slots, self.numel, dtype=self.acc_dtype, device=dev)
        self.grad_views: List[torch.Tensor] = []
        self.state_views: List[Tuple[torch.Tensor, ...]] = []   # per parameter, its view of each slot
        self._view_specs = [(tuple(p.shape), _dense_strides(p), o) for p, o in zip(targets, offsets)]
        for p, (shape, strides, o) in zip(targets, self._view_specs):
            self.grad_views.append(self.grad_buf.as_strided(shape, strides, o))
            self.state_views.append(tuple(row.as_strided(shape, strides, row.storage_offset() + o)
                                          for row in self.state_buf))
        self._view_ptrs = [v.data_ptr() for v in self.grad_views]
        # What each parameter must still look like for this bucket to serve it (checked every step).
        self._layouts = [_layout(p) for p in targets]
        self._shapes = [layout[0] for layout in self._layouts]    # what step()'s fast check compares
        self._strides = [layout[1] for layout in self._layouts]
        # Non-dense parameters are updated through a dense copy (staging), copied in and out.
        self.staging: Dict[int, torch.Tensor] = {
            i: torch.empty_strided(tuple(p.shape), _dense_strides(p), dtype=self.dtype, device=dev)
            for i, p in enumerate(targets) if not _is_dense(p)}
        self.weights: List[torch.Tensor] = []      # what the kernels update, per segment
        self.w_offsets = torch.zeros(len(targets), dtype=torch.int64, device=dev)
        self._ptrs: List[int] = []
        self.w_aligned = False
        self._set_weights(targets)

        # Carry over optimizer state (live views of an older bucket, or values loaded from a
        # state_dict) into the new buffers.
        self.step = torch.full((1,), float(t), dtype=torch.float32, device=dev)
        self.step_entry = self.step.view(())   # what every state[p]["step"] holds
        self.has_state = [False] * len(self.params)
        self._entries: List[Tuple[torch.Tensor, ...]] = [()] * len(self.params)   # what state[p][keys] hold
        self._keys: List[Tuple[str, ...]] = [()] * len(self.params)
        for i, p in enumerate(self.params):
            st = optimizer_state.get(p)
            if st is None:
                continue
            # the keys the group uses now first, then any other key set the algorithm knows (the
            # paper's m after a change of momentum_form: adopted here, restarted at the next step)
            current = algorithm.state_keys(param_groups[self.group_index[i]])
            for keys in (current,) + tuple(k for k in algorithm.key_sets if k != current):
                if all(isinstance(st.get(key), torch.Tensor) for key in keys):
                    self._adopt(i, st, keys)
                    st[STEP] = self.step_entry
                    break
        self.clean = [True] * len(self.params)  # grad view known to be zero

        # tables
        chunk_rows, seg_rows = [], []
        for s, (o, n, e) in enumerate(zip(offsets, numels, ends)):
            first = len(chunk_rows)
            chunk_rows.extend([c, s] for c in range(o, e, self.chunk_elems))
            seg_rows.append([o, e, n, self.group_index[s], 0, first, len(chunk_rows) - first])
        self._seg_rows = seg_rows
        self.seg_table = torch.tensor(seg_rows, dtype=torch.int64).reshape(-1, SEG_COLS).to(dev)
        self.chunk_table = torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1, CHUNK_COLS).to(dev)
        self.num_segments = len(seg_rows)
        self.num_chunks = len(chunk_rows)
        self.has_tail = any(n % ALIGN for n in numels)   # a parameter that ends inside a 16-element block
        self.reduce_plan = ReducePlan(seg_rows, self.num_chunks, dev)
        self.seg_active = torch.zeros(self.num_segments, dtype=torch.int32, device=dev)
        # exact (float64) hyperparameters: each kernel rounds a value to acc where it reads it
        self.group_table = torch.zeros(len(param_groups), GROUP_COLS, dtype=torch.float64, device=dev)
        self.partials = torch.zeros(max(self.num_chunks, 1), PART_COLS, dtype=self.acc_dtype, device=dev)
        self.counters = torch.zeros(self.num_segments, dtype=torch.int32, device=dev)
        self.stats = torch.zeros(self.num_segments, STAT_COLS, dtype=self.acc_dtype, device=dev)
        self.stats[:, STAT_TRUST_RATIO] = 1.0
        self._active: Optional[List[int]] = None
        self._expected_grads: List[Optional[torch.Tensor]] = [object()] * len(self.params)   # no fast path yet
        self._state_ref = None
        self._sig: Optional[bytes] = None   # step_signature after the last prepare
        self._fast = False                  # set by sync_params for the gather_grads right after it
        self._rows: Optional[list] = None
        self._tensor_lr: Optional[list] = None
        self._filters: Optional[list] = None
        # what the bucket's groups use of the options that shape the elementwise code (from
        # prepare; Algorithm.variant): backends may compile for just that
        self.variant: tuple = ()
        self.has_empty = any(n == 0 for n in numels)   # a zero-size parameter (a segment without chunks)
        self.view = BucketView(self)

        # the gradient hooks (grad views attached by backward), removed with the bucket
        self._hooks: Dict[int, object] = {}
        self._impls = [p._cdata for p in self.params]   # each parameter's TensorImpl (_follow_swaps)
        self._maybe_pending: set = set()   # parameters whose first-update mark may not be consumed yet
        self._ref = weakref.ref(self)
        self._finalizer = weakref.finalize(self, _release, self._hooks, self._ref, [id(p) for p in self.params])
        if not self.sharded:
            for i in range(len(self.params)):
                self.hook_grad(i)
        self.reduce_groups = shard_groups(self.params[0]) if self.sharded else []

    def _state_entry(self, view: torch.Tensor, i: int) -> torch.Tensor:
        """What optimizer.state[p][key] holds: the slot's view (a DTensor over it when sharded)."""
        if not self.sharded:
            return view
        p = self.params[i]
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def _adopt(self, i: int, st: Dict, keys: Tuple[str, ...]) -> None:
        """Copy the tensors st[keys] into parameter i's slots and point the entries at the slots."""
        entries = []
        for key, view in zip(keys, self.state_views[i]):
            view.copy_(local(st[key].detach()))
            st[key] = entry = self._state_entry(view, i)
            entries.append(entry)
        self._entries[i], self._keys[i] = tuple(entries), keys
        self.has_state[i] = True

    # -- the parameters' memory ---------------------------------------------------------------
    def _set_weights(self, targets: List[torch.Tensor]) -> None:
        """Point the kernels at the parameters' current memory: the weights list and the offsets
        table (elements from weights[0]; aligned when every weight is 16-element aligned)."""
        self.weights = [self.staging.get(i, t) for i, t in enumerate(targets)]
        self.plan_cache: Dict[str, object] = {}   # backends' plans (BucketView.plan) name the weights
        self._sig = None
        self._ptrs = [t.data_ptr() for t in targets]
        size = self.weights[0].element_size()
        ptrs = [w.data_ptr() for w in self.weights]
        base = ptrs[0]
        self.w_aligned = all((q - base) % (ALIGN * size) == 0 for q, w in zip(ptrs, self.weights) if w.numel()) \
            and base % 16 == 0
        upload(self.w_offsets, [(q - base) // size for q in ptrs])

    def sync_params(self, peers: Sequence["Bucket"] = ()) -> bool:
        """Called before each step: False when a parameter changed shape, strides, dtype or device
        (the buckets must be rebuilt); a parameter that only moved to other memory is followed
        (unless it now shares memory with another parameter, of this bucket or of `peers`, the
        optimizer's other buckets). The common case (nothing moved) is three C-level passes over
        the parameters."""
        self._fast = False
        if not self.sharded:
            ps = self.params
            if self._sig is not None and _step_signature(ps) == self._sig:
                self._fast = True   # nothing moved, and every .grad is last step's (gather_grads)
                return True
            if list(map(_CDATA, ps)) != self._impls:
                self._follow_swaps()
            if (list(map(torch.Tensor.data_ptr, ps)) == self._ptrs
                    and list(map(torch.Tensor.stride, ps)) == self._strides
                    and list(map(_SHAPE, ps)) == self._shapes):
                return True
        moved = False
        with torch.no_grad():
            for i, p in enumerate(self.params):
                t = local(p) if self.sharded else p
                if t.data_ptr() != self._ptrs[i]:
                    if _layout(t) != self._layouts[i]:
                        return False
                    moved = True
                elif t.shape != self._layouts[i][0] or t.stride() != self._layouts[i][1]:
                    return False
            if moved:
                targets = [local(p) if self.sharded else p for p in self.params]
                others = [b for b in peers if b is not self and b.device == self.device]
                refuse_shared_memory(targets + [local(p) for b in others for p in b.params],
                                     self.where + [w for b in others for w in b.where])
                self._set_weights(targets)
        return True

    def layout_changed(self, i: int) -> bool:
        """Parameter i no longer has the shape, strides, dtype or device it was built with."""
        p = self.params[i]
        return _layout(local(p) if self.sharded else p) != self._layouts[i]

    def stage_in(self) -> None:
        if self.staging:
            idx = list(self.staging)
            torch._foreach_copy_([self.staging[i] for i in idx], [self.params[i].detach() for i in idx])

    def stage_out(self) -> None:
        if self.staging:
            idx = list(self.staging)
            torch._foreach_copy_([self.params[i].detach() for i in idx], [self.staging[i] for i in idx])

    # -- gradients ----------------------------------------------------------------------------
    def _renew_views(self) -> None:
        """A grad view whose memory was swapped (`p.grad.data = x`; module._apply converts grads
        that way) no longer views the bucket: that tensor becomes a foreign .grad (copied in, as
        any other) and the parameter gets a new view."""
        if self.sharded or list(map(torch.Tensor.data_ptr, self.grad_views)) == self._view_ptrs:
            return
        for i, (v, ptr) in enumerate(zip(self.grad_views, self._view_ptrs)):
            if v.data_ptr() != ptr:
                self.grad_views[i] = self.grad_buf.as_strided(*self._view_specs[i])
        self._expected_grads = [object()] * len(self.params)   # no fast path until prepare
        self._sig = None

    def attach_grad(self, i: int) -> None:
        """Backward is about to produce p.grad while it is None: give autograd the bucket view."""
        view = self.grad_views[i]
        if not self.clean[i]:
            view.zero_()
            self.grad_rezeroed += 1
        self.clean[i] = False
        self.params[i].grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad: None, or every existing .grad zeroed in place (the same tensors).
        The bucket's own gradient buffer is zeroed with one fill."""
        self._fast = False
        self._renew_views()
        if not self.sharded:
            self.grad_buf.zero_()
            self.clean = [True] * len(self.params)
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if set_to_none:
                p.grad = None
            elif self.sharded or g is not self.grad_views[i]:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()
            else:
                self.clean[i] = False

    def hook_grad(self, i: int) -> None:
        """Make parameter i's backward accumulate into the bucket's view: a tensor hook, which
        autograd runs before it writes .grad, attaches the view as .grad (in backward() only: in
        torch.autograd.grad the gradients must not become .grad). The newest bucket of a parameter
        owns its gradient (another optimizer built over the same parameters later takes it over).
        A parameter without autograd (requires_grad False) gets its hook when a gradient first has
        to be copied in (prepare)."""
        p = self.params[i]
        _OWNER[id(p)] = self._ref
        if i in self._hooks or not p.requires_grad:
            return
        stale = p._backward_hooks is not None and _BOUND.get(id(p), p._cdata) != p._cdata
        self._hooks[i] = p.register_hook(_make_attach_hook(self._ref, i))
        if stale:   # swapped since its hook dict was bound (while no bucket of it checked)
            _rebind_hooks(p)
        _BOUND[id(p)] = p._cdata

    def _follow_swaps(self) -> None:
        """Parameters given a new TensorImpl by torch.utils.swap_tensors (load_state_dict or
        module.to() under swap_module_params_on_conversion; the memory may be the same): their
        hooks are bound to the new one."""
        for i, p in enumerate(self.params):
            if p._cdata != self._impls[i]:
                self._impls[i] = p._cdata
                if i in self._hooks:
                    _rebind_hooks(p)
                    _BOUND[id(p)] = p._cdata

    def remove_hooks(self) -> None:
        _remove_handles(self._hooks)

    # -- per-step host bookkeeping (no device sync) -------------------------------------------
    def gather_grads(self) -> Tuple[List[Optional[torch.Tensor]], bool]:
        """Each parameter's .grad, and whether they are exactly last step's (the bucket's views
        where a gradient was, None elsewhere: the fast path, one C-level pass). A .grad that is not
        the view is checked here, before anything changes, so a rejected step changes nothing."""
        if torch.compiler.is_compiling():   # Dynamo traces plain loops (not C-level map passes)
            return [p.grad for p in self.params], False
        if self._fast:   # sync_params saw the signature unchanged
            self._fast = False
            return self._expected_grads, True
        self._renew_views()
        grads = list(map(_GRAD, self.params))
        if all(map(is_, grads, self._expected_grads)):
            return grads, True
        for i, g in enumerate(grads):
            if g is not None and g is not self.grad_views[i]:
                g = local(g)
                if not grad_ok(g):
                    check_grad(g, self.where[i])
                if g.dtype != self.dtype and _grad_dtype(self.params[i]) != self.dtype:
                    raise RuntimeError(
                        f"{self.where[i]}: its gradient is {g.dtype} (p.grad_dtype = {_grad_dtype(self.params[i])}) "
                        f"but the fused optimizers keep gradients in the parameter's dtype, {self.dtype}; set "
                        "p.grad_dtype = p.dtype (the default), or use the tvlars_fused.reference class, which "
                        "takes the gradient as is")
        return grads, False

    def _state_intact(self, state: Dict, keys: List[Tuple[str, ...]]) -> bool:
        """No state entry of the active parameters was reset, replaced or reassigned since the last
        step (ZeroRedundancyOptimizer's load_state_dict writes whole entries): C-level passes over
        the entries cached by the last slow path (one item per active parameter and slot)."""
        return (state is self._state_ref and keys == self._keys_seen
                # every key and entry of the state, by identity and in order (no lookup: hashing a
                # tensor key is a Python call, per parameter and step)
                and len(state) == len(self._state_values) and all(map(is_, state.values(), self._state_values))
                and all(map(is_, state.keys(), self._state_keys))
                and all(map(is_, map(dict.get, self._act_slot_state, self._act_keys), self._act_entries))
                and all(map(is_, map(dict.get, self._stated, repeat(STEP)), repeat(self.step_entry))))

    def prepare(self, param_groups: List[dict], state: Dict, grads: List[Optional[torch.Tensor]],
                same_grads: bool) -> List[float]:
        """Collect which parameters have a gradient, copy in gradients that are not the bucket's
        views, create state entries on first use, and upload the tables that changed. Returns the
        values of the "step" entries that were replaced from outside (ZeroRedundancyOptimizer's
        load_state_dict writes whole state entries), checked: the optimizer adopts t from them. When the gradients are last
        step's and no state entry changed, nothing is done per parameter."""
        keys = [self.algorithm.state_keys(g) for g in param_groups]
        intact = self._state_intact(state, keys)
        if same_grads and intact:
            replaced_steps = []
        else:
            if not intact:
                self._copy_moved_entries(state)
            replaced_steps = self._prepare_params(param_groups, state, grads, keys)
        self._upload_tables(param_groups)
        return replaced_steps

    def _prepare_params(self, param_groups: List[dict], state: Dict, grads: List[Optional[torch.Tensor]],
                        keys: List[Tuple[str, ...]]):
        """prepare()'s per-parameter work; caches what the next step's fast check compares."""
        active = []
        replaced_steps = []
        copied = self._read_aliased(grads)
        for i, p in enumerate(self.params):
            g = copied[i]
            st = state.get(p)
            if g is None:
                active.append(0)
                if self.has_state[i] and st is not None and st.get(STEP, self.step_entry) is not self.step_entry:
                    replaced_steps.extend(self._take_step(st))   # (spec: at the next step, updated or not)
                continue
            view = self.grad_views[i]
            if g is not view:   # (FSDP2's gradients always take this path)
                view.copy_(local(g).detach())
                if p.requires_grad and not (torch.compiler.is_compiling() or self.sharded or i in self._hooks):
                    self.hook_grad(i)   # unfrozen since the bucket was built: the next backward attaches
                # (not counted while torch.compile traces: a counter changing every step would be
                # a guard failing every step)
                self.grad_copies += not (self.sharded or torch.compiler.is_compiling())
            self.clean[i] = False
            active.append(1)
            group = param_groups[self.group_index[i]]
            mine = keys[self.group_index[i]]
            if self.has_state[i]:
                self._check_entries(i, st, mine)
            if not self.has_state[i]:
                st = state[p]
                self._start_state(i, st, mine, group)
            if st.get(STEP) is not self.step_entry:
                replaced_steps.extend(self._take_step(st))
        if active != self._active:
            upload(self.seg_active, active)
            self._active = active
        # what the next step's fast check compares against
        self._expected_grads = [v if a else None for v, a in zip(self.grad_views, active)]
        live = [i for i, a in enumerate(active) if a]
        self._act_state = [state.get(self.params[i]) for i in live]
        self._stated = [st for st, has in zip(map(state.get, self.params), self.has_state)
                        if has and st is not None and STEP in st]
        self._act_slot_state = [st for i, st in zip(live, self._act_state) for _ in self._keys[i]]
        self._act_keys = [key for i in live for key in self._keys[i]]
        self._act_entries = [entry for i in live for entry in self._entries[i]]
        self._state_ref, self._keys_seen = state, keys
        self._state_keys, self._state_values = tuple(state.keys()), tuple(state.values())
        # the signature the next step's sync_params compares (only when every gradient is the
        # bucket's view: a foreign .grad, even the same tensor again, must be copied every step)
        self._sig = (_step_signature(self.params) if not torch.compiler.is_compiling() and not self.sharded
                     and _step_signature is not None and all(map(is_, grads, self._expected_grads))
                     else None)
        return replaced_steps

    def _take_step(self, st: Dict) -> List[float]:
        """Point the entry's "step" at the bucket's t; the value written there from outside (to be
        adopted as t), if any, checked before anything is written (base.check_step)."""
        given = st.get(STEP)
        value = [] if given is None else [check_step(given)]
        st[STEP] = self.step_entry
        return value

    def _read_aliased(self, grads: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """The gradients, those that are views of this bucket's gradient buffer other than their own
        parameter's (.grad swapped between parameters) read out first: each is copied into its
        parameter's view, so none may be overwritten before it has been read. (Not inside
        torch.compile.)"""
        if self.sharded or torch.compiler.is_compiling():
            return grads
        out = grads
        for i, g in enumerate(grads):
            if g is not None and g is not self.grad_views[i] and g._base is self.grad_buf:
                out = list(out) if out is grads else out
                out[i] = g.clone()
        return out

    def _copy_moved_entries(self, state: Dict) -> None:
        """State entries moved from one parameter to another (opt.state[p0], opt.state[p1] =
        opt.state[p1], opt.state[p0]) are views of this bucket's own slots: they are copied
        before any slot takes a given tensor, so none is overwritten before it has been read."""
        own = {id(e) for entries in self._entries for e in entries}
        for i, p in enumerate(self.params):
            st = state.get(p)
            for key, cur in list(st.items()) if st else ():
                if id(cur) in own and all(cur is not e for e in self._entries[i]):
                    st[key] = cur.clone()

    def _check_entries(self, i: int, st: Optional[Dict], keys: Tuple[str, ...]) -> None:
        """Parameter i has state: a slot's entry reset by the user (or a new key set: another
        momentum_form) starts the whole state afresh; a tensor assigned by the user becomes the
        slot's values."""
        current = tuple(None if st is None else st.get(key) for key in keys)
        if keys != self._keys[i] or any(c is None for c in current):
            self.has_state[i] = False
            for key, entry in zip(self._keys[i], self._entries[i]):
                # (another form's key goes whatever it holds: the new form starts afresh)
                if st is not None and (st.get(key) is entry or key not in keys):
                    st.pop(key, None)
            return
        for key, cur, entry, view in zip(keys, current, self._entries[i], self.state_views[i]):
            if cur is not entry:
                view.copy_(local(cur.detach()))
                st[key] = entry
                self._set_first_update(i, False)   # a state given from outside: not a first update

    def _start_state(self, i: int, st: Dict, keys: Tuple[str, ...], group: dict) -> None:
        """Parameter i's first update (or a restart): each slot takes the tensor written into the
        entry from outside (ZeroRedundancyOptimizer's load_state_dict), else starts as the
        algorithm says; a first update the algorithm marks is set pending in the stats row (the
        kernels consume it in the step that updates the parameter, so a step skipped by found_inf
        does not count)."""
        entries, marked = [], False
        for key, view, how in zip(keys, self.state_views[i], self.algorithm.initial_state(group)):
            given = st.get(key)
            if isinstance(given, torch.Tensor):
                view.copy_(local(given.detach()))
            elif how == WEIGHTS:
                view.copy_(local(self.params[i].detach()))
            else:
                view.zero_()
                marked = marked or self.algorithm.first_step_flag(group)
            st[key] = entry = self._state_entry(view, i)
            entries.append(entry)
        self._entries[i], self._keys[i] = tuple(entries), keys
        self.has_state[i] = True
        self._set_first_update(i, marked)

    def _set_first_update(self, i: int, pending: bool) -> None:
        """Mark parameter i's next update as its first (the algorithm's first_update_stat, consumed
        on the device by the step that updates it), or clear a mark that may still be pending (a
        step skipped by found_inf leaves it). Only marks this bucket set are ever cleared."""
        if pending:
            self.stats[i, self.algorithm.first_update_stat].fill_(1)
            self._maybe_pending.add(i)
        elif i in self._maybe_pending:
            self.stats[i, self.algorithm.first_update_stat].fill_(0)
            self._maybe_pending.discard(i)

    def pending_marks(self, state: Dict) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Before a rebuild: (parameter, its first-update mark) for each mark that may still be
        pending (heavy_ball with dampening, waiting for a step with momentum) on state this bucket
        still holds (state written from outside since is never a first update)."""
        col = self.algorithm.first_update_stat
        return [(self.params[i], self.stats[i, col]) for i in self._maybe_pending
                if all(state.get(self.params[i], {}).get(key) is entry
                       for key, entry in zip(self._keys[i], self._entries[i]))]

    def take_marks(self, marks: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After a rebuild: the marks of the parameters this bucket now holds (a device copy each,
        no sync)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        for p, mark in marks:
            i = index.get(id(p))
            if i is not None and self.has_state[i]:
                self.stats[i, self.algorithm.first_update_stat].copy_(mark)
                self._maybe_pending.add(i)

    def _upload_tables(self, param_groups: List[dict]) -> None:
        """The segment flags, group rows and device lr's, where they changed (asynchronously)."""
        algo = self.algorithm
        filters = [(g["weight_decay_filter"], g[algo.adaptation_filter]) for g in param_groups]
        if filters != self._filters:
            for i, row in enumerate(self._seg_rows):
                row[SEG_FLAGS] = algo.segment_flags(param_groups[self.group_index[i]], self.params[i].ndim)
            upload(self.seg_table, self._seg_rows)
            self._filters = filters

        rows = [algo.group_row(g) for g in param_groups]
        # (a tensor lr's row holds 0 there: a float lr of 0 after a tensor one must still upload)
        tensor_lr = [isinstance(g["lr"], torch.Tensor) for g in param_groups]
        if rows != self._rows or tensor_lr != self._tensor_lr:
            upload(self.group_table, rows)
            self._rows, self._tensor_lr = rows, tensor_lr
            self.variant = algo.variant([rows[gi] for gi in sorted(set(self.group_index))])
        for gi, g in enumerate(param_groups):
            if isinstance(g["lr"], torch.Tensor):  # a device lr: copied on the device, never read
                self.group_table[gi, COL_LR].copy_(g["lr"].reshape(()), non_blocking=True)


class BucketView:
    """What a backend may read of a bucket (docs/DESIGN.md, "The backend contract"): the layout,
    the tables and buffers the kernels take (docs/SPEC.md, "The bucket ABI"), and the host copies
    of the tables. Backends write only through the kernels (weights, state, partials, counters,
    stats, step); everything else here is read-only to them."""

    __slots__ = ("_b", "serial", "__weakref__")

    def __init__(self, bucket: "Bucket"):
        self._b = bucket
        self.serial = next(_SERIALS)   # names the bucket for its life (ids are reused): find_view
        _VIEWS[self.serial] = self

    # -- layout (fixed for the bucket's life) --------------------------------------------------
    algorithm = property(lambda self: self._b.algorithm, doc="the Algorithm (algorithms/)")
    device = property(lambda self: self._b.device)
    dtype = property(lambda self: self._b.dtype, doc="the parameters' dtype")
    acc_dtype = property(lambda self: self._b.acc_dtype, doc="norms, stats and state: float32, or float64")
    chunk_elems = property(lambda self: self._b.chunk_elems)
    numel = property(lambda self: self._b.numel, doc="elements of the flat buffers (padding included)")
    num_segments = property(lambda self: self._b.num_segments)
    num_chunks = property(lambda self: self._b.num_chunks)
    has_tail = property(lambda self: self._b.has_tail, doc="a parameter ends inside a 16-element block")
    has_empty = property(lambda self: self._b.has_empty, doc="a zero-size parameter (no chunks)")
    reduce_plan = property(lambda self: self._b.reduce_plan, doc="stats.ReducePlan: the segment sum's order")
    # -- host copies of the tables (as last uploaded) -------------------------------------------
    seg_rows = property(lambda self: self._b._seg_rows, doc="seg_table's rows (SEG_FLAGS as uploaded)")
    group_rows = property(lambda self: self._b._rows, doc="group_table's rows (a tensor lr as 0.0)")
    active = property(lambda self: self._b._active, doc="seg_active as a list")
    variant = property(lambda self: self._b.variant, doc="Algorithm.variant of the bucket's groups")
    # -- device tensors ----------------------------------------------------------------------------
    weights = property(lambda self: self._b.weights, doc="per segment, the tensor the kernels update")
    w_aligned = property(lambda self: self._b.w_aligned, doc="every weight 16-element aligned from weights[0]")
    w_offsets = property(lambda self: self._b.w_offsets)
    grad_buf = property(lambda self: self._b.grad_buf)
    state_buf = property(lambda self: self._b.state_buf, doc="[algorithm.slots, numel]")
    seg_table = property(lambda self: self._b.seg_table)
    seg_active = property(lambda self: self._b.seg_active)
    chunk_table = property(lambda self: self._b.chunk_table)
    group_table = property(lambda self: self._b.group_table)
    step = property(lambda self: self._b.step)
    partials = property(lambda self: self._b.partials)
    counters = property(lambda self: self._b.counters)
    stats = property(lambda self: self._b.stats)

    def use_traced_variant(self, variant: tuple) -> None:
        """Inside torch.compile's op (kernels/traced.py): the variant the step was traced with.
        Dynamo applies the bucket's attribute writes of prepare() only after the graph has run,
        so the bucket still holds the one before (the one exception to this view's read-only)."""
        self._b.variant = variant

    def plan(self, name: str, build):
        """A backend's per-bucket plan (launch arguments, slices: host objects), built by
        build(view) on first use and again after the parameters moved to other memory."""
        cache = self._b.plan_cache
        found = cache.get(name)
        if found is None:
            found = cache[name] = build(self)
        return found


_SERIALS = count(1)
_VIEWS: "weakref.WeakValueDictionary[int, BucketView]" = weakref.WeakValueDictionary()


def find_view(serial: int) -> Optional[BucketView]:
    """The live bucket's view with that serial (what a compiled step's op names its bucket by)."""
    return _VIEWS.get(serial)


# id(parameter) -> the weak reference of the bucket whose hook attaches its gradient view: the
# newest. Keyed by id, not by a weak reference to the parameter: torch.utils.swap_tensors (module.to()
# and load_state_dict under swap_module_params_on_conversion) refuses a tensor that has one. A bucket
# holds its parameters, so their ids stay theirs while it lives; its finalizer (_release) drops them.
_OWNER: Dict[int, weakref.ref] = {}
# id(parameter) -> its TensorImpl (_cdata) when a bucket last bound its hook dict; dropped with _OWNER
_BOUND: Dict[int, int] = {}


def _remove_handles(handles: Dict[int, object]) -> None:
    for h in handles.values():
        h.remove()
    handles.clear()


def _grad_dtype(p: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autograd gives p's gradient: a leaf's grad_dtype (torch >= 2.10; None: whatever
    backward produces), else p's dtype."""
    try:
        return getattr(p, "grad_dtype", p.dtype) if p.is_leaf else p.dtype
    except RuntimeError:   # a tensor subclass without it
        return p.dtype


def _rebind_hooks(p: torch.Tensor) -> None:
    """torch.utils.swap_tensors gives a parameter a new TensorImpl but leaves its hook dict bound to
    the old one, so no hook registered before or after the swap fires (torch 2.13); assigning the
    dict binds it to the current one (what register_hook does for a tensor's first hook; like it,
    this drops hooks registered from C++ with Tensor::register_hook, which is why it is done only
    after a swap)."""
    if p._backward_hooks is not None:
        p._backward_hooks = p._backward_hooks


def _release(handles: Dict[int, object], bucket_ref: weakref.ref, param_ids: List[int]) -> None:
    """A bucket is gone: its hooks, and its ownership of parameters no newer bucket took over."""
    _remove_handles(handles)
    for pid in param_ids:
        if _OWNER.get(pid) is bucket_ref:
            del _OWNER[pid]
            _BOUND.pop(pid, None)


_TASK = (-1, False)   # (autograd graph task id, whether it writes .grad): the last one asked about


def _accumulates(p: torch.Tensor) -> bool:
    """Whether the running backward writes p.grad: not inside torch.autograd.grad, which returns the
    gradients instead (autograd declines the question for a leaf there). The answer is the same for
    every parameter of one graph task: asked once per task. Any doubt: False (the step then copies
    the gradient in: slower, never wrong)."""
    global _TASK
    task = torch._C._current_graph_task_id()
    last = _TASK
    if last[0] == task:
        return last[1]
    try:
        writes = bool(torch._C._will_engine_execute_node(get_gradient_edge(p).node))
    except RuntimeError:
        writes = False
    _TASK = (task, writes)
    return writes


def _make_attach_hook(bucket_ref, i):
    def hook(grad):
        # A backward traced by torch.compile produces .grad as a graph output instead of
        # accumulating in place, so there is nothing to attach: step() copies those grads in.
        if torch.compiler.is_compiling():
            return None
        bucket = bucket_ref()
        if bucket is None:
            return None
        p = bucket.params[i]
        owner = _OWNER.get(id(p))
        owner = None if owner is None else owner()
        # Attach only a dense grad to a parameter that still fits this bucket, and only where this
        # bucket owns it (or its owner is gone): a sparse grad must reach step() (which rejects
        # it), and a parameter reshaped or moved to another dtype or device gets its own grad;
        # step() then rebuilds the buckets. A grad_dtype other than the parameter's forbids the
        # view: step() refuses such a gradient.
        if ((owner is None or owner is bucket) and p.grad is None and grad is not None and not grad.is_sparse
                and not bucket.layout_changed(i) and _grad_dtype(p) == p.dtype and _accumulates(p)):
            bucket.attach_grad(i)
        return None
    return hook
