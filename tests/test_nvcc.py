"""csrc/bucket_step_cuda.cu compiles with nvcc for sm_80 and sm_90 -- no GPU needed, and a CPU
build of torch's headers is enough -- with no register spills, 128-bit global loads/stores, and no
FMA contraction in the update, for every algorithm and dtype (the CPU and CUDA kernels share
csrc/algo/*.h and csrc/arith.h bit for bit).

One nvcc run (both architectures) with the flags the real build uses: NVCC_FLAGS from setup.py,
torch's COMMON_NVCC_FLAGS and include paths, and the defines BuildExtension adds. -rP shows the
register table:

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_nvcc.py -rP
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU = ROOT / "csrc" / "bucket_step_cuda.cu"
OBJ = "bucket_step_cuda"
ARCHS = ("80", "90")
KERNELS = [(p, a, t) for p in ("pass1", "pass2") for a in ("lars", "lamb")
           for t in ("float32", "float64", "bfloat16", "float16")]
MAX_REGISTERS = 64   # 256-thread blocks: <= 64 registers keeps at least 4 blocks (50%) resident per SM
# LAMB's pass 1 streams w, g and both moments and divides twice per element: about 75 registers
# (3 blocks of 256 threads per SM, still four 128-bit streams in flight per thread), 92 for float64
MAX_REGISTERS_BY_KERNEL = {("pass1", "lamb"): 96}


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


def setup_nvcc_flags():
    """NVCC_FLAGS as written in setup.py (parsed, not imported: importing runs setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no NVCC_FLAGS list")


def nvcc_command(out_dir: Path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    cmd = [NVCC, "-c", str(CU), "-o", str(out_dir / f"{OBJ}.o")]
    cmd += setup_nvcc_flags() + list(COMMON_NVCC_FLAGS)
    cmd += ["-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTVLARS_WITH_CUDA"]
    incs = list(include_paths()) + [sysconfig.get_paths()["include"]]
    cmd += [f"-I{p}" for p in incs]
    # A CPU build of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h (it
    # only matters on Windows); CUDA builds have it and use it.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in incs):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for arch in ARCHS:
        cmd.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    cmd += ["--resource-usage", "-Xptxas", "-v", "-keep", "-keep-dir", str(out_dir)]
    return cmd


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvcc")
    cmd = nvcc_command(out)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, "nvcc failed:\n" + " ".join(cmd) + "\n" + log[-6000:]
    return out, log


def _kernel_id(mangled: str):
    """(pass, algorithm, dtype) of a mangled pass1_kernel<Algo, P> / pass2_kernel<Algo, P>."""
    kind = "pass1" if "pass1_kernel" in mangled else "pass2" if "pass2_kernel" in mangled else None
    if kind is None:
        return None
    tail = mangled.split("_kernel", 1)[1]
    algo = "lars" if "4Lars" in tail else "lamb" if "4Lamb" in tail else tail
    for key, name in (("BFloat16", "bfloat16"), ("Half", "float16"), ("EfE", "float32"), ("EdE", "float64")):
        if key in tail:
            return kind, algo, name
    return kind, algo, tail


def parse_ptxas(log: str):
    """{(arch, pass, dtype): (registers, spill_stores, spill_loads, stack)} from ptxas -v."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            kid = _kernel_id(m.group(1))
            cur = None if kid is None else (m.group(2),) + kid
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out.setdefault(cur, {}).update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out.setdefault(cur, {})["regs"] = int(m.group(1))
    return out


def test_compiles_for_sm80_and_sm90(build):
    out, _ = build
    assert (out / f"{OBJ}.o").stat().st_size > 0
    for arch in ARCHS:
        assert (out / f"{OBJ}.compute_{arch}.cubin").exists()


def test_no_spills_and_register_table(build):
    _, log = build
    usage = parse_ptxas(log)
    lines = [f"{'kernel':8s} {'algo':5s} {'dtype':9s} " + " ".join(f"sm_{a} regs/spill st/ld/stack" for a in ARCHS)]
    for kind, algo, dtype in KERNELS:
        cells = []
        for arch in ARCHS:
            u = usage.get((arch, kind, algo, dtype))
            name = f"{kind} {algo} {dtype} sm_{arch}"
            assert u is not None and "regs" in u, f"no ptxas report for {name}"
            assert u["spill_st"] == 0 and u["spill_ld"] == 0, f"{name} spills: {u}"
            assert u["stack"] == 0, f"{name} uses a stack frame: {u}"
            limit = MAX_REGISTERS_BY_KERNEL.get((kind, algo), MAX_REGISTERS)
            assert u["regs"] <= limit, f"{name}: {u['regs']} registers (at most {limit})"
            cells.append(f"{u['regs']:4d} / {u['spill_st']}/{u['spill_ld']}/{u['stack']}".ljust(30))
        lines.append(f"{kind:8s} {algo:5s} {dtype:9s} " + " ".join(cells))
    print("\n" + "\n".join(lines))


def _ptx_kernels(ptx: str):
    """{(pass, algorithm, dtype): body} of the .entry functions in a PTX file."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+)\s*\((.*?)\n}\n", ptx, re.S):
        kid = _kernel_id(m.group(1))
        if kid is not None:
            out[kid] = m.group(0)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_128bit_access_and_no_fma_in_update(build, arch):
    out, _ = build
    kernels = _ptx_kernels((out / f"{OBJ}.compute_{arch}.ptx").read_text())
    for kind, algo, dtype in KERNELS:
        body = kernels.get((kind, algo, dtype))
        name = f"{kind} {algo} {dtype}"
        assert body is not None, f"{name} missing from the PTX"
        # w and g (and the state) move as 128-bit vectors
        assert re.search(r"ld\.global(\.nc)?\.v(4\.(f32|u32|b32)|2\.(f64|u64|b64))", body), f"{name}: no 128-bit load"
        # every multiply and add is its own rounding (csrc/arith.h), as on the CPU (division and
        # sqrt are the PTX div.rn / sqrt.rn instructions; only LARS's pass 1 calls expf, for
        # phi(t), whose library code uses FMA)
        if (kind, algo) != ("pass1", "lars"):
            assert not re.search(r"\bfma\.rn\.f(32|64)\b", body), f"{name}: contracted FMA"
        # the weights (pass 2) and LAMB's moments (pass 1) are stored 128 bits at a time (the
        # weights through an address computed from the offsets table: a generic-space st.v4)
        if kind == "pass2" or algo == "lamb":
            assert re.search(r"st(\.global)?\.v(4\.(f32|u32|b32)|2\.(f64|u64|b64))", body), f"{name}: no 128-bit store"
