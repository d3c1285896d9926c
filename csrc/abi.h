// Every table layout and flag of the bucket ABI (docs/SPEC.md), mirroring tvlars_fused/abi.py
// (tests/test_abi.py checks that the two agree).
#pragma once

#include <cstdint>

namespace tvlars {

// every segment starts at a multiple of ALIGN elements of the flat grad/state buffers
constexpr int64_t ALIGN = 16;
// seg_table int64 [S, SEG_COLS]
constexpr int SEG_OFFSET = 0, SEG_END = 1, SEG_NUMEL = 2, SEG_GROUP = 3, SEG_FLAGS = 4,
              SEG_FIRST_CHUNK = 5, SEG_NUM_CHUNKS = 6, SEG_COLS = 7;
// chunk_table int64 [C, CHUNK_COLS]
constexpr int CHUNK_START = 0, CHUNK_SEG = 1, CHUNK_COLS = 2;
// partials acc [C, PART_COLS]: per chunk sum(w^2), sum(d^2), sum(g^2)
constexpr int PART_W2 = 0, PART_D2 = 1, PART_G2 = 2, PART_COLS = 3;
// a segment's sum: its chunk partials in tiles of REDUCE_TILE, each tile a pairwise tree
constexpr int64_t REDUCE_TILE = 1024;
// stats acc [S, STAT_COLS]
constexpr int STAT_WEIGHT_NORM = 0, STAT_UPDATE_NORM = 1, STAT_TRUST_RATIO = 2, STAT_PHI = 3,
              STAT_GRAD_NORM = 4, STAT_WEIGHT_DECAY = 5, STAT_COLS = 6;
// group_table acc [G, GROUP_COLS]
constexpr int COL_LR = 0, COL_MOMENTUM = 1, COL_WEIGHT_DECAY = 2, COL_ETA = 3, COL_LMBDA = 4,
              COL_DELAY = 5, COL_ALPHA = 6, COL_GAMMA_MIN = 7, COL_NORM_CLIP = 8, COL_USE_PHI = 9,
              COL_FORM = 10, COL_HOLD = 11, COL_EPS = 12, COL_UNDAMPED = 13, COL_GRAD_SIGN = 14,
              COL_GFLAGS = 15, GROUP_COLS = 16;
// momentum forms (COL_FORM)
constexpr int FORM_HEAVY_BALL = 0, FORM_PAPER = 1, FORM_LR_SCALED = 2;
// bits of group_table[:, COL_GFLAGS]
constexpr int64_t GF_GRAD_DENOMINATOR = 1, GF_TRUST_CLIP = 2, GF_NO_ADAPT = 4, GF_PLAIN_ZERO = 8,
                  GF_NESTEROV = 16;
// bits of seg_table[:, SEG_FLAGS]
constexpr int64_t FLAG_SKIP_WEIGHT_DECAY = 1, FLAG_SKIP_ADAPTATION = 2, FLAG_FIRST_STEP = 4;

}  // namespace tvlars
