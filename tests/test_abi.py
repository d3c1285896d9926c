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


def _ints(prefix: str, exclude=("COLS", "SLOTS", "PUBLIC")) -> dict:
    return {n: v for n, v in vars(abi).items()
            if n.startswith(prefix) and isinstance(v, int) and not n.endswith(exclude)}


def test_columns_are_distinct_and_dense():
    for prefix, cols in (("SEG_", abi.SEG_COLS), ("CHUNK_", abi.CHUNK_COLS), ("PART_", abi.PART_COLS)):
        assert sorted(_ints(prefix).values()) == list(range(cols)), prefix
    # stats: the public columns, then each algorithm's hand-off from pass 1 to pass 2
    assert sorted(_ints("STAT_").values()) == list(range(abi.STAT_PUBLIC))
    assert sorted(_ints("LAMB_STAT_").values()) == list(range(abi.STAT_PUBLIC, abi.STAT_COLS))
    lars = sorted(_ints("LARS_STAT_").values())
    assert len(set(lars)) == len(lars) and min(lars) >= abi.STAT_PUBLIC and max(lars) < abi.STAT_COLS
    # the group table: the columns every algorithm has, then each algorithm's own, distinct within it
    common = sorted(_ints("COL_").values())
    assert common == list(range(len(common)))
    for prefix in ("LARS_", "LAMB_"):
        own = [v for n, v in _ints(prefix).items() if not n.startswith(prefix + "STAT_")]
        assert len(set(own)) == len(own) and min(own) == len(common) and max(own) < abi.GROUP_COLS, prefix


def test_flags_are_distinct_bits():
    for prefix in ("GF_", "FLAG_"):
        bits = list(_ints(prefix).values())
        assert all(b > 0 and b & (b - 1) == 0 for b in bits) and len(set(bits)) == len(bits), prefix


def test_algorithms_and_their_state_slots():
    from tvlars_fused.algorithms import LAMB_ALGORITHM, LARS_ALGORITHM, TVLARS_ALGORITHM
    assert {TVLARS_ALGORITHM.id, LARS_ALGORITHM.id, LAMB_ALGORITHM.id} == {abi.ALGO_LARS, abi.ALGO_LAMB}
    for algo in (TVLARS_ALGORITHM, LARS_ALGORITHM, LAMB_ALGORITHM):
        assert all(len(keys) == algo.slots for keys in algo.key_sets), algo
        assert len(algo.stat_names) == abi.STAT_PUBLIC
