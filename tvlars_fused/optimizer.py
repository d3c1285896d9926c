"""The fused TVLARS and LARS: torch.optim drop-ins whose step is a couple of kernel launches per
bucket (docs/DESIGN.md). Same arguments, state layout and results as tvlars_fused.reference, plus
`backend`.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

from . import reference
from .base import STEP_KEY, describe
from .buckets import STAT_PHI, STAT_TRUST_RATIO, STAT_UPDATE_NORM, STAT_WEIGHT_NORM, Bucket
from .kernels import BACKENDS, resolve
from .sharding import all_reduce_norms, bucket_key, is_sharded

__all__ = ["TVLARS", "LARS"]

STAT_NAMES = {STAT_WEIGHT_NORM: "weight_norm", STAT_UPDATE_NORM: "update_norm",
              STAT_TRUST_RATIO: "trust_ratio", STAT_PHI: "phi"}


class _Fused:
    """Mixed into the reference classes: same constructor, validation and state_dict format;
    step() runs the bucket kernels instead of the per-parameter loop."""

    # torch.amp.GradScaler sets optimizer.grad_scale / optimizer.found_inf (device tensors) for the
    # step instead of unscaling the gradients itself and syncing on found_inf. (No class defaults:
    # GradScaler multiplies an existing grad_scale attribute.)
    _step_supports_amp_scaling = True

    def __init__(self, params, lr, *args, backend: str = "auto", **kwargs):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; use one of {BACKENDS}")
        self.backend = backend
        self._buckets: Optional[List[Bucket]] = None
        self._built_layout: Optional[list] = None
        self._building = True
        super().__init__(params, lr, *args, **kwargs)
        self._building = False
        # Build now, so parameters are bucket views and the grad hooks are in place before the
        # first backward: the first step takes the fast path too.
        self._ensure_buckets()

    # -- buckets ------------------------------------------------------------------------------
    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._invalidate()

    def _invalidate(self) -> None:
        for b in self._buckets or ():
            b.remove_hooks()
        self._buckets = None
        if not getattr(self, "_building", False):
            self._ensure_buckets()

    def _layout(self) -> list:
        """Which parameters each group lists (param_groups can be edited in place)."""
        return [tuple(map(id, g["params"])) for g in self.param_groups]

    def _ensure_buckets(self) -> List[Bucket]:
        layout = self._layout()
        if (self._buckets is not None and layout == self._built_layout
                and not any(b.is_stale() for b in self._buckets)):
            return self._buckets
        step = self.state[STEP_KEY]
        by_key: Dict = OrderedDict()
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                by_key.setdefault(bucket_key(p), []).append((p, gi, describe(gi, i, p)))
        buckets = []
        for key, items in by_key.items():
            mod = resolve(self.backend, key[0])
            if is_sharded(items[0][0]) and not getattr(mod, "SUPPORTS_SHARDED", False):
                if self.backend != "auto":
                    raise ValueError(
                        f"backend={self.backend!r} cannot run FSDP2-sharded (DTensor) parameters: its fused "
                        "kernel has no split for the all-reduce of the layer norms between its passes; "
                        "use backend='auto', 'triton' or 'torch'")
                mod = resolve("torch", key[0])
            b = Bucket([p for p, _, _ in items], [gi for _, gi, _ in items], self.param_groups,
                       mod.CHUNK_ELEMS, step, self._tvlars, self.state, [w for _, _, w in items])
            b.backend = mod
            buckets.append(b)
        for b in self._buckets or ():   # only once the new buckets exist (a failed build changes nothing)
            b.remove_hooks()
        self._buckets = buckets
        self._built_layout = layout
        # t lives on the device, one copy per bucket (all advance together); state["step"] shows
        # the first, so state_dict() carries it without a sync. (No parameters: it stays on the host.)
        if buckets:
            self.state[STEP_KEY] = buckets[0].step.view(())
        return buckets

    @property
    def grad_copies(self) -> int:
        """How many gradients had to be copied into a bucket (not on the fast path) so far."""
        return sum(b.grad_copies for b in self._buckets or ())

    @property
    def backends(self) -> List[str]:
        """The backend that runs each bucket."""
        return [b.backend.NAME for b in self._ensure_buckets()]

    # -- torch.optim API ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = self.begin_step(closure)
        # Under torch.compile the graph's guards stand in for the staleness check (data_ptr is
        # not traceable); buckets always exist after __init__.
        buckets = self._buckets if torch.compiler.is_compiling() else self._ensure_buckets()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for b in buckets:
            b.prepare(self.param_groups, self.state)
        for b in buckets:
            gs = None if grad_scale is None else grad_scale.to(b.device, non_blocking=True)
            fi = None if found_inf is None else found_inf.to(b.device, non_blocking=True)
            if b.reduce_groups:
                b.backend.bucket_step(b, gs, fi, functools.partial(all_reduce_norms, found_inf=fi))
            else:
                b.backend.bucket_step(b, gs, fi)
            b.finish()
        if not buckets:   # every group empty: only t advances, as in the reference
            keep = 1.0 if found_inf is None else (found_inf.reshape(()) == 0).float().cpu()
            self.state[STEP_KEY] += keep
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers in place (one fill per bucket); with set_to_none (the
        default) each .grad becomes None, exactly as torch does, and backward re-attaches the
        bucket view before it accumulates."""
        buckets = self._buckets if torch.compiler.is_compiling() else self._ensure_buckets()
        for b in buckets:
            b.zero_grad(set_to_none)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._invalidate()   # rebuilt at the next step from the loaded state

    def layer_stats(self) -> Dict[torch.Tensor, torch.Tensor]:
        """Per parameter, a device tensor [weight_norm, update_norm, trust_ratio, phi] from the
        last step that updated it (norms after norm_clip; no sync until read). Live views:
        clone them to keep a step's values."""
        out = {}
        for b in self._ensure_buckets():
            for i, p in enumerate(b.params):
                out[p] = b.stats[i]
        return out


class TVLARS(_Fused, reference.TVLARS):
    """Fused TVLARS. Arguments as tvlars_fused.reference.TVLARS, plus backend: "auto" (triton for
    CUDA tensors, else the C++ extension, else torch), "triton", "cuda", "cpu" or "torch"."""


class LARS(_Fused, reference.LARS):
    """Fused LARS (TVLARS with phi == 1). Arguments as tvlars_fused.reference.LARS, plus backend."""
