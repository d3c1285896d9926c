"""setup.py's choice of the CUDA toolkit (CUDA_HOME) for the extension build: where nvcc is a wrapper
outside the toolkit, torch's own guess cannot link (`cannot find -lcudart`)."""
import ast
import glob
import os
import shutil
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
