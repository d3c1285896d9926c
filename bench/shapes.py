"""Parameter sets for the benchmark, written out as shape lists (no model libraries needed).

Each set is a list of shapes in the order the model registers its parameters (torchvision for the
ResNets, Hugging Face GPT2LMHeadModel for GPT-2 small, whose lm_head is tied to wte). The counts are
checked by `self_check()` (python -m bench.shapes).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

Shape = Tuple[int, ...]


def _bn(c: int) -> List[Shape]:
    return [(c,), (c,)]  # BatchNorm weight, bias


def resnet18() -> List[Shape]:
    """torchvision resnet18: BasicBlock x [2, 2, 2, 2]."""
    shapes: List[Shape] = [(64, 3, 7, 7)] + _bn(64)
    inplanes = 64
    for planes, blocks, stride in ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            shapes += [(planes, inplanes, 3, 3)] + _bn(planes)
            shapes += [(planes, planes, 3, 3)] + _bn(planes)
            if s != 1 or inplanes != planes:
                shapes += [(planes, inplanes, 1, 1)] + _bn(planes)
            inplanes = planes
    return shapes + [(1000, 512), (1000,)]


def resnet50() -> List[Shape]:
    """torchvision resnet50: Bottleneck (expansion 4) x [3, 4, 6, 3]."""
    shapes: List[Shape] = [(64, 3, 7, 7)] + _bn(64)
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            shapes += [(planes, inplanes, 1, 1)] + _bn(planes)
            shapes += [(planes, planes, 3, 3)] + _bn(planes)
            shapes += [(planes * 4, planes, 1, 1)] + _bn(planes * 4)
            if s != 1 or inplanes != planes * 4:
                shapes += [(planes * 4, inplanes, 1, 1)] + _bn(planes * 4)
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def gpt2_small(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> List[Shape]:
    """GPT-2 small (GPT2LMHeadModel, Conv1D weights stored in x out; lm_head tied to wte)."""
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]                  # ln_1
        shapes += [(d, 3 * d), (3 * d,)]        # attn.c_attn
        shapes += [(d, d), (d,)]                # attn.c_proj
        shapes += [(d,), (d,)]                  # ln_2
        shapes += [(d, 4 * d), (4 * d,)]        # mlp.c_fc
        shapes += [(4 * d, d), (d,)]            # mlp.c_proj
    return shapes + [(d,), (d,)]                # ln_f


def tiny(n: int = 2000, size: int = 64) -> List[Shape]:
    """Stress: many tiny tensors (launch / per-tensor overhead dominates)."""
    return [(size,)] * n


def big(rows: int = 8192, cols: int = 8192) -> List[Shape]:
    """Stress: one 64M-element tensor (pure bandwidth)."""
    return [(rows, cols)]


SETS: Dict[str, List[Shape]] = {
    "resnet18": resnet18(),
    "resnet50": resnet50(),
    "gpt2s": gpt2_small(),
    "tiny2000": tiny(),
    "big64m": big(),
    "host161": tiny(161, 16),
    "host2000": tiny(2000, 16),
}

DESCRIPTIONS = {
    "resnet18": "ResNet-18 (torchvision), incl. BN weights/biases",
    "resnet50": "ResNet-50 (torchvision), incl. BN weights/biases",
    "gpt2s": "GPT-2 small (wte 50257x768, wpe 1024x768, 12 blocks, ln_f; lm_head tied)",
    "tiny2000": "2000 tensors of shape (64,)",
    "big64m": "one 8192x8192 tensor (64M elements)",
    "host161": "161 tensors of 16 elements (ResNet-50's count): step() host overhead",
    "host2000": "2000 tensors of 16 elements: step() host overhead",
}

# (tensors, parameters): the published counts
EXPECTED = {
    "resnet18": (62, 11_689_512),
    "resnet50": (161, 25_557_032),
    "gpt2s": (148, 124_439_808),
    "tiny2000": (2000, 128_000),
    "big64m": (1, 67_108_864),
    "host161": (161, 2_576),
    "host2000": (2000, 32_000),
}


def numel(shape: Shape) -> int:
    return math.prod(shape)


def count(name: str) -> Tuple[int, int]:
    shapes = SETS[name]
    return len(shapes), sum(numel(s) for s in shapes)


def self_check() -> None:
    for name, expected in EXPECTED.items():
        got = count(name)
        assert got == expected, f"{name}: expected (tensors, params) {expected}, got {got}"


self_check()

if __name__ == "__main__":
    for name in SETS:
        t, n = count(name)
        print(f"{name:10s} {t:5d} tensors {n:13,d} params  {DESCRIPTIONS[name]}")
