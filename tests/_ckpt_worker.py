"""The fresh-process half of the checkpoint test in tests/test_reliability.py, and the model, data
and optimizer that both halves build from the same seeds.

    python tests/_ckpt_worker.py CKPT_DIR START STOP CASE [CASE ...]

CASE is a case id of tests/backend_cases.py: a backend on the CPU ("torch", "cpu", "triton",
"reference") or on a CUDA device ("cuda-triton", "cuda-cuda", "cuda-torch", "cuda-reference"),
running TVLARS, or LAMB with "-LAMB" appended ("torch-LAMB", "cuda-reference-LAMB"). For each
case: build the model (on the case's device) and optimizer exactly as the test does, load
CKPT_DIR/ckpt_<case>.pt (model, optimizer and LR-scheduler state_dicts saved after START steps),
train steps START..STOP-1 and save the result to CKPT_DIR/resumed_<case>.pt. The test compares it
bit for bit with the run that was never interrupted.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

if not torch.cuda.is_available():   # as tests/conftest.py: before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from backend_cases import BackendCase  # noqa: E402  (this file's folder is on sys.path)

# Per class: the hyperparameters of both groups (the second group adds the class's other form,
# AlgorithmSpec.other_form, and its own lr).
HYPER = {"TVLARS": dict(lr=0.4, momentum=0.9, weight_decay=1e-3, eta=2e-3, lmbda=0.05, delay_steps=2),
         "LAMB": dict(lr=0.04, betas=(0.8, 0.95), weight_decay=1e-2)}
THREADS = 1   # both processes use the same intra-op thread count (bitwise-identical forward/backward)


@contextlib.contextmanager
def same_bits():
    """What both processes run under, so that forward and backward give the same bits in each:
    THREADS intra-op threads and, on a GPU, deterministic cuDNN convolutions (cuDNN's default
    backward algorithms may accumulate with atomics)."""
    n, det, bench = torch.get_num_threads(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.set_num_threads(THREADS)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(n)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_model(seed: int = 0, device="cpu") -> Net:
    """Initialised on the CPU (the same numbers on every device), then moved to `device`."""
    torch.manual_seed(seed)
    return Net().to(device)


def make_optimizer(model: torch.nn.Module, case: BackendCase):
    """The case's class on its backend (or the reference), with two groups (on the 1-D parameters
    the class's other form with both filters: TVLARS the paper's momentum form, LAMB decoupled
    weight decay), and a tensor-free scheduler: everything a state_dict has to carry."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    groups = [{"params": weights}, {"params": vectors, **case.spec.other_form, "lr": 0.2}]
    opt = case.optimizer(**HYPER[case.algo])(groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return opt, sched


def batch(step: int, device="cpu"):
    """Drawn on the CPU from a CPU generator, then moved to `device`."""
    g = torch.Generator().manual_seed(10_000 + step)
    x, y = torch.randn(6, 3, 6, 6, generator=g), torch.randn(6, 5, generator=g)
    return x.to(device), y.to(device)


def train(model, opt, sched, start: int, stop: int) -> None:
    device = next(model.parameters()).device
    for step in range(start, stop):
        x, y = batch(step, device)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def checkpoint(model, opt, sched) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}


def result(model, opt) -> dict:
    """What is compared bit for bit: parameters and buffers, the optimizer's state and step."""
    sd = opt.state_dict()
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "state": {k: ({n: t.detach().clone() for n, t in v.items()} if isinstance(v, dict) else v.detach().clone())
                      for k, v in sd["state"].items()},
            "lrs": [g["lr"] for g in opt.param_groups]}


def resume(ckpt_dir: str, case_id: str, start: int, stop: int) -> None:
    case = BackendCase.from_id(case_id)
    model = make_model(device=case.device)
    opt, sched = make_optimizer(model, case)
    ck = torch.load(os.path.join(ckpt_dir, f"ckpt_{case_id}.pt"), weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    train(model, opt, sched, start, stop)
    torch.save(result(model, opt), os.path.join(ckpt_dir, f"resumed_{case_id}.pt"))


def main(argv) -> None:
    ckpt_dir, start, stop, case_ids = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    with same_bits():
        for case_id in case_ids:
            resume(ckpt_dir, case_id, start, stop)


if __name__ == "__main__":
    main(sys.argv[1:])
