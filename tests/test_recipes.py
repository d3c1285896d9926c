"""The README's "Coming from" recipes, each checked against an independent implementation of that
LARS, written here from its published formulas (not from anyone's code): float64, 50 steps on a
model with biases, a BatchNorm layer and a parameter whose gradient is always zero, an LR that
changes every step. Each recipe must match to 1e-12 (relative to the parameters' size), on the
reference and every fused backend here (the Triton interpreter's runs are marked slow).

  timm Lars             q = c*||w|| / (||g|| + wd*||w|| + eps) (1 if a norm is 0), optional clip
                        min(q/lr, 1), adapted only with weight decay unless always_adapt; then d =
                        q*(g + wd*w) and torch's SGD momentum (first buffer = d, dampening, Nesterov)
  apex LARC             as timm when both norms are > 0 (c = 0.02, eps 1e-8, clip or scale mode),
                        else the plain gradient (no weight decay); SGD momentum of the wrapped SGD
  Lightning Bolts LARS  as LARC (no clip) but only when weight_decay != 0; SGD momentum
  SGD-Nesterov LARS     Barlow Twins' trust ratio with torch's Nesterov momentum
  You et al. 2017       q = eta*||w|| / (||g|| + wd*||w||) for every layer, d = q*(g + wd*w),
                        TensorFlow momentum v = m*v + lr*d, w -= v
  MLPerf ResNet-50      q as timm with eps 1e-7 (the TF2 reference takes `epsilon or Keras'
                        epsilon()`, and its lars_epsilon flag defaults to 0), biases and BatchNorm
                        excluded from weight decay and adaptation by name; TensorFlow momentum
                        v = m*v + lr*q*d, w -= v
  Barlow Twins          q = eta*||w||/||g + wd*w|| with the ndim == 1 filters; mu = m*mu + q*d,
                        w -= lr*mu
  TVLARS (authors)      Barlow Twins' LARS times phi(t) = 1/(0.1 + exp(lmbda*(t + 1))), norms
                        clamped at 10, both filters; the earlier release (10bcfd2) holds phi = 1
                        for the first epochs

pytorch-optimizer's LARS is run itself (installed): equal everywhere but on the parameter whose
gradient is zero, the difference the README names.

and the README's "Coming from another LAMB" lines that have no installable implementation here
(pytorch-optimizer's Lamb and torch's AdamW/Adam are checked against the packages themselves in
tests/test_lamb.py):

  apex FusedLAMB        Adam moments (grad averaging), bias-corrected m/bc1, v/bc2, update
                        m_hat/(sqrt(v_hat) + eps) + wd*w (adam_w_mode) or wd*w added to the
                        gradient first; w -= lr*(||w||/||u||)*u where both norms are > 0, the ratio
                        only where wd != 0 unless use_nvlamb (per group, step counted per group)
  torch-optimizer Lamb  moments without bias correction (debias: the step times sqrt(bc2)/bc1),
                        u = m/(sqrt(v) + eps) + wd*w, q = min(||w||, 10)/||u|| (1 for a zero norm),
                        adam=True: q = 1
  timm Lamb             bias-corrected m/bc1 / (sqrt(v)/sqrt(bc2) + eps) + wd*w; q = ||w||/||u|| (1
                        for a zero norm) only with weight decay (always_adapt=False); lambc caps
                        q at 1
  BERT's TF LAMB        as apex's adam_w_mode with the ratio everywhere, biases and LayerNorm (here
                        BatchNorm) excluded from weight decay and adaptation by name
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import pytest
import torch
from torch import nn

import tvlars_fused
from tvlars_fused import lars_param_groups, reference
from tvlars_fused.param_groups import BIAS, NORM, ONE_DIM
from tvlars_fused.kernels import available_backends
from parity import rel_err

F64 = torch.float64
STEPS = 50
BACKENDS = ["reference"] + [b if b != "triton" else pytest.param(b, marks=pytest.mark.slow)
                            for b in available_backends("cpu", ("cpu", "torch", "triton"))]


class Net(nn.Module):
    """Conv with bias, BatchNorm, Linear with bias, and `dead`: a parameter whose gradient is
    always exactly zero (it enters the loss multiplied by 0)."""

    def __init__(self, conv_bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=conv_bias)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.dead = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1)) + 0.0 * self.dead.sum()


def make_net(conv_bias: bool = True) -> Net:
    torch.manual_seed(11)
    return Net(conv_bias).to(F64)


def batches():
    g = torch.Generator().manual_seed(12)
    return [(torch.randn(6, 3, 6, 6, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64))
            for _ in range(STEPS)]


def lr_at(step: int, base: float) -> float:
    """A schedule that changes every step (warm-up then polynomial decay, as MLPerf's)."""
    warm = 5
    return base * (step + 1) / warm if step < warm else base * (1 - (step - warm) / STEPS) ** 2


def run_ours(make_opt: Callable, base_lr: float, net: Callable = make_net,
             schedule: Callable = lr_at) -> List[torch.Tensor]:
    model = net()
    opt = make_opt(model)
    for step, (x, y) in enumerate(batches()):
        for g in opt.param_groups:
            g["lr"] = schedule(step, base_lr)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def run_independent(update: Callable, base_lr: float, net: Callable = make_net,
                    schedule: Callable = lr_at) -> List[torch.Tensor]:
    """Train the same model with `update(named_params, state, lr, t)`, a plain loop over params."""
    model = net()
    named = list(model.named_parameters())
    state: Dict[str, dict] = {n: {} for n, _ in named}
    for step, (x, y) in enumerate(batches()):
        for _, p in named:
            p.grad = None
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            update(named, state, schedule(step, base_lr), step)
    return [p.detach().clone() for p in model.parameters()]


WD, LR = 5e-3, 0.8


def check_recipe(backend: str, independent: Callable, ours: Callable, what: str, cls: str = "LARS") -> None:
    """Train with the independent implementation and with ours(optimizer_class, model): equal."""
    theirs = run_independent(independent, LR)
    assert_match(run_ours(lambda model: ours(make(backend, cls), model), LR), theirs, what)


def assert_match(ours, theirs, what, net: Callable = make_net):
    for a, b in zip(ours, theirs):
        err = rel_err(a, b)
        assert err <= 1e-12, f"{what}: {err:.3e}"
    moved = max(float((a - b).abs().max()) for a, b in zip(theirs, [p.detach() for p in net().parameters()]))
    assert moved > 1e-3, f"{what}: the run must move the parameters"


def torch_sgd_momentum(buf_state: dict, d: torch.Tensor, momentum: float, dampening: float,
                       nesterov: bool) -> torch.Tensor:
    """torch.optim.SGD's momentum on the (already adapted) gradient d: the direction to step along."""
    if "buf" not in buf_state:
        buf_state["buf"] = d.clone()
    else:
        buf_state["buf"] = momentum * buf_state["buf"] + (1 - dampening) * d
    return d + momentum * buf_state["buf"] if nesterov else buf_state["buf"]


def make(backend: str, cls: str = "LARS"):
    """The class under test: the eager reference or a fused backend."""
    if backend == "reference":
        return getattr(reference, cls)
    return lambda *a, **k: getattr(tvlars_fused, cls)(*a, backend=backend, **k)


# -- timm ------------------------------------------------------------------------------------------

def timm_update(wd, c=0.001, eps=1e-8, trust_clip=False, always_adapt=False, momentum=0.9, dampening=0.0,
                nesterov=False, no_decay=()):
    def update(named, state, lr, t):
        for name, p in named:
            g = p.grad
            w_decay = 0.0 if name in no_decay else wd
            if w_decay != 0 or always_adapt:
                wn, gn = p.norm(), g.norm()
                ratio = c * wn / (gn + w_decay * wn + eps)
                ratio = torch.where((wn > 0) & (gn > 0), ratio, torch.ones_like(ratio))
                if trust_clip:
                    ratio = torch.clamp(ratio / lr, max=1.0)
                g = (g + w_decay * p) * ratio
            p.sub_(lr * torch_sgd_momentum(state[name], g, momentum, dampening, nesterov))
    return update


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "trust_clip", "nesterov", "dampening", "bias_bn_groups",
                                     "larc_bias_bn_groups"])
def test_timm_lars(backend, variant):
    """larc_bias_bn_groups: timm's create_optimizer_v2(model, "larc", weight_decay=wd), trust_clip
    with the no-decay group, which neither adapts nor clips (always_adapt=False)."""
    kw = dict(trust_clip=variant in ("trust_clip", "larc_bias_bn_groups"), nesterov=variant == "nesterov",
              dampening=0.3 if variant == "dampening" else 0.0)
    # timm's optimizer factory (filter_bias_and_bn): 1-D parameters in a group without weight decay
    no_decay = ("conv.bias", "bn.weight", "bn.bias", "fc.bias") if variant.endswith("bias_bn_groups") else ()

    def ours(LARS, model):
        params = (lars_param_groups(model, exclude_from_weight_decay=[ONE_DIM], exclude_from_adaptation=[])
                  if no_decay else model.parameters())
        return LARS(params, lr=LR, momentum=0.9, weight_decay=WD, eta=0.001, denominator="grad", eps=1e-8,
                    always_adapt=False, **kw)
    check_recipe(backend, timm_update(WD, no_decay=no_decay, **kw), ours, f"timm {variant}")


def lr_through_zero(step: int, base: float) -> float:
    """A linear warm-up from lr = 0 (transformers' get_linear_schedule_with_warmup), then a linear
    decay that reaches 0 at the last step (PolynomialLR, CosineAnnealingLR with eta_min=0)."""
    warm = 5
    return base * step / warm if step < warm else base * (STEPS - 1 - step) / (STEPS - 1 - warm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_lars_trust_clip_through_lr_zero(backend):
    """trust_clip at lr = 0 (docs/SPEC.md: min(q/lr, 1) is 1 there, as timm's q/0 = inf clamped):
    a schedule that starts and ends at 0 trains as timm's Lars does, with no error."""
    assert lr_through_zero(0, LR) == 0.0 and lr_through_zero(STEPS - 1, LR) == 0.0
    kw = dict(trust_clip=True, nesterov=False, dampening=0.0)
    theirs = run_independent(timm_update(WD, **kw), LR, schedule=lr_through_zero)
    ours = run_ours(lambda model: make(backend)(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD,
                                                eta=0.001, denominator="grad", eps=1e-8, always_adapt=False, **kw),
                    LR, schedule=lr_through_zero)
    assert_match(ours, theirs, "timm trust_clip through lr = 0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum, dampening, nesterov, wd", [(0.0, 0.3, False, 0.0), (0.0, 1.0, False, WD),
                                                               (0.9, 0.3, False, WD), (0.9, 0.0, True, WD)])
def test_without_adaptation_is_torch_sgd(backend, momentum, dampening, nesterov, wd):
    """adapt=False is torch.optim.SGD itself (run here as the independent implementation), with its
    weight decay, momentum, dampening (none at momentum 0: SGD keeps no buffer) and Nesterov, under
    an lr that changes every step."""
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, dampening=dampening,
                               nesterov=nesterov, weight_decay=wd)
    theirs = run_ours(sgd, LR)
    ours = run_ours(lambda model: make(backend)(model.parameters(), lr=LR, momentum=momentum, weight_decay=wd,
                                                dampening=dampening, nesterov=nesterov, adapt=False), LR)
    assert_match(ours, theirs, f"SGD momentum={momentum} dampening={dampening} nesterov={nesterov}")



def momentum_through_zero(step: int) -> float:
    """0.9, then 0 for a while (SGD keeps its buffer untouched), 0.9 again, 0 again at the end."""
    return 0.0 if 10 <= step < 20 or step >= 40 else 0.9


def momentum_from_zero(step: int) -> float:
    """0 at first (SGD creates no buffer: its first buffer is the update of step 15), then 0.9."""
    return 0.0 if step < 15 else 0.9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule,rebuild", [(momentum_through_zero, False), (momentum_from_zero, False),
                                              (momentum_from_zero, True)])
@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_momentum_schedule_through_zero_is_torch_sgd(backend, schedule, rebuild, dampening):
    """A momentum edited between steps (a momentum schedule) that passes through 0: as torch's SGD,
    a step at momentum 0 is lr*u and leaves the buffer as it was; the first step with momentum
    after steps without starts the buffer at u (torch creates it then), also when the buckets were
    rebuilt in between (rebuild: add_param_group during the momentum-0 steps)."""
    def run(make_opt):
        model = make_net()
        opt = make_opt(model)
        for step, (x, y) in enumerate(batches()):
            if rebuild and step == 5:
                opt.add_param_group({"params": [nn.Parameter(torch.ones(2, dtype=F64))]})
            for g in opt.param_groups:
                g["lr"], g["momentum"] = lr_at(step, LR), schedule(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]
    kw = {"lr": LR, "momentum": schedule(0), "dampening": dampening, "weight_decay": WD}
    theirs = run(lambda model: torch.optim.SGD(model.parameters(), **kw))
    ours = run(lambda model: make(backend)(model.parameters(), adapt=False, **kw))
    assert_match(ours, theirs, f"momentum {schedule.__name__} dampening={dampening}")

# -- apex LARC -------------------------------------------------------------------------------------

def larc_update(wd, clip, c=0.02, eps=1e-8, momentum=0.9):
    def update(named, state, lr, t):
        for name, p in named:
            g = p.grad
            pn, gn = float(p.norm()), float(g.norm())
            if pn != 0 and gn != 0:
                adaptive = c * pn / (gn + pn * wd + eps)
                if clip:
                    adaptive = min(adaptive / lr, 1.0)
                g = (g + wd * p) * adaptive
            p.sub_(lr * torch_sgd_momentum(state[name], g, momentum, 0.0, False))   # the wrapped SGD, wd 0
    return update


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["scale", "clip"])
def test_apex_larc(backend, mode):
    check_recipe(backend, larc_update(WD, clip=mode == "clip"),
                 lambda LARS, m: LARS(m.parameters(), lr=LR, momentum=0.9, weight_decay=WD, eta=0.02,
                                      denominator="grad", eps=1e-8, plain_step_on_zero_norm=True,
                                      trust_clip=mode == "clip"), f"LARC {mode}")


# -- Lightning Bolts / Flash LARS -------------------------------------------------------------------

def lightning_update(wd, c=0.001, eps=1e-8, momentum=0.9, nesterov=False, dampening=0.0, no_decay=()):
    def update(named, state, lr, t):
        for name, p in named:
            g = p.grad
            w_decay = 0.0 if name in no_decay else wd
            pn, gn = float(p.norm()), float(g.norm())
            if w_decay != 0 and pn != 0 and gn != 0:
                g = (g + w_decay * p) * (c * pn / (gn + pn * w_decay + eps))
            p.sub_(lr * torch_sgd_momentum(state[name], g, momentum, dampening, nesterov))
    return update


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "nesterov", "no_decay_group"])
def test_lightning_lars(backend, variant):
    no_decay = ("conv.bias", "fc.bias", "bn.weight", "bn.bias") if variant == "no_decay_group" else ()

    def ours(LARS, model):
        params = (lars_param_groups(model, exclude_from_weight_decay=[BIAS, NORM], exclude_from_adaptation=[])
                  if no_decay else model.parameters())
        return LARS(params, lr=LR, momentum=0.9, weight_decay=WD, eta=0.001, denominator="grad", eps=1e-8,
                    always_adapt=False, plain_step_on_zero_norm=True, nesterov=variant == "nesterov")
    check_recipe(backend, lightning_update(WD, nesterov=variant == "nesterov", no_decay=no_decay), ours,
                 f"Lightning {variant}")


# -- LARS with torch's Nesterov momentum ------------------------------------------------------------

def sgd_nesterov_lars_update(wd, eta=1e-3, momentum=0.9):
    def update(named, state, lr, t):
        for name, p in named:
            d = p.grad + wd * p
            wn, dn = p.norm(), d.norm()
            q = torch.where((wn > 0) & (dn > 0), eta * wn / dn, torch.ones_like(wn))
            p.sub_(lr * torch_sgd_momentum(state[name], q * d, momentum, 0.0, True))
    return update


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_nesterov_style_lars(backend):
    check_recipe(backend, sgd_nesterov_lars_update(WD),
                 lambda LARS, m: LARS(m.parameters(), lr=LR, momentum=0.9, weight_decay=WD, nesterov=True),
                 "SGD-Nesterov LARS")



# -- pytorch-optimizer's LARS (the package itself) --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_pytorch_optimizer_lars(backend, nesterov):
    """pytorch_optimizer.LARS (4.1) run itself, against the README's recipe: equal on every
    parameter but `dead`, the 2-D parameter whose gradient is zero, which the README names as the
    one difference (there q = c*||w|| / (0 + wd*||w||) = c/wd; here 1, as timm, MLPerf, LARC)."""
    po = pytest.importorskip("pytorch_optimizer")
    # (at LR 0.4 and above this recipe's unadapted BatchNorm steps kill every ReLU of the small net
    # for a while: every 2-D gradient is then exactly zero, the difference above on every layer)
    base_lr = 0.2
    kw = dict(lr=base_lr, momentum=0.9, weight_decay=WD, nesterov=nesterov)
    theirs = run_ours(lambda model: po.LARS(model.parameters(), trust_coefficient=0.001, **kw), base_lr)
    ours = run_ours(lambda model: make(backend)(
        lars_param_groups(model, exclude_from_weight_decay=[ONE_DIM], exclude_from_adaptation=[ONE_DIM]),
        eta=0.001, denominator="grad", **kw), base_lr)
    names = [n for n, _ in make_net().named_parameters()]
    dead = names.index("dead")
    assert rel_err(ours[dead], theirs[dead]) > 1e-3   # the documented difference is real
    ours[dead] = theirs[dead]
    assert_match(ours, theirs, f"pytorch-optimizer LARS nesterov={nesterov}")

# -- MLPerf ResNet-50 (TensorFlow LARS) ----------------------------------------------------------------

def mlperf_update(wd, eta=1e-3, momentum=0.9, skip=("bias", "bn"), lars_epsilon=0.0):
    eps = lars_epsilon or 1e-7   # (an eps of 0 selects Keras' default epsilon)
    def update(named, state, lr, t):
        for name, p in named:
            g = p.grad
            scaled_lr = lr
            if not any(s in name for s in skip):
                wn, gn = p.norm(), g.norm()
                ratio = torch.where((wn > 0) & (gn > 0), eta * wn / (gn + wd * wn + eps), torch.ones_like(wn))
                scaled_lr = lr * ratio
                g = g + wd * p
            v = state[name].get("v", torch.zeros_like(p))
            state[name]["v"] = momentum * v + scaled_lr * g
            p.sub_(state[name]["v"])
    return update


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlperf_resnet50_lars(backend):
    check_recipe(backend, mlperf_update(WD),
                 lambda LARS, m: LARS(lars_param_groups(m, exclude_from_weight_decay=[BIAS, NORM],
                                                        exclude_from_adaptation=[BIAS, NORM]),
                                      lr=LR, momentum=0.9, weight_decay=WD, eta=0.001, eps=1e-7,
                                      denominator="grad", momentum_form="lr_scaled"), "MLPerf")


# -- You, Gitman, Ginsburg 2017, Algorithm 1 --------------------------------------------------------------

def you2017_update(wd, eta=1e-3, momentum=0.9):
    """The original LARS: local lr = eta*||w|| / (||g|| + wd*||w||), v = m*v + lr*local_lr*(g + wd*w),
    w -= v, every layer adapted. Where a norm is 0 the paper's formula degenerates (||w|| = 0 gives
    0 forever: a zero-initialized layer such as BatchNorm's bias would never move; ||g|| = 0 gives
    eta/wd); there the recipe takes 1, as timm and the MLPerf LARS do (README)."""
    def update(named, state, lr, t):
        for name, p in named:
            g = p.grad
            wn, gn = p.norm(), g.norm()
            local_lr = eta * wn / (gn + wd * wn) if wn > 0 and gn > 0 else 1.0
            v = state[name].get("v", torch.zeros_like(p))
            state[name]["v"] = momentum * v + lr * local_lr * (g + wd * p)
            p.sub_(state[name]["v"])
    return update


@pytest.mark.parametrize("backend", BACKENDS)
def test_you_2017_lars(backend):
    check_recipe(backend, you2017_update(WD),
                 lambda LARS, m: LARS(m.parameters(), lr=LR, momentum=0.9, weight_decay=WD, eta=0.001,
                                      denominator="grad", momentum_form="lr_scaled"), "You et al. 2017")


# -- Barlow Twins ------------------------------------------------------------------------------------

def barlow_twins_update(wd, eta=1e-3, momentum=0.9, phi=lambda t: 1.0, clamp=None):
    def update(named, state, lr, t):
        for name, p in named:
            d = p.grad
            if p.ndim != 1:                       # weight_decay_filter / lars_adaptation_filter: ndim == 1
                d = d + wd * p
                wn, dn = p.norm(), d.norm()
                if clamp is not None:
                    wn, dn = wn.clamp(0, clamp), dn.clamp(0, clamp)
                q = torch.where((wn > 0) & (dn > 0), eta * phi(t) * wn / dn, torch.ones_like(wn))
                d = q * d
            mu = state[name].get("mu", torch.zeros_like(p))
            state[name]["mu"] = momentum * mu + d
            p.sub_(lr * state[name]["mu"])
    return update


@pytest.mark.parametrize("backend", BACKENDS)
def test_barlow_twins_lars(backend):
    check_recipe(backend, barlow_twins_update(WD),
                 lambda LARS, m: LARS(m.parameters(), lr=LR, momentum=0.9, weight_decay=WD, eta=0.001,
                                      weight_decay_filter=True, lars_adaptation_filter=True), "Barlow Twins")


# -- the authors' TVLARS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("release", ["current", "10bcfd2"])
def test_authors_tvlars(backend, release):
    lmbda = 0.02
    hold = 10 * 2 if release == "10bcfd2" else 0     # epoch_delay_cnt=10 epochs of 2 steps

    def phi(t):
        return 1.0 if t < hold else 1.0 / (0.1 + math.exp(lmbda * (t + 1)))
    check_recipe(backend, barlow_twins_update(WD, phi=phi, clamp=10.0),
                 lambda TVLARS, m: TVLARS(m.parameters(), lr=LR, momentum=0.9, weight_decay=WD, eta=0.001,
                                          lmbda=lmbda, alpha=0.1, delay_steps=-1, gamma_min=0.0, norm_clip=10.0,
                                          hold_steps=hold, weight_decay_filter=True, lars_adaptation_filter=True),
                 f"authors' TVLARS {release}", cls="TVLARS")


# -- the group helper -------------------------------------------------------------------------------------

def test_lars_param_groups_rules():
    model = make_net()
    emb = nn.Embedding(4, 3)
    model.add_module("emb", emb)
    groups = lars_param_groups(model, exclude_from_weight_decay=[BIAS, NORM, nn.Embedding],
                               exclude_from_adaptation=[r"^bn\.", lambda n, p, m: p.ndim == 0], lr=0.5)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names == [["dead", "conv.weight", "fc.weight"], ["conv.bias", "fc.bias", "emb.weight"],
                     ["bn.weight", "bn.bias"]]
    assert [(g.get("weight_decay"), g.get("adapt"), g["lr"]) for g in groups] == \
        [(None, None, 0.5), (0.0, None, 0.5), (0.0, False, 0.5)]
    opt = tvlars_fused.LARS(groups, lr=0.1, weight_decay=1e-3)
    assert opt.state_dict()["param_groups"][2]["param_names"] == ["bn.weight", "bn.bias"]
    with pytest.raises(TypeError, match="exclude_from_adaptation must be a list of rules"):
        lars_param_groups(model, exclude_from_adaptation="bias")
    # BIAS: every name ending in "bias", nn.MultiheadAttention's in_proj_bias included (the BERT rule)
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    plain, excluded = lars_param_groups(layer, exclude_from_weight_decay=[BIAS, NORM],
                                        exclude_from_adaptation=[BIAS, NORM])
    assert sorted(n for n, _ in excluded["params"]) == sorted(n for n, p in layer.named_parameters()
                                                              if "bias" in n or "norm" in n)
    assert all(p.ndim == 2 for _, p in plain["params"])
    with pytest.raises(TypeError, match="a parameter-group rule must be"):
        lars_param_groups(model, exclude_from_adaptation=[3])


# -- LAMB --------------------------------------------------------------------------------------------
LAMB_LR, LAMB_WD, LAMB_EPS = 0.01, 0.05, 1e-6


def lamb_net() -> Net:
    """The recipes' model without the conv bias: in front of BatchNorm its gradient is rounding
    noise (exactly 0 in exact arithmetic), which Adam's m/(sqrt(v) + eps) amplifies by 1/eps, so
    two correct implementations would differ there by their rounding, not their math."""
    return make_net(conv_bias=False)


def check_lamb_recipe(backend: str, independent: Callable, ours: Callable, what: str) -> None:
    theirs = run_independent(independent, LAMB_LR, lamb_net)
    assert_match(run_ours(lambda model: ours(make(backend, "LAMB"), model), LAMB_LR, lamb_net), theirs, what,
                 lamb_net)


def adam_moments(st: dict, g: torch.Tensor, beta1: float, beta2: float, beta3: float):
    m = st["m"] = beta1 * st.get("m", torch.zeros_like(g)) + beta3 * g
    v = st["v"] = beta2 * st.get("v", torch.zeros_like(g)) + (1 - beta2) * g * g
    return m, v


def apex_fused_lamb_update(wd, adam_w_mode=True, use_nvlamb=False, betas=(0.9, 0.999), eps=LAMB_EPS,
                           grad_averaging=True):
    """apex.optimizers.FusedLAMB (multi_tensor_lamb: stage 1 per element, stage 2 per tensor), no
    global clip (max_grad_norm above the gradients' norm)."""
    beta1, beta2 = betas

    def update(named, state, lr, t):
        step = t + 1
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        beta3 = 1 - beta1 if grad_averaging else 1.0
        for name, p in named:
            g = p.grad if adam_w_mode else p.grad + wd * p
            m, v = adam_moments(state[name], g, beta1, beta2, beta3)
            u = (m / bc1) / ((v / bc2).sqrt() + eps)
            if adam_w_mode:
                u = u + wd * p
            ratio = lr
            if use_nvlamb or wd != 0:
                pn, un = p.norm(), u.norm()
                ratio = torch.where((pn != 0) & (un != 0), lr * (pn / un), torch.full_like(pn, lr))
            p.sub_(ratio * u)
    return update


@pytest.mark.parametrize("variant", ["default", "l2", "nvlamb"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_apex_fused_lamb(backend, variant):
    kw = dict(default=dict(), l2=dict(adam_w_mode=False), nvlamb=dict(use_nvlamb=True))[variant]
    ours_kw = dict(default=dict(always_adapt=False), l2=dict(always_adapt=False, weight_decay_mode="l2"),
                   nvlamb=dict())[variant]
    check_lamb_recipe(backend, apex_fused_lamb_update(LAMB_WD, **kw),
                      lambda LAMB, m: LAMB(m.parameters(), lr=LAMB_LR, eps=LAMB_EPS, weight_decay=LAMB_WD, **ours_kw),
                      f"apex FusedLAMB {variant}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_apex_fused_lamb_no_decay_group_takes_no_ratio(backend):
    """use_nvlamb=False with a weight-decay-free group (BERT's biases and norms): that group steps
    as plain Adam, the other takes the trust ratio (always_adapt=False decides per group)."""
    def update(named, state, lr, t):
        decayed = [(n, p) for n, p in named if not n.endswith("bias") and not n.startswith("bn")]
        plain = [(n, p) for n, p in named if (n, p) not in decayed]
        apex_fused_lamb_update(LAMB_WD)(decayed, state, lr, t)
        apex_fused_lamb_update(0.0)(plain, state, lr, t)
    check_lamb_recipe(backend, update,
                      lambda LAMB, m: LAMB(lars_param_groups(m, exclude_from_weight_decay=[BIAS, NORM],
                                                             exclude_from_adaptation=[]),
                                           lr=LAMB_LR, eps=LAMB_EPS, weight_decay=LAMB_WD, always_adapt=False),
                      "apex FusedLAMB, no-decay group")


def torch_optimizer_lamb_update(wd, debias=False, adam=False, clamp=10.0, betas=(0.9, 0.999), eps=LAMB_EPS):
    """torch_optimizer.Lamb (jettify/pytorch-optimizer)."""
    beta1, beta2 = betas

    def update(named, state, lr, t):
        step = t + 1
        corr = math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step) if debias else 1.0
        for name, p in named:
            m, v = adam_moments(state[name], p.grad, beta1, beta2, 1 - beta1)
            wn = p.norm().clamp(0, clamp)
            u = m / (v.sqrt() + eps)
            if wd != 0:
                u = u + wd * p
            un = u.norm()
            q = torch.where((wn == 0) | (un == 0), torch.ones_like(wn), wn / un)
            if adam:
                q = torch.ones_like(q)
            p.sub_((lr * corr) * q * u)
    return update


@pytest.mark.parametrize("variant", ["default", "debias", "adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_optimizer_lamb(backend, variant):
    kw = dict(default=dict(), debias=dict(debias=True), adam=dict(adam=True))[variant]
    ours_kw = dict(default=dict(bias_correction="none"), debias=dict(bias_correction="step_size"),
                   adam=dict(bias_correction="none", adapt=False))[variant]
    check_lamb_recipe(backend, torch_optimizer_lamb_update(LAMB_WD, **kw),
                      lambda LAMB, m: LAMB(m.parameters(), lr=LAMB_LR, eps=LAMB_EPS, weight_decay=LAMB_WD,
                                           weight_norm_clip=10.0, **ours_kw),
                      f"torch-optimizer Lamb {variant}")


def timm_lamb_update(wd, trust_clip=False, always_adapt=False, betas=(0.9, 0.999), eps=LAMB_EPS):
    """timm.optim.Lamb (bias correction, grad averaging, no global clip: max_grad_norm=None): the
    bias-corrected Adam direction plus wd*w; the ratio ||w||/||u|| (1 for a zero norm) only with
    weight decay unless always_adapt; lambc: the ratio capped at 1."""
    beta1, beta2 = betas

    def update(named, state, lr, t):
        step = t + 1
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        for name, p in named:
            m, v = adam_moments(state[name], p.grad, beta1, beta2, 1 - beta1)
            u = (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)
            if wd != 0:
                u = u + wd * p
            if wd != 0 or always_adapt:
                wn, un = p.norm(), u.norm()
                one = torch.ones_like(wn)
                q = torch.where(wn > 0, torch.where(un > 0, wn / un, one), one)
                if trust_clip:
                    q = torch.minimum(q, one)
                u = u * q
            p.sub_(lr * u)
    return update


def large_weights_lamb_net() -> Net:
    """lamb_net with every weight 30x: ||w|| above ||u|| in every layer, so lambc's cap binds."""
    net = lamb_net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(30.0)
    return net


@pytest.mark.parametrize("variant", ["lamb", "lambc"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_lamb(backend, variant):
    clip = variant == "lambc"
    net = large_weights_lamb_net if clip else lamb_net
    theirs = run_independent(timm_lamb_update(LAMB_WD, trust_clip=clip), LAMB_LR, net)
    ours = run_ours(lambda model: make(backend, "LAMB")(model.parameters(), lr=LAMB_LR, eps=LAMB_EPS,
                                                         weight_decay=LAMB_WD, always_adapt=False, trust_clip=clip),
                    LAMB_LR, net)
    assert_match(ours, theirs, f"timm {variant}", net)
    if clip:   # the cap binds in this run: without it the parameters end elsewhere
        uncapped = run_independent(timm_lamb_update(LAMB_WD), LAMB_LR, net)
        assert max(rel_err(a, b) for a, b in zip(uncapped, theirs)) > 1e-3


def bert_lamb_update(wd, skip=("bias", "bn"), betas=(0.9, 0.999), eps=LAMB_EPS):
    """BERT's LAMB (TensorFlow): exclude_from_weight_decay = exclude_from_layer_adaptation = skip."""
    beta1, beta2 = betas

    def update(named, state, lr, t):
        step = t + 1
        for name, p in named:
            m, v = adam_moments(state[name], p.grad, beta1, beta2, 1 - beta1)
            u = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
            ratio = torch.ones((), dtype=p.dtype)
            if not any(s in name for s in skip):
                u = u + wd * p
                wn, gn = p.norm(), u.norm()
                ratio = torch.where(wn > 0, torch.where(gn > 0, wn / gn, ratio), ratio)
            p.sub_(ratio * lr * u)
    return update


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rules", ["names", "types"])
def test_bert_lamb(backend, rules):
    """The README's row: TF's rule as name patterns (here "bn" stands for BERT's "LayerNorm"), or
    [BIAS, NORM], the same on models without nn.MultiheadAttention(add_bias_kv=True)."""
    skip = ["bias", "bn"] if rules == "names" else [BIAS, NORM]
    check_lamb_recipe(backend, bert_lamb_update(LAMB_WD),
                      lambda LAMB, m: LAMB(lars_param_groups(m, exclude_from_weight_decay=skip,
                                                             exclude_from_adaptation=skip),
                                           lr=LAMB_LR, eps=LAMB_EPS, weight_decay=LAMB_WD), "BERT LAMB")
