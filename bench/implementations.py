"""The optimizer steps the benchmark compares. Each is a real optimizer step over the same
parameters and gradients (fresh copies per implementation, so nothing is shared between them).

    eager          tvlars_fused.reference.TVLARS: one parameter at a time (the reference)
    foreach        a multi-tensor TVLARS step written here with torch._foreach_* ops: one op sequence
                   over all parameters, norms via torch._foreach_norm, trust ratios as tensors, no
                   host sync
    compiled       torch.compile of that foreach step (Inductor); compile time is reported apart
    fused-<name>   tvlars_fused.TVLARS(backend=<name>) for every backend that can run on the device
                   ("cpu" and "torch" on CPU; "triton", "cuda" and "torch" on a GPU)
    fused-triton-graph  the triton step captured once in a CUDA graph and replayed: the kernels'
                   own speed, without step()'s host-side bookkeeping (GPU only)
    sgd-foreach    torch.optim.SGD(momentum=0.9, foreach=True): the floor (same bytes, no norms)
    sgd-fused      torch.optim.SGD(momentum=0.9, fused=True), where torch supports it on the device

Every implementation runs the same TVLARS hyperparameters (HP below, heavy-ball momentum, no
filters, no norm_clip); the SGD floors use the same lr and momentum without weight decay.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import tvlars_fused
from tvlars_fused import reference
from tvlars_fused.schedule import phi

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=1e-3, delay_steps=0.0,
          alpha=1.0, gamma_min=0.0)
SGD_LR = 0.01

# Implementation names in the order they are run and shown. "fused-*" are expanded per device.
# "-grad": the same backend with denominator="grad" (||g|| + wd*||w||: a third sum in pass 1).
ALL = ("eager", "foreach", "compiled", "fused-cpu", "fused-cpu-grad", "fused-torch", "fused-triton",
       "fused-triton-grad", "fused-triton-graph", "fused-cuda", "sgd-foreach", "sgd-fused")
FUSED_BACKENDS = {"cpu": ("fused-cpu", "fused-cpu-grad", "fused-torch"),
                  "cuda": ("fused-triton", "fused-triton-grad", "fused-triton-graph", "fused-cuda", "fused-torch")}


class Unavailable(Exception):
    """This implementation cannot run here (the reason is reported as a note)."""


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def floor_bytes(dtype: torch.dtype) -> int:
    """The least any TVLARS/LARS step must move per parameter: read w, g, state; write w, state
    (state is float32 for bf16/fp16 parameters): 20 B for float32, 14 B for bfloat16."""
    p = _nbytes(dtype)
    s = 4 if dtype in (torch.bfloat16, torch.float16) else p
    return p + p + s + p + s


# ---------------------------------------------------------------------------------------------
# The multi-tensor (torch._foreach_*) TVLARS step
# ---------------------------------------------------------------------------------------------
def foreach_tvlars_step(params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor],
                        step: torch.Tensor, lr: float, momentum: float, weight_decay: float, eta: float,
                        lmbda: float, delay_steps: float, alpha: float, gamma_min: float,
                        w32: Optional[List[torch.Tensor]] = None,
                        d32: Optional[List[torch.Tensor]] = None) -> None:
    """One TVLARS step (docs/SPEC.md; heavy-ball, no filters, no norm_clip) over all parameters
    with multi-tensor ops. No host sync: phi(t), the norms and the trust ratios stay tensors.

    Low-precision parameters are updated in float32 with float32 state (bufs): pass float32
    scratch lists w32/d32 (eager: filled with _foreach_copy_), or None to let the caller's
    compiler materialise the casts (the compiled variant)."""
    low = params[0].dtype in (torch.bfloat16, torch.float16)
    if low:
        if w32 is None:
            w = [p.float() for p in params]
            d = [g.float() for g in grads]
        else:
            w, d = w32, d32
            torch._foreach_copy_(w, params)
            torch._foreach_copy_(d, grads)
        torch._foreach_add_(d, w, alpha=weight_decay)          # d = g + wd * w
    else:
        w = params
        d = torch._foreach_add(grads, w, alpha=weight_decay)   # d = g + wd * w
    wn = torch.stack(torch._foreach_norm(w))
    dn = torch.stack(torch._foreach_norm(d))
    ph = phi(step, lmbda, delay_steps, alpha, gamma_min)        # tensor on the device
    q = torch.where((wn > 0) & (dn > 0), eta * ph * wn / dn, torch.ones_like(wn))
    torch._foreach_mul_(bufs, momentum)                        # buf = momentum * buf + q * d
    torch._foreach_addcmul_(bufs, d, list(q.unbind(0)))
    torch._foreach_add_(w, bufs, alpha=-lr)                    # w = w - lr * buf
    if low:
        torch._foreach_copy_(params, w)                        # round to nearest even
    step.add_(1)


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------
class Impl:
    """One implementation on one parameter set. setup() builds it over `params` (leaf tensors
    whose .grad is set), step() runs one optimizer step, momentum() returns the per-parameter
    float32 (or parameter-dtype) momentum buffers after the steps run so far."""

    name = ""
    label = ""
    tvlars = True            # checked against the eager reference
    compile_s: Optional[float] = None
    note = ""

    def __init__(self, device: torch.device):
        self.device = device

    def setup(self, params: List[torch.Tensor]) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def momentum(self) -> List[torch.Tensor]:
        raise NotImplementedError

    def design_bytes(self, dtype: torch.dtype) -> Tuple[float, str]:
        """Nominal bytes per parameter the design moves per step (no cache reuse) and how."""
        raise NotImplementedError


class _TorchOptim(Impl):
    def momentum(self):
        return [self.opt.state[p]["momentum_buffer"] for p in self.params]

    def step(self):
        self.opt.step()


class Eager(_TorchOptim):
    name, label = "eager", "eager reference (per parameter)"

    def setup(self, params):
        self.params = params
        self.opt = reference.TVLARS(params, **HP)

    def design_bytes(self, dtype):
        if _nbytes(dtype) == 4:
            # d=g.clone 8, d+=wd*w 12, ||w|| 4, ||d|| 4, d*=q 8, buf*=m 8, buf+=d 12, w-lr*buf 12, copy_ 8
            return 76, "per param: clone g, add wd*w, 2 norms, scale, buf*m+d, w-lr*buf, copy back"
        # + w.float() 6, g.float() 6 instead of 8, copy back fp32->bf16 6 instead of 8
        return 78, "as float32 plus the casts of w and g to float32 and back"


class Foreach(Impl):
    name, label = "foreach", "multi-tensor torch._foreach_* step"

    def setup(self, params):
        self.params = params
        self.grads = [p.grad for p in params]
        sdt = torch.float32 if params[0].dtype in (torch.bfloat16, torch.float16) else params[0].dtype
        self.bufs = [torch.zeros_like(p, dtype=sdt) for p in params]
        self.t = torch.zeros((), dtype=torch.float32, device=self.device)
        low = sdt != params[0].dtype
        self.w32 = [torch.empty_like(b) for b in self.bufs] if low else None
        self.d32 = [torch.empty_like(b) for b in self.bufs] if low else None
        self.fn: Callable = foreach_tvlars_step

    @torch.no_grad()
    def step(self):
        self.fn(self.params, self.grads, self.bufs, self.t, w32=self.w32, d32=self.d32, **HP)

    def momentum(self):
        return self.bufs

    def design_bytes(self, dtype):
        if _nbytes(dtype) == 4:
            # d=g+wd*w 12, ||w|| 4, ||d|| 4, buf*=m 8, buf+=q*d 12, w-=lr*buf 12
            return 52, "d=g+wd*w, 2 norm passes, buf*=m, buf+=q*d, w-=lr*buf (6 sweeps)"
        # + copies to fp32 scratch 6+6, d+=wd*w 12 instead of 12, copy back 6
        return 70, "as float32 on fp32 scratch copies of w and g, plus the copy back"


class Compiled(Foreach):
    name, label = "compiled", "torch.compile(foreach step), Inductor"

    def setup(self, params):
        super().setup(params)
        self.w32 = self.d32 = None   # let Inductor fuse the casts
        import torch._dynamo
        torch._dynamo.reset()        # a fresh cache per configuration (no cache_size_limit fallback)
        self.fn = torch.compile(foreach_tvlars_step, dynamic=False)
        # the first call compiles; the runner times it apart as compile_s
        t0 = time.perf_counter()
        self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - t0
        self.stepped_in_setup = True

    def design_bytes(self, dtype):
        # the best Inductor can do: a norm pass (reads w, g) and an update pass, like the fused design
        p = _nbytes(dtype)
        s = 4 if p == 2 else p
        return 2 * p + (2 * p + s + p + s), "ideal if Inductor fuses to 2 passes (like fused); not measured"


def take_fast_path(opt, params: List[torch.Tensor]) -> None:
    """Put the given gradients where a training loop's backward puts them: zero_grad(), then a
    backward whose gradient is exactly the given one accumulates into the optimizer's gradient
    views (the hook attaches them). A .grad assigned by hand would be copied in every step."""
    grads = [p.grad for p in params]
    opt.zero_grad()
    with torch.enable_grad():
        torch.stack([(p * g).sum(dtype=torch.float32) for p, g in zip(params, grads)]).sum().backward()
    assert opt.grad_copies == 0 and all(torch.equal(p.grad, g) for p, g in zip(params, grads))


class Fused(_TorchOptim):
    def __init__(self, device, backend, denominator="update"):
        super().__init__(device)
        self.backend = backend
        self.denominator = denominator
        suffix = "" if denominator == "update" else f"-{denominator}"
        self.name = f"fused-{backend}{suffix}"
        self.label = f"tvlars_fused.TVLARS(backend={backend!r}, denominator={denominator!r})"

    def setup(self, params):
        self.params = params
        try:
            self.opt = tvlars_fused.TVLARS(params, backend=self.backend, denominator=self.denominator, **HP)
            got = self.opt.backends          # builds the buckets: raises when it cannot run here
        except Exception as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
        if got != [self.backend] * len(got):
            raise Unavailable(f"backend {self.backend!r} resolved to {got}")
        take_fast_path(self.opt, params)

    def design_bytes(self, dtype):
        p = _nbytes(dtype)
        s = 4 if p == 2 else p
        if self.backend == "torch":
            # foreach ops slice by slice; the scratch rows of a slice stay in cache between its ops
            return 2 * p + (2 * p + s + p + s), "as the kernels, in slices of torch ops (scratch in cache)"
        return 2 * p + (2 * p + s + p + s), "pass 1 reads w,g; pass 2 reads w,g,s, writes w,s"


class FusedGraph(Fused):
    """backend="triton" with the step captured in a CUDA graph after the checked first step and a
    side-stream warm-up; step() replays it. momentum() returns the buffers as they were after the
    first step (what the benchmark checks)."""

    def __init__(self, device):
        super().__init__(device, "triton")
        self.name = "fused-triton-graph"
        self.label = "tvlars_fused.TVLARS(backend='triton'), step captured in a CUDA graph"

    def setup(self, params):
        if self.device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        super().setup(params)
        self.opt.step()
        self.stepped_in_setup = True
        self.first = [m.clone() for m in super().momentum()]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):        # warm-up off the capture stream, as capture requires
            for _ in range(2):
                self.opt.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.opt.step()

    def momentum(self):
        return self.first

    def step(self):
        self.graph.replay()


class SGDForeach(_TorchOptim):
    name, label = "sgd-foreach", "torch.optim.SGD(momentum=0.9, foreach=True)"
    tvlars = False

    def setup(self, params):
        self.params = params
        self.opt = torch.optim.SGD(params, lr=SGD_LR, momentum=HP["momentum"], foreach=True)

    def design_bytes(self, dtype):
        p = _nbytes(dtype)   # torch keeps the momentum buffer in the parameter dtype
        return 2 * p + 3 * p + 3 * p, "buf*=m, buf+=g, w-=lr*buf (3 sweeps, state in param dtype)"


class SGDFused(_TorchOptim):
    name, label = "sgd-fused", "torch.optim.SGD(momentum=0.9, fused=True)"
    tvlars = False

    def setup(self, params):
        self.params = params
        try:
            self.opt = torch.optim.SGD(params, lr=SGD_LR, momentum=HP["momentum"], fused=True)
            self.opt.step()   # fused support is checked lazily on some versions: probe it
            self.stepped_in_setup = True
        except Exception as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None

    def design_bytes(self, dtype):
        p = _nbytes(dtype)
        return 5 * p, "one pass: read w,g,buf; write w,buf (state in param dtype)"


def names_for(device: torch.device) -> List[str]:
    """Implementation names that may run on `device` (fused backends probed at setup)."""
    fused = FUSED_BACKENDS["cuda" if device.type == "cuda" else "cpu"]
    return [n for n in ALL if not n.startswith("fused-") or n in fused]


def make(name: str, device: torch.device) -> Impl:
    if name == "fused-triton-graph":
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        return FusedGraph(device)
    if name.startswith("fused-"):
        backend, _, denominator = name[len("fused-"):].partition("-")
        if backend in ("triton", "cuda") and device.type != "cuda":
            raise Unavailable(f"backend {backend!r} needs a CUDA device")
        return Fused(device, backend, denominator or "update")
    cls = {"eager": Eager, "foreach": Foreach, "compiled": Compiled, "sgd-foreach": SGDForeach,
           "sgd-fused": SGDFused}.get(name)
    if cls is None:
        raise ValueError(f"unknown implementation {name!r}; choose from {ALL}")
    return cls(device)
