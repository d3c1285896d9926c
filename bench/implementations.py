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

LAMB, the same way (names prefixed "lamb-"; the floors are torch's AdamW, same state and bytes):

    lamb-eager     tvlars_fused.reference.LAMB: one parameter at a time (the reference)
    lamb-foreach   a multi-tensor LAMB step written here with torch._foreach_* ops (the fused
                   step's math: trust ratios as tensors, no host sync)
    lamb-compiled  torch.compile of that foreach step (Inductor); compile time is reported apart
    lamb-fused-<name>  tvlars_fused.LAMB(backend=<name>) for every backend on the device
    lamb-fused-triton-graph  the triton LAMB step captured in a CUDA graph and replayed (GPU only)
    lamb-pytorch-optimizer  pytorch_optimizer.Lamb (foreach=True where it can), its defaults
    adamw-foreach  torch.optim.AdamW(foreach=True): the floor (same state and bytes, no norms)
    adamw-fused    torch.optim.AdamW(fused=True), where torch supports it on the device

Every TVLARS implementation runs the same TVLARS hyperparameters (HP below, heavy-ball momentum,
no filters, no norm_clip); the SGD floors use the same lr and momentum without weight decay.
Every LAMB implementation runs one configuration, LAMB_HP with LAMB_OPTIONS: pytorch-optimizer
4.1's default Lamb written as tvlars_fused options (docs/SPEC.md, "LAMB"), so that its row is
checked against the same reference as the others; the AdamW floors use the same lr, betas, eps
and weight decay.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import tvlars_fused
from tvlars_fused import reference
from tvlars_fused.schedule import phi

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3, lmbda=1e-3, delay_steps=0.0,
          alpha=1.0, gamma_min=0.0)
SGD_LR = 0.01

# LAMB: one configuration for every LAMB row. LAMB_OPTIONS is pytorch-optimizer 4.1's default Lamb
# (weight_decouple=True, adam_debias=False: the step divided by 1 - beta1^k, ||w|| clamped at 10,
# eps also in the trust ratio's denominator); tests/test_lamb.py::test_pytorch_optimizer_default_lamb
# checks the mapping. weight_decay 0.01 (pytorch-optimizer's default is 0) so the decay is exercised.
LAMB_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
LAMB_OPTIONS = dict(bias_correction="first_moment", weight_decay_mode="decoupled", weight_norm_clip=10.0,
                    ratio_eps=LAMB_HP["eps"])

# Implementation names in the order they are run and shown. "fused-*" are expanded per device.
# "-grad": the same backend with denominator="grad" (||g|| + wd*||w||: a third sum in pass 1).
TVLARS_NAMES = ("eager", "foreach", "compiled", "fused-cpu", "fused-cpu-grad", "fused-torch", "fused-triton",
                "fused-triton-grad", "fused-triton-graph", "fused-cuda", "sgd-foreach", "sgd-fused")
LAMB_NAMES = ("lamb-eager", "lamb-foreach", "lamb-compiled", "lamb-fused-cpu", "lamb-fused-torch",
              "lamb-fused-triton", "lamb-fused-triton-graph", "lamb-fused-cuda", "lamb-pytorch-optimizer",
              "adamw-foreach", "adamw-fused")
ALL = TVLARS_NAMES + LAMB_NAMES
FUSED_BACKENDS = {"cpu": ("fused-cpu", "fused-cpu-grad", "fused-torch", "lamb-fused-cpu", "lamb-fused-torch"),
                  "cuda": ("fused-triton", "fused-triton-grad", "fused-triton-graph", "fused-cuda", "fused-torch",
                           "lamb-fused-triton", "lamb-fused-triton-graph", "lamb-fused-cuda", "lamb-fused-torch")}


# --algorithms: which rows belong to which comparison (each with its own eager reference, foreach
# floor and floor bytes)
FAMILIES = {"tvlars": TVLARS_NAMES, "lamb": LAMB_NAMES}
# per family: the eager reference ("x eager") and the foreach floor ("/sgd-foreach" column)
BASELINES = {"tvlars": ("eager", "sgd-foreach"), "lamb": ("lamb-eager", "adamw-foreach")}


def family(name: str) -> str:
    return "lamb" if name in LAMB_NAMES else "tvlars"


def algorithm_of(name: str) -> str:
    """The row's algorithm column: tvlars, sgd (TVLARS's floor), lamb, adamw (LAMB's floor)."""
    for prefix, algo in (("sgd-", "sgd"), ("adamw-", "adamw"), ("lamb-", "lamb")):
        if name.startswith(prefix):
            return algo
    return "tvlars"


def is_compiled(name: str) -> bool:
    return name in ("compiled", "lamb-compiled")


def requirement(name: str) -> str:
    """What `name` needs where names_for() leaves it out, as the "not run on" line says it: "CPU
    only" (the fused C++ CPU kernel takes CPU tensors only), "need a CUDA device" (Triton, the
    CUDA extension, CUDA graphs); "" for a name that runs on both."""
    on_cpu, on_cuda = name in FUSED_BACKENDS["cpu"], name in FUSED_BACKENDS["cuda"]
    if on_cpu != on_cuda:
        return "CPU only" if on_cpu else "need a CUDA device"
    return ""


class Unavailable(Exception):
    """This implementation cannot run here (the reason is reported as a note)."""


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def floor_bytes(dtype: torch.dtype, algorithm: str = "tvlars") -> int:
    """The least any step of the algorithm must move per parameter (state is float32 for bf16/fp16
    parameters). TVLARS/LARS (and SGD with momentum): read w, g, state; write w, state: 20 B for
    float32, 14 B for bfloat16. LAMB (and Adam/AdamW): read w, g, m, v; write w, m, v: 28 B for
    float32, 22 B for bfloat16."""
    p = _nbytes(dtype)
    s = 4 if dtype in (torch.bfloat16, torch.float16) else p
    if algorithm in ("lamb", "adamw"):
        return p + p + 2 * s + p + 2 * s
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
    float32 (or parameter-dtype) momentum buffers after the steps run so far (TVLARS);
    check_state() what the benchmark checks after the first step (TVLARS: the momentum; LAMB:
    exp_avg, exp_avg_sq and the parameters)."""

    name = ""
    label = ""
    algorithm = "tvlars"     # tvlars, lamb (checked against the float64 spec), sgd, adamw (floors)
    # state and arithmetic in the parameter dtype (bfloat16 moments for bfloat16 parameters), not
    # float32 as the spec: checked at that dtype's resolution (bench/__main__.py, check_lamb)
    state_in_param_dtype = False
    compile_s: Optional[float] = None
    note = ""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def checked(self) -> bool:
        return self.algorithm in ("tvlars", "lamb")

    def floor_bytes(self, dtype: torch.dtype) -> int:
        return floor_bytes(dtype, self.algorithm)

    def check_state(self) -> Dict[str, List[torch.Tensor]]:
        if self.algorithm == "lamb":
            return dict(exp_avg=self.exp_avgs(), exp_avg_sq=self.exp_avg_sqs(), param=list(self.params))
        return dict(momentum=self.momentum())

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


def foreach_setup(impl: Impl, params: List[torch.Tensor], states, scratches) -> None:
    """A foreach implementation's lists: the parameters and their gradients, each of `states` as
    zeros (float32 for bfloat16/float16 parameters, as the fused kernels keep it), the step t, and
    each of `scratches` as float32 working copies (None for float32/float64 parameters)."""
    impl.params = params
    impl.grads = [p.grad for p in params]
    sdt = torch.float32 if params[0].dtype in (torch.bfloat16, torch.float16) else params[0].dtype
    for name in states:
        setattr(impl, name, [torch.zeros_like(p, dtype=sdt) for p in params])
    impl.t = torch.zeros((), dtype=torch.float32, device=impl.device)
    low = sdt != params[0].dtype
    for name in scratches:
        setattr(impl, name, [torch.empty_like(p, dtype=sdt) for p in params] if low else None)


class Foreach(Impl):
    name, label = "foreach", "multi-tensor torch._foreach_* step"

    def setup(self, params):
        foreach_setup(self, params, ("bufs",), ("w32", "d32"))
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
        compile_first_step(self, foreach_tvlars_step)

    def design_bytes(self, dtype):
        # the best Inductor can do: a norm pass (reads w, g) and an update pass, like the fused design
        p = _nbytes(dtype)
        s = 4 if p == 2 else p
        return 2 * p + (2 * p + s + p + s), "ideal if Inductor fuses to 2 passes (like fused); not measured"


def compile_first_step(impl: Impl, fn: Callable) -> None:
    """impl.fn = torch.compile(fn) on a fresh Dynamo cache (per configuration: no cache_size_limit
    fallback); the first call compiles, timed apart as impl.compile_s."""
    import torch._dynamo
    torch._dynamo.reset()
    impl.fn = torch.compile(fn, dynamic=False)
    t0 = time.perf_counter()
    impl.step()
    if impl.device.type == "cuda":
        torch.cuda.synchronize(impl.device)
    impl.compile_s = time.perf_counter() - t0
    impl.stepped_in_setup = True


def fused_optimizer(cls, backend: str, params: List[torch.Tensor], **kwargs):
    """cls(params, backend=backend, **kwargs) with its gradients on the fast path; Unavailable when
    that backend cannot run here (or resolves to another)."""
    try:
        opt = cls(params, backend=backend, **kwargs)
        got = opt.backends          # builds the buckets: raises when it cannot run here
    except Exception as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None
    if got != [backend] * len(got):
        raise Unavailable(f"backend {backend!r} resolved to {got}")
    take_fast_path(opt, params)
    return opt


def capture_step(impl: Impl) -> "torch.cuda.CUDAGraph":
    """impl.opt's step captured in a CUDA graph, after two warm-up steps on a side stream (as
    capture requires); the caller has taken (and kept what it checks of) the first step."""
    side = torch.cuda.Stream(impl.device)
    side.wait_stream(torch.cuda.current_stream(impl.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            impl.opt.step()
    torch.cuda.current_stream(impl.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.opt.step()
    return graph


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
        self.opt = fused_optimizer(tvlars_fused.TVLARS, self.backend, params, denominator=self.denominator, **HP)

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
        self.graph = capture_step(self)

    def momentum(self):
        return self.first

    def step(self):
        self.graph.replay()


class SGDForeach(_TorchOptim):
    name, label = "sgd-foreach", "torch.optim.SGD(momentum=0.9, foreach=True)"
    algorithm = "sgd"

    def setup(self, params):
        self.params = params
        self.opt = torch.optim.SGD(params, lr=SGD_LR, momentum=HP["momentum"], foreach=True)

    def design_bytes(self, dtype):
        p = _nbytes(dtype)   # torch keeps the momentum buffer in the parameter dtype
        return 2 * p + 3 * p + 3 * p, "buf*=m, buf+=g, w-=lr*buf (3 sweeps, state in param dtype)"


class SGDFused(_TorchOptim):
    name, label = "sgd-fused", "torch.optim.SGD(momentum=0.9, fused=True)"
    algorithm = "sgd"

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


# ---------------------------------------------------------------------------------------------
# LAMB: the multi-tensor (torch._foreach_*) step
# ---------------------------------------------------------------------------------------------
def foreach_lamb_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                      exp_avg_sqs: List[torch.Tensor], step: torch.Tensor, lr: float, betas: Tuple[float, float],
                      eps: float, weight_decay: float, weight_norm_clip: float, ratio_eps: float,
                      w32: Optional[List[torch.Tensor]] = None,
                      g32: Optional[List[torch.Tensor]] = None) -> None:
    """One LAMB step (docs/SPEC.md, "LAMB") in the benchmark's configuration, LAMB_OPTIONS:
    bias_correction="first_moment", weight_decay_mode="decoupled", grad_averaging, ||w|| clamped
    at weight_norm_clip, no filters, not maximize; over all parameters with multi-tensor ops. No
    host sync: t, the norms, the trust ratios and the step scale stay tensors.

        m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g*g ; u = m / (sqrt(v) + eps)
        w' = w*(1 - lr*wd) ; q = min(||w'||, clip) / (||u|| + ratio_eps) (1 where a norm is 0)
        w = w' - ((lr / (1 - b1^k)) * q) * u,  k = t + 1

    Low-precision parameters: as foreach_tvlars_step (float32 scratch w32/g32 for the eager
    variant, None to let the compiler materialise the casts), float32 moments."""
    beta1, beta2 = betas
    low = params[0].dtype in (torch.bfloat16, torch.float16)
    if low:
        if w32 is None:
            w = [p.float() for p in params]
            g = [x.float() for x in grads]
        else:
            w, g = w32, g32
            torch._foreach_copy_(w, params)
            torch._foreach_copy_(g, grads)
    else:
        w, g = params, grads
    torch._foreach_mul_(exp_avgs, beta1)                             # m = b1*m + (1-b1)*g
    torch._foreach_add_(exp_avgs, g, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)                          # v = b2*v + (1-b2)*g*g
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)                         # u = m / (sqrt(v) + eps)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(exp_avgs, denom)
    del denom
    if weight_decay != 0:
        torch._foreach_mul_(w, 1.0 - lr * weight_decay)               # w' = w*(1 - lr*wd)
    wn = torch.stack(torch._foreach_norm(w)).clamp(max=weight_norm_clip)
    un = torch.stack(torch._foreach_norm(u))
    q = torch.where((wn > 0) & (un > 0), wn / (un + ratio_eps), torch.ones_like(wn))
    ls = (lr / (1.0 - beta1 ** (step.double() + 1))).to(wn.dtype)    # lr * s, in float64 on the device
    torch._foreach_mul_(u, list((ls * q).unbind(0)))                 # w = w' - ((lr*s)*q) * u
    torch._foreach_sub_(w, u)
    if low:
        torch._foreach_copy_(params, w)                               # round to nearest even
    step.add_(1)


def lamb_fused_bytes(dtype: torch.dtype) -> Tuple[int, str]:
    """The fused LAMB step's bytes per parameter (docs/DESIGN.md, "Bytes per parameter"): pass 1
    reads w, g, m, v and writes m, v; pass 2 reads w, m, v and writes w. float32: 24 + 16 = 40 B;
    bfloat16 parameters with float32 moments: 20 + 12 = 32 B. The floor (floor_bytes) is 28 / 22 B:
    the difference is pass 2 re-reading w, m, v, the price of the layer norms."""
    p = _nbytes(dtype)
    s = 4 if p == 2 else p
    one, two = 2 * p + 4 * s, 2 * p + 2 * s
    return one + two, (f"pass 1 reads w,g,m,v, writes m,v ({one} B); pass 2 reads w,m,v, writes w ({two} B)"
                       + ("" if s == p else "; w, g in the parameter dtype, m, v float32"))


# ---------------------------------------------------------------------------------------------
# LAMB implementations
# ---------------------------------------------------------------------------------------------
class _LambTorchOptim(_TorchOptim):
    algorithm = "lamb"

    def exp_avgs(self):
        return [self.opt.state[p]["exp_avg"] for p in self.params]

    def exp_avg_sqs(self):
        return [self.opt.state[p]["exp_avg_sq"] for p in self.params]


class LambEager(_LambTorchOptim):
    name, label = "lamb-eager", "eager reference LAMB (per parameter)"

    def setup(self, params):
        self.params = params
        self.opt = reference.LAMB(params, **LAMB_HP, **LAMB_OPTIONS)

    def design_bytes(self, dtype):
        if _nbytes(dtype) == 4:
            # m: m*b1 8, g*b3 8, + 12, copy_ 8; v: v*b2 8, g*g 8, *(1-b2) 8, + 12, copy_ 8;
            # sqrt 8, +eps 8, m/() 12; w*(1-lr*wd) 8; ||w'|| 4, ||u|| 4; u*c 8, w'-() 12, copy_ 8
            return 152, "per param: m and v each as 4 ops and a copy_, sqrt, +eps, /, decay, 2 norms, scale, sub, copy back"
        # + w.float() 6, g.float() 6; the copy back fp32->bf16 6 instead of 8
        return 162, "as float32 plus the casts of w and g to float32 and back"


class LambForeach(Impl):
    name, label = "lamb-foreach", "multi-tensor torch._foreach_* LAMB step"
    algorithm = "lamb"

    def setup(self, params):
        foreach_setup(self, params, ("m", "v"), ("w32", "g32"))
        self.fn: Callable = foreach_lamb_step

    @torch.no_grad()
    def step(self):
        o = LAMB_OPTIONS
        self.fn(self.params, self.grads, self.m, self.v, self.t, w32=self.w32, g32=self.g32,
                weight_norm_clip=o["weight_norm_clip"], ratio_eps=o["ratio_eps"], **LAMB_HP)

    def exp_avgs(self):
        return self.m

    def exp_avg_sqs(self):
        return self.v

    def design_bytes(self, dtype):
        if _nbytes(dtype) == 4:
            # m*=b1 8, m+=b3*g 12, v*=b2 8, v+=(1-b2)*g*g 12, sqrt 8, +eps 8, u=m/() 12,
            # w*=(1-lr*wd) 8, ||w'|| 4, ||u|| 4, u*=c 8, w-=u 12
            return 104, "m (2 sweeps), v (2), sqrt, +eps, m/(), decay, 2 norm passes, u*=c, w-=u (12 sweeps)"
        # + copies to fp32 scratch 6+6, copy back 6
        return 122, "as float32 on fp32 scratch copies of w and g, plus the copy back"


class LambCompiled(LambForeach):
    name, label = "lamb-compiled", "torch.compile(foreach LAMB step), Inductor"

    def setup(self, params):
        super().setup(params)
        self.w32 = self.g32 = None   # let Inductor fuse the casts
        compile_first_step(self, foreach_lamb_step)

    def design_bytes(self, dtype):
        return lamb_fused_bytes(dtype)[0], "ideal if Inductor fuses to 2 passes (like fused); not measured"


class LambFused(_LambTorchOptim):
    def __init__(self, device, backend):
        super().__init__(device)
        self.backend = backend
        self.name = f"lamb-fused-{backend}"
        self.label = f"tvlars_fused.LAMB(backend={backend!r})"

    def setup(self, params):
        self.params = params
        self.opt = fused_optimizer(tvlars_fused.LAMB, self.backend, params, **LAMB_HP, **LAMB_OPTIONS)

    def design_bytes(self, dtype):
        total, how = lamb_fused_bytes(dtype)
        if self.backend == "torch":
            return total, how + " (as the kernels, in slices of torch ops: scratch in cache)"
        return total, how


class LambFusedGraph(LambFused):
    """backend="triton" captured in a CUDA graph after the checked first step, as FusedGraph;
    check_state() returns the moments and parameters as they were after the first step."""

    def __init__(self, device):
        super().__init__(device, "triton")
        self.name = "lamb-fused-triton-graph"
        self.label = "tvlars_fused.LAMB(backend='triton'), step captured in a CUDA graph"

    def setup(self, params):
        if self.device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        super().setup(params)
        self.opt.step()
        self.stepped_in_setup = True
        first = super().check_state()
        self.first = {k: [x.detach().clone() for x in v] for k, v in first.items()}
        self.graph = capture_step(self)

    def check_state(self):
        return self.first

    def step(self):
        self.graph.replay()


class LambPytorchOptimizer(_LambTorchOptim):
    """pytorch_optimizer.Lamb with its defaults (= LAMB_OPTIONS), foreach=True. Its state is in
    the parameter dtype (bfloat16 moments for bfloat16 parameters) and its math too."""
    name = "lamb-pytorch-optimizer"
    label = "pytorch_optimizer.Lamb(foreach=True)"
    state_in_param_dtype = True

    def setup(self, params):
        self.params = params
        try:
            import pytorch_optimizer
            from pytorch_optimizer import Lamb
        except Exception as exc:
            raise Unavailable(f"pytorch_optimizer not importable ({type(exc).__name__}: {exc}); "
                              "pip install pytorch-optimizer==4.1.0") from None
        version = getattr(pytorch_optimizer, "__version__", "?")
        self.opt = Lamb(params, foreach=True, **LAMB_HP)   # its other defaults are LAMB_OPTIONS
        can = getattr(self.opt, "_can_use_foreach", None)  # 4.1.0's test (foreach=True is a request)
        self.foreach = bool(can(self.opt.param_groups[0])) if can is not None else True
        self.label = f"pytorch_optimizer.Lamb(foreach=True) {version}"
        if not self.foreach:
            self.note = "pytorch_optimizer ran its per-parameter loop (foreach not supported here)"

    def design_bytes(self, dtype):
        p = _nbytes(dtype)   # state and math in the parameter dtype
        if getattr(self, "foreach", True):
            # w*=(1-lr*wd) 2p, m*=b1 2p, m+=b3*g 3p, v*=b2 2p, v+=(1-b2)*g*g 3p, sqrt 2p, +eps 2p,
            # 1/x 2p, u*=m 3p, ||w'|| p, ||u|| p, u*=q 2p, w-=step*u 3p
            return 28 * p, "foreach: decay, m (2 sweeps), v (2), sqrt, +eps, 1/x, *m, 2 norms, *q, w-= (state in param dtype)"
        # m 5p, v 5p, decay 2p, sqrt 2p, +eps 2p, m/() 3p, 2 norms 2p, w-= 3p (and a host sync per tensor)
        return 24 * p, "per param: decay, m (2), v (2), sqrt, +eps, m/(), 2 norms, w-= (state in param dtype)"


class AdamWForeach(_TorchOptim):
    name, label = "adamw-foreach", "torch.optim.AdamW(foreach=True)"
    algorithm = "adamw"

    def setup(self, params):
        self.params = params
        self.opt = torch.optim.AdamW(params, foreach=True, **LAMB_HP)

    def design_bytes(self, dtype):
        p = _nbytes(dtype)   # torch keeps exp_avg and exp_avg_sq in the parameter dtype
        # w*=(1-lr*wd) 2p, lerp_(m, g) 3p, v*=b2 2p, v+=(1-b2)*g*g 3p, sqrt 2p, /bc2 2p, +eps 2p,
        # w+=c*m/denom 4p
        return 20 * p, "decay, lerp m, v (2 sweeps), sqrt, /sqrt(bc2), +eps, addcdiv (8 sweeps, state in param dtype)"


class AdamWFused(_TorchOptim):
    name, label = "adamw-fused", "torch.optim.AdamW(fused=True)"
    algorithm = "adamw"

    def setup(self, params):
        self.params = params
        try:
            self.opt = torch.optim.AdamW(params, fused=True, **LAMB_HP)
            self.opt.step()   # fused support is checked lazily on some versions: probe it
            self.stepped_in_setup = True
        except Exception as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None

    def design_bytes(self, dtype):
        p = _nbytes(dtype)
        return 7 * p, "one pass: read w,g,m,v; write w,m,v (state in param dtype)"


def names_for(device: torch.device) -> List[str]:
    """Implementation names that may run on `device` (fused backends probed at setup)."""
    fused = FUSED_BACKENDS["cuda" if device.type == "cuda" else "cpu"]
    return [n for n in ALL if not n.startswith(("fused-", "lamb-fused-")) or n in fused]


def make(name: str, device: torch.device) -> Impl:
    if name in ("fused-triton-graph", "lamb-fused-triton-graph"):
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        return FusedGraph(device) if name == "fused-triton-graph" else LambFusedGraph(device)
    if name.startswith("lamb-fused-"):
        backend = name[len("lamb-fused-"):]
        if backend in ("triton", "cuda") and device.type != "cuda":
            raise Unavailable(f"backend {backend!r} needs a CUDA device")
        return LambFused(device, backend)
    if name.startswith("fused-"):
        backend, _, denominator = name[len("fused-"):].partition("-")
        if backend in ("triton", "cuda") and device.type != "cuda":
            raise Unavailable(f"backend {backend!r} needs a CUDA device")
        return Fused(device, backend, denominator or "update")
    cls = {"eager": Eager, "foreach": Foreach, "compiled": Compiled, "sgd-foreach": SGDForeach,
           "sgd-fused": SGDFused, "lamb-eager": LambEager, "lamb-foreach": LambForeach,
           "lamb-compiled": LambCompiled, "lamb-pytorch-optimizer": LambPytorchOptimizer,
           "adamw-foreach": AdamWForeach, "adamw-fused": AdamWFused}.get(name)
    if cls is None:
        raise ValueError(f"unknown implementation {name!r}; choose from {ALL}")
    return cls(device)
