"""examples/large_batch_digits.py runs end to end: trains every optimizer over several seeds,
checks fused vs reference TVLARS, writes its figure and its tables; --grid tunes the lr scales on
a validation split. Needs scikit-learn and matplotlib (skipped without them)."""
import csv
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "large_batch_digits.py")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                       reason="the example needs scikit-learn (pip install scikit-learn)"),
    pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                       reason="the example's figure needs matplotlib (pip install matplotlib)"),
]


def load_example():
    spec = importlib.util.spec_from_file_location("large_batch_digits", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["large_batch_digits"] = mod
    spec.loader.exec_module(mod)
    return mod


def run_example(tmp_path, *args, timeout, check=True):
    out = tmp_path / "digits.png"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert out.exists() and out.stat().st_size > 10_000, "no figure written"
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    if check:
        m = re.search(r"^fused-vs-reference check: (PASS|FAIL) .*float64 runs (\S+), float32 steps "
                      r"(\S+)\)$", proc.stdout, re.M)
        assert m, proc.stdout
        assert m.group(1) == "PASS", proc.stdout
        assert float(m.group(2)) <= 1e-5 and float(m.group(3)) <= 1e-5
    line = re.search(r"^final test accuracy \(mean over (\d+) seeds\): (.*?) \|", proc.stdout, re.M)
    assert line, proc.stdout
    acc = {name: float(v) for name, v in re.findall(r"(WA-LARS|TVLARS|LAMB) ([\d.]+)%", line.group(2))}
    return proc.stdout, acc, int(line.group(1))


def test_example_quick(tmp_path):
    stdout, acc, n_seeds = run_example(tmp_path, "--quick", timeout=120)
    assert "test-accuracy curves identical" in stdout
    assert {"WA-LARS", "TVLARS"} <= set(acc) and n_seeds == 2
    md = (tmp_path / "digits.md").read_text()
    assert "| optimizer | lr (scale × base) | final |" in md
    assert re.search(r"\| TVLARS − WA-LARS, final \| [+-][\d.]+ \| [+-][\d.]+ \| [+-][\d.]+ ± [\d.]+ \|",
                     md), md
    with open(tmp_path / "digits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(acc) and {r["seed"] for r in rows} == {"0", "1"}
    assert {r["split_seed"] for r in rows} == {"0"}
    # the final table is the mean of the per-seed rows
    for name, mean in acc.items():
        vals = [float(r["final_acc"]) for r in rows if r["optimizer"] == name]
        assert abs(sum(vals) / len(vals) - mean) < 0.006


def test_example_quick_grid(tmp_path):
    stdout, acc, _ = run_example(tmp_path, "--quick", "--epochs", "2", "--grid", "--grid-scales",
                                 "1", "2", "--no-check", timeout=120, check=False)
    assert "chosen scales (best mean validation accuracy):" in stdout
    assert stdout.count("final runs identical to the grid's test runs") == len(acc)
    grid = (tmp_path / "digits_grid.md").read_text()
    assert grid.count("**(chosen)**") == len(acc)
    with open(tmp_path / "digits_grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(acc) * 2 * 2   # (validation, test) x optimizers x scales x seeds
    assert {r["eval_set"] for r in rows} == {"validation", "test"}
    assert {r["n_eval"] for r in rows if r["eval_set"] == "validation"} == {"288"}


def test_split_is_fixed_and_validation_comes_from_the_training_part():
    ex = load_example()
    a, b = ex.load_data(0), ex.load_data(0)
    assert all((x == y).all() for x, y in zip(a, b))
    assert len(a[0]) == 1437 and len(a[2]) == 360
    tr, te = ex.split_indices(0)
    tr2, va = ex.split_indices(0, 0.2)
    assert len(tr2) == 1149 and len(va) == 288
    assert set(tr2) | set(va) == set(tr) and not set(va) & set(te) and not set(tr) & set(te)
    assert ex.split_indices(1)[1] != te      # another split seed, another split


def test_paired_statistics():
    ex = load_example()
    p = ex.paired([98.0, 97.5, 97.0, 98.5], [97.5, 97.5, 97.5, 97.0])
    assert p["diffs"] == pytest.approx([0.5, 0.0, -0.5, 1.5])
    assert p["mean"] == pytest.approx(0.375) and (p["higher"], p["tied"], p["lower"]) == (2, 1, 1)
    sd = (sum((d - 0.375) ** 2 for d in p["diffs"]) / 3) ** 0.5
    assert p["sd"] == pytest.approx(sd)
    assert p["hi"] - p["mean"] == pytest.approx(3.182 * sd / 2)


@pytest.mark.slow
def test_example_full(tmp_path):
    stdout, acc, n_seeds = run_example(tmp_path, timeout=900)
    # a real run learns: ~97-98% on the 360 test digits (chance: 10%), here as a mean over seeds
    assert n_seeds == 10
    assert acc["WA-LARS"] > 90 and acc["TVLARS"] > 90, stdout
    if "LAMB" in acc:
        assert acc["LAMB"] > 90, stdout


def test_example_lamb_choice(tmp_path):
    """The LAMB baseline is tvlars_fused.LAMB with the paper's options by default; --lamb
    pytorch-optimizer swaps in pytorch-optimizer's Lamb (each named in the output)."""
    stdout, acc, _ = run_example(tmp_path, "--quick", "--epochs", "2", "--no-check", timeout=120, check=False)
    assert "LAMB: tvlars_fused.LAMB (" in stdout and "bias_correction='moments'" in stdout, stdout
    assert "LAMB" in acc
    if importlib.util.find_spec("pytorch_optimizer") is None:
        pytest.skip("pytorch-optimizer is not installed")
    other, acc2, _ = run_example(tmp_path, "--quick", "--epochs", "2", "--no-check", "--lamb", "pytorch-optimizer",
                                 timeout=120, check=False)
    assert "LAMB: pytorch_optimizer.Lamb " in other, other
    assert acc2["WA-LARS"] == acc["WA-LARS"] and acc2["TVLARS"] == acc["TVLARS"]   # only LAMB changes
    assert acc2["LAMB"] != acc["LAMB"]


def test_example_grid_for_one_optimizer(tmp_path):
    """--grid-optimizers LAMB tunes only LAMB: the grid's tables hold LAMB alone, the others run at
    their default scales."""
    stdout, acc, _ = run_example(tmp_path, "--quick", "--epochs", "2", "--grid", "--grid-optimizers", "LAMB",
                                 "--grid-scales", "1", "2", "--no-check", timeout=120, check=False)
    assert "lr grid for LAMB only; WA-LARS at scale" in stdout, stdout
    assert stdout.count("final runs identical to the grid's test runs") == 1
    with open(tmp_path / "digits_grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} == {"LAMB"} and len(rows) == 2 * 2 * 2
    assert set(acc) == {"WA-LARS", "TVLARS", "LAMB"}
