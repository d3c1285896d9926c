"""torch.compile: a compiled training step (forward, backward, optimizer.step) with
fullgraph=True — no graph break — gives the eager result; a tensor lr changed in place needs no
recompile. Dynamo traces backward only with torch._dynamo.config.trace_autograd_ops = True."""
import copy

import pytest
import torch

import tvlars_fused
from tvlars_fused.kernels import resolve

from parity import max_err


def _cpu_backends():
    """The extension backend (or torch when it is not built) in the default run; the other slow,
    since each compile takes tens of seconds on a small CPU machine."""
    out = []
    for name in ("cpu", "torch"):
        try:
            resolve(name, torch.device("cpu"))
            out.append(pytest.param(name, marks=pytest.mark.slow) if out else name)
        except RuntimeError:
            pass
    return out


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
@pytest.mark.parametrize("backend", _cpu_backends())
def test_compiled_training_step_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    m_c, m_e = _net(), _net()
    lr = torch.tensor(0.5)
    kw = dict(lr=lr, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05)
    o_c = tvlars_fused.TVLARS(m_c.parameters(), backend=backend, **kw)
    o_e = tvlars_fused.TVLARS(m_e.parameters(), backend=backend, **dict(kw, lr=lr.clone()))
    compiled = torch.compile(train_step, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for step in range(4):
            x = torch.randn(16, 6, generator=g)
            for o in (o_c, o_e):
                o.zero_grad()
                o.param_groups[0]["lr"].fill_(0.5 / (step + 1))
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
def test_readme_recipe_with_globals_does_not_recompile():
    """The README's compiled training step, written as it is there (model and optimizer as
    globals, a backward whose gradients take the copy path): after the first steps no recompile
    (grad_copies is not counted while tracing: a counter changing every step would fail a guard
    every step, and fullgraph=True hard-fails at the recompile limit)."""
    torch._dynamo.reset()
    model = _net()
    opt = tvlars_fused.TVLARS(model.parameters(), lr=torch.tensor(0.1), backend=_cpu_backends()[0])
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
