"""Reproduce the classification experiments of TVLARS (arXiv 2309.14053): ResNet-18 on CIFAR-10 at
large batch sizes, WA-LARS vs TVLARS vs LAMB, with the layer-wise norm / trust-ratio plots of the
paper's figures. Meant for a GPU; --synthetic runs it end to end on a tiny stand-in data set.

    python examples/repro_cifar10.py --data-dir ~/data                # the paper's grid (200 runs)
    python examples/repro_cifar10.py --data-dir ~/data --preset small  # one setting each (18 runs)
    python examples/repro_cifar10.py --synthetic --out-dir /tmp/cifar-smoke   # seconds, on a CPU

The data: CIFAR-10's "python version" (cifar-10-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html, extracted), i.e. the directory cifar-10-batches-py/
with data_batch_1 ... data_batch_5 and test_batch (pickled dicts with "data" and "labels"): the
layout torchvision.datasets.CIFAR10(root) reads. --data-dir is that directory or its parent. The
script never downloads; without the files it stops with a message naming the directory and what
must be in it. (The files are pickles, read with pickle like torchvision does: point it only at
files you trust.)

What it runs: for every batch size, every optimizer, every point of its grid (and every --seeds),
ResNet-18 from its seed for --epochs epochs, test accuracy after every epoch. Batches larger than
--micro-batch are accumulated from micro-batches (one optimizer step per batch; the loss of each
micro-batch is summed and divided by the batch size, so the gradient is the full batch's mean;
BatchNorm normalises over each micro-batch, as it does over each GPU's share under DDP). Results
go to --out-dir: runs.csv (one row per run, written as each run ends: a rerun with the same
settings skips the runs it already has), results.csv and results.md (per batch size, each optimizer's best setting and
TVLARS minus the best baseline), accuracy.png (test accuracy per epoch of those best settings),
layers_B<batch>.png (per layer, from the optimizer's layer_stats() after every step: weight norm,
gradient norm ||g + wd*w|| and trust ratio eta*phi(t)*||w||/||d||, for the best WA-LARS and
TVLARS runs: the view of the paper's layer-wise figures), and per run its curves (curves/*.json)
and layer statistics (stats/*.pt).

Where each setting comes from. [A] the authors' code, github.com/KhoiDOO/tvlars (file named);
[I] the paper as quoted in this project's issue #15; [C] chosen here: neither source gives it (the
paper's own experimental section could not be consulted while writing this script).
  model        ResNet-18 [I]. Stem: 3x3 convolution, stride 1, no max-pool, the usual CIFAR
               variant [C]; the authors' code uses torchvision's ImageNet resnet18 (7x7 stride-2
               stem + max-pool) [A model/base.py]: --stem imagenet. Initialisation as torchvision.
  data         50,000 train / 10,000 test; augmentation RandomCrop(32, padding 4), horizontal
               flip, RandomRotation(15), normalised with the ImageNet mean/std [A dataset/bench.py]
               (done here on the device, per micro-batch). Last partial batch kept (DataLoader
               default) [A clf.py].
  epochs       100 [A script/*/script.json].
  batch sizes  512 1024 2048 4096 8192 16384: the paper's range, up to 16k [I]; the authors'
               scripts also list 32768 [A script/*/script.json] (--batch-sizes).
  common       momentum 0.9, eta 1e-3, weight decay 5e-4 [A opt/lars.py, opt/tvlars.py,
               script.json]; 1-D parameters (biases, BatchNorm) excluded from weight decay and
               from the layer-wise adaptation, heavy-ball momentum (buf = m*buf + q*d; w -= lr*buf)
               [A clf.py, opt/tvlars.py].
  TVLARS       lr grid per batch size {512: 1 2 3, 1024: 5 8 10, 2048: 10 12 15, 4096: 12 15 17
               20, 8192: 12 15 17 20 25 30, 16384: 12 15 17 20 25 30 35} and lambda grid
               {512: 1e-6 1e-5 1e-4 1e-3, 1024: + 5e-3, 2048: + 1e-2, >= 4096: + 5e-2}
               [A script/tvlars/script.json]; no lr schedule [A script.json "sd": None]; delay
               d_e = 10 epochs [A clf.py epoch_delay_cnt=10], as delay_steps = 10 * steps/epoch in
               phi(t) = 1/(alpha + exp(lmbda*(t - delay_steps))) + gamma_min;
               gamma_min = B/B_base * 0.001 [I] with B_base = 256 [A scheduler/lars_warmup.py:
               base lr = B/256; the paper's B_base not verified] (--base-batch, --gamma-min);
               alpha = 1 [C: phi(0) <= 1, TVLARS starts as LARS without warm-up; the authors'
               opt/tvlars.py uses 0.1, phi up to 10: --alpha 0.1]; no norm clipping [C; the
               authors' opt/tvlars.py clamps both norms at 10: --norm-clip 10].
  WA-LARS      peak lr = s * B/256 with s in {0.1, 0.3, 0.5}; linear warm-up from 0 over 20
               epochs, then cosine to 0.001 * peak [A script/lars/script.json "warm",
               scheduler/lars_warmup.py].
  LAMB         examples/lamb_choice.py: the fused tvlars_fused.LAMB with the LAMB paper's
               defaults (Algorithm 2: bias-corrected moments, weight decay added to the update,
               eps 1e-6, no weight-norm clip) [C]. The authors' opt/lamb.py (from
               cybertronai/pytorch-lamb) is LAMB v3: no bias correction, weight decay in the
               update, weight norm clamped at 10 [A] (tvlars_fused.LAMB(bias_correction="none",
               weight_norm_clip=10), docs/SPEC.md "LAMB"); --lamb pytorch-optimizer runs
               pytorch-optimizer's Lamb (pinned in examples/requirements.txt: no moment bias
               correction, step x 1/(1 - beta1^t), decoupled decay, the same clamp) for
               comparison. Weight decay 5e-4, the WA-LARS schedule [A
               clf.py: LAMB gets the "lars-warm" schedule]; peak lr in {0.005, 0.01, 0.02} *
               sqrt(B/512) [C: the authors' LAMB lr grid is not in their scripts; square-root
               scaling as in the LAMB paper].
  LARS         (optional, --optimizers ... lars) constant lr, the TVLARS lr grid
               [A script/lars/script.json "non-warm"].
  selection    the best grid point per (batch size, optimizer) by final test accuracy (mean over
               seeds), as a grid search reported on the test set does. That is optimistic, and
               more so for TVLARS, whose grid (lr x lambda) has up to 49 points against WA-LARS's
               and LAMB's 3. --holdout N trains on 50,000 - N images and selects on those N
               instead (the test accuracy is then reported at the setting the validation picked).

Presets (--preset): paper (default) is the grids above; small is the middle lr of each grid and
lambda = 1e-3 (the authors' main.py default), one run per optimizer and batch size. The run
count and an estimate are printed first; --dry-run stops there.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # run from anywhere in the checkout without installing the package
    import tvlars_fused
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(HERE, ".."))
    import tvlars_fused

sys.path.insert(0, HERE)
import lamb_choice  # noqa: E402
from lamb_choice import lamb_missing, lamb_source, make_lamb  # noqa: E402
from pins import version_report  # noqa: E402

# -- the settings (see the module docstring for their sources) -----------------------------------
PAPER_BATCH_SIZES = (512, 1024, 2048, 4096, 8192, 16384)
TVLARS_LRS = {512: (1.0, 2.0, 3.0), 1024: (5.0, 8.0, 10.0), 2048: (10.0, 12.0, 15.0),
              4096: (12.0, 15.0, 17.0, 20.0), 8192: (12.0, 15.0, 17.0, 20.0, 25.0, 30.0),
              16384: (12.0, 15.0, 17.0, 20.0, 25.0, 30.0, 35.0),
              32768: (12.0, 15.0, 17.0, 20.0, 25.0, 30.0, 35.0)}
TVLARS_LMBDAS = {512: (1e-6, 1e-5, 1e-4, 1e-3), 1024: (1e-6, 1e-5, 1e-4, 1e-3, 5e-3),
                 2048: (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2),
                 4096: (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2),
                 8192: (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2),
                 16384: (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2),
                 32768: (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2, 5e-2)}
WA_LARS_SCALES = (0.1, 0.3, 0.5)          # peak lr = scale * B / 256
LAMB_LRS_512 = (0.005, 0.01, 0.02)        # peak lr = value * sqrt(B / 512)   [C]
SMALL_LMBDA = 1e-3
OPTIMIZERS = ("wa-lars", "tvlars", "lamb", "lars")
LABELS = {"wa-lars": "WA-LARS", "tvlars": "TVLARS", "lamb": "LAMB", "lars": "LARS"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CIFAR_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


# -- data ------------------------------------------------------------------------------------------
def find_cifar_dir(data_dir: str) -> str:
    """The cifar-10-batches-py directory: data_dir itself or data_dir/cifar-10-batches-py.
    Stops with a message naming the directory and the files it needs when they are not there."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    candidates = [data_dir, os.path.join(data_dir, CIFAR_DIRNAME)]
    for d in candidates:
        if all(os.path.isfile(os.path.join(d, f)) for f in TRAIN_FILES + (TEST_FILE,)):
            return d
    where = candidates[1] if os.path.basename(data_dir) != CIFAR_DIRNAME else data_dir
    missing = ([f for f in TRAIN_FILES + (TEST_FILE,) if not os.path.isfile(os.path.join(where, f))]
               if os.path.isdir(where) else None)
    raise SystemExit(
        f"CIFAR-10 not found: expected the directory {where} "
        + ("(it does not exist)" if missing is None else f"(missing: {', '.join(missing)})")
        + f" holding data_batch_1 ... data_batch_5 and test_batch, the CIFAR-10 'python version' "
        f"(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted into "
        f"{os.path.dirname(where)}; the layout torchvision.datasets.CIFAR10(root=...) uses). Pass "
        f"--data-dir with that directory or its parent. This script never downloads; --synthetic "
        f"runs on a tiny stand-in data set instead.")


def read_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> (uint8 [N, 3, 32, 32], int64 [N])."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
    if "data" not in entry or ("labels" not in entry and "fine_labels" not in entry):
        raise SystemExit(f"{path}: not a CIFAR-10 python batch (keys {sorted(entry)})")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"],
                        dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise SystemExit(f"{path}: data of shape {data.shape} with {len(labels)} labels; expected "
                         f"[N, 3072] uint8 and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str):
    """(train_x uint8 [N,3,32,32], train_y int64 [N], test_x, test_y) as CPU tensors."""
    d = find_cifar_dir(data_dir)
    parts = [read_batch(os.path.join(d, f)) for f in TRAIN_FILES]
    test_x, test_y = read_batch(os.path.join(d, TEST_FILE))
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    for name, y in (("train", train_y), ("test", test_y)):
        if y.min() < 0 or y.max() > 9:
            raise SystemExit(f"{d}: {name} labels outside 0..9")
    return (torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
            torch.from_numpy(test_y))


def write_synthetic_cifar(root: str, per_batch: int = 20, n_test: int = 50, seed: int = 0) -> str:
    """A tiny CIFAR-10 stand-in in the real file format (root/cifar-10-batches-py/data_batch_1..5,
    test_batch, batches.meta; pickled dicts as in the real files), so that the real loader reads
    it. Each class has its own smooth colour pattern plus noise: learnable, not trivially so.
    Returns the cifar-10-batches-py directory."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, CIFAR_DIRNAME)
    os.makedirs(d, exist_ok=True)
    coarse = rng.normal(size=(10, 3, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, 8, 8)))          # [10, 3, 32, 32], smooth

    def make(n, batch_label):
        labels = rng.integers(0, 10, size=n)
        img = 128 + 40 * patterns[labels] + 50 * rng.normal(size=(n, 3, 32, 32))
        data = np.clip(img, 0, 255).astype(np.uint8).reshape(n, -1)
        return {"batch_label": batch_label, "labels": [int(v) for v in labels], "data": data,
                "filenames": [f"synthetic_{batch_label.replace(' ', '_')}_{i}.png" for i in range(n)]}

    for i, name in enumerate(TRAIN_FILES, 1):
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(make(per_batch, f"training batch {i} of 5"), f, protocol=2)
    with open(os.path.join(d, TEST_FILE), "wb") as f:
        pickle.dump(make(n_test, "testing batch 1 of 1"), f, protocol=2)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return d


class Augment:
    """The authors' training augmentation on the device, per micro-batch: random crop 32 with
    4-pixel zero padding, horizontal flip, random rotation in [-deg, deg] (nearest, zero fill),
    then the ImageNet mean/std normalisation. uint8 [N,3,32,32] -> float32."""

    def __init__(self, device, rotate_deg: float = 15.0):
        self.device = device
        self.rotate = rotate_deg
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.ar = torch.arange(32, device=device)

    def normalise(self, x_uint8):
        return (x_uint8.float().div_(255) - self.mean) / self.std

    def __call__(self, x_uint8, gen: torch.Generator):
        n = len(x_uint8)
        x = F.pad(x_uint8.float().div_(255), (4, 4, 4, 4))
        oy = torch.randint(0, 9, (n,), device=self.device, generator=gen)
        ox = torch.randint(0, 9, (n,), device=self.device, generator=gen)
        rows = (oy[:, None] + self.ar)[:, None, :, None]
        cols = (ox[:, None] + self.ar)[:, None, None, :]
        x = x[torch.arange(n, device=self.device)[:, None, None, None],
              torch.arange(3, device=self.device)[None, :, None, None], rows, cols]
        flip = torch.rand(n, device=self.device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.rotate:
            a = (torch.rand(n, device=self.device, generator=gen) * 2 - 1) * math.radians(self.rotate)
            cos, sin = torch.cos(a), torch.sin(a)
            zero = torch.zeros_like(a)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return (x - self.mean) / self.std


# -- model -----------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18: [2, 2, 2, 2] basic blocks of width w, 2w, 4w, 8w (w = 64: 11.2M parameters).
    stem "cifar": 3x3 stride-1 convolution, no max-pool; "imagenet": torchvision's 7x7 stride-2
    convolution + 3x3 stride-2 max-pool. torchvision's initialisation."""

    def __init__(self, num_classes: int = 10, width: int = 64, stem: str = "cifar"):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', not {stem!r}")
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- one optimizer step from micro-batches ---------------------------------------------------------
def accumulate_and_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, micro_batch: int,
                        prepare: Optional[Callable] = None,
                        autocast=contextlib.nullcontext) -> Tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch (x, y), computed in micro-batches of at most micro_batch
    samples: each micro-batch's summed cross-entropy, divided by the whole batch's size, is
    back-propagated (gradients accumulate in .grad), then opt.step() once. Without BatchNorm (or
    with micro_batch >= len(x)) this is the full-batch step up to rounding. prepare(x_micro) maps
    the stored samples to the model's input (augmentation). Returns (summed loss, number correct)
    as device tensors (no host sync)."""
    n = len(x)
    opt.zero_grad()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, n, micro_batch):
        xb, yb = x[i:i + micro_batch], y[i:i + micro_batch]
        if prepare is not None:
            xb = prepare(xb)
        with autocast():
            logits = model(xb)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        loss = F.cross_entropy(logits, yb, reduction="sum")
        (loss / n).backward()
        loss_sum += loss.detach().double()
        correct += (logits.detach().argmax(1) == yb).sum()
    opt.step()
    return loss_sum, correct


# -- the runs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    batch_size: int
    optimizer: str          # one of OPTIMIZERS
    lr: float               # peak / constant lr
    lmbda: Optional[float]  # TVLARS only
    seed: int

    @property
    def key(self) -> str:
        lm = "" if self.lmbda is None else f"_lm{self.lmbda:g}"
        return f"B{self.batch_size}_{self.optimizer}_lr{self.lr:g}{lm}_s{self.seed}"

    @property
    def setting(self) -> Tuple:
        return (self.batch_size, self.optimizer, self.lr, self.lmbda)


def nearest_batch(table: Dict[int, Sequence[float]], b: int) -> Sequence[float]:
    """The grid of the listed batch size nearest to b (in log scale)."""
    return table[min(table, key=lambda k: (abs(math.log(k / b)), k))]


def grid_for(optimizer: str, b: int, preset: str, args) -> List[Tuple[float, Optional[float]]]:
    """[(lr, lmbda)] for one optimizer at batch size b."""
    def pick(values):
        values = list(values)
        return values if preset == "paper" else [values[len(values) // 2]]

    if optimizer == "tvlars":
        lrs = args.tvlars_lrs or pick(nearest_batch(TVLARS_LRS, b))
        lms = args.lmbdas or (list(nearest_batch(TVLARS_LMBDAS, b)) if preset == "paper"
                              else [SMALL_LMBDA])
        return [(lr, lm) for lr in lrs for lm in lms]
    if optimizer == "lars":
        return [(lr, None) for lr in (args.lars_lrs or pick(nearest_batch(TVLARS_LRS, b)))]
    if optimizer == "wa-lars":
        return [(s * b / 256, None) for s in (args.wa_lars_scales or pick(WA_LARS_SCALES))]
    if optimizer == "lamb":
        return [(v * math.sqrt(b / 512), None) for v in (args.lamb_lrs or pick(LAMB_LRS_512))]
    raise ValueError(optimizer)


def plan_runs(args) -> List[RunConfig]:
    runs = []
    for b in args.batch_sizes:
        for opt in args.optimizers:
            for lr, lm in grid_for(opt, b, args.preset, args):
                for seed in args.seeds:
                    runs.append(RunConfig(b, opt, float(lr), lm, seed))
    return runs


def gamma_min_for(b: int, args) -> float:
    return args.gamma_min if args.gamma_min is not None else b / args.base_batch * 1e-3


def build_optimizer(cfg: RunConfig, model: nn.Module, steps_per_epoch: int, args):
    """(optimizer, LambdaLR scheduler or None, phi(t) function or None, description)."""
    total = steps_per_epoch * args.epochs
    common = dict(momentum=0.9, weight_decay=args.weight_decay, eta=args.eta,
                  weight_decay_filter=True, lars_adaptation_filter=True, norm_clip=args.norm_clip)
    params = list(model.parameters())
    warmup = round(args.warmup_epochs * steps_per_epoch)
    final = args.wa_final_ratio

    def warm_cos(step):   # the authors' lars_warmup.py: from 0, linear, then cosine to final*peak
        if step < warmup:
            return step / warmup
        q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return q + final * (1 - q)

    if cfg.optimizer == "tvlars":
        delay = args.delay_epochs * steps_per_epoch
        gmin = gamma_min_for(cfg.batch_size, args)
        opt = tvlars_fused.TVLARS(params, lr=cfg.lr, lmbda=cfg.lmbda, delay_steps=delay,
                                  alpha=args.alpha, gamma_min=gmin, **common)
        phi = lambda t: float(tvlars_fused.phi(t, cfg.lmbda, delay, args.alpha, gmin))  # noqa: E731
        return opt, None, phi, (f"TVLARS lr {cfg.lr:g}, lmbda {cfg.lmbda:g}, delay_steps {delay}, "
                                f"alpha {args.alpha:g}, gamma_min {gmin:g}")
    if cfg.optimizer == "lars":
        return tvlars_fused.LARS(params, lr=cfg.lr, **common), None, None, f"LARS lr {cfg.lr:g}"
    if cfg.optimizer == "wa-lars":
        opt = tvlars_fused.LARS(params, lr=cfg.lr, **common)
        return (opt, torch.optim.lr_scheduler.LambdaLR(opt, warm_cos), None,
                f"WA-LARS peak lr {cfg.lr:g}, warm-up {warmup} steps + cosine to {final:g} x peak")
    if cfg.optimizer == "lamb":
        opt = make_lamb(params, lr=cfg.lr, weight_decay=args.weight_decay)
        return (opt, torch.optim.lr_scheduler.LambdaLR(opt, warm_cos), None,
                f"LAMB peak lr {cfg.lr:g}, warm-up {warmup} steps + cosine")
    raise ValueError(cfg.optimizer)


@torch.no_grad()
def evaluate(model, x_norm, y, batch: int, autocast) -> Tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x_norm), batch):
        with autocast():
            logits = model(x_norm[i:i + batch])
        loss += float(F.cross_entropy(logits.float(), y[i:i + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / len(y), loss / len(y)


def run_one(cfg: RunConfig, data, args, device, log=print) -> Dict:
    train_x, train_y, test_x, test_y, val_x, val_y = data
    n = len(train_x)
    b = cfg.batch_size
    steps_per_epoch = math.ceil(n / b)
    micro = min(args.micro_batch, b)
    torch.manual_seed(cfg.seed)
    model = ResNet18(width=args.width, stem=args.stem).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, sched, phi, desc = build_optimizer(cfg, model, steps_per_epoch, args)
    fwd = torch.compile(model) if args.compile else model
    aug = Augment(device, args.rotate)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    order = torch.Generator().manual_seed(cfg.seed + 2)
    if args.amp == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    mf = torch.channels_last if args.channels_last else torch.contiguous_format

    def prepare(xb):
        return aug(xb, gen).contiguous(memory_format=mf)

    test_norm = aug.normalise(test_x).contiguous(memory_format=mf)
    val_norm = aug.normalise(val_x).contiguous(memory_format=mf) if val_x is not None else None
    names = [k for k, _ in model.named_parameters()]
    has_stats = hasattr(opt, "layer_stats")
    hist = {"key": cfg.key, **asdict(cfg), "label": LABELS[cfg.optimizer], "desc": desc,
            "steps_per_epoch": steps_per_epoch, "micro_batch": micro, "train_loss": [],
            "train_acc": [], "test_acc": [], "test_loss": [], "val_acc": [], "lr": [], "phi": []}
    stats_steps, stats = [], []
    t0 = time.perf_counter()
    step = 0
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=order).to(device)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        epoch_stats = []
        for i in range(steps_per_epoch):
            idx = perm[i * b:(i + 1) * b]
            hist["lr"].append(opt.param_groups[0]["lr"])
            if phi is not None:
                hist["phi"].append(phi(step))
            ls, c = accumulate_and_step(fwd, opt, train_x[idx], train_y[idx], micro, prepare,
                                        autocast)
            loss_sum += ls
            correct += c
            if sched is not None:
                sched.step()
            if has_stats and step % args.stats_every == 0:
                st = opt.layer_stats()
                epoch_stats.append(torch.stack([st[p] for p in model.parameters()]).float())
                stats_steps.append(step)
            step += 1
        if epoch_stats:
            stats.append(torch.stack(epoch_stats).cpu())
        hist["train_loss"].append(float(loss_sum) / n)
        hist["train_acc"].append(int(correct) / n)
        acc, tl = evaluate(fwd, test_norm, test_y, args.eval_batch, autocast)
        hist["test_acc"].append(acc)
        hist["test_loss"].append(tl)
        if val_norm is not None:
            hist["val_acc"].append(evaluate(fwd, val_norm, val_y, args.eval_batch, autocast)[0])
        if not math.isfinite(hist["train_loss"][-1]):
            log(f"  {cfg.key}: train loss {hist['train_loss'][-1]} at epoch {epoch}: diverged, stopped")
            break
        if epoch % args.log_every == 0 or epoch == args.epochs:
            log(f"  {cfg.key} epoch {epoch}/{args.epochs}: train loss {hist['train_loss'][-1]:.4f}, "
                f"train acc {100 * hist['train_acc'][-1]:.2f}%, test acc {100 * acc:.2f}%"
                + (f", val acc {100 * hist['val_acc'][-1]:.2f}%" if val_norm is not None else "")
                + f" [{time.perf_counter() - t0:.0f} s]")
    hist["seconds"] = time.perf_counter() - t0
    hist["epochs_run"] = len(hist["test_acc"])
    hist["param_names"] = names
    hist["param_ndim"] = [p.ndim for p in model.parameters()]
    if stats:
        hist["stats"] = torch.cat(stats)          # [recorded steps, params, 4]
        hist["stats_steps"] = stats_steps
    return hist


def stat_names(n: int) -> Sequence[str]:
    """The names of the n columns of layer_stats() (the first four: weight_norm, update_norm,
    trust_ratio, phi)."""
    for mod in ("tvlars_fused.abi", "tvlars_fused.diagnostics"):
        try:
            names = tuple(getattr(__import__(mod, fromlist=["LARS_STAT_NAMES"]), "LARS_STAT_NAMES"))
        except (ImportError, AttributeError):
            continue
        if len(names) == n:
            return names
    return ("weight_norm", "update_norm", "trust_ratio", "phi") + tuple(f"col{i}" for i in range(4, n))


# -- results ---------------------------------------------------------------------------------------
RUN_FIELDS = ["key", "batch_size", "optimizer", "lr", "lmbda", "seed", "epochs", "steps_per_epoch",
              "micro_batch", "final_test_acc", "best_test_acc", "best_epoch", "final_val_acc",
              "final_train_loss", "diverged", "seconds", "lamb", "config", "desc"]
# the arguments that change a run's result besides its key: a row counts as done only when they match
CONFIG_ARGS = ("epochs", "width", "stem", "rotate", "micro_batch", "amp", "delay_epochs", "alpha",
               "base_batch", "gamma_min", "norm_clip", "eta", "weight_decay", "warmup_epochs",
               "wa_final_ratio", "holdout", "synthetic")


def config_signature(args, lamb: Optional[str]) -> str:
    blob = json.dumps({k: getattr(args, k) for k in CONFIG_ARGS} | {"lamb": lamb}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def run_row(h: Dict, args, lamb: Optional[str]) -> Dict:
    best = max(range(len(h["test_acc"])), key=lambda i: h["test_acc"][i])
    return {"key": h["key"], "batch_size": h["batch_size"], "optimizer": h["optimizer"],
            "lr": h["lr"], "lmbda": "" if h["lmbda"] is None else h["lmbda"], "seed": h["seed"],
            "epochs": args.epochs, "steps_per_epoch": h["steps_per_epoch"],
            "micro_batch": h["micro_batch"], "final_test_acc": round(100 * h["test_acc"][-1], 4),
            "best_test_acc": round(100 * h["test_acc"][best], 4), "best_epoch": best + 1,
            "final_val_acc": round(100 * h["val_acc"][-1], 4) if h["val_acc"] else "",
            "final_train_loss": h["train_loss"][-1],
            "diverged": int(h["epochs_run"] < args.epochs or not math.isfinite(h["train_loss"][-1])),
            "seconds": round(h["seconds"], 1), "lamb": lamb if h["optimizer"] == "lamb" else "",
            "config": config_signature(args, lamb), "desc": h["desc"]}


def read_rows(path: str, config: Optional[str] = None) -> Dict[str, Dict]:
    """{run key: row} of runs.csv; with config, only the rows of that configuration."""
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        return {r["key"]: r for r in csv.DictReader(f) if config is None or r.get("config") == config}


def append_row(path: str, row: Dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def _f(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def summarise(plan: List[RunConfig], rows: Dict[str, Dict], args) -> Tuple[List[Dict], List[str]]:
    """Per (batch size, optimizer): the best setting (by mean final validation accuracy with
    --holdout, else by mean final test accuracy), its test accuracy over seeds; per batch size,
    TVLARS minus the best baseline. Returns (CSV rows, Markdown lines)."""
    select_on = "final_val_acc" if args.holdout else "final_test_acc"
    by_setting: Dict[Tuple, List[Dict]] = {}
    for cfg in plan:
        if cfg.key in rows:
            by_setting.setdefault(cfg.setting, []).append(rows[cfg.key])
    best: Dict[Tuple[int, str], Tuple[Tuple, List[Dict]]] = {}
    n_settings: Dict[Tuple[int, str], int] = {}
    for setting, rs in by_setting.items():
        k = (setting[0], setting[1])
        n_settings[k] = n_settings.get(k, 0) + 1
        score = statistics.fmean(_f(r[select_on]) for r in rs)
        if math.isnan(score):
            score = -1.0
        if k not in best or score > best[k][2]:
            best[k] = (setting, rs, score)
    out_rows, md = [], []
    md += [f"Each optimizer's best setting per batch size, selected on the "
           f"{'validation split' if args.holdout else 'test set'} (final accuracy, mean over "
           f"seeds), and its test accuracy (%) after {args.epochs} epochs (mean ± std over "
           f"{len(args.seeds)} seed(s)); 'settings' is the size of each grid.", "",
           "| batch | optimizer | settings | best setting | final test acc | best-epoch test acc "
           "| diverged runs |", "|---|---|---|---|---|---|---|"]

    def fmt(xs):
        xs = [x for x in xs if not math.isnan(x)]
        if not xs:
            return "n/a"
        return f"{statistics.fmean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")

    for b in args.batch_sizes:
        for opt in args.optimizers:
            if (b, opt) not in best:
                continue
            setting, rs, _ = best[(b, opt)]
            fin = [_f(r["final_test_acc"]) for r in rs]
            top = [_f(r["best_test_acc"]) for r in rs]
            div = sum(int(r["diverged"]) for rr in by_setting.values() for r in rr
                      if r["batch_size"] == str(b) and r["optimizer"] == opt)
            desc = f"lr {setting[2]:g}" + ("" if setting[3] is None else f", λ {setting[3]:g}")
            md.append(f"| {b} | {LABELS[opt]} | {n_settings[(b, opt)]} | {desc} | {fmt(fin)} | "
                      f"{fmt(top)} | {div} |")
            out_rows.append({"batch_size": b, "optimizer": LABELS[opt], "settings": n_settings[(b, opt)],
                             "lr": setting[2], "lmbda": "" if setting[3] is None else setting[3],
                             "seeds": len(rs), "final_test_acc_mean": round(statistics.fmean(fin), 4),
                             "final_test_acc_std": round(statistics.stdev(fin), 4) if len(fin) > 1 else "",
                             "best_epoch_test_acc_mean": round(statistics.fmean(top), 4),
                             "selected_on": "validation" if args.holdout else "test"})
    baselines = [o for o in ("wa-lars", "lamb", "lars") if o in args.optimizers]
    if "tvlars" in args.optimizers and baselines:
        md += ["", "TVLARS minus the best baseline (" + ", ".join(LABELS[o] for o in baselines)
               + ") at each batch size, final test accuracy (points):", "",
               "| batch | TVLARS | best baseline | difference |", "|---|---|---|---|"]
        for b in args.batch_sizes:
            if (b, "tvlars") not in best:
                continue
            tv = statistics.fmean(_f(r["final_test_acc"]) for r in best[(b, "tvlars")][1])
            cands = [(statistics.fmean(_f(r["final_test_acc"]) for r in best[(b, o)][1]), o)
                     for o in baselines if (b, o) in best]
            if not cands:
                continue
            base, o = max(cands)
            md.append(f"| {b} | {tv:.2f} | {LABELS[o]} {base:.2f} | {tv - base:+.2f} |")
    return out_rows, md


# -- figures ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


COLORS = {"wa-lars": "tab:blue", "tvlars": "tab:red", "lamb": "tab:green", "lars": "tab:gray"}


def best_keys(plan: List[RunConfig], rows: Dict[str, Dict], args) -> Dict[Tuple[int, str], str]:
    """(batch, optimizer) -> the key of the first seed's run of the best setting."""
    select_on = "final_val_acc" if args.holdout else "final_test_acc"
    groups: Dict[Tuple, List[RunConfig]] = {}
    for cfg in plan:
        if cfg.key in rows:
            groups.setdefault(cfg.setting, []).append(cfg)
    out, score = {}, {}
    for setting, cfgs in groups.items():
        s = statistics.fmean(_f(rows[c.key][select_on]) for c in cfgs)
        s = -1.0 if math.isnan(s) else s
        k = (setting[0], setting[1])
        if k not in score or s > score[k]:
            score[k], out[k] = s, cfgs[0].key
    return out


def plot_accuracy(best: Dict[Tuple[int, str], str], args, out: str) -> Optional[str]:
    plt = _plt()
    bs = [b for b in args.batch_sizes if any(k[0] == b for k in best)]
    if not bs:
        return None
    cols = min(3, len(bs))
    rows = math.ceil(len(bs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, b in zip(axes.flat, bs):
        for opt in args.optimizers:
            key = best.get((b, opt))
            if key is None:
                continue
            with open(os.path.join(args.out_dir, "curves", key + ".json")) as f:
                h = json.load(f)
            acc = [100 * a for a in h["test_acc"]]
            ax.plot(range(1, len(acc) + 1), acc, color=COLORS[opt],
                    label=f"{LABELS[opt]} ({acc[-1]:.1f}%)")
        ax.set(title=f"batch {b}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(bs):]:
        ax.axis("off")
    fig.suptitle("ResNet-18 on CIFAR-10: best setting of each optimizer (first seed)", fontsize=11)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.45)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_layers(best: Dict[Tuple[int, str], str], b: int, args, out: str) -> Optional[str]:
    """Rows: the best WA-LARS (or LARS) and TVLARS runs at batch b; columns: per-layer weight norm,
    gradient norm and trust ratio after every recorded step (weight tensors, coloured by depth)."""
    plt = _plt()
    rows = [o for o in ("wa-lars", "lars", "tvlars") if (b, o) in best]
    rows = [o for o in rows
            if os.path.exists(os.path.join(args.out_dir, "stats", best[(b, o)] + ".pt"))]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(14, 3.6 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, opt in enumerate(rows):
        s = torch.load(os.path.join(args.out_dir, "stats", best[(b, opt)] + ".pt"))
        stats, steps = s["stats"], s["steps"]
        idx = [i for i, d in enumerate(s["param_ndim"]) if d > 1]
        for c, (col, ylabel, short, scale) in enumerate((
                (0, "weight norm ||w||", "weight norm", "linear"),
                (1, "gradient norm ||g + wd·w||", "gradient norm", "log"),
                (2, "trust ratio η·φ(t)·||w||/||d||", "trust ratio", "log"))):
            ax = axes[r, c]
            for j, i in enumerate(idx):
                ax.plot(steps, stats[:, i, col].numpy(), color=cmap(j / max(1, len(idx) - 1)), lw=0.8)
            ax.set(yscale=scale, xlabel="step", ylabel=ylabel,
                   title=f"{LABELS[opt]}: {short} ({best[(b, opt)]})")
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Per layer (weight tensors; colour: depth, stem dark to fc light), batch {b}: "
                 f"from layer_stats() after each step", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.09, top=0.9, wspace=0.25, hspace=0.4)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"),
                    help="cifar-10-batches-py or its parent (default: $CIFAR10_DIR or ./data)")
    ap.add_argument("--synthetic", action="store_true",
                    help="a tiny random CIFAR-shaped data set, written in the real file format to "
                    "<out-dir>/synthetic-data and read by the real loader; small model, one setting "
                    "per optimizer, batches 32 and 64, 2 epochs: a smoke test")
    ap.add_argument("--out-dir", default=None,
                    help="default runs/repro_cifar10 (with --synthetic: a new temporary directory)")
    ap.add_argument("--preset", choices=("paper", "small"), default=None,
                    help="paper: the authors' grids (default); small: one setting per optimizer")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=None,
                    help="default wa-lars tvlars lamb")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=None, help="default 100 (synthetic: 2)")
    ap.add_argument("--tvlars-lrs", type=float, nargs="+", default=None, help="override the grid")
    ap.add_argument("--lmbdas", type=float, nargs="+", default=None, help="override the grid")
    ap.add_argument("--wa-lars-scales", type=float, nargs="+", default=None,
                    help="override: peak lr = scale * B/256")
    ap.add_argument("--lamb-lrs", type=float, nargs="+", default=None,
                    help="override: peak lr = value * sqrt(B/512)")
    ap.add_argument("--lars-lrs", type=float, nargs="+", default=None)
    ap.add_argument("--lamb", choices=lamb_choice.LAMB_CHOICES, default=lamb_choice.DEFAULT_LAMB,
                    help="which LAMB (examples/lamb_choice.py): tvlars_fused.LAMB with the paper's "
                    "defaults (default), or pytorch-optimizer's Lamb for comparison")
    ap.add_argument("--delay-epochs", type=float, default=10.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--base-batch", type=int, default=256, help="B_base in gamma_min = B/B_base*1e-3")
    ap.add_argument("--gamma-min", type=float, default=None, help="override B/B_base * 1e-3")
    ap.add_argument("--norm-clip", type=float, default=None)
    ap.add_argument("--eta", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--warmup-epochs", type=float, default=20.0, help="WA-LARS and LAMB")
    ap.add_argument("--wa-final-ratio", type=float, default=1e-3,
                    help="WA-LARS/LAMB: the cosine ends at this fraction of the peak lr")
    ap.add_argument("--holdout", type=int, default=0,
                    help="train on all but N training images and select each grid's best on them")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="largest micro-batch (gradient accumulation above it; default 1024)")
    ap.add_argument("--eval-batch", type=int, default=1000)
    ap.add_argument("--width", type=int, default=None, help="ResNet width (64; synthetic: 8)")
    ap.add_argument("--stem", choices=("cifar", "imagenet"), default="cifar")
    ap.add_argument("--rotate", type=float, default=15.0, help="augmentation rotation (degrees)")
    ap.add_argument("--device", default=None, help="default cuda when available, else cpu")
    ap.add_argument("--amp", choices=("bf16", "none"), default=None,
                    help="autocast dtype (default bf16 on CUDA, none on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: 1 with --synthetic, else torch's default)")
    ap.add_argument("--stats-every", type=int, default=1, help="record layer_stats() every N steps")
    ap.add_argument("--log-every", type=int, default=10, help="print a line every N epochs")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = ap.parse_args(argv)
    syn = args.synthetic
    args.preset = args.preset or ("small" if syn else "paper")
    args.batch_sizes = args.batch_sizes or ([32, 64] if syn else list(PAPER_BATCH_SIZES))
    args.optimizers = args.optimizers or ["wa-lars", "tvlars", "lamb"]
    args.epochs = args.epochs or (2 if syn else 100)
    args.width = args.width or (8 if syn else 64)
    args.micro_batch = args.micro_batch or (16 if syn else 1024)
    if syn:
        args.warmup_epochs = min(args.warmup_epochs, args.epochs / 2)
        args.delay_epochs = min(args.delay_epochs, args.epochs / 2)
        args.log_every = min(args.log_every, args.epochs)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.synthetic:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    args.channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lamb_choice.use(args.lamb)
    lamb = lamb_source()
    if "lamb" in args.optimizers and lamb is None:
        print(f"LAMB skipped: {lamb_missing()}")
        args.optimizers = [o for o in args.optimizers if o != "lamb"]

    if args.synthetic:   # the stand-in data set goes next to the results (a temp dir by default)
        args.out_dir = args.out_dir or os.path.join(tempfile.mkdtemp(prefix="cifar10-synthetic-"),
                                                    "out")
        args.data_dir = write_synthetic_cifar(os.path.join(args.out_dir, "synthetic-data"))
        print(f"synthetic stand-in for CIFAR-10 (random class patterns + noise, the real file "
              f"format) in {args.data_dir}")
    args.out_dir = args.out_dir or os.path.join("runs", "repro_cifar10")
    plan = plan_runs(args)
    versions, warnings = version_report(["torch", "numpy", "pytorch-optimizer", "matplotlib"])
    print(f"versions: {versions}, tvlars_fused {getattr(tvlars_fused, '__version__', '?')}; LAMB: "
          f"{lamb}; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", autocast {args.amp}")
    for w in warnings:   # (pins.version_report: pytorch-optimizer's pin included)
        if w:
            print(w)
    per = {}
    for cfg in plan:
        per[(cfg.batch_size, cfg.optimizer)] = per.get((cfg.batch_size, cfg.optimizer), 0) + 1
    print(f"plan: {len(plan)} runs of {args.epochs} epochs (preset {args.preset}, seeds {args.seeds}): "
          + "; ".join(f"B={b}: " + ", ".join(f"{LABELS[o]} {per[(b, o)]}" for o in args.optimizers
                                              if (b, o) in per) for b in args.batch_sizes))
    print(f"ResNet-18 width {args.width}, {args.stem} stem; micro-batch <= {args.micro_batch}; "
          f"TVLARS: delay {args.delay_epochs:g} epochs, alpha {args.alpha:g}, gamma_min = B/"
          f"{args.base_batch} x 1e-3" + (f" (overridden: {args.gamma_min:g})" if args.gamma_min
                                          is not None else "")
          + f", norm_clip {args.norm_clip}; WA-LARS/LAMB: warm-up {args.warmup_epochs:g} epochs + "
          f"cosine; selection on "
          + (f"a validation split of {args.holdout} images" if args.holdout else "the test set"))
    if device.type != "cuda" and not args.synthetic:
        print("warning: no GPU; ResNet-18 on CIFAR-10 on a CPU takes hours per run")
    runs_csv = os.path.join(args.out_dir, "runs.csv")
    sig = config_signature(args, lamb)
    rows = read_rows(runs_csv, sig)
    other = len(read_rows(runs_csv)) - len(rows)
    if other:
        print(f"note: {runs_csv} also holds {other} runs made with other settings (ignored; their "
              f"curves/ and stats/ files may be overwritten: use another --out-dir to keep them)")
    todo = [c for c in plan if c.key not in rows]
    if len(todo) < len(plan):
        print(f"{len(plan) - len(todo)} of {len(plan)} runs already in {runs_csv}: skipped")
    if args.dry_run:
        for cfg in plan:
            print("  " + cfg.key + ("  (done)" if cfg.key in rows else ""))
        return 0

    tx, ty, ex, ey = load_cifar10(args.data_dir)
    vx = vy = None
    if args.holdout:
        g = torch.Generator().manual_seed(12345)
        perm = torch.randperm(len(tx), generator=g)
        held, kept = perm[:args.holdout], perm[args.holdout:]
        vx, vy, tx, ty = tx[held], ty[held], tx[kept], ty[kept]
    print(f"data: {len(tx)} train / {len(ex)} test images"
          + (f" / {len(vx)} validation (held out of the training set)" if vx is not None else "")
          + f" from {find_cifar_dir(args.data_dir)}")
    data = tuple(None if t is None else t.to(device) for t in (tx, ty, ex, ey, vx, vy))
    for sub in ("curves", "stats"):
        os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
    t_start = time.perf_counter()
    for i, cfg in enumerate(todo, 1):
        h = run_one(cfg, data, args, device)
        with open(os.path.join(args.out_dir, "curves", cfg.key + ".json"), "w") as f:
            json.dump({k: v for k, v in h.items() if k not in ("stats", "stats_steps")}, f)
        if "stats" in h:
            torch.save({"stats": h["stats"], "steps": h["stats_steps"], "names": h["param_names"],
                        "param_ndim": h["param_ndim"],
                        "columns": list(stat_names(h["stats"].shape[-1]))},
                       os.path.join(args.out_dir, "stats", cfg.key + ".pt"))
        row = run_row(h, args, lamb)
        append_row(runs_csv, row)
        rows[cfg.key] = {k: str(v) for k, v in row.items()}
        el = time.perf_counter() - t_start
        print(f"[{i}/{len(todo)}] {cfg.key}: final test acc {row['final_test_acc']:.2f}% (best "
              f"{row['best_test_acc']:.2f}% at epoch {row['best_epoch']}) in {h['seconds']:.0f} s; "
              f"{h['desc']}; about {el / i * (len(todo) - i) / 60:.0f} min left")

    rows = read_rows(runs_csv, sig)
    summary_rows, md = summarise(plan, rows, args)
    header = [f"# ResNet-18 on CIFAR-10: WA-LARS vs TVLARS vs LAMB ({args.preset} grid"
              + (", synthetic stand-in data" if args.synthetic else "") + ")", "",
              f"{args.epochs} epochs, seeds {args.seeds}; versions: {versions}; LAMB: {lamb}; "
              f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                    else "") + ".", ""]
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("\n".join(header + md) + "\n")
    if summary_rows:
        with open(os.path.join(args.out_dir, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary_rows[0]))
            w.writeheader()
            w.writerows(summary_rows)
    print("\n" + "\n".join(md) + "\n")
    written = [os.path.join(args.out_dir, n) for n in ("runs.csv", "results.csv", "results.md")]
    try:
        best = best_keys(plan, rows, args)
        p = plot_accuracy(best, args, os.path.join(args.out_dir, "accuracy.png"))
        written += [p] if p else []
        for b in args.batch_sizes:
            p = plot_layers(best, b, args, os.path.join(args.out_dir, f"layers_B{b}.png"))
            written += [p] if p else []
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figures")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
