"""The table layouts and flags are defined once per language: tvlars_fused/abi.py (Python, Triton,
the torch backend) and csrc/abi.h (the C++/CUDA kernels). They must agree, name for name."""
import re
from pathlib import Path

from tvlars_fused import abi

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "abi.h"


def header_constants() -> dict:
    text = re.sub(r"//[^\n]*", "", HEADER.read_text())
    out = {}
    for decl in re.findall(r"constexpr\s+\w+\s+([^;]+);", text):
        for name, value in re.findall(r"(\w+)\s*=\s*(-?\d+)", decl):
            out[name] = int(value)
    return out


def test_every_header_constant_matches_abi_py():
    consts = header_constants()
    assert len(consts) >= 30, consts   # the parser found the tables
    for name, value in consts.items():
        assert hasattr(abi, name), f"csrc/abi.h defines {name}, tvlars_fused/abi.py does not"
        assert getattr(abi, name) == value, f"{name}: abi.h {value}, abi.py {getattr(abi, name)}"


def test_every_abi_py_constant_is_in_the_header():
    consts = header_constants()
    names = [n for n in vars(abi) if n.isupper() and isinstance(getattr(abi, n), int)]
    assert names and not [n for n in names if n not in consts], [n for n in names if n not in consts]


def test_columns_are_distinct_and_dense():
    for prefix, cols in (("SEG_", abi.SEG_COLS), ("CHUNK_", abi.CHUNK_COLS), ("PART_", abi.PART_COLS),
                         ("STAT_", abi.STAT_COLS), ("COL_", abi.GROUP_COLS)):
        idx = sorted(v for n, v in vars(abi).items()
                     if n.startswith(prefix) and isinstance(v, int) and not n.endswith("COLS"))
        assert idx == list(range(cols)), (prefix, idx)
