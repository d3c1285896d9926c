"""examples/repro_cifar10.py: the CIFAR-10 reader (the real file format; never downloads; a clear
message when the files are absent), gradient accumulation (the same step as the full batch), the
paper's grid as planned, and the whole script end to end on its synthetic stand-in data set."""
import csv
import importlib.util
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "repro_cifar10.py")


def load_script():
    spec = importlib.util.spec_from_file_location("repro_cifar10", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repro_cifar10"] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


R = load_script()


def run_script(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# -- the reader ------------------------------------------------------------------------------------
def test_missing_directory_is_named_with_what_belongs_in_it(tmp_path):
    where = tmp_path / "nothing-here"
    with pytest.raises(SystemExit) as exc:
        R.find_cifar_dir(str(where))
    msg = str(exc.value)
    assert str(where / "cifar-10-batches-py") in msg and "does not exist" in msg
    for needed in ("data_batch_1", "data_batch_5", "test_batch", "never downloads", "--data-dir"):
        assert needed in msg, msg


def test_incomplete_directory_lists_the_missing_files(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        R.load_cifar10(str(tmp_path))
    msg = str(exc.value)
    assert "missing: data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch" in msg, msg


def test_cli_without_data_fails_with_the_message(tmp_path):
    proc = run_script("--data-dir", str(tmp_path / "absent"), "--batch-sizes", "32",
                      "--optimizers", "tvlars", "--preset", "small", "--out-dir", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "CIFAR-10 not found" in proc.stderr and str(tmp_path / "absent") in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "runs.csv").exists()


def test_synthetic_files_are_cifar_python_batches_and_read_back(tmp_path):
    d = R.write_synthetic_cifar(str(tmp_path), per_batch=7, n_test=5, seed=3)
    assert d == str(tmp_path / "cifar-10-batches-py")
    with open(os.path.join(d, "data_batch_2"), "rb") as f:   # what torchvision reads
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (7, 3072)
    assert len(entry["labels"]) == 7
    tx, ty, ex, ey = R.load_cifar10(str(tmp_path))   # the parent directory works too
    assert tx.shape == (35, 3, 32, 32) and tx.dtype == torch.uint8 and ex.shape == (5, 3, 32, 32)
    assert torch.equal(tx[7:14], torch.from_numpy(entry["data"].reshape(7, 3, 32, 32)))
    assert ty[7:14].tolist() == entry["labels"] and ty.dtype == torch.int64
    assert R.load_cifar10(d)[3].tolist() == ey.tolist()


def test_reader_accepts_bytes_keys(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "b"
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": [3, 9]}, f, protocol=2)
    x, y = R.read_batch(str(path))
    assert x.shape == (2, 3, 32, 32) and (x.reshape(2, -1) == data).all() and y.tolist() == [3, 9]


# -- gradient accumulation -------------------------------------------------------------------------
class Tiny(nn.Module):   # no BatchNorm: micro-batches then give exactly the full batch's gradient
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _optimizers():
    import tvlars_fused
    from tvlars_fused import reference
    yield "TVLARS", lambda p: tvlars_fused.TVLARS(p, lr=0.5, lmbda=0.1, delay_steps=1, gamma_min=0.01)
    yield "LARS", lambda p: tvlars_fused.LARS(p, lr=0.5, weight_decay=5e-4)
    yield "reference TVLARS", lambda p: reference.TVLARS(p, lr=0.5, lmbda=0.1, delay_steps=1)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from lamb_choice import lamb_source, make_lamb
    if lamb_source() is not None:
        yield "LAMB", lambda p: make_lamb(p, lr=1e-2, weight_decay=5e-4)


@pytest.mark.parametrize("name,make", list(_optimizers()), ids=[n for n, _ in _optimizers()])
@pytest.mark.parametrize("micro", [1, 5, 12])
def test_accumulated_micro_batches_give_the_full_batch_step(name, make, micro):
    """Three optimizer steps on batches of 12 (float64): micro-batches of 1, 5 (5 + 5 + 2) and 12
    give the parameters, momentum included, of the full-batch steps."""
    torch.manual_seed(0)
    ref_model = Tiny().double()
    model = Tiny().double()
    model.load_state_dict(ref_model.state_dict())
    ref_opt, opt = make(list(ref_model.parameters())), make(list(model.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(12, 3, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (12,), generator=g)
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(ref_model(x), y)
        loss.backward()
        ref_opt.step()
        loss_sum, correct = R.accumulate_and_step(model, opt, x, y, micro)
        assert math.isclose(float(loss_sum) / 12, float(loss.detach()), rel_tol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert float((p - q).detach().abs().max() / q.detach().abs().max()) < 1e-12, name


# -- the plan --------------------------------------------------------------------------------------
def test_paper_grid_is_planned_as_documented():
    args = R.parse_args([])
    plan = R.plan_runs(args)
    count = {}
    for c in plan:
        count[(c.batch_size, c.optimizer)] = count.get((c.batch_size, c.optimizer), 0) + 1
    assert args.batch_sizes == [512, 1024, 2048, 4096, 8192, 16384] and args.epochs == 100
    assert [count[(b, "tvlars")] for b in args.batch_sizes] == [12, 15, 18, 28, 42, 49]
    assert all(count[(b, o)] == 3 for b in args.batch_sizes for o in ("wa-lars", "lamb"))
    assert len(plan) == 200
    wa = sorted(c.lr for c in plan if c.batch_size == 16384 and c.optimizer == "wa-lars")
    assert wa == pytest.approx([6.4, 19.2, 32.0])
    assert R.gamma_min_for(16384, args) == pytest.approx(0.064)
    assert R.gamma_min_for(512, args) == pytest.approx(0.002)
    small = R.plan_runs(R.parse_args(["--preset", "small"]))
    assert len(small) == 18
    assert {(c.lr, c.lmbda) for c in small if c.optimizer == "tvlars" and c.batch_size == 4096} \
        == {(17.0, 1e-3)}


def test_tvlars_schedule_uses_the_delay_in_steps_and_gamma_min():
    args = R.parse_args([])
    cfg = R.RunConfig(2048, "tvlars", 12.0, 1e-2, 0)
    opt, sched, phi, _ = R.build_optimizer(cfg, Tiny(), math.ceil(50000 / 2048), args)
    group = opt.param_groups[0]
    assert sched is None and group["delay_steps"] == 250 and group["gamma_min"] == pytest.approx(0.008)
    assert group["alpha"] == 1.0 and group["weight_decay_filter"] and group["lars_adaptation_filter"]
    assert phi(250) == pytest.approx(0.5 + 0.008)
    opt, sched, _, _ = R.build_optimizer(R.RunConfig(2048, "wa-lars", 2.4, None, 0), Tiny(), 25, args)
    lrs = []
    for _ in range(100 * 25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up: 20 epochs x 25 steps from 0, then cosine down to 1e-3 x peak
    assert lrs[0] == 0.0 and lrs[250] == pytest.approx(1.2) and lrs[500] == pytest.approx(2.4)
    assert lrs[-1] == pytest.approx(2.4 * 1e-3, rel=0.01)


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The one command, on the synthetic stand-in: 2 batch sizes (32, 64; micro-batches of 16) x
    3 optimizers x 2 epochs of a width-8 ResNet-18."""
    out = tmp_path_factory.mktemp("repro") / "out"
    proc = run_script("--synthetic", "--out-dir", str(out))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    return out, proc


def test_synthetic_end_to_end(synthetic_run):
    out, proc = synthetic_run
    assert "plan: 6 runs of 2 epochs" in proc.stdout
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["optimizer"] for r in rows} == {"wa-lars", "tvlars", "lamb"} \
        or (len(rows) == 4 and "LAMB skipped" in proc.stdout)
    assert all(int(r["micro_batch"]) == 16 for r in rows)          # batches 32 and 64: accumulated
    assert all(0 <= float(r["final_test_acc"]) <= 100 and r["diverged"] == "0" for r in rows)
    md = (out / "results.md").read_text()
    assert "| batch | optimizer |" in md and "TVLARS minus the best baseline" in md
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for png in ("accuracy.png", "layers_B32.png", "layers_B64.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # layer_stats() of every step; phi as the schedule says (delay: 1 epoch = 4 steps at B=32)
    st = torch.load(out / "stats" / "B32_tvlars_lr2_lm0.001_s0.pt")
    assert st["stats"].shape[:2] == (8, len(st["names"])) and st["steps"] == list(range(8))
    assert st["columns"][:4] == ["weight_norm", "update_norm", "trust_ratio", "phi"]
    import tvlars_fused
    want = torch.tensor([tvlars_fused.phi(t, 1e-3, 4, 1.0, 32 / 256 * 1e-3) for t in range(8)])
    assert torch.allclose(st["stats"][:, 0, 3], want.float(), rtol=1e-6)


def test_rerun_skips_the_runs_it_has(synthetic_run, capsys):
    """A rerun into the same directory trains nothing and rewrites the same tables (in-process:
    cheaper than a second subprocess)."""
    out, _ = synthetic_run
    md = (out / "results.md").read_text()
    (out / "results.md").unlink()
    threads = torch.get_num_threads()
    try:
        assert R.main(["--synthetic", "--out-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out / "runs.csv", newline="") as f:
        n = len(list(csv.DictReader(f)))
    assert f"{n} of {n} runs already in" in capsys.readouterr().out
    assert (out / "results.md").read_text() == md


def test_rerun_with_other_settings_does_not_reuse_the_runs(synthetic_run, capsys):
    """Rows count as done only for the settings they were made with (--dry-run: nothing trains)."""
    out, _ = synthetic_run
    threads = torch.get_num_threads()
    try:
        assert R.main(["--synthetic", "--out-dir", str(out), "--dry-run"]) == 0
        same = capsys.readouterr().out
        assert R.main(["--synthetic", "--out-dir", str(out), "--dry-run", "--epochs", "3"]) == 0
        other = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    with open(out / "runs.csv", newline="") as f:
        n = len(list(csv.DictReader(f)))
    assert f"{n} of {n} runs already in" in same and "B32_tvlars_lr2_lm0.001_s0  (done)" in same
    assert "already in" not in other and f"also holds {n} runs made with other settings" in other
