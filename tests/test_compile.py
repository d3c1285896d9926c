"""torch.compile: a compiled training step (forward, backward, optimizer.step) with
fullgraph=True — no graph break — gives the eager result; a tensor lr changed in place needs no
recompile. Dynamo traces backward only with torch._dynamo.config.trace_autograd_ops = True.

Each test for both classes, TVLARS and LAMB (ids `[cpu-TVLARS]`, `[cpu-LAMB]`; the other CPU
backend's compile is slow, as before, for both); HYPER holds each class's options."""

import pytest
import torch

import tvlars_fused
from tvlars_fused.kernels import resolve

from parity import max_err

# Per class: the options besides lr (a tensor, set by each test)
HYPER = {"TVLARS": dict(momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05),
         "LAMB": dict(betas=(0.8, 0.95), weight_decay=1e-2)}
LR = {"TVLARS": 0.5, "LAMB": 0.05}
ALGOS = tuple(HYPER)


def _cpu_backend_names():
    out = []
    for name in ("cpu", "torch"):
        try:
            resolve(name, torch.device("cpu"))
            out.append(name)
        except RuntimeError:
            pass
    return out


def _cpu_backends():
    """(backend, class) params: the extension backend (or torch when it is not built) in the
    default run; the other slow, since each compile takes tens of seconds on a small CPU machine."""
    return [pytest.param(name, algo, id=f"{name}-{algo}", marks=[pytest.mark.slow] if i else [])
            for i, name in enumerate(_cpu_backend_names()) for algo in ALGOS]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train_step(model, opt, x):
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason=f"torch {torch.__version__}: Dynamo cannot trace backward "
                           "(no torch._dynamo.config.trace_autograd_ops)")
@pytest.mark.parametrize("backend,algo", _cpu_backends())
def test_compiled_training_step_fullgraph_matches_eager(backend, algo):
    torch._dynamo.reset()
    m_c, m_e = _net(), _net()
    lr0 = LR[algo]
    lr = torch.tensor(lr0)
    cls = getattr(tvlars_fused, algo)
    o_c = cls(m_c.parameters(), backend=backend, lr=lr, **HYPER[algo])
    o_e = cls(m_e.parameters(), backend=backend, lr=lr.clone(), **HYPER[algo])
    compiled = torch.compile(train_step, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for step in range(4):
            x = torch.randn(16, 6, generator=g)
            for o in (o_c, o_e):
                o.zero_grad()
                o.param_groups[0]["lr"].fill_(lr0 / (step + 1))
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                lc = compiled(m_c, o_c, x)
            le = train_step(m_e, o_e, x)
            assert torch.allclose(lc, le, rtol=1e-6, atol=0)
    err = max_err(m_c.parameters(), m_e.parameters())
    assert err < 1e-6, err
    assert float(o_c.step_count) == 4
    assert not torch.equal(m_c[0].weight, _net()[0].weight), "the compiled step must update the weights"


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason=f"torch {torch.__version__}: Dynamo cannot trace backward")
@pytest.mark.parametrize("algo", ALGOS)
def test_readme_recipe_with_globals_does_not_recompile(algo):
    """The README's compiled training step, written as it is there (model and optimizer as
    globals, a backward whose gradients take the copy path): after the first steps no recompile
    (grad_copies is not counted while tracing: a counter changing every step would fail a guard
    every step, and fullgraph=True hard-fails at the recompile limit)."""
    torch._dynamo.reset()
    model = _net()
    opt = getattr(tvlars_fused, algo)(model.parameters(), lr=torch.tensor(LR[algo] / 5), backend=_cpu_backend_names()[0],
                                      **HYPER[algo])
    g = globals()
    g["_README_MODEL"], g["_README_OPT"] = model, opt

    @torch.compile(fullgraph=True, backend="aot_eager")
    def train_step(x):
        loss = _README_MODEL(x).square().mean()   # noqa: F821 (module globals, as in the README)
        loss.backward()
        _README_OPT.step()                        # noqa: F821
        return loss.detach()

    gen = torch.Generator().manual_seed(2)
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for step in range(10):
                opt.zero_grad()
                with torch._dynamo.config.patch(error_on_recompile=step >= 3):
                    train_step(torch.randn(16, 6, generator=gen))
    finally:
        del g["_README_MODEL"], g["_README_OPT"]
    assert float(opt.step_count) == 10


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason=f"torch {torch.__version__}: Dynamo cannot trace backward")
@pytest.mark.parametrize("algo", ALGOS)
def test_float_option_schedule_under_fullgraph(algo):
    """A float option a scheduler moves every step (OneCycleLR's cycle_momentum writes momentum or
    betas; a weight-decay schedule) under fullgraph=True: Dynamo recompiles the step for each new
    value, as for any Python number it guards on (README, "Known interactions"), and the numbers
    are eager's. (The option checks once called math.isfinite, which Dynamo cannot trace: the
    second step failed with `Unsupported`.)"""
    torch._dynamo.reset()
    cls = getattr(tvlars_fused, algo)
    backend = _cpu_backend_names()[0]
    models = _net(), _net()
    opts = [cls(m.parameters(), lr=torch.tensor(LR[algo] / 5), backend=backend, **HYPER[algo]) for m in models]
    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for step in range(3):
            x = torch.randn(16, 6, generator=gen)
            for o in opts:
                o.zero_grad()
                for group in o.param_groups:
                    if algo == "LAMB":
                        group["betas"] = (0.8 + 0.05 * step, 0.95)
                    else:
                        group["momentum"] = 0.9 - 0.05 * step
                    group["weight_decay"] = 1e-3 * (step + 1)
            compiled(models[0], opts[0], x)
            train_step(models[1], opts[1], x)
    err = max_err(models[0].parameters(), models[1].parameters())
    assert err < 1e-6, err
    assert float(opts[0].step_count) == 3


# -- the GPU backends (triton, cuda) inside torch.compile: tvlars_fused::traced_bucket_step --------

# Per class: options written into the group mid-run that change the compiled variant (the kernels
# a bucket's groups need)
SWITCH = {"TVLARS": dict(nesterov=True), "LAMB": dict(weight_decay_mode="l2")}


def _gpu_backend_cases():
    from conftest import HAS_CUDA
    from tvlars_fused.kernels import available_backends
    cases = []
    on_cpu = "triton" in available_backends("cpu", ("triton",))   # the Triton interpreter
    for device, backend, ok in (("cpu", "triton", on_cpu), ("cuda", "triton", HAS_CUDA),
                                ("cuda", "cuda", HAS_CUDA and "cuda" in available_backends("cuda", ("cuda",)))):
        for algo in ALGOS:
            for compiler in ("aot_eager", "inductor"):
                for first in ("compiled", "eager"):
                    marks = [] if ok else [pytest.mark.skip(reason=f"backend={backend!r} cannot run on {device} here")]
                    if (compiler == "inductor" and algo == "LAMB") or (first == "eager" and device == "cpu"):
                        marks.append(pytest.mark.slow)
                    cases.append(pytest.param(device, backend, algo, compiler, first, marks=marks,
                                              id=f"{device}-{backend}-{algo}-{compiler}-{first}-first"))
    return cases


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason=f"torch {torch.__version__}: Dynamo cannot trace backward")
@pytest.mark.parametrize("device,backend,algo,compiler,first", _gpu_backend_cases())
def test_gpu_backends_compiled_step_fullgraph_matches_eager(device, backend, algo, compiler, first):
    """A compiled training step (fullgraph) on backend triton or cuda gives the eager numbers: the
    step traces to one op per bucket, which the graph hands its own copies of the tensors it
    mutated before (the uploaded tables, the gradients, the parameters), copied into the bucket's
    memory for the kernels and the results back. From the first step on (the kernels' variant is
    the one traced: Dynamo writes the bucket's new variant back only after the graph), or after an
    eager first step (on a GPU it binds the Triton launches, which a compiled step must not
    reach); at step 3 an option changes the variant."""
    torch._dynamo.reset()
    cls = getattr(tvlars_fused, algo)
    models = _net().to(device), _net().to(device)
    o_c, o_e = (cls(m.parameters(), backend=backend, lr=torch.tensor(LR[algo], device=device), **HYPER[algo])
                for m in models)
    compiled = torch.compile(train_step, fullgraph=True, backend=compiler)
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for step in range(5):
            x = torch.randn(16, 6, generator=g).to(device)
            for o in (o_c, o_e):
                o.zero_grad()
                o.param_groups[0]["lr"].fill_(LR[algo] / (step + 1))
                if step == 3:
                    o.param_groups[0].update(SWITCH[algo])
            (train_step if step == 0 and first == "eager" else compiled)(models[0], o_c, x)
            train_step(models[1], o_e, x)
            err = max_err(models[0].parameters(), models[1].parameters())
            # (aot_eager runs the forward and backward ops as eager does; Inductor fuses them)
            assert err == 0 if compiler == "aot_eager" else err < 1e-6, (step, err)
    assert float(o_c.step_count) == 5
    for k, v in o_c.state_dict()["state"].items():
        for key, t in v.items():
            err = max_err([t], [o_e.state_dict()["state"][k][key]])
            assert err == 0 if compiler == "aot_eager" else err < 1e-5, (k, key, err)
    assert not torch.equal(models[0][0].weight, _net()[0].weight.to(device)), "the steps must update the weights"


def test_traced_step_refuses_sharded_buckets():
    """Sharded (FSDP2) buckets all-reduce between the two passes, which the traced op cannot do:
    a clear error at trace time, never a step without the all-reduce."""
    from tvlars_fused.kernels.traced import traced_step

    class Named:
        NAME = "triton"
    with pytest.raises(RuntimeError, match="sharded.*inside torch.compile"):
        traced_step(Named(), None, None, None, between=lambda view: None)
