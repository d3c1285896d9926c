"""examples/large_batch_digits.py runs end to end: trains, checks fused vs reference TVLARS and
writes its figure. Needs scikit-learn and matplotlib (skipped without them)."""
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


def run_example(tmp_path, *args, timeout):
    out = tmp_path / "digits.png"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert out.exists() and out.stat().st_size > 10_000, "no figure written"
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    m = re.search(r"^fused-vs-reference check: (PASS|FAIL) .*float64 runs (\S+), float32 steps (\S+)\)$",
                  proc.stdout, re.M)
    assert m, proc.stdout
    assert m.group(1) == "PASS", proc.stdout
    assert float(m.group(2)) <= 1e-5 and float(m.group(3)) <= 1e-5
    acc = {name: float(v) for name, v in
           re.findall(r"(WA-LARS|TVLARS|LAMB) ([\d.]+)%", proc.stdout.split("final test accuracy:")[1])}
    return proc.stdout, acc


def test_example_quick(tmp_path):
    stdout, acc = run_example(tmp_path, "--quick", timeout=120)
    assert "test-accuracy curves identical" in stdout
    assert {"WA-LARS", "TVLARS"} <= set(acc)


@pytest.mark.slow
def test_example_full(tmp_path):
    stdout, acc = run_example(tmp_path, timeout=900)
    # a real run learns: ~97-98% on the 360 test digits (chance: 10%)
    assert acc["WA-LARS"] > 90 and acc["TVLARS"] > 90, stdout
    if "LAMB" in acc:
        assert acc["LAMB"] > 90, stdout
