"""Known interactions with other libraries (docs/known_interactions.md): each one reproduced, and
the documented workaround shown to give the right numbers.

1. Lightning refuses `Trainer(gradient_clip_val=..., precision="bf16-mixed")` for any optimizer that
   takes torch's fused AMP protocol (`_step_supports_amp_scaling`), torch's SGD(fused=True)
   included. Workaround: clip in `LightningModule.configure_gradient_clipping`.
2. `torch.compile(fullgraph=True)` of code that calls `optimizer.step()` fails once an LR scheduler
   has wrapped that step (torch/optim/lr_scheduler.py is force-skipped by Dynamo). Workarounds: a
   tensor lr with fullgraph=False, or a tensor lr and the class's own step with fullgraph=True.
3. DDP(gradient_as_bucket_view=True) and a Dynamo-traced (or compiled-autograd) backward leave
   .grad tensors that are not the optimizer's views: every step copies every gradient
   (`opt.grad_copies`). The results are unchanged; the cost is measured by running this file:

       .venv/bin/python tests/test_interactions.py     # ResNet-50 shapes, fused "cpu" step

Each interaction is checked for both of the project's classes, TVLARS and LAMB (ids `[TVLARS]`,
`[LAMB]`, beside torch's own optimizers where a test compares with them), on the C++ backend (the
torch one when the extension is not built). The Lightning tests skip when `lightning` is not
installed.
"""
import os
import socket
import statistics
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tvlars_fused
from tvlars_fused import reference
from tvlars_fused.kernels import available_backends

CPU_BACKEND = available_backends("cpu", ("cpu", "torch"))[0]   # the C++ kernel when it is built
# Per class of the project: the hyperparameters of every test here (lr where the test gives none)
HP = {"TVLARS": dict(lr=0.5, momentum=0.9, weight_decay=1e-3, eta=2e-2, lmbda=0.05),
      "LAMB": dict(lr=0.05, betas=(0.8, 0.95), weight_decay=1e-2)}
PROJECT = tuple(HP)


def fused(algo, params, **kw):
    """tvlars_fused.<algo> on CPU_BACKEND with HP[algo] (updated by kw)."""
    return getattr(tvlars_fused, algo)(params, backend=CPU_BACKEND, **{**HP[algo], **kw})


def eager(algo, params, **kw):
    """tvlars_fused.reference.<algo> with HP[algo] (updated by kw)."""
    return getattr(reference, algo)(params, **{**HP[algo], **kw})


def _net(double=False):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return m.double() if double else m


def _max_err(a, b):
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


# =============================================================================================
# 1. Lightning: gradient_clip_val with a fused-AMP-protocol optimizer
# =============================================================================================
CLIP = 0.5
LIGHTNING_REFUSAL = ("does not allow for gradient clipping because it performs unscaling of "
                     "gradients internally")


def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
    """The documented workaround, verbatim (a LightningModule method)."""
    if not gradient_clip_val:
        return
    scaler = getattr(self.trainer.precision_plugin, "scaler", None)
    if scaler is not None:          # precision="16-mixed": the gradients are still scaled
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if gradient_clip_algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


def _lightning():
    return pytest.importorskip(
        "lightning", reason="lightning is not installed "
        f"(pip install -c <(echo torch=={torch.__version__.split('+')[0]}) lightning)")


def _fit(L, make_opt, workaround, precision="bf16-mixed", steps=4):
    """A tiny Trainer fit on CPU; returns the trained parameters, the optimizer and the gradient
    norms seen by the workaround (before clipping)."""
    norms = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            return make_opt(self.parameters())

    if workaround:
        def clip(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norms.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))))
            configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
        Module.configure_gradient_clipping = clip

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8 * steps, 6, generator=g),
                                          10 * torch.randn(8 * steps, 3, generator=g))
    module = Module()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, gradient_clip_val=CLIP,
                        max_steps=steps, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Lightning's advice on num_workers, logging, ...
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    opt = trainer.optimizers[0]
    return [p.detach().clone() for p in module.parameters()], opt, norms


LIGHTNING_FUSED = {
    "torch-SGD-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    **{algo: (lambda ps, algo=algo: fused(algo, ps)) for algo in PROJECT},
}
LIGHTNING_PLAIN = {   # the same update without the fused AMP protocol: Lightning clips for these
    "torch-SGD-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    **{algo: (lambda ps, algo=algo: eager(algo, ps)) for algo in PROJECT},
}


@pytest.mark.parametrize("name", list(LIGHTNING_FUSED))
def test_lightning_refuses_gradient_clipping_for_fused_amp_optimizers(name):
    L = _lightning()
    assert getattr(LIGHTNING_FUSED[name]([torch.zeros(1, requires_grad=True)]),
                   "_step_supports_amp_scaling", False)
    with pytest.raises(RuntimeError, match=LIGHTNING_REFUSAL):
        _fit(L, LIGHTNING_FUSED[name], workaround=False, steps=1)


@pytest.mark.parametrize("name", list(LIGHTNING_FUSED))
def test_lightning_clipping_workaround_matches_lightnings_own_clipping(name):
    """The fused optimizer clipped by the workaround ends where the non-fused one clipped by
    Lightning itself does (same gradient_clip_val), and the clipping was active."""
    L = _lightning()
    got, opt, norms = _fit(L, LIGHTNING_FUSED[name], workaround=True)
    expected, _, _ = _fit(L, LIGHTNING_PLAIN[name], workaround=False)
    assert len(norms) == 4 and min(norms) > 2 * CLIP, f"the clipping must be active: {norms}"
    assert _max_err(got, expected) < 1e-6, _max_err(got, expected)
    unclipped = _net()
    assert _max_err(got, unclipped.parameters()) > 1e-3, "the fit must move the weights"
    if name in PROJECT:
        assert opt.grad_copies == 0, "Lightning's loop keeps the fast gradient path"


@pytest.mark.parametrize("algo", PROJECT)
def test_gradscaler_unscale_then_clip_then_fused_step_matches_reference(algo):
    """The workaround's "16-mixed" branch (Lightning maps 16-mixed to bf16-mixed on CPU, so it is
    checked here without Lightning): GradScaler.unscale_ + clip_grad_norm_ + scaler.step on the
    fused optimizer (which then gets grad_scale=None, found_inf from unscale_) equals the same
    loop on the reference optimizer, including a step skipped for an inf (float64: the project's
    1e-12 rule between the two)."""
    results = []
    for make in (lambda ps: fused(algo, ps), lambda ps: eager(algo, ps)):
        m = _net(double=True)
        opt = make(m.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x = torch.randn(8, 6, generator=g, dtype=torch.float64)
            if step == 2:
                x[0, 0] = float("inf")
            opt.zero_grad()
            target = 10 * torch.ones(8, 3, dtype=torch.float64)
            scaler.scale(torch.nn.functional.mse_loss(m(x), target)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            scaler.step(opt)
            scaler.update()
        results.append(([p.detach().clone() for p in m.parameters()], float(opt.step_count)))
    (got, t_got), (expected, t_exp) = results
    assert t_got == t_exp == 3, "the inf step is skipped, t included"
    assert _max_err(got, expected) < 1e-12


# =============================================================================================
# 2. torch.compile(fullgraph=True) and LR schedulers
# =============================================================================================
KINDS = ["torch-SGD", *PROJECT]   # torch's SGD, then the project's classes


def _make_opt(kind, lr):
    m = _net()
    if kind == "torch-SGD":
        return m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    return m, fused(kind, m.parameters(), lr=lr)


@pytest.mark.parametrize("kind", KINDS)
def test_lr_scheduler_breaks_fullgraph(kind):
    """Dynamo alone (backend="eager": no code generation) decides this: the scheduler replaces
    opt.step by a wrapper from torch/optim/lr_scheduler.py, a file Dynamo never traces."""
    torch._dynamo.reset()
    m, opt = _make_opt(kind, torch.tensor(0.1))
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    m(torch.randn(4, 6)).sum().backward()
    compiled = torch.compile(lambda: opt.step(), fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported) as exc:
        compiled()
    msg = str(exc.value)
    assert "Attempted to call function marked as skipped" in msg and "lr_scheduler.py" in msg, msg


@pytest.mark.parametrize("kind", KINDS)
def test_fullgraph_step_without_scheduler(kind):
    """For contrast: without a scheduler the project's steps (TVLARS, LAMB) compile with
    fullgraph=True; torch's own optimizers do not in any case (their step graph-breaks on purpose,
    _use_grad_for_differentiable)."""
    torch._dynamo.reset()
    m, opt = _make_opt(kind, torch.tensor(0.1))
    m(torch.randn(4, 6)).sum().backward()
    compiled = torch.compile(lambda: opt.step(), fullgraph=True, backend="eager")
    if kind in PROJECT:
        compiled()
        assert float(opt.step_count) == 1
    else:
        with pytest.raises(torch._dynamo.exc.Unsupported, match=r"torch._dynamo.graph_break\(\)"):
            compiled()


def _train_step(model, opt, x, step_fn=None):
    loss = model(x).square().mean()
    loss.backward()
    if step_fn is None:
        opt.step()
    else:
        step_fn(opt)
    return loss.detach()


def _scheduled_run(kind, compile_kw, lr, class_step, steps=4):
    """`steps` training steps with StepLR(gamma=0.5); compiled when compile_kw is not None, no
    recompile allowed after the second call (the first creates the optimizer state)."""
    m, opt = _make_opt(kind, lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step_fn = type(opt).step if class_step else None
    fn = _train_step if compile_kw is None else torch.compile(_train_step, **compile_kw)
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for i in range(steps):
            opt.zero_grad()
            with torch._dynamo.config.patch(error_on_recompile=i >= 2):
                fn(m, opt, torch.randn(16, 6, generator=g), step_fn)
            sched.step()
    return list(m.parameters()), opt


@pytest.mark.parametrize("kind", KINDS)
def test_lr_scheduler_float_lr_recompiles_the_step(kind):
    """Why the workarounds use a tensor lr: with fullgraph=False Dynamo compiles the step (torch's
    optimizers: the step's own frame, after their graph break; this project's: the scheduler's
    wrapper around it, which Dynamo traces through), guarding on a float lr, so each scheduler
    step recompiles it (until the recompile limit, then that frame runs eagerly). aot_eager guards
    as Inductor does; backend="eager" keeps the float symbolic and would not show it."""
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.RecompileError, match="Recompiling function (step|wrapper)"):
        _scheduled_run(kind, dict(fullgraph=False, backend="aot_eager"), 0.1, class_step=False)


@pytest.mark.parametrize("kind", KINDS)
def test_lr_scheduler_workaround_fullgraph_false_tensor_lr(kind):
    torch._dynamo.reset()
    got, opt = _scheduled_run(kind, dict(fullgraph=False), torch.tensor(0.1), class_step=False)
    expected, _ = _scheduled_run(kind, None, torch.tensor(0.1), class_step=False)
    assert _max_err(got, expected) < 1e-6
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 16)


@pytest.mark.parametrize("kind", PROJECT)
def test_lr_scheduler_workaround_fullgraph_tensor_lr_class_step(kind):
    """The project's classes only (torch's optimizers cannot be fullgraph-compiled at all, see
    above): the scheduler fills the tensor lr in place, the compiled step calls type(opt).step,
    one graph, no recompile, the eager numbers. The scheduler, which no longer sees the step, warns
    once."""
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, opt = _scheduled_run(kind, dict(fullgraph=True), torch.tensor(0.1), class_step=True)
    expected, _ = _scheduled_run(kind, None, torch.tensor(0.1), class_step=False)
    assert _max_err(got, expected) < 1e-6
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 / 16)
    spurious = [w for w in caught if "Detected call of `lr_scheduler.step()` before" in str(w.message)]
    assert len(spurious) == 1


# =============================================================================================
# 3. Gradients that are not the optimizer's views: DDP(gradient_as_bucket_view=True) and a
#    compiled backward
# =============================================================================================
WORLD = 2
DDP_STEPS = 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(steps, double=True):
    g = torch.Generator().manual_seed(1)
    dt = torch.float64 if double else torch.float32
    return [(torch.randn(8, 6, generator=g, dtype=dt), torch.randn(8, 3, generator=g, dtype=dt))
            for _ in range(steps)]


def _ddp_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        info = {}
        for algo in PROJECT:   # one spawn for every class: starting the processes is the cost
            for as_view in (False, True):
                model = torch.nn.parallel.DistributedDataParallel(_net(double=True),
                                                                  gradient_as_bucket_view=as_view)
                opt = fused(algo, model.parameters())
                for x, y in _batches(DDP_STEPS):
                    half = slice(rank * 4, rank * 4 + 4)
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(model(x[half]), y[half]).backward()
                    opt.step()
                info[algo, as_view] = {"params": [p.detach().clone() for p in model.parameters()],
                                       "grad_copies": opt.grad_copies, "class": type(opt).__name__}
        torch.save(info, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()   # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_as_bucket_view_copies_every_gradient(tmp_path):
    """Both classes, in one spawn (info keyed by (class, as_view))."""
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    infos = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for algo in PROJECT:
        m = _net(double=True)
        opt = eager(algo, m.parameters())
        for x, y in _batches(DDP_STEPS):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        n_params = len(list(m.parameters()))
        for r, info in enumerate(infos):
            assert info[algo, False]["class"] == algo
            assert info[algo, False]["grad_copies"] == 0, f"{algo}: default DDP: the all-reduce result lands in the views"
            assert info[algo, True]["grad_copies"] == DDP_STEPS * n_params, f"{algo}: as_view: every gradient, every step"
            for as_view in (False, True):
                err = _max_err(info[algo, as_view]["params"], m.parameters())
                assert err < 1e-12, f"{algo}, rank {r}, gradient_as_bucket_view={as_view}: {err}"


def _compiled_backward_run(mode, algo, steps=3):
    m = _net()
    opt = fused(algo, m.parameters())
    if mode == "compiled-backward":     # Dynamo traces loss.backward(): grads are graph outputs
        @torch.compile(fullgraph=True)
        def loss_and_backward(x, y):
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss.detach()
    else:
        fwd = torch.compile(m) if mode == "compiled-model" else m

        def loss_and_backward(x, y):   # backward runs in autograd (Inductor's backward kernels)
            loss = torch.nn.functional.mse_loss(fwd(x), y)
            loss.backward()
            return loss.detach()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for x, y in _batches(steps, double=False):
            opt.zero_grad()
            loss_and_backward(x, y)
            opt.step()
    return list(m.parameters()), opt.grad_copies


@pytest.mark.parametrize("algo", PROJECT)
@pytest.mark.parametrize("mode,copies", [("compiled-backward", 3 * 4), ("compiled-model", 0)])
def test_compiled_backward_copies_gradients_compiled_model_does_not(mode, copies, algo):
    torch._dynamo.reset()
    got, n = _compiled_backward_run(mode, algo)
    expected, n_eager = _compiled_backward_run("eager", algo)
    assert n_eager == 0
    assert n == copies
    assert _max_err(got, expected) < 1e-6


# =============================================================================================
# The cost of the gradient copies (not a test: python tests/test_interactions.py)
# =============================================================================================
def bench_grad_copies(steps: int = 60, threads=None):
    """Times the fused step (backend "cpu") on ResNet-50's float32 parameters with .grad the
    optimizer's views (the fast path) and with .grad views of a separate flat buffer (what
    DDP(gradient_as_bucket_view=True) leaves), interleaved, one process; prints the medians."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from bench.shapes import resnet50
    if threads:
        torch.set_num_threads(threads)
    shapes = resnet50()
    numel = sum(torch.Size(s).numel() for s in shapes)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]

    def make(fast):
        params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in shapes]
        opt = tvlars_fused.TVLARS(params, lr=0.1, backend="cpu")
        if fast:   # backward attaches the bucket views; fill them in place
            torch.autograd.backward([p.sum() for p in params])
            for p, gr in zip(params, grads):
                p.grad.copy_(gr)
        else:      # views of another library's flat gradient buffer, as DDP's bucket views
            flat = torch.cat([gr.reshape(-1) for gr in grads])
            off = 0
            for p in params:
                p.grad = flat[off:off + p.numel()].view_as(p)
                off += p.numel()
        opt.step()   # creates the state
        return opt
    opts = {"fast path (.grad = optimizer's views)": make(True),
            "copy path (.grad = another buffer's views)": make(False)}
    times = {k: [] for k in opts}
    for _ in range(steps):
        for k, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t)
    copies = {k: o.grad_copies for k, o in opts.items()}
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    ct = []
    for _ in range(steps):
        t = time.perf_counter()
        dst.copy_(src)
        ct.append(time.perf_counter() - t)
    print(f"ResNet-50 shapes: {len(shapes)} float32 tensors, {numel / 1e6:.1f}M parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {steps} steps")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        q = sorted(times[k])
        print(f"  {k:45s} median {v:7.2f} ms  (p10 {q[len(q) // 10] * 1e3:.2f}, p90 "
              f"{q[len(q) * 9 // 10] * 1e3:.2f}; grad_copies so far: {copies[k]})")
    fast, slow = med.values()
    print(f"  extra per step: {slow - fast:.2f} ms (+{100 * (slow / fast - 1):.0f}%); "
          f"8 B/param moved extra (read 4 B from the other buffer, write 4 B into the bucket) = "
          f"{8 * numel / 1e6:.0f} MB/step")
    print(f"  for scale: one flat {numel / 1e6:.1f}M-element float32 copy_ takes "
          f"{statistics.median(ct) * 1e3:.2f} ms")
    print(f"  load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    # python tests/test_interactions.py [STEPS [THREADS]]
    bench_grad_copies(int(sys.argv[1]) if len(sys.argv) > 1 else 60,
                      int(sys.argv[2]) if len(sys.argv) > 2 else None)
