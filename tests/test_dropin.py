"""Drop-in behaviour: GradScaler, LR schedulers (incl. a tensor lr), diagnostics, the schedule CLI.

Every test that runs a fused optimizer runs on each (device, backend, class) case of
tests/backend_cases.py: the CPU backends (ids [torch], [cpu], [triton]) and, on a CUDA machine,
the CUDA ones ([cuda-triton], [cuda-cuda], [cuda-torch]), for TVLARS, and the same for LAMB
([torch-LAMB], ..., [cuda-torch-LAMB]; [triton-LAMB], under the Triton interpreter, is marked
slow); the eager reference runs on the case's device. Each class's hyperparameters are in HYPER.
Not parametrized over the cases:
- test_schedule_cli_plots_png: runs no optimizer (it plots phi(t) in a subprocess).
"""
import copy
import math
import subprocess
import sys

import pytest
import torch

import tvlars_fused
from tvlars_fused.diagnostics import layer_stats_dict

from backend_cases import CASES, extra_interpreted, params
from parity import max_err

BACKENDS = params(CASES, slow=extra_interpreted)
HYPER = {"TVLARS": dict(lr=0.5, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=2),
         # torch-optimizer's debias=True: a step scale s != 1 (layer_stats' fourth column)
         "LAMB": dict(lr=0.05, betas=(0.9, 0.999), weight_decay=1e-2, bias_correction="step_size")}
# layer_stats()'s fourth column on the first step with HYPER: phi(0) for TVLARS, LAMB's step scale
# sqrt(1 - beta2) / (1 - beta1) (docs/SPEC.md)
FIRST_STEP_SCALE = {"TVLARS": tvlars_fused.phi(0, 0.05, 2, 1.0, 0.0), "LAMB": math.sqrt(1 - 0.999) / (1 - 0.9)}
# the LR-scheduler test: the class run (TVLARS's cases run its sibling LARS) and its options
SCHEDULED = {"TVLARS": ("LARS", dict(lr=0.5)), "LAMB": ("LAMB", dict(lr=0.05, weight_decay=1e-2))}


def _net(seed=0, dtype=torch.float64, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(device, dtype)


@pytest.mark.parametrize("case", BACKENDS)
def test_grad_scaler_forced_overflow(case):
    """The fused protocol: GradScaler hands grad_scale/found_inf to step(); a forced overflow skips
    the step on the device (t included) and lowers the scale; later steps match the reference run
    (which GradScaler unscales and skips the classic way)."""
    dev = case.device
    m_ref = _net(device=dev)
    m = copy.deepcopy(m_ref)
    opt = case.optimizer(**HYPER[case.algo])(m.parameters())
    o_ref = case.reference.optimizer(**HYPER[case.algo])(m_ref.parameters())
    assert opt._step_supports_amp_scaling and not getattr(o_ref, "_step_supports_amp_scaling", False)
    amp_device = torch.device(dev).type
    s_f = torch.amp.GradScaler(amp_device, init_scale=1024.0, growth_interval=2)
    s_r = torch.amp.GradScaler(amp_device, init_scale=1024.0, growth_interval=2)
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(7):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64).to(dev)
        for model, o, s in ((m, opt, s_f), (m_ref, o_ref, s_r)):
            o.zero_grad()
            s.scale(model(x).square().mean()).backward()
            if step == 3:
                model[0].weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            s.step(o)
            s.update()
            if step == 3:
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "skipped step changed w"
        seen.append((s_f.get_scale(), s_r.get_scale()))
        assert max_err(m.parameters(), m_ref.parameters()) < 1e-12, step
    assert seen[3][0] == seen[3][1] < seen[2][0], "the overflow must lower the scale"
    assert float(opt.step_count) == float(o_ref.step_count) == 6
    assert not hasattr(opt, "grad_scale") or opt.grad_scale is None  # GradScaler cleans up


@pytest.mark.parametrize("case", BACKENDS)
@pytest.mark.parametrize("sched", ["step", "cosine", "onecycle", "lambda", "warmup_cosine"])
def test_lr_schedulers_drive_fused_like_reference(case, sched):
    def make(o):
        if sched == "step":
            return torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.3)
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6)
        if sched == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=8)
        if sched == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e))
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)
        return torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[3])

    m_ref = _net(1, device=case.device)
    m = copy.deepcopy(m_ref)
    cls, hyper = SCHEDULED[case.algo]
    opt = case.optimizer(cls, **hyper)(m.parameters())
    o_ref = case.reference.optimizer(cls, **hyper)(m_ref.parameters())
    s, s_ref = make(opt), make(o_ref)
    g = torch.Generator().manual_seed(1)
    lrs = []
    for _ in range(8):
        x = torch.randn(16, 6, generator=g, dtype=torch.float64).to(case.device)
        for model, o, sc in ((m, opt, s), (m_ref, o_ref, s_ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
            sc.step()
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["lr"] == o_ref.param_groups[0]["lr"]
    assert len(set(lrs)) > 2, "the schedule must actually change lr"
    assert max_err(m.parameters(), m_ref.parameters()) < 1e-12


@pytest.mark.parametrize("case", BACKENDS)
def test_tensor_lr_changes_without_sync(case, monkeypatch):
    m_ref = _net(2, torch.float32, device=case.device)
    m = copy.deepcopy(m_ref)
    lr0 = HYPER[case.algo]["lr"]
    lr = torch.tensor(lr0, device=case.device)   # a device lr, as a scheduler on the GPU keeps it
    opt = case.optimizer(**dict(HYPER[case.algo], lr=lr))(m.parameters())
    o_ref = case.reference.optimizer(**HYPER[case.algo])(m_ref.parameters())
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2)).to(case.device)

    def boom(*a, **k):
        raise AssertionError("host sync")
    for step in range(4):
        lr.fill_(lr0 / (step + 1))              # changed in place: no recompiles, no syncs
        o_ref.param_groups[0]["lr"] = lr0 / (step + 1)
        for model, o in ((m, opt), (m_ref, o_ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            if o is opt:
                with monkeypatch.context() as mp:
                    for name in ("item", "__bool__", "tolist", "cpu", "__float__"):
                        mp.setattr(torch.Tensor, name, boom)
                    o.step()
            else:
                o.step()
    assert max_err(m.parameters(), m_ref.parameters()) < 1e-5


@pytest.mark.parametrize("case", BACKENDS)
def test_layer_stats_dict_for_loggers(case):
    m = _net(3, device=case.device)
    opt = case.optimizer(**HYPER[case.algo])(m.parameters())
    opt.zero_grad()
    m(torch.randn(4, 6, dtype=torch.float64).to(case.device)).sum().backward()
    w0 = m[0].weight.detach().clone()
    opt.step()
    d = layer_stats_dict(opt, m.named_parameters(), prefix="opt/")
    names = case.spec.stat_names   # TVLARS: ..., "phi", ...; LAMB: ..., "step_scale", ...
    assert set(d) == {f"opt/{n}/{s}" for n, _ in m.named_parameters() for s in names}
    assert all(isinstance(v, float) for v in d.values())
    assert d["opt/0.weight/weight_norm"] == pytest.approx(float(w0.norm()), rel=1e-12)
    assert d[f"opt/0.weight/{names[3]}"] == pytest.approx(FIRST_STEP_SCALE[case.algo], rel=1e-6)
    assert d["opt/0.weight/weight_decay"] == HYPER[case.algo]["weight_decay"]


def test_schedule_cli_plots_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "phi.png"
    r = subprocess.run([sys.executable, "-m", "tvlars_fused.schedule", "--lmbda", "1e-3", "1e-2",
                        "--delay-steps", "100", "--steps", "300", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
