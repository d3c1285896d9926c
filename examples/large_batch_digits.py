"""Large-batch training on the scikit-learn digits: WA-LARS vs TVLARS vs LAMB over seeds, no download.

A small CNN on the 8x8 digits of sklearn.datasets.load_digits (1797 images, 10 classes; a fixed
stratified 80/20 split chosen by --split-seed, independent of the training seeds: 1437 train / 360
test), trained with batches of 512 (3 steps per epoch, 60 epochs = 180 steps by default) by

  (a) WA-LARS: fused tvlars_fused.LARS with linear warm-up + cosine decay
      (SequentialLR of LinearLR + CosineAnnealingLR), the paper's baseline;
  (b) TVLARS: fused tvlars_fused.TVLARS, no warm-up: phi(t) starts near 1 and decays (a sigmoid
      centred at delay_steps = 1/3 of the run);
  (c) LAMB: the project's fused tvlars_fused.LAMB with the LAMB paper's defaults (Algorithm 2:
      bias-corrected moments, weight decay in the update; examples/lamb_choice.py), with the same
      warm-up + cosine schedule as (a); --lamb pytorch-optimizer runs pytorch-optimizer's Lamb
      (other math, tuned on its own) instead, for comparison;

each from the same initial weights and batch order for a given training seed, over 10 training
seeds (--seeds). Each optimizer runs at its own base learning rate (5 for the LARS pair, 0.02 for
LAMB) times a scale, by default the scale --grid chose (below): lr 30 for WA-LARS, 40 for TVLARS,
0.02 for LAMB (x1; also x1, lr 0.02, for --lamb pytorch-optimizer: each LAMB tuned on its own).
It prints, and writes as Markdown + CSV next to the figure: final test accuracy mean +- std over
the seeds, the accuracy at an early epoch (--early-epoch), the total learning rate of each run
(sum over steps of lr(t) * phi(t), in units of the base lr), and the per-seed paired differences
TVLARS - WA-LARS, TVLARS - LAMB and WA-LARS - LAMB (mean +- std, 95% t interval, how many seeds
higher / tied / lower). The figure: mean +- std curves of test accuracy and train loss, phi(t)
next to WA-LARS's LR multiplier, and per layer the weight norm, gradient norm ||g + wd*w|| and
trust ratio of TVLARS at every step of the first seed (from layer_stats(): the view of the paper's
Figure 3).

--grid tunes every optimizer over the same grid of lr scales (--grid-scales, default 0.25 0.5 1
1.5 2 3 4 6 8 12 times its base lr: steps of x1.33 to x2, with pairs of TVLARS and WA-LARS runs
of the same total learning rate, e.g. TVLARS x1.5 and WA-LARS x1). Each (optimizer, scale, seed)
is trained once on the training set minus a stratified 20% validation split and evaluated on that
split (selection), and once on the whole training set and evaluated on the test set (reported
for every grid point). Each optimizer's scale is the one with the best mean validation accuracy;
the final table is then rerun at those scales (and checked to be identical to the grid's test
runs). DEFAULT_SCALES are what that selection gave in the runs recorded in examples/README.md,
so the default command reproduces its final table without the grid (DEFAULT_LAMB_SCALES: LAMB's,
for each --lamb). --grid-optimizers limits the grid to some optimizers (the others run at their
default or --scales scale): each optimizer's scale is chosen from its own validation runs only, so
that changes nothing in the selection, but the grid's tables then hold only those optimizers. The
grid's tables go to <figure stem>_grid.md / _grid.csv.

It also checks the fused TVLARS against the eager reference (tvlars_fused.reference.TVLARS) on
the first seed:
  - at every float32 step of the TVLARS run, a reference step from the same state and gradients
    (its state_dict loaded into the reference) gives the same parameters within 1e-5 relative
    (they agree to ~1e-7, about one float32 ulp);
  - the whole run, repeated in float64 with the fused and with the reference optimizer (same seed
    and data order), gives the same test-accuracy curve and final parameters within 1e-5 relative
    (~1e-15 at lr 5; ~1e-7 at the tuned lr 40, where the run amplifies rounding more).
The whole float32 run is also repeated with the reference and compared, for information only: the
per-step differences (~1 ulp) flip an occasional ReLU / max-pool decision in float32, after which
the two runs are different, equally valid trajectories (at lr 40: parameters far apart, accuracy
curves differing by up to a few percent at some epochs), so that comparison cannot be a check.

    pip install -r examples/requirements.txt      # torch installed first, separately
    PYTHONPATH=. python examples/large_batch_digits.py            # 10 seeds, ~1.5 min on 1 core
    PYTHONPATH=. python examples/large_batch_digits.py --grid     # the lr grid too, ~25 min
    PYTHONPATH=. python examples/large_batch_digits.py --grid --grid-optimizers LAMB   # LAMB's only
    PYTHONPATH=. python examples/large_batch_digits.py --lamb pytorch-optimizer   # the other LAMB
    PYTHONPATH=. python examples/large_batch_digits.py --quick    # 2 seeds x 4 epochs (tests)

Exit status 1 when the fused-vs-reference check fails.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # run from anywhere in the checkout without installing the package
    import tvlars_fused
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(HERE, ".."))
    import tvlars_fused
from tvlars_fused import reference

sys.path.insert(0, HERE)
import lamb_choice  # noqa: E402
from lamb_choice import lamb_missing, lamb_source, make_lamb  # noqa: E402
from pins import version_report  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # optional
    tqdm = None

CHECK_RTOL = 1e-5   # final parameters of fused vs reference TVLARS: max |diff| / max |p| per tensor
OPTIMIZERS = ("WA-LARS", "TVLARS", "LAMB")
DEFAULT_SEEDS = tuple(range(10))
GRID_SCALES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
# The scales --grid selected (best mean validation accuracy over seeds 0-9, split seed 0, 60
# epochs, batch 512) in the runs recorded in examples/README.md (large_batch_digits_grid.md).
# LAMB's depends on which LAMB (--lamb), each tuned on the same grid: tvlars_fused.LAMB (the
# paper's defaults) by --grid --grid-optimizers LAMB, pytorch-optimizer's Lamb 4.1.0 (and WA-LARS,
# TVLARS) by the earlier --grid over all three, from before tvlars_fused had a LAMB.
DEFAULT_SCALES = {"WA-LARS": 6.0, "TVLARS": 8.0, "LAMB": 1.0}
DEFAULT_LAMB_SCALES = {"tvlars_fused": DEFAULT_SCALES["LAMB"], "pytorch-optimizer": 1.0}
# two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond 30)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
       18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
       26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


# -- data and model ------------------------------------------------------------------------------
def split_indices(split_seed: int, val_fraction: float = 0.0):
    """(train indices, evaluation indices) into load_digits()'s 1797 images.

    The stratified 80/20 train/test split is drawn with split_seed only (the training seeds never
    change it). With val_fraction > 0, the *training* part is split again (stratified, same seed)
    and (train minus validation, validation) is returned instead: the test set is not touched."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit(f"this example needs scikit-learn (pip install scikit-learn): {exc}")
    target = load_digits().target
    idx = list(range(len(target)))
    tr, ev = train_test_split(idx, test_size=0.2, random_state=split_seed, stratify=target)
    if val_fraction > 0:
        tr, ev = train_test_split(tr, test_size=val_fraction, random_state=split_seed,
                                  stratify=target[tr])
    return tr, ev


def load_data(split_seed: int, val_fraction: float = 0.0):
    """The digits of split_indices() as float32 tensors (N, 1, 8, 8), standardised with the
    training part's mean/std: (x_train, y_train, x_eval, y_eval)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    tr, ev = split_indices(split_seed, val_fraction)
    x_tr = torch.tensor(digits.images[tr], dtype=torch.float32).unsqueeze(1)
    x_ev = torch.tensor(digits.images[ev], dtype=torch.float32).unsqueeze(1)
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std, torch.tensor(digits.target[tr], dtype=torch.long),
            (x_ev - mean) / std, torch.tensor(digits.target[ev], dtype=torch.long))


class SmallCNN(nn.Module):
    """conv 3x3 (16) -> maxpool -> conv 3x3 (32) -> maxpool -> fc 128->64 -> fc 64->10 (13.7k
    parameters; small enough that the float64 check runs are cheap on a CPU)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)    # 16 x 4 x 4
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)    # 32 x 2 x 2
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def warmup_cosine(opt, warmup_steps: int, total_steps: int):
    """The WA-LARS schedule: linear warm-up from lr/10 over warmup_steps, then cosine to 0."""
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, end_factor=1.0,
                                             total_iters=warmup_steps)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[warmup_steps])


# -- training ------------------------------------------------------------------------------------
def train(name: str, make_opt: Callable, data, args, steps_per_epoch: int, seed: int,
          record_stats: bool = False, shadow: Optional[Callable] = None,
          dtype: torch.dtype = torch.float32, quiet: bool = False, log=print,
          bar: bool = True) -> Dict:
    """Train a fresh SmallCNN from the training seed `seed` (initial weights: torch.manual_seed(seed);
    batch order: a generator seeded with seed + 1; the same for every optimizer). Returns the
    per-epoch curves (accuracy on data's evaluation set), the per-step lr, the final parameters
    and, with record_stats, the per-step layer_stats() of the optimizer.

    shadow(params) -> optimizer: before every step, load this optimizer's state_dict into the
    shadow optimizer over copies of the parameters (same values, same gradients), step both and
    record the largest relative difference of the results: a one-step parity check at every point
    of the real training trajectory."""
    x_tr, y_tr, x_te, y_te = (t.to(dtype) if t.is_floating_point() else t for t in data)
    torch.manual_seed(seed)
    model = SmallCNN().to(dtype)
    names = [n for n, _ in model.named_parameters()]
    opt, sched = make_opt(model)
    params = list(model.parameters())
    if shadow is not None:
        shadow_params = [nn.Parameter(p.detach().clone()) for p in params]
        shadow_opt = shadow(shadow_params)
    order = torch.Generator().manual_seed(seed + 1)
    hist = {"name": name, "seed": seed, "loss": [], "acc": [], "correct": [], "lr": [], "stats": [],
            "shadow_rel": 0.0}
    n = len(x_tr)
    pbar = None
    if tqdm is not None and bar:
        pbar = tqdm(total=args.epochs, desc=f"{name:>14} s{seed}", unit="ep", leave=False,
                    file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            hist["lr"].append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            if shadow is not None:
                with torch.no_grad():
                    for sp, p in zip(shadow_params, params):
                        sp.copy_(p)
                        sp.grad = p.grad.detach().clone()
                shadow_opt.load_state_dict(opt.state_dict())
                shadow_opt.step()
            opt.step()
            if shadow is not None:
                hist["shadow_rel"] = max(hist["shadow_rel"], max_rel_diff(params, shadow_params))
            if sched is not None:
                sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            if record_stats:
                st = opt.layer_stats()
                hist["stats"].append(torch.stack([st[p].detach().clone().float()
                                                  for p in model.parameters()]))
        model.eval()
        with torch.no_grad():
            correct = int((model(x_te).argmax(1) == y_te).sum())
        hist["loss"].append(loss_sum / n)
        hist["correct"].append(correct)
        hist["acc"].append(correct / len(y_te))
        line = (f"{name:>14} seed {seed} epoch {epoch:3d}/{args.epochs}  train loss "
                f"{hist['loss'][-1]:.4g}  acc {hist['acc'][-1]:.4f}")
        if pbar is not None:
            pbar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", acc=f"{hist['acc'][-1]:.3f}")
            pbar.update(1)
        if not quiet and (epoch % args.log_every == 0 or epoch == args.epochs):
            log(line)
    if pbar is not None:
        pbar.close()
    hist["seconds"] = time.perf_counter() - t0
    hist["n_test"], hist["steps"] = len(y_te), args.epochs * steps_per_epoch
    hist["params"] = [p.detach().clone() for p in params]
    hist["param_names"] = names
    if record_stats:
        hist["stats"] = torch.stack(hist["stats"])   # [steps, params, 4]
    backend = getattr(opt, "backends", None)   # the fused classes: which kernel ran the step
    if not quiet:
        log(f"{name:>14} seed {seed} done in {hist['seconds']:.1f} s: final acc {hist['acc'][-1]:.4f}, "
            f"best {max(hist['acc']):.4f}, final train loss {hist['loss'][-1]:.4g}"
            + (f" (fused backend: {', '.join(sorted(set(backend)))})" if backend else ""))
    return hist


def max_rel_diff(a, b) -> float:
    """max over tensors of max|a - b| / max|b|."""
    return max(float((x.detach().double() - y.detach().double()).abs().max()
                     / y.detach().double().abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def report_float32(fused: Dict, ref: Dict) -> None:
    """Fused vs reference full float32 runs: printed, not asserted. Each step agrees to ~1 ulp
    (checked in compare()), but in float32 such differences flip an occasional ReLU / max-pool
    decision, after which the two runs are different (equally valid) trajectories; in float64
    the same runs agree to ~1e-15."""
    diff = [e for e, (a, b) in enumerate(zip(fused["correct"], ref["correct"]), 1) if a != b]
    worst = max([abs(a - b) for a, b in zip(fused["correct"], ref["correct"])] + [0])
    print("fused vs reference TVLARS, full runs (float32, informational): test-accuracy curves "
          + ("identical" if not diff else f"differ at {len(diff)} of {len(ref['acc'])} epochs "
             f"(by at most {worst} of {ref['n_test']} test images)")
          + f", final test acc {100 * fused['acc'][-1]:.2f}% / {100 * ref['acc'][-1]:.2f}%, final "
          f"params max rel diff {max_rel_diff(fused['params'], ref['params']):.2e} (rounding-order "
          f"differences that float32 training amplifies; not a check)")


def compare(fused: Dict, ref: Dict, shadow_rel: float) -> bool:
    """The check: fused vs reference TVLARS from the same seed and data order give identical
    test-accuracy curves and final parameters within CHECK_RTOL when run in float64, and every
    float32 step of the plotted run is within CHECK_RTOL of a reference step from the same
    state."""
    same_curve = fused["correct"] == ref["correct"]
    rel = max_rel_diff(fused["params"], ref["params"])
    loss_rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fused["loss"], ref["loss"]))
    ok = same_curve and rel <= CHECK_RTOL and shadow_rel <= CHECK_RTOL
    print(f"fused vs reference TVLARS, full runs (float64): test-accuracy curves "
          f"{'identical' if same_curve else 'DIFFER'} over {len(ref['acc'])} epochs "
          f"(final {100 * fused['acc'][-1]:.2f}% / {100 * ref['acc'][-1]:.2f}%), final params max "
          f"rel diff {rel:.2e}, train loss max rel diff {loss_rel:.2e}")
    if not same_curve:
        print(f"  fused     correct: {fused['correct']}\n  reference correct: {ref['correct']}")
    print(f"fused vs reference TVLARS, each of the {fused['steps']} float32 steps of "
          f"the plotted run, from the same state and gradients: max rel diff {shadow_rel:.2e}")
    print(f"fused-vs-reference check: {'PASS' if ok else 'FAIL'} (tolerance {CHECK_RTOL:g}; "
          f"float64 runs {rel:.3e}, float32 steps {shadow_rel:.3e})")
    return ok


# -- the optimizers ------------------------------------------------------------------------------
class Setup:
    """Everything the runs share: the schedule lengths and each optimizer's base lr."""

    def __init__(self, args, steps_per_epoch: int):
        self.args = args
        self.steps_per_epoch = steps_per_epoch
        self.total = steps_per_epoch * args.epochs
        self.warmup = max(1, round((args.warmup_epochs if args.warmup_epochs is not None
                                    else args.epochs / 6) * steps_per_epoch))
        self.lmbda = args.tv_lmbda if args.tv_lmbda is not None else 9.0 / self.total
        self.delay = args.tv_delay if args.tv_delay is not None else self.total / 3.0
        self.common = dict(momentum=0.9, weight_decay=args.weight_decay, eta=args.eta)
        self.phi = [float(tvlars_fused.phi(s, self.lmbda, self.delay, 1.0, 0.0))
                    for s in range(self.total)]

    def base_lr(self, opt_name: str) -> float:
        return self.args.lamb_lr if opt_name == "LAMB" else self.args.lr

    def lr(self, opt_name: str, scale: float) -> float:
        return self.base_lr(opt_name) * scale

    def factory(self, opt_name: str, scale: float, tv_cls=None) -> Callable:
        """make_opt(model) -> (optimizer, scheduler or None) for train()."""
        lr = self.lr(opt_name, scale)
        if opt_name == "WA-LARS":
            def make(model):
                opt = tvlars_fused.LARS(model.parameters(), lr=lr, **self.common)
                return opt, warmup_cosine(opt, self.warmup, self.total)
        elif opt_name == "TVLARS":
            cls = tv_cls or tvlars_fused.TVLARS

            def make(model):
                return cls(model.parameters(), lr=lr, lmbda=self.lmbda, delay_steps=self.delay,
                           **self.common), None
        elif opt_name == "LAMB":
            def make(model):
                opt = make_lamb(model.parameters(), lr=lr, weight_decay=self.args.weight_decay)
                return opt, warmup_cosine(opt, self.warmup, self.total)
        else:  # pragma: no cover
            raise ValueError(opt_name)
        return make

    def reference_tvlars(self, scale: float) -> Callable:
        lr = self.lr("TVLARS", scale)
        return lambda params: reference.TVLARS(params, lr=lr, lmbda=self.lmbda,
                                               delay_steps=self.delay, **self.common)

    def total_lr(self, hist: Dict) -> float:
        """sum over steps of lr(t) * phi(t) (phi = 1 but for TVLARS), in units of the
        optimizer's base lr: how much learning rate the run had in all."""
        phi = self.phi if hist["name"].startswith("TVLARS") else [1.0] * len(hist["lr"])
        return sum(lr * p for lr, p in zip(hist["lr"], phi)) / self.base_lr(hist["name"].split()[0])


# -- statistics and tables -----------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired(a: Sequence[float], b: Sequence[float]) -> Dict:
    """Per-seed differences a - b (points): mean, sd, 95% t interval, higher / tied / lower."""
    d = [x - y for x, y in zip(a, b)]
    m, s = mean_std(d)
    half = T95.get(len(d) - 1, 1.96) * s / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"diffs": d, "mean": m, "sd": s, "lo": m - half, "hi": m + half,
            "higher": sum(x > 1e-9 for x in d), "tied": sum(abs(x) <= 1e-9 for x in d),
            "lower": sum(x < -1e-9 for x in d)}


def final_pct(h: Dict) -> float:
    return 100.0 * h["acc"][-1]


def early_pct(h: Dict, epoch: int) -> float:
    return 100.0 * h["acc"][min(epoch, len(h["acc"])) - 1]


def summary_tables(runs: Dict[str, List[Dict]], scales: Dict[str, float], setup: Setup,
                   early_epoch: int) -> List[str]:
    """The final table (Markdown lines): per optimizer, and the paired differences."""
    args = setup.args
    seeds = [h["seed"] for h in next(iter(runs.values()))]
    n_test = next(iter(runs.values()))[0]["n_test"]
    e = min(early_epoch, args.epochs)
    out = [f"Test accuracy (%) over {len(seeds)} training seeds ({', '.join(map(str, seeds))}; "
           f"the seed sets the initial weights and the batch order), split seed {args.split_seed} "
           f"({n_test} test images: one image = {100 / n_test:.2f} points), batch "
           f"{args.batch_size}, {args.epochs} epochs = {setup.total} steps; mean ± sample std:", "",
           f"| optimizer | lr (scale × base) | final | min – max | epoch {e} | best epoch "
           f"| total lr Σ lr(t)·φ(t) / base lr |",
           "|---|---|---|---|---|---|---|"]
    for name, hs in runs.items():
        fin = [final_pct(h) for h in hs]
        out.append(f"| {name} | {setup.lr(name, scales[name]):g} ({scales[name]:g} × "
                   f"{setup.base_lr(name):g}) | {pm(fin)} | {min(fin):.2f} – {max(fin):.2f} | "
                   f"{pm([early_pct(h, e) for h in hs], 1)} | "
                   f"{pm([100 * max(h['acc']) for h in hs])} | {setup.total_lr(hs[0]):.1f} |")
    pairs = [(a, b) for a, b in (("TVLARS", "WA-LARS"), ("TVLARS", "LAMB"), ("WA-LARS", "LAMB"))
             if a in runs and b in runs]
    if pairs:
        out += ["", "Paired differences per training seed (points; same initial weights and batch "
                "order for both):", "",
                "| difference | " + " | ".join(f"s{s}" for s in seeds)
                + " | mean ± std | 95% t interval | higher / tied / lower |",
                "|---|" + "---|" * len(seeds) + "---|---|---|"]
        picks = [("final", final_pct)]
        if e < args.epochs:
            picks.append((f"epoch {e}", lambda h: early_pct(h, e)))
        for label, pick in picks:
            for a, b in pairs:
                p = paired([pick(h) for h in runs[a]], [pick(h) for h in runs[b]])
                out.append(f"| {a} − {b}, {label} | " + " | ".join(f"{x:+.2f}" for x in p["diffs"])
                           + f" | {p['mean']:+.2f} ± {p['sd']:.2f} | [{p['lo']:+.2f}, {p['hi']:+.2f}]"
                           f" | {p['higher']} / {p['tied']} / {p['lower']} |")
    return out


def grid_table(val: Dict, test: Dict, chosen: Dict[str, float], setup: Setup,
               early_epoch: int) -> List[str]:
    """val/test: {(opt, scale): [hist per seed]} -> Markdown lines, one row per grid point."""
    e = min(early_epoch, setup.args.epochs)
    out = ["| optimizer | scale | lr | total lr / base | validation, final | test, final "
           f"| test, epoch {e} |", "|---|---|---|---|---|---|---|"]
    for (name, scale), hs in test.items():
        mark = " **(chosen)**" if chosen.get(name) == scale else ""
        out.append(f"| {name} | {scale:g}{mark} | {setup.lr(name, scale):g} | "
                   f"{setup.total_lr(hs[0]):.1f} | {pm([final_pct(h) for h in val[(name, scale)]])} | "
                   f"{pm([final_pct(h) for h in hs])} | {pm([early_pct(h, e) for h in hs], 1)} |")
    return out


def equal_total_lr_lines(test: Dict, setup: Setup) -> List[str]:
    """TVLARS vs WA-LARS at (about) the same total learning rate, where the grid has such pairs
    (TVLARS's phi(t) integrates to ~2/3 of WA-LARS's warm-up + cosine: scale 1.5 vs 1, 3 vs 2)."""
    out = []
    wa = {s: hs for (n, s), hs in test.items() if n == "WA-LARS"}
    tv = {s: hs for (n, s), hs in test.items() if n == "TVLARS"}
    for s_wa, h_wa in wa.items():
        tot_wa = setup.total_lr(h_wa[0])
        best = min(tv, key=lambda s: abs(setup.total_lr(tv[s][0]) - tot_wa), default=None)
        if best is None or abs(setup.total_lr(tv[best][0]) - tot_wa) > 0.05 * tot_wa:
            continue
        p = paired([final_pct(h) for h in tv[best]], [final_pct(h) for h in h_wa])
        out.append(f"| TVLARS ×{best:g} ({setup.total_lr(tv[best][0]):.1f}) − WA-LARS ×{s_wa:g} "
                   f"({tot_wa:.1f}) | {pm([final_pct(h) for h in tv[best]])} | "
                   f"{pm([final_pct(h) for h in h_wa])} | {p['mean']:+.2f} ± {p['sd']:.2f} "
                   f"[{p['lo']:+.2f}, {p['hi']:+.2f}] | {p['higher']} / {p['tied']} / {p['lower']} |")
    if out:
        out = ["| at equal total lr (total lr / base) | TVLARS test | WA-LARS test | paired "
               "difference, mean ± std [95% t] | higher / tied / lower |",
               "|---|---|---|---|---|"] + out
    return out


def write_csv(path: str, rows: List[Dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def csv_rows(phase: str, runs: Dict[Tuple[str, float], List[Dict]], setup: Setup,
             eval_set: str, early_epoch: int) -> List[Dict]:
    rows = []
    for (name, scale), hs in runs.items():
        for h in hs:
            rows.append({"phase": phase, "optimizer": name, "scale": scale,
                         "lr": setup.lr(name, scale), "seed": h["seed"],
                         "split_seed": setup.args.split_seed, "eval_set": eval_set,
                         "n_eval": h["n_test"], "epochs": setup.args.epochs,
                         "batch_size": setup.args.batch_size,
                         "final_acc": round(final_pct(h), 4),
                         f"acc_epoch{min(early_epoch, setup.args.epochs)}":
                             round(early_pct(h, early_epoch), 4),
                         "best_acc": round(100 * max(h["acc"]), 4),
                         "final_train_loss": h["loss"][-1],
                         "total_lr_over_base": round(setup.total_lr(h), 3)})
    return rows


# -- figure --------------------------------------------------------------------------------------
def plot(runs: Dict[str, List[Dict]], tv: Dict, tv_phi: List[float], lars_lr_mult: List[float],
         setup: Setup, out: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure written")
        return None
    args = setup.args
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    colors = {"WA-LARS": "tab:blue", "TVLARS": "tab:red", "LAMB": "tab:green"}
    epochs = list(range(1, args.epochs + 1))
    n_seeds = len(next(iter(runs.values())))

    def band(ax, name, key, scale=1.0, label=None, log=False):
        """mean +- std over the seeds (log: geometric mean x/÷ geometric std)"""
        ys = torch.tensor([h[key] for h in runs[name]], dtype=torch.float64) * scale
        if log:
            ys = ys.clamp_min(1e-30).log()
        m = ys.mean(0)
        s = ys.std(0) if len(ys) > 1 else torch.zeros_like(m)
        lo, mid, hi = m - s, m, m + s
        if log:
            lo, mid, hi = lo.exp(), mid.exp(), hi.exp()
        ax.plot(epochs, mid.numpy(), color=colors.get(name), label=label or name)
        ax.fill_between(epochs, lo.numpy(), hi.numpy(), color=colors.get(name), alpha=0.2, lw=0)

    ax = axes[0, 0]
    for name, hs in runs.items():
        band(ax, name, "acc", 100.0,
             f"{name} ({pm([final_pct(h) for h in hs], 1)}%)")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"Test accuracy, mean ± std over {n_seeds} seeds")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[0, 1]
    for name in runs:
        band(ax, name, "loss", log=True)
    ax.set(xlabel="epoch", ylabel="train loss", title="Train loss (geometric mean x/÷ std)",
           yscale="log")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    steps = range(len(tv_phi))
    ax.plot(steps, tv_phi, color="tab:red", label="TVLARS phi(t)")
    ax.plot(steps, lars_lr_mult, color="tab:blue", ls="--", label="WA-LARS lr(t) / lr")
    ax.set(xlabel="step t", ylabel="scale", title="phi(t) (TVLARS) vs warm-up + cosine (WA-LARS)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)

    # Figure-3 view: per layer (weight tensors; biases left out for readability), from TVLARS's
    # layer_stats() after every step of the first seed.
    stats = tv["stats"]                       # [steps, params, 4]
    t = range(stats.shape[0])
    layer_idx = [i for i, k in enumerate(tv["param_names"]) if k.endswith("weight")]
    panels = [(0, "weight norm ||w||", "TVLARS per layer: weight norm", "linear"),
              (1, "gradient norm ||d|| = ||g + wd*w||", "TVLARS per layer: gradient norm", "log"),
              (2, "trust ratio q = eta*phi(t)*||w||/||d||", "TVLARS per layer: trust ratio", "log")]
    for (col, ylabel, title, yscale), ax in zip(panels, axes[1]):
        for i in layer_idx:
            ax.plot(t, stats[:, i, col].numpy(), label=tv["param_names"][i].replace(".weight", ""),
                    lw=1.2)
        ax.set(xlabel="step t", ylabel=ylabel, title=title + f" (weights, seed {tv['seed']})",
               yscale=yscale)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        ax.title.set_fontsize(10)
    fig.suptitle(f"SmallCNN on sklearn digits, batch {args.batch_size} ({setup.steps_per_epoch} "
                 f"steps/epoch), {args.epochs} epochs, {n_seeds} training seeds, split seed "
                 f"{args.split_seed}", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:   # a palette PNG: about 3x smaller than matplotlib's RGBA one, same look
        import io

        from PIL import Image
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=128).save(out, optimize=True)
    except ImportError:
        fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -- main ----------------------------------------------------------------------------------------
def run_grid(setup: Setup, names: List[str], data_val, data_test, log) -> Tuple[Dict, Dict, Dict]:
    """Every (optimizer, scale, seed): a validation run and a test run. Returns (val, test, chosen
    scale per optimizer: best mean validation accuracy; ties go to the smaller scale)."""
    args = setup.args
    steps_val = math.ceil(len(data_val[0]) / args.batch_size)
    setup_val = Setup(args, steps_val)
    if setup_val.total != setup.total:
        raise SystemExit(f"the validation split changes the steps per epoch ({steps_val} vs "
                         f"{setup.steps_per_epoch}): pick another --val-fraction")
    val: Dict = {}
    test: Dict = {}
    n_runs = 2 * len(names) * len(args.grid_scales) * len(args.seeds)
    t0 = time.perf_counter()
    done = 0
    for name in names:
        for scale in args.grid_scales:
            for phase, store, data in (("val", val, data_val), ("test", test, data_test)):
                store[(name, scale)] = [
                    train(name, setup.factory(name, scale), data, args, setup.steps_per_epoch,
                          seed, quiet=True, bar=False, log=log) for seed in args.seeds]
                done += len(args.seeds)
            log(f"grid: {name} x{scale:g} (lr {setup.lr(name, scale):g}): validation "
                f"{pm([final_pct(h) for h in val[(name, scale)]])}%, test "
                f"{pm([final_pct(h) for h in test[(name, scale)]])}% over {len(args.seeds)} seeds "
                f"[{done}/{n_runs} runs, {time.perf_counter() - t0:.0f} s]")
    chosen = {}
    for name in names:
        means = [(statistics.fmean(final_pct(h) for h in val[(name, s)]), -s) for s in args.grid_scales]
        chosen[name] = -max(means)[1]
    return val, test, chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="default 60 (4 with --quick)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", default=os.path.join("examples", "large_batch_digits.png"),
                    help="PNG path; the tables go next to it (.md, .csv; _grid.md, _grid.csv)")
    ap.add_argument("--quick", action="store_true", help="2 seeds x 4 epochs (for tests)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="training seeds (default 0..9; 0 1 with --quick)")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="seed of the train/test (and validation) split, fixed across training seeds")
    ap.add_argument("--lr", type=float, default=5.0, help="LARS/TVLARS base lr (eta=1e-3)")
    ap.add_argument("--lamb-lr", type=float, default=2e-2, help="LAMB base lr")
    ap.add_argument("--scales", type=float, nargs=3, metavar=("WA_LARS", "TVLARS", "LAMB"),
                    default=None, help="lr scale of each optimizer without --grid (default: the "
                    "scales the recorded --grid run chose: "
                    + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_SCALES.items())
                    + "; LAMB " + ", ".join(f"{v:g} for --lamb {k}" for k, v in
                                            DEFAULT_LAMB_SCALES.items()) + ")")
    ap.add_argument("--lamb", choices=lamb_choice.LAMB_CHOICES, default=lamb_choice.DEFAULT_LAMB,
                    help="which LAMB (examples/lamb_choice.py): tvlars_fused.LAMB with the paper's "
                    "defaults (default), or pytorch-optimizer's Lamb for comparison")
    ap.add_argument("--grid", action="store_true",
                    help="tune each optimizer's lr scale over --grid-scales on a validation split")
    ap.add_argument("--grid-optimizers", nargs="+", choices=OPTIMIZERS, default=None,
                    help="--grid: tune only these (default all; the others run at their default "
                    "or --scales scale)")
    ap.add_argument("--grid-scales", type=float, nargs="+", default=list(GRID_SCALES))
    ap.add_argument("--val-fraction", type=float, default=0.2,
                    help="--grid: validation share of the training split")
    ap.add_argument("--early-epoch", type=int, default=10, help="the early accuracy reported")
    ap.add_argument("--eta", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="WA-LARS/LAMB warm-up (default: 1/6 of the run)")
    ap.add_argument("--tv-lmbda", type=float, default=None,
                    help="TVLARS lmbda (default: 9/total_steps, phi at the end ~ 0.0025)")
    ap.add_argument("--tv-delay", type=float, default=None,
                    help="TVLARS delay_steps (default: total_steps/3, where phi = 1/2)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the fused-vs-reference check runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: tiny model, and fastest on a shared machine)")
    ap.add_argument("--log-every", type=int, default=None,
                    help="print a line every N epochs of each run (default: only the last)")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 4 if args.quick else 60
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else list(DEFAULT_SEEDS)
    if args.log_every is None:
        args.log_every = args.epochs
    lamb_choice.use(args.lamb)
    scales = (dict(DEFAULT_SCALES, LAMB=DEFAULT_LAMB_SCALES[args.lamb]) if args.scales is None
              else dict(zip(OPTIMIZERS, args.scales)))

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    data = load_data(args.split_seed)
    n_train = len(data[0])
    setup = Setup(args, math.ceil(n_train / args.batch_size))
    lamb = lamb_source()
    names = [n for n in OPTIMIZERS if n != "LAMB" or lamb is not None]

    def log(msg):
        (tqdm.write if tqdm is not None else print)(msg)

    versions, warnings = version_report(["torch", "scikit-learn", "numpy", "pytorch-optimizer"])
    print(f"digits: {n_train} train / {len(data[2])} test images (split seed {args.split_seed}), "
          f"batch {args.batch_size} -> {setup.steps_per_epoch} steps/epoch, {args.epochs} epochs = "
          f"{setup.total} steps; training seeds {args.seeds}; {torch.get_num_threads()} thread(s)")
    print(f"versions: {versions}, tvlars_fused {getattr(tvlars_fused, '__version__', '?')}; "
          f"LAMB: {lamb or 'skipped: ' + lamb_missing()}")
    for w in warnings:   # (pins.version_report: pytorch-optimizer's pin included)
        if w:
            print(w)
    print(f"WA-LARS: base lr {args.lr:g}, eta {args.eta:g}, wd {args.weight_decay:g}, warm-up "
          f"{setup.warmup} steps + cosine | TVLARS: base lr {args.lr:g}, lmbda {setup.lmbda:.4g}, "
          f"delay_steps {setup.delay:.4g} (phi(0) = {setup.phi[0]:.3f}), no warm-up | LAMB: base lr "
          f"{args.lamb_lr:g}, wd {args.weight_decay:g}, same schedule as WA-LARS")

    grid_md: List[str] = []
    grid_rows: List[Dict] = []
    grid_test = None
    if args.grid:
        data_val = load_data(args.split_seed, args.val_fraction)
        print(f"lr grid: scales {args.grid_scales} of each base lr, {len(args.seeds)} seeds; "
              f"selection on a stratified {100 * args.val_fraction:g}% validation split of the "
              f"training set ({len(data_val[0])} train / {len(data_val[2])} validation), report on "
              f"the test set")
        grid_names = [n for n in names if args.grid_optimizers is None or n in args.grid_optimizers]
        if grid_names != names:
            print("lr grid for " + ", ".join(grid_names) + " only; "
                  + ", ".join(f"{n} at scale {scales[n]:g}" for n in names if n not in grid_names))
        val, grid_test, chosen = run_grid(setup, grid_names, data_val, data, log)
        scales.update(chosen)
        gt = grid_table(val, grid_test, scales, setup, args.early_epoch)
        eq = equal_total_lr_lines(grid_test, setup)
        print("\n" + "\n".join(gt) + ("\n\n" + "\n".join(eq) if eq else "") + "\n")
        print("chosen scales (best mean validation accuracy): "
              + ", ".join(f"{n} {scales[n]:g} (lr {setup.lr(n, scales[n]):g})" for n in grid_names))
        on_test = {n: max(args.grid_scales, key=lambda s: (statistics.fmean(
            final_pct(h) for h in grid_test[(n, s)]), -s)) for n in grid_names}
        best_test = ("had the scales been picked on the test set instead (optimistic): " + ", ".join(
            f"{n} x{on_test[n]:g} {pm([final_pct(h) for h in grid_test[(n, on_test[n])]])}%"
            for n in grid_names))
        print(best_test)
        gt += ["", best_test[0].upper() + best_test[1:] + "."]
        grid_md += [f"## large_batch_digits.py --grid: lr scales {args.grid_scales}, "
                    f"{len(args.seeds)} seeds, {args.epochs} epochs, batch {args.batch_size}"
                    + (f" ({', '.join(grid_names)} only)" if grid_names != names else ""), "",
                    f"versions: {versions}; LAMB: {lamb}", "",
                    f"Selection on a stratified {100 * args.val_fraction:g}% validation split of the "
                    f"training set, report on the test set; mean ± sample std over seeds "
                    f"{', '.join(map(str, args.seeds))}:", "", *gt, ""] + ([*eq, ""] if eq else [])
        grid_rows += csv_rows("grid", val, setup, "validation", args.early_epoch)
        grid_rows += csv_rows("grid", grid_test, setup, "test", args.early_epoch)

    # the final runs: each optimizer at its scale, every seed; the first seed's TVLARS run records
    # layer_stats() for the figure and is checked step by step against the reference
    print("final runs: " + ", ".join(f"{n} lr {setup.lr(n, scales[n]):g} (x{scales[n]:g})"
                                      for n in names) + f", {len(args.seeds)} seeds")
    check = not args.no_check
    runs: Dict[str, List[Dict]] = {n: [] for n in names}
    for i, seed in enumerate(args.seeds):
        for name in names:
            first_tv = i == 0 and name == "TVLARS"
            runs[name].append(train(
                name, setup.factory(name, scales[name]), data, args, setup.steps_per_epoch, seed,
                record_stats=first_tv,
                shadow=setup.reference_tvlars(scales[name]) if first_tv and check else None,
                log=log))
    if grid_test is not None:   # the same runs as the grid's test runs: deterministic, so equal
        for name in grid_names:
            same = ([h["correct"] for h in runs[name]]
                    == [h["correct"] for h in grid_test[(name, scales[name])]])
            print(f"{name}: final runs {'identical to' if same else 'DIFFER from'} the grid's test "
                  f"runs at scale {scales[name]:g}")

    tables = summary_tables(runs, scales, setup, args.early_epoch)
    print("\n" + "\n".join(tables) + "\n")
    print(f"final test accuracy (mean over {len(args.seeds)} seeds): "
          + ", ".join(f"{n} {statistics.fmean(final_pct(h) for h in runs[n]):.2f}%" for n in names)
          + f" | epoch {min(args.early_epoch, args.epochs)}: "
          + ", ".join(f"{n} {statistics.fmean(early_pct(h, args.early_epoch) for h in runs[n]):.2f}%"
                      for n in names))
    md = [f"## large_batch_digits.py: {len(args.seeds)} seeds, {args.epochs} epochs, batch "
          f"{args.batch_size}", "", f"versions: {versions}; LAMB: {lamb}", "", *tables, ""]
    rows = csv_rows("final", {(n, scales[n]): runs[n] for n in names}, setup, "test",
                    args.early_epoch)

    ok = True
    tv0 = runs["TVLARS"][0]
    if check:
        print("fused vs reference TVLARS: the same TVLARS run (first seed) with the eager reference "
              "optimizer (same seed and data order), in float32 and in float64 (fused and reference)")
        seed0 = args.seeds[0]
        ref32 = train("TVLARS ref", setup.factory("TVLARS", scales["TVLARS"], reference.TVLARS),
                      data, args, setup.steps_per_epoch, seed0, quiet=True, log=log)
        f64 = [train(name, setup.factory("TVLARS", scales["TVLARS"], cls), data, args,
                     setup.steps_per_epoch, seed0, dtype=torch.float64, quiet=True, log=log)
               for name, cls in (("TVLARS f64", tvlars_fused.TVLARS),
                                 ("TVLARS ref f64", reference.TVLARS))]
        report_float32(tv0, ref32)
        ok = compare(f64[0], f64[1], tv0["shadow_rel"])
        # the phi the kernels used must be the schedule's
        assert torch.allclose(tv0["stats"][:, 0, 3], torch.tensor(setup.phi), rtol=1e-6), \
            "phi mismatch"

    wa_lr = setup.lr("WA-LARS", scales["WA-LARS"])
    lars_mult = [lr / wa_lr for lr in runs["WA-LARS"][0]["lr"]]
    out = plot(runs, tv0, setup.phi, lars_mult, setup, args.out)
    if out:
        print(f"wrote {out}")
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    write_csv(stem + ".csv", rows)
    print(f"wrote {stem}.md, {stem}.csv")
    if grid_md:
        with open(stem + "_grid.md", "w") as f:
            f.write("\n".join(grid_md) + "\n")
        write_csv(stem + "_grid.csv", grid_rows)
        print(f"wrote {stem}_grid.md, {stem}_grid.csv")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
