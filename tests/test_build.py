"""The build: setup.py's choice of the CUDA toolkit (CUDA_HOME) for the extension (where nvcc is a
wrapper outside the toolkit, torch's own guess cannot link: `cannot find -lcudart`), and a wheel
that works without the source tree (every subpackage in it)."""
import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def find_cuda_home():
    """setup.py's find_cuda_home, read from the file (importing setup.py runs setup())."""
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "find_cuda_home")
    scope = {"glob": glob, "os": os, "shutil": shutil}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(SETUP), "exec"), scope)
    return scope["find_cuda_home"]()


def toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_user_cuda_home_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "mine"))
    assert find_cuda_home() == str(tmp_path / "mine")


def test_nvcc_symlinked_out_of_the_toolkit_finds_the_toolkit(monkeypatch, tmp_path):
    root = toolkit(tmp_path / "cuda-x")
    wrapper_dir = tmp_path / "wrappers" / "bin"   # <wrappers>/bin/nvcc: no libcudart beside it
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").symlink_to(root / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert find_cuda_home() == str(root)


def test_nvcc_inside_a_toolkit(monkeypatch, tmp_path):
    root = toolkit(tmp_path / "cuda-y")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(root / "bin"))
    assert find_cuda_home() == str(root)


def test_wheel_holds_every_subpackage_and_works_outside_the_tree(tmp_path):
    """`pip install --no-build-isolation .` (README) gets every subpackage: a wheel built without the
    extension, unpacked outside the source tree, imports and steps on the torch backend."""
    root = tmp_path / "src"   # a copy: no build/ left over from other builds, no compiled extension
    shutil.copytree(SETUP.parent, root, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", "gpu-out", "bench", "examples"))
    env = dict(os.environ, TVLARS_FUSED_BUILD_EXT="0")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                          str(tmp_path / "dist"), str(root)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("tvlars_fused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    on_disk = {str(p.parent.relative_to(root)) for p in (root / "tvlars_fused").rglob("__init__.py")}
    in_wheel = {os.path.dirname(n) for n in names if n.endswith("/__init__.py")}
    assert on_disk == in_wheel, (on_disk, in_wheel)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    script = ("import torch, tvlars_fused; assert tvlars_fused.__file__.startswith(%r), tvlars_fused.__file__; "
              "p = torch.nn.Parameter(torch.ones(3)); o = tvlars_fused.LAMB([p], backend='torch'); "
              "p.sum().backward(); o.step(); print('ok', o.backends)") % str(tmp_path / "site")
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and "ok ['torch']" in run.stdout, run.stdout + run.stderr[-3000:]
