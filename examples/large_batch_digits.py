"""Large-batch training on the scikit-learn digits: WA-LARS vs TVLARS vs LAMB, no download needed.

A small CNN on the 8x8 digits of sklearn.datasets.load_digits (1797 images, 10 classes; a fixed
stratified 80/20 split: 1437 train / 360 test), trained with batches of 512 (3 steps per epoch,
60 epochs = 180 steps by default) by

  (a) WA-LARS: fused tvlars_fused.LARS with linear warm-up + cosine decay
      (SequentialLR of LinearLR + CosineAnnealingLR), the paper's baseline;
  (b) TVLARS: fused tvlars_fused.TVLARS, no warm-up: phi(t) starts near 1 and decays (a sigmoid
      centred at delay_steps = 1/3 of the run);
  (c) LAMB from pytorch-optimizer (skipped with a message when it is not installed), with the
      same warm-up + cosine schedule as (a).

It prints train loss / test accuracy per epoch and writes a PNG: test accuracy and train loss per
epoch, phi(t) next to WA-LARS's LR multiplier, and per layer the weight norm, gradient norm
||g + wd*w|| and trust ratio of TVLARS at every step (from layer_stats(): the view of the paper's
Figure 3).

It also checks the fused TVLARS against the eager reference (tvlars_fused.reference.TVLARS):
  - at every float32 step of run (b), a reference step from the same state and gradients (its
    state_dict loaded into the reference) gives the same parameters within 1e-5 relative;
  - the whole run, repeated in float64 with the fused and with the reference optimizer (same seed
    and data order), gives the same test-accuracy curve and final parameters within 1e-5 relative.
The whole float32 run is also repeated with the reference and compared, for information only: the
per-step differences (~1 ulp) flip an occasional ReLU / max-pool decision in float32, after which
the two runs are different, equally valid trajectories (parameters ~1e-2 apart, accuracy curves
differing by a test image here and there), so that comparison cannot be an exact check.

    pip install scikit-learn matplotlib pytorch-optimizer tqdm
    PYTHONPATH=. python examples/large_batch_digits.py            # ~35 s of CPU time, 1 core
    PYTHONPATH=. python examples/large_batch_digits.py --quick    # 4 epochs (for tests)

Exit status 1 when the fused-vs-reference check fails.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # run from anywhere in the checkout without installing the package
    import tvlars_fused
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import tvlars_fused
from tvlars_fused import reference

try:
    from tqdm.auto import tqdm
except ImportError:  # optional
    tqdm = None

CHECK_RTOL = 1e-5   # final parameters of fused vs reference TVLARS: max |diff| / max |p| per tensor


# -- data and model ------------------------------------------------------------------------------
def load_data(seed: int):
    """The digits as float32 tensors (N, 1, 8, 8), standardised with the training mean/std."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit(f"this example needs scikit-learn (pip install scikit-learn): {exc}")
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.images, digits.target, test_size=0.2,
                                              random_state=seed, stratify=digits.target)
    x_tr = torch.tensor(x_tr, dtype=torch.float32).unsqueeze(1)
    x_te = torch.tensor(x_te, dtype=torch.float32).unsqueeze(1)
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std, torch.tensor(y_tr, dtype=torch.long),
            (x_te - mean) / std, torch.tensor(y_te, dtype=torch.long))


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
def train(name: str, make_opt: Callable, data, args, steps_per_epoch: int,
          record_stats: bool = False, shadow: Optional[Callable] = None,
          dtype: torch.dtype = torch.float32, quiet: bool = False, log=print) -> Dict:
    """Train a fresh SmallCNN (same init and data order for every optimizer: both come from
    args.seed). Returns the per-epoch curves, the final parameters and, with record_stats, the
    per-step layer_stats() of the optimizer.

    shadow(params) -> optimizer: before every step, load this optimizer's state_dict into the
    shadow optimizer over copies of the parameters (same values, same gradients), step both and
    record the largest relative difference of the results: a one-step parity check at every point
    of the real training trajectory."""
    x_tr, y_tr, x_te, y_te = (t.to(dtype) if t.is_floating_point() else t for t in data)
    torch.manual_seed(args.seed)
    model = SmallCNN().to(dtype)
    names = [n for n, _ in model.named_parameters()]
    opt, sched = make_opt(model)
    params = list(model.parameters())
    if shadow is not None:
        shadow_params = [nn.Parameter(p.detach().clone()) for p in params]
        shadow_opt = shadow(shadow_params)
    order = torch.Generator().manual_seed(args.seed + 1)
    hist = {"name": name, "loss": [], "acc": [], "correct": [], "lr": [], "stats": [],
            "shadow_rel": 0.0}
    n = len(x_tr)
    bar = None
    if tqdm is not None:
        bar = tqdm(total=args.epochs, desc=f"{name:>14}", unit="ep", leave=False, file=sys.stderr,
                   dynamic_ncols=True)
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
        line = (f"{name:>14} epoch {epoch:3d}/{args.epochs}  train loss {hist['loss'][-1]:.4g}  "
                f"test acc {hist['acc'][-1]:.4f}")
        if bar is not None:
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", acc=f"{hist['acc'][-1]:.3f}")
            bar.update(1)
        if not quiet and (epoch % args.log_every == 0 or epoch == args.epochs):
            log(line)
    if bar is not None:
        bar.close()
    hist["seconds"] = time.perf_counter() - t0
    hist["n_test"], hist["steps"] = len(y_te), args.epochs * steps_per_epoch
    hist["params"] = [p.detach().clone() for p in params]
    hist["param_names"] = names
    if record_stats:
        hist["stats"] = torch.stack(hist["stats"])   # [steps, params, 4]
    backend = getattr(opt, "backends", None)   # the fused classes: which kernel ran the step
    log(f"{name:>14} done in {hist['seconds']:.1f} s: final test acc {hist['acc'][-1]:.4f}, "
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
    print(f"fused vs reference TVLARS, full runs (float32, informational): test-accuracy curves "
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


# -- figure --------------------------------------------------------------------------------------
def plot(runs: List[Dict], tv: Dict, tv_phi: List[float], lars_lr_mult: List[float],
         steps_per_epoch: int, args, out: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure written")
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    colors = {"WA-LARS": "tab:blue", "TVLARS": "tab:red", "LAMB": "tab:green"}
    epochs = range(1, args.epochs + 1)
    ax = axes[0, 0]
    for r in runs:
        ax.plot(epochs, [100 * a for a in r["acc"]], label=f"{r['name']} ({100 * r['acc'][-1]:.1f}%)",
                color=colors.get(r["name"]))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[0, 1]
    for r in runs:
        ax.plot(epochs, r["loss"], label=r["name"], color=colors.get(r["name"]))
    ax.set(xlabel="epoch", ylabel="train loss", title="Train loss (cross-entropy)", yscale="log")
    ax.legend(fontsize=8)
    ax = axes[0, 2]
    steps = range(len(tv_phi))
    ax.plot(steps, tv_phi, color="tab:red", label="TVLARS phi(t)")
    ax.plot(steps, lars_lr_mult, color="tab:blue", ls="--", label="WA-LARS lr(t) / lr")
    ax.set(xlabel="step t", ylabel="scale", title="phi(t) (TVLARS) vs warm-up + cosine (WA-LARS)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)

    # Figure-3 view: per layer (weight tensors; biases left out for readability), from TVLARS's
    # layer_stats() after every step.
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
        ax.set(xlabel="step t", ylabel=ylabel, title=title + " (weight tensors)", yscale=yscale)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for spine in ("top", "right"):
            ax.spines[spine].set_visible(False)
        ax.title.set_fontsize(10)
    fig.suptitle(f"SmallCNN on sklearn digits, batch {args.batch_size} ({steps_per_epoch} steps/epoch), "
                 f"{args.epochs} epochs, seed {args.seed}", fontsize=11)
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
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="default 60 (4 with --quick)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", default=os.path.join("examples", "large_batch_digits.png"),
                    help="PNG path")
    ap.add_argument("--quick", action="store_true", help="a very short run (for tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=5.0, help="LARS/TVLARS base lr (eta=1e-3)")
    ap.add_argument("--eta", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--lamb-lr", type=float, default=2e-2)
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="WA-LARS/LAMB warm-up (default: 1/6 of the run)")
    ap.add_argument("--tv-lmbda", type=float, default=None,
                    help="TVLARS lmbda (default: 9/total_steps, phi at the end ~ 0.0025)")
    ap.add_argument("--tv-delay", type=float, default=None,
                    help="TVLARS delay_steps (default: total_steps/3, where phi = 1/2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: tiny model, and fastest on a shared machine)")
    ap.add_argument("--log-every", type=int, default=None,
                    help="print a line every N epochs (default: ~10 lines per run)")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 4 if args.quick else 60
    if args.log_every is None:
        args.log_every = max(1, args.epochs // 10)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data = load_data(args.seed)
    n_train = len(data[0])
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, round((args.warmup_epochs if args.warmup_epochs is not None
                           else args.epochs / 6) * steps_per_epoch))
    lmbda = args.tv_lmbda if args.tv_lmbda is not None else 9.0 / total
    delay = args.tv_delay if args.tv_delay is not None else total / 3.0
    print(f"digits: {n_train} train / {len(data[2])} test images, batch {args.batch_size} "
          f"-> {steps_per_epoch} steps/epoch, {args.epochs} epochs = {total} steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"WA-LARS: lr {args.lr:g}, eta {args.eta:g}, wd {args.weight_decay:g}, warm-up {warmup} "
          f"steps + cosine | TVLARS: lr {args.lr:g}, lmbda {lmbda:.4g}, delay_steps {delay:.4g} "
          f"(phi(0) = {tvlars_fused.phi(0, lmbda, delay, 1.0, 0.0):.3f}), no warm-up | "
          f"LAMB: lr {args.lamb_lr:g}, same schedule as WA-LARS")

    common = dict(momentum=0.9, weight_decay=args.weight_decay, eta=args.eta)

    def make_lars(model):
        opt = tvlars_fused.LARS(model.parameters(), lr=args.lr, **common)
        return opt, warmup_cosine(opt, warmup, total)

    def make_tvlars(cls):
        def make(model):
            return cls(model.parameters(), lr=args.lr, lmbda=lmbda, delay_steps=delay,
                       **common), None
        return make

    def make_lamb(model):
        opt = pytorch_optimizer.Lamb(model.parameters(), lr=args.lamb_lr,
                                     weight_decay=args.weight_decay)
        return opt, warmup_cosine(opt, warmup, total)

    def log(msg):
        (tqdm.write if tqdm is not None else print)(msg)

    def make_reference(params):
        return reference.TVLARS(params, lr=args.lr, lmbda=lmbda, delay_steps=delay, **common)

    runs = [train("WA-LARS", make_lars, data, args, steps_per_epoch, log=log),
            train("TVLARS", make_tvlars(tvlars_fused.TVLARS), data, args, steps_per_epoch,
                  record_stats=True, shadow=make_reference, log=log)]
    try:
        import pytorch_optimizer
    except ImportError:
        print("LAMB skipped: pytorch-optimizer is not installed (pip install pytorch-optimizer)")
    else:
        runs.append(train("LAMB", make_lamb, data, args, steps_per_epoch, log=log))
    print("fused vs reference TVLARS: the same TVLARS run with the eager reference optimizer "
          "(same seed and data order), in float32 and in float64 (fused and reference)")
    ref32 = train("TVLARS ref", make_tvlars(reference.TVLARS), data, args, steps_per_epoch,
                  quiet=True, log=log)
    check = [train(name, make_tvlars(cls), data, args, steps_per_epoch, dtype=torch.float64,
                   quiet=True, log=log)
             for name, cls in (("TVLARS f64", tvlars_fused.TVLARS),
                               ("TVLARS ref f64", reference.TVLARS))]

    print("\nfinal test accuracy: " + ", ".join(f"{r['name']} {100 * r['acc'][-1]:.2f}%"
                                              for r in runs)
          + " | best: " + ", ".join(f"{r['name']} {100 * max(r['acc']):.2f}%" for r in runs))
    report_float32(runs[1], ref32)
    ok = compare(check[0], check[1], runs[1]["shadow_rel"])

    tv_phi = [float(tvlars_fused.phi(s, lmbda, delay, 1.0, 0.0)) for s in range(total)]
    lars_mult = [lr / args.lr for lr in runs[0]["lr"]]
    # the phi the kernels used must be the schedule's
    assert torch.allclose(runs[1]["stats"][:, 0, 3], torch.tensor(tv_phi), rtol=1e-6), "phi mismatch"
    out = plot(runs, runs[1], tv_phi, lars_mult, steps_per_epoch, args, args.out)
    if out:
        print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
