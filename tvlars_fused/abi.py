"""Every table layout and flag the kernels read (docs/SPEC.md, "The bucket ABI"), defined once.

The Triton kernels import these as compile-time constants, the torch backend indexes with them,
and csrc/abi.h mirrors them for the C++/CUDA kernels (tests/test_abi.py checks the two agree).
"""
from __future__ import annotations

ALIGN = 16  # every segment starts at a multiple of ALIGN elements of the flat grad/state buffers

# seg_table int64 [S, SEG_COLS]: one row per parameter (segment)
SEG_OFFSET, SEG_END, SEG_NUMEL, SEG_GROUP, SEG_FLAGS, SEG_FIRST_CHUNK, SEG_NUM_CHUNKS = range(7)
SEG_COLS = 7

# chunk_table int64 [C, CHUNK_COLS]
CHUNK_START, CHUNK_SEG = 0, 1
CHUNK_COLS = 2

# partials acc [C, PART_COLS]: per chunk sum(w^2), sum(d^2)
PART_W2, PART_D2 = 0, 1
PART_COLS = 2
# a segment's sum: its chunk partials in tiles of REDUCE_TILE chunks, each tile a pairwise tree
# (docs/SPEC.md, "The segment sum"), the tiles added in chunk order
REDUCE_TILE = 1024

# stats acc [S, STAT_COLS]: per segment, from the last step that updated it
STAT_WEIGHT_NORM, STAT_UPDATE_NORM, STAT_TRUST_RATIO, STAT_PHI = range(4)
STAT_COLS = 4
STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "phi")

# group_table acc [G, GROUP_COLS]: one row per param group
COL_LR, COL_MOMENTUM, COL_WEIGHT_DECAY, COL_ETA = 0, 1, 2, 3
COL_LMBDA, COL_DELAY, COL_ALPHA, COL_GAMMA_MIN = 4, 5, 6, 7
COL_NORM_CLIP = 8          # +inf when norm_clip is None
COL_USE_PHI = 9            # 1.0 for TVLARS, 0.0 for LARS (phi == 1)
COL_PAPER_FORM = 10        # 1.0 for momentum_form == "paper", 0.0 for "heavy_ball"
GROUP_COLS = 11

# bits of seg_table[:, SEG_FLAGS]
FLAG_SKIP_WEIGHT_DECAY = 1   # weight_decay_filter and ndim == 1
FLAG_SKIP_ADAPTATION = 2     # lars_adaptation_filter and ndim == 1
