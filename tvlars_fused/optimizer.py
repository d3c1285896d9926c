"""The fused TVLARS, LARS and LAMB: torch.optim drop-ins whose step is two kernel launches per
bucket (docs/DESIGN.md). Same arguments, state format and results as tvlars_fused.reference (their
siblings over base.LayerwiseOptimizer), plus `backend`.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from operator import is_
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.optim.optimizer import required

from .abi import STAT_PUBLIC
from .algorithms import LAMB_ALGORITHM, LARS_ALGORITHM, TVLARS_ALGORITHM, options
from .base import STEP, LayerwiseOptimizer, is_lazy, is_sized
from .buckets import Bucket, refuse_shared_memory
from .kernels import BACKENDS, resolve
from .sharding import all_reduce_norms, bucket_key, is_sharded, local

__all__ = ["TVLARS", "LARS", "LAMB", "FusedOptimizer"]


def _options_seen(group: dict, names: tuple) -> tuple:
    """(group, option names, their values, a tensor lr's dtype and shape); values None where one
    can change in place (a list)."""
    values = tuple(map(group.get, names))
    lr = group.get("lr")
    lr_meta = (lr.dtype, lr.shape) if isinstance(lr, torch.Tensor) else None
    return group, names, None if any(isinstance(v, (list, dict, set)) for v in values) else values, lr_meta


def _validated_before(group: dict, seen: tuple) -> bool:
    """The group object and each of its options (by identity; a tensor lr's dtype and shape, which
    `lr.data = ...` changes) as validated last."""
    g, names, values, lr_meta = seen
    return (values is not None and group is g and all(map(is_, map(group.get, names), values))
            and (lr_meta is None or (group["lr"].dtype, group["lr"].shape) == lr_meta))


class FusedOptimizer(LayerwiseOptimizer):
    """The bucket machinery shared by the fused optimizers: parameters grouped by (device, dtype)
    into buckets (buckets.py), each stepped by its backend's two launches, no host sync."""

    # torch.amp.GradScaler sets optimizer.grad_scale / optimizer.found_inf (device tensors) for the
    # step instead of unscaling the gradients itself and syncing on found_inf. (No class defaults:
    # GradScaler multiplies an existing grad_scale attribute.)
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: Dict[str, Any], backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}; use one of {BACKENDS}")
        self.backend = backend
        self._init_buckets(0.0)
        super().__init__(params, defaults)
        self._building = False
        # Build now, so the grad hooks are in place before the first backward: the first step
        # takes the fast path too.
        self._ensure_buckets()

    def _init_buckets(self, t: float) -> None:
        self._buckets: Optional[List[Bucket]] = None
        self._built_layout: Optional[list] = None
        self._lazy: List[torch.Tensor] = []   # parameters left out of the buckets: no size yet
        self._building = True
        self._t_host = torch.tensor(float(t), dtype=torch.float32)   # t while there are no buckets
        self._grad_copies_before = 0   # counted by buckets that were since rebuilt
        self._validated: Optional[list] = None   # (group, option names, values) as last validated
        self._retired: List[Bucket] = []          # buckets dropped for a rebuild not yet built

    # -- pickling (copy.deepcopy, pickle, multiprocessing) --------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        if "defaults" in state:   # a new object (unpickled, deep-copied): build its buckets
            self._init_buckets(self._max_step(self.state))
            self._building = False
            self._ensure_buckets()

    # -- buckets ------------------------------------------------------------------------------
    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._invalidate()

    def _invalidate(self, rebuild: bool = True) -> None:
        for b in self._buckets or ():
            b.remove_hooks()
            self._grad_copies_before += b.grad_copies
        if self._buckets:
            self._t_host = self._buckets[0].step.detach().reshape(()).cpu()
        # a rebuild hands their pending first-update marks on; a load starts the state afresh
        self._retired = (self._buckets or []) if rebuild else []
        self._buckets = None
        if rebuild and not self._building:
            self._ensure_buckets()

    def _layout(self) -> list:
        """Which parameters each group lists (param_groups can be edited in place)."""
        return [tuple(map(id, g["params"])) for g in self.param_groups]

    def _ensure_buckets(self) -> List[Bucket]:
        layout = self._layout()
        if (self._buckets is not None and layout == self._built_layout and not any(map(is_sized, self._lazy))
                and all(b.sync_params(self._buckets) for b in self._buckets)):
            return self._buckets
        t = self._step_tensor()
        # first-update marks still pending on state the old buckets hold (before the new ones adopt it)
        marks = [m for b in [*self._retired, *(self._buckets or ())] for m in b.pending_marks(self.state)]
        by_key: Dict = OrderedDict()
        lazy = []
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if is_lazy(p):   # a lazy module's, before its first forward: no gradient, no state yet
                    lazy.append(p)
                    continue
                by_key.setdefault(bucket_key(p), []).append((p, gi, self._where(gi, i)))
        for device in {key[0] for key in by_key}:   # (across buckets: a bfloat16 view of a float32 weight too)
            items = [item for key, its in by_key.items() if key[0] == device for item in its]
            refuse_shared_memory([local(p) for p, _, _ in items], [w for _, _, w in items])
        buckets = []
        for key, items in by_key.items():
            backend = resolve(self.backend, key[0])
            if is_sharded(items[0][0]) and not backend.SUPPORTS_SHARDED:
                if self.backend != "auto":
                    raise ValueError(
                        f"backend={self.backend!r} cannot run FSDP2-sharded (DTensor) parameters: its fused "
                        "kernel has no split for the all-reduce of the layer norms between its passes; "
                        "use backend='auto', 'triton' or 'torch'")
                backend = resolve("torch", key[0])
            b = Bucket([p for p, _, _ in items], [gi for _, gi, _ in items], self.param_groups,
                       backend.CHUNK_ELEMS, float(t), self.algorithm, self.state, [w for _, _, w in items])
            b.backend = backend
            buckets.append(b)
        for b in buckets:
            b.take_marks(marks)
        self._retired = []
        for b in self._buckets or ():   # only once the new buckets exist (a failed build changes nothing)
            b.remove_hooks()
            self._grad_copies_before += b.grad_copies
        self._buckets = buckets
        self._built_layout = layout
        self._lazy = lazy
        return buckets

    def _step_tensor(self) -> torch.Tensor:
        """t: the first bucket's device counter (every bucket's advances together)."""
        return self._buckets[0].step_entry if self._buckets else self._t_host

    def _load_step(self, t: float) -> None:
        # Rebuilt after the load's post-hooks (_after_load), from the loaded state and this t.
        self._invalidate(rebuild=False)
        self._t_host = torch.tensor(float(t), dtype=torch.float32)
        for st in self.state.values():
            if isinstance(st, dict) and st:
                st[STEP] = self._t_host

    def _after_load(self) -> None:
        super()._after_load()
        self._ensure_buckets()

    @property
    def grad_copies(self) -> int:
        """How many gradients had to be copied into a bucket (not on the fast path) so far."""
        return self._grad_copies_before + sum(b.grad_copies for b in self._buckets or ())

    @property
    def backends(self) -> List[str]:
        """The backend that runs each bucket."""
        return [b.backend.NAME for b in self._ensure_buckets()]

    # -- torch.optim API ------------------------------------------------------------------------
    def validate_step(self) -> None:
        """The groups here; each gradient that is not the optimizer's own view is checked by its
        bucket (gather_grads), all before anything changes. A group whose every option is the
        object last validated is not checked again (a scheduler or a user sets a new value; an
        option held in a list, which can change in place, is checked every step)."""
        groups, seen = self.param_groups, self._validated
        if (not torch.compiler.is_compiling() and seen is not None and len(groups) == len(seen)
                and all(map(_validated_before, groups, seen))):
            return
        for gi, group in enumerate(groups):
            self.algorithm.validate(group, where=f"param_groups[{gi}]")
        names = ("lr", *self.algorithm.defaults)
        self._validated = [_options_seen(g, names) for g in groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.begin_step(closure)
        # Under torch.compile the graph's guards stand in for the staleness check (data_ptr is
        # not traceable); buckets always exist after __init__.
        if torch.compiler.is_compiling():
            for p in self._lazy:
                if not is_lazy(p):
                    raise RuntimeError(
                        "a lazy module's parameters had no size when the optimizer's buckets were built, and "
                        "torch.compile cannot rebuild them inside the compiled step: run the model's forward "
                        "once (a dummy batch) or take one optimizer step outside torch.compile first")
            buckets = self._buckets
        else:
            buckets = self._ensure_buckets()
        gathered = [b.gather_grads() for b in buckets]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        replaced = [t for b, (grads, same) in zip(buckets, gathered)
                    for t in b.prepare(self.param_groups, self.state, grads, same)]
        if replaced:   # "step" entries written from outside (ZeRO's load_state_dict): adopt t
            t = max(replaced)   # (values Bucket.prepare has checked)
            for b in buckets:
                b.step.fill_(t)
        for b in buckets:
            gs = None if grad_scale is None else grad_scale.to(b.device, non_blocking=True)
            fi = None if found_inf is None else found_inf.to(b.device, non_blocking=True)
            b.stage_in()
            if b.reduce_groups:
                b.backend.bucket_step(b.view, gs, fi, functools.partial(all_reduce_norms, groups=b.reduce_groups,
                                                                        found_inf=fi))
            else:
                b.backend.bucket_step(b.view, gs, fi)
            b.stage_out()
        if not buckets:   # every group empty: only t advances, as in the reference
            keep = 1.0 if found_inf is None else (found_inf.reshape(()) == 0).float().cpu()
            self._t_host += keep
        return loss

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad (set_to_none: every .grad becomes None; else every existing .grad is
        zeroed in place), with the bucket's gradient buffer zeroed by one fill, so that backward,
        which re-attaches the bucket views, accumulates into zeros."""
        for b in self._ensure_buckets():
            b.zero_grad(set_to_none)

    def layer_stats(self) -> Dict[torch.Tensor, torch.Tensor]:
        """Per parameter, a device tensor with the columns `self.algorithm.stat_names` from the last
        step that updated it (no sync until read; live views: clone them to keep a step's values).
        TVLARS/LARS: [weight_norm, update_norm, trust_ratio, phi, grad_norm, weight_decay] = ||w||,
        ||g + wd*w||, q, phi(t), ||g|| (g as the step used it: unscaled, negated with maximize) and
        the weight decay applied, norms after norm_clip. LAMB: [weight_norm, update_norm,
        trust_ratio, step_scale, grad_norm, weight_decay] = ||w'|| (after weight_norm_clip), ||u||,
        q, s, ||g'||, the weight decay applied (docs/SPEC.md, "LAMB")."""
        out = {}
        for b in self._ensure_buckets():
            for i, p in enumerate(b.params):
                out[p] = b.stats[i, :STAT_PUBLIC]
        return out


class TVLARS(FusedOptimizer):
    """Fused TVLARS (arXiv 2309.14053; docs/SPEC.md). The arguments of
    tvlars_fused.reference.TVLARS, plus backend: "auto" (triton for CUDA tensors, else the C++
    extension, else torch), "triton", "cuda", "cpu" or "torch"."""
    algorithm = TVLARS_ALGORITHM

    def __init__(self, params, lr: Union[float, torch.Tensor] = required, momentum: float = 0.9, *,
                 weight_decay: float = 5e-4, eta: float = 1e-3, lmbda: float = 1e-3, delay_steps: float = 0,
                 alpha: float = 1.0, gamma_min: float = 0.0, hold_steps: float = 0, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball", denominator: str = "update", eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, always_adapt: bool = True,
                 plain_step_on_zero_norm: bool = False, nesterov: bool = False, dampening: float = 0.0,
                 maximize: bool = False, backend: str = "auto"):
        super().__init__(params, options(locals()), backend)


class LARS(FusedOptimizer):
    """Fused LARS (TVLARS with phi == 1). The arguments of tvlars_fused.reference.LARS, plus
    backend."""
    algorithm = LARS_ALGORITHM

    def __init__(self, params, lr: Union[float, torch.Tensor] = required, momentum: float = 0.9, *,
                 weight_decay: float = 0.0, eta: float = 1e-3, weight_decay_filter: bool = False,
                 lars_adaptation_filter: bool = False, norm_clip: Optional[float] = None,
                 momentum_form: str = "heavy_ball", denominator: str = "update", eps: float = 0.0,
                 trust_clip: bool = False, adapt: bool = True, always_adapt: bool = True,
                 plain_step_on_zero_norm: bool = False, nesterov: bool = False, dampening: float = 0.0,
                 maximize: bool = False, backend: str = "auto"):
        super().__init__(params, options(locals()), backend)


class LAMB(FusedOptimizer):
    """Fused LAMB (You et al. 2019, Algorithm 2; docs/SPEC.md, "LAMB"): Adam moments with bias
    correction and the layer-wise trust ratio ||w|| / ||r + wd*w||. The arguments of
    tvlars_fused.reference.LAMB, plus backend. Options for apex FusedLAMB, pytorch-optimizer's and
    torch-optimizer's Lamb and AdamW are in the README ("Coming from")."""
    algorithm = LAMB_ALGORITHM

    def __init__(self, params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), *,
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: Union[str, bool] = "moments",
                 weight_decay_mode: str = "update", grad_averaging: bool = True,
                 weight_norm_clip: Optional[float] = None, ratio_eps: float = 0.0, adapt: bool = True,
                 always_adapt: bool = True, weight_decay_filter: bool = False, adaptation_filter: bool = False,
                 maximize: bool = False, trust_clip: bool = False, backend: str = "auto"):
        super().__init__(params, options(locals()), backend)
