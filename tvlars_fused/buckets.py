"""Flat parameter buckets: the parameters of one (device, dtype) live in one contiguous buffer.

Each parameter becomes a view of its bucket (the Parameter objects stay the same, so the model keeps
working); its gradient and optimizer state are views of matching flat buffers. Segments start at
multiples of ALIGN elements (128-bit aligned for every dtype); padding stays zero. The segment,
chunk and group tables that the kernels read are described in docs/SPEC.md ("The bucket ABI").

How the bucket knows which parameters have a gradient, without a host sync: gradients follow torch
semantics exactly (a parameter whose .grad is None is skipped). zero_grad() zeroes the grad buffer
in place and sets each .grad to None; a tensor hook, which runs before autograd accumulates into
.grad, attaches the (zeroed) bucket view as .grad the first time backward produces a gradient for
the parameter, so autograd accumulates straight into the bucket. At step time, `p.grad is None`
says "skip", `p.grad is view` is the fast path, and anything else (a grad re-allocated after
model.zero_grad(), assigned by hand, or replaced by another library) is copied in and the view
restored; `Bucket.grad_copies` counts those.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import accumulation_dtype, check_grad, describe, state_key
from .hyperparams import GROUP_TABLE_COLS, group_row, segment_flags
from .sharding import is_sharded, local, shard_groups

ALIGN = 16  # elements: 64 B for float32, enough for 128-bit vector access of every dtype

# seg_table columns
SEG_OFFSET, SEG_END, SEG_NUMEL, SEG_GROUP, SEG_FLAGS, SEG_FIRST_CHUNK, SEG_NUM_CHUNKS = range(7)
SEG_COLS = 7
# chunk_table columns
CHUNK_START, CHUNK_SEG = 0, 1
# stats columns
STAT_WEIGHT_NORM, STAT_UPDATE_NORM, STAT_TRUST_RATIO, STAT_PHI = range(4)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Momentum state is float32 for bfloat16/float16 parameters, the parameter dtype otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _dense_strides(p: torch.Tensor) -> Tuple[int, ...]:
    """Keep the parameter's memory format (e.g. channels_last) when it is dense, else contiguous."""
    return tuple(torch.empty_like(p, device="meta").stride())  # preserve_format does exactly this


class Bucket:
    """Flat buffers and tables for the parameters of one (device, dtype)."""

    def __init__(self, params: Sequence[torch.Tensor], group_index: Sequence[int],
                 param_groups: List[dict], chunk_elems: int, step: torch.Tensor, tvlars: bool,
                 optimizer_state: Dict, where: Sequence[str]):
        assert len(params) > 0
        self.params = list(params)
        # Sharded (DTensor) parameters belong to FSDP2, which all-gathers from its own storage:
        # the bucket mirrors their local shards (copied in and out each step) instead of rebinding.
        self.sharded = is_sharded(params[0])
        self.locals = [local(p.detach()) for p in self.params]
        self.group_index = list(group_index)
        self.where = list(where)
        self.device = self.locals[0].device
        self.dtype = params[0].dtype
        self.acc_dtype = accumulation_dtype(self.dtype)
        self.state_dtype = state_dtype(self.dtype)
        self.chunk_elems = int(chunk_elems)
        self.tvlars = tvlars
        # A parameter whose shape changed (p.data = ...) no longer fits its state: refuse before
        # anything is re-bound.
        for i, p in enumerate(self.params):
            st = optimizer_state.get(p)
            for key in ("momentum_buffer", "m"):
                v = st.get(key) if st is not None else None
                if isinstance(v, torch.Tensor) and local(v).shape != self.locals[i].shape:
                    raise ValueError(
                        f"{self.where[i]} has shape {tuple(p.shape)} but its optimizer state[{key!r}] has shape "
                        f"{tuple(v.shape)}: the parameter changed shape after the optimizer was built; reset "
                        "its state (del optimizer.state[p]) or build a new optimizer")
        self.grad_copies = 0      # grads that were not the bucket's view at step time
        self.grad_rezeroed = 0    # views that had to be zeroed one by one (no optimizer.zero_grad())

        # layout
        offsets, numels, ends = [], [], []
        off = 0
        for p in self.locals:
            n = p.numel()
            offsets.append(off)
            numels.append(n)
            off += ALIGN * math.ceil(n / ALIGN)
            ends.append(off)
        self.numel = off
        dev, dt = self.device, self.dtype
        self.param_buf = torch.zeros(self.numel, dtype=dt, device=dev)
        self.grad_buf = torch.zeros(self.numel, dtype=dt, device=dev)
        self.state_buf = torch.zeros(self.numel, dtype=self.state_dtype, device=dev)

        self.param_views, self.grad_views, self.state_views = [], [], []
        for p, o in zip(self.locals, offsets):
            shape, strides = tuple(p.shape), _dense_strides(p)
            pv = self.param_buf.as_strided(shape, strides, o)
            pv.copy_(p.detach())
            self.param_views.append(pv)
            self.grad_views.append(self.grad_buf.as_strided(shape, strides, o))
            self.state_views.append(self.state_buf.as_strided(shape, strides, o))
        if not self.sharded:
            for p, pv in zip(self.params, self.param_views):
                p.data = pv
            # (the old storages must not stay alive through self.locals)
            self.locals = list(self.param_views)
        self._expected_ptrs = [local(p).data_ptr() for p in self.params]
        # what each parameter must still look like (param_is_stale runs every step: plain tuples)
        self._layouts = [(tuple(v.shape), v.stride()) for v in self.param_views]

        # Carry over optimizer state (live views of an older bucket, or values loaded from a
        # state_dict) and existing gradients into the new buffers.
        self.has_state = [False] * len(self.params)
        self._entries: List[Optional[torch.Tensor]] = [None] * len(self.params)   # what state[p][key] holds
        self._keys: List[Optional[str]] = [None] * len(self.params)
        for i, p in enumerate(self.params):
            st = optimizer_state.get(p)
            first = state_key(param_groups[self.group_index[i]]["momentum_form"])
            for key in (first, "m" if first == "momentum_buffer" else "momentum_buffer"):
                if st is not None and isinstance(st.get(key), torch.Tensor):
                    self.state_views[i].copy_(local(st[key].detach()))
                    st[key] = self._entries[i] = self._state_entry(i)
                    self._keys[i] = key
                    self.has_state[i] = True
                    break
        self.clean = [True] * len(self.params)  # grad view known to be zero
        for i, p in enumerate(self.params):
            if p.grad is not None and not self.sharded:
                check_grad(p.grad, self.where[i])
                self.grad_views[i].copy_(p.grad.detach())
                p.grad = self.grad_views[i]
                self.clean[i] = False
                self.grad_copies += 1

        # tables
        chunk_rows, seg_rows = [], []
        for s, (o, n, e) in enumerate(zip(offsets, numels, ends)):
            first = len(chunk_rows)
            chunk_rows.extend([c, s] for c in range(o, e, self.chunk_elems))
            seg_rows.append([o, e, n, self.group_index[s], 0, first, len(chunk_rows) - first])
        self._seg_rows = seg_rows
        self.seg_table = torch.tensor(seg_rows, dtype=torch.int64).reshape(-1, SEG_COLS).to(dev)
        self.chunk_table = torch.tensor(chunk_rows, dtype=torch.int64).reshape(-1, 2).to(dev)
        self.num_segments = len(seg_rows)
        self.num_chunks = len(chunk_rows)
        self.seg_active = torch.zeros(self.num_segments, dtype=torch.int32, device=dev)
        self.group_table = torch.zeros(len(param_groups), GROUP_TABLE_COLS, dtype=self.acc_dtype, device=dev)
        self.partials = torch.zeros(max(self.num_chunks, 1), 2, dtype=self.acc_dtype, device=dev)
        self.counters = torch.zeros(self.num_segments, dtype=torch.int32, device=dev)
        self.stats = torch.zeros(self.num_segments, 4, dtype=self.acc_dtype, device=dev)
        self.stats[:, STAT_TRUST_RATIO] = 1.0
        self.step = torch.zeros(1, dtype=torch.float32, device=dev)
        self.step.copy_(step.detach().reshape(1))
        self._active: Optional[List[int]] = None
        self._rows: Optional[list] = None
        self._filters: Optional[list] = None

        ref = weakref.ref(self)
        self._hooks = [] if self.sharded else [
            p.register_hook(_make_attach_hook(ref, i)) for i, p in enumerate(self.params) if p.requires_grad]
        self.reduce_groups = shard_groups(self.params[0]) if self.sharded else []

    def _state_entry(self, i: int) -> torch.Tensor:
        """What optimizer.state[p][key] holds: the state view (a DTensor over it when sharded)."""
        view = self.state_views[i]
        if not self.sharded:
            return view
        p = self.params[i]
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    # -- gradients ----------------------------------------------------------------------------
    def attach_grad(self, i: int) -> None:
        """Backward is about to produce p.grad while it is None: give autograd the bucket view."""
        view = self.grad_views[i]
        if not self.clean[i]:
            view.zero_()
            self.grad_rezeroed += 1
        self.clean[i] = False
        self.params[i].grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.sharded:   # FSDP2 owns these gradients
            for p in self.params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()
            return
        self.grad_buf.zero_()
        for i, p in enumerate(self.params):
            self.clean[i] = True
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad = self.grad_views[i]
                self.clean[i] = False

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- per-step host bookkeeping (no device sync) -------------------------------------------
    def param_is_stale(self, i: int) -> bool:
        """True when parameter i was moved or re-assigned (module.to, p.data = ...) since the build.
        Runs every step for every parameter: plain attribute reads against precomputed tuples."""
        p = self.params[i]
        shape, stride = self._layouts[i]
        if self.sharded:   # FSDP2 owns the local storage: compare what the shard looks like
            lp = local(p)
            return lp.dtype != self.dtype or lp.device != self.device or lp.shape != shape
        # (same storage, other strides: `p.data = p.data.t()` on a square weight)
        return (p.data_ptr() != self._expected_ptrs[i] or p.dtype != self.dtype or p.stride() != stride
                or p.shape != shape or p.device != self.device)

    def is_stale(self) -> bool:
        return any(self.param_is_stale(i) for i in range(len(self.params)))

    def prepare(self, param_groups: List[dict], state: Dict) -> None:
        """Collect which parameters have a gradient, copy in foreign gradients, create state
        entries on first use, and upload the tables that changed since the last step."""
        active = []
        if self.sharded:
            self.locals = [local(p.detach()) for p in self.params]
            torch._foreach_copy_(self.param_views, self.locals)
        forms = [g["momentum_form"] for g in param_groups]
        keys = [state_key(f) for f in forms]
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                active.append(0)
                continue
            view = self.grad_views[i]
            if self.sharded:
                check_grad(local(g), self.where[i])
                view.copy_(local(g.detach()))
            elif g is not view:
                check_grad(g, self.where[i])
                view.copy_(g.detach())
                p.grad = view
                self.grad_copies += 1
            self.clean[i] = False
            active.append(1)
            gi = self.group_index[i]
            form, key = forms[gi], keys[gi]
            if self.has_state[i]:
                st = state.get(p)
                cur = None if st is None else st.get(key)
                if cur is not self._entries[i]:
                    if cur is None:   # reset by the user, or a new momentum_form: start it afresh
                        self.has_state[i] = False
                        if st is not None and st.get(self._keys[i]) is self._entries[i]:
                            del st[self._keys[i]]
                    else:             # a tensor assigned by the user: its values become the state
                        self.state_views[i].copy_(local(cur.detach()))
                        st[key] = self._entries[i]
            if not self.has_state[i]:
                if form == "paper":  # m starts equal to w
                    self.state_views[i].copy_(self.param_views[i])
                else:
                    self.state_views[i].zero_()
                state[p][key] = self._entries[i] = self._state_entry(i)
                self._keys[i] = key
                self.has_state[i] = True
        if active != self._active:
            self.seg_active.copy_(torch.tensor(active, dtype=torch.int32), non_blocking=True)
            self._active = active

        filters = [(g["weight_decay_filter"], g["lars_adaptation_filter"]) for g in param_groups]
        if filters != self._filters:
            for i, row in enumerate(self._seg_rows):
                row[SEG_FLAGS] = segment_flags(param_groups[self.group_index[i]], self.params[i].ndim)
            self.seg_table.copy_(torch.tensor(self._seg_rows, dtype=torch.int64).reshape(-1, SEG_COLS),
                                 non_blocking=True)
            self._filters = filters

        rows = [group_row(g, self.tvlars) for g in param_groups]
        if rows != self._rows:
            self.group_table.copy_(torch.tensor(rows, dtype=self.acc_dtype), non_blocking=True)
            self._rows = rows
        for gi, g in enumerate(param_groups):
            if isinstance(g["lr"], torch.Tensor):  # a device lr: copied on the device, never read
                self.group_table[gi, 0].copy_(g["lr"].reshape(()), non_blocking=True)


    def finish(self) -> None:
        """After the kernels: write a sharded bucket's parameters back to FSDP2's shards."""
        if self.sharded:
            torch._foreach_copy_(self.locals, self.param_views)


def _make_attach_hook(bucket_ref, i):
    def hook(grad):
        # A backward traced by torch.compile produces .grad as a graph output instead of
        # accumulating in place, so there is nothing to attach: step() copies those grads in.
        if torch.compiler.is_compiling():
            return None
        bucket = bucket_ref()
        # Attach only a dense grad to a parameter that still lives in this bucket: a sparse grad
        # must reach step() (which rejects it), and a parameter moved behind the optimizer's back
        # (module.to, p.data = ...) gets its own grad; step() then rebuilds the buckets.
        if (bucket is not None and not grad.is_sparse and bucket.params[i].grad is None
                and not bucket.param_is_stale(i)):
            bucket.attach_grad(i)
        return None
    return hook
