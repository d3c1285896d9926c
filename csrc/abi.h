// Every table layout and flag of the bucket ABI (docs/SPEC.md), mirroring tvlars_fused/abi.py
// (tests/test_abi.py checks that the two agree, name for name).
#pragma once

#include <cstdint>

namespace tvlars {

// every segment starts at a multiple of ALIGN elements of the flat grad/state buffers
constexpr int64_t ALIGN = 16;
// the layer-wise algorithms (the ops' `algorithm` argument) and their state slots per element
constexpr int ALGO_LARS = 0, ALGO_LAMB = 1;
constexpr int LARS_STATE_SLOTS = 1, LAMB_STATE_SLOTS = 2;
// seg_table int64 [S, SEG_COLS]
constexpr int SEG_OFFSET = 0, SEG_END = 1, SEG_NUMEL = 2, SEG_GROUP = 3, SEG_FLAGS = 4,
              SEG_FIRST_CHUNK = 5, SEG_NUM_CHUNKS = 6, SEG_COLS = 7;
// chunk_table int64 [C, CHUNK_COLS]
constexpr int CHUNK_START = 0, CHUNK_SEG = 1, CHUNK_COLS = 2;
// partials acc [C, PART_COLS]: per chunk the sums of squares of the weight term, the update
// direction and g'
constexpr int PART_W2 = 0, PART_U2 = 1, PART_G2 = 2, PART_COLS = 3;
// a segment's sum: its chunk partials in tiles of REDUCE_TILE, each tile a pairwise tree
constexpr int64_t REDUCE_TILE = 1024;
// stats acc [S, STAT_COLS]: STAT_PUBLIC columns layer_stats() shows, then what pass 1 hands pass 2
constexpr int STAT_WEIGHT_NORM = 0, STAT_UPDATE_NORM = 1, STAT_TRUST_RATIO = 2, STAT_SCALE = 3,
              STAT_GRAD_NORM = 4, STAT_WEIGHT_DECAY = 5, STAT_PUBLIC = 6;
constexpr int LAMB_STAT_BC1 = 6, LAMB_STAT_BC2 = 7, LAMB_STAT_STEP = 8, STAT_COLS = 9;
// LARS's first update (heavy_ball with dampening), decided on the device (abi.py)
constexpr int LARS_STAT_FIRST = 6, LARS_STAT_PENDING = 7;
// group_table float64 [G, GROUP_COLS]: the columns every algorithm has, then the algorithm's own
constexpr int COL_LR = 0, COL_WEIGHT_DECAY = 1, COL_GRAD_SIGN = 2, COL_GFLAGS = 3, COL_NORM_CLIP = 4,
              GROUP_COLS = 16;
constexpr int LARS_MOMENTUM = 5, LARS_ETA = 6, LARS_LMBDA = 7, LARS_DELAY = 8, LARS_ALPHA = 9,
              LARS_GAMMA_MIN = 10, LARS_USE_PHI = 11, LARS_FORM = 12, LARS_HOLD = 13, LARS_EPS = 14,
              LARS_UNDAMPED = 15;
constexpr int LAMB_BETA1 = 5, LAMB_BETA2 = 6, LAMB_BETA3 = 7, LAMB_ONE_MINUS_BETA2 = 8, LAMB_EPS = 9,
              LAMB_RATIO_EPS = 10;
// momentum forms (LARS_FORM)
constexpr int FORM_HEAVY_BALL = 0, FORM_PAPER = 1, FORM_LR_SCALED = 2;
// bits of group_table[:, COL_GFLAGS]
constexpr int64_t GF_NO_ADAPT = 1, GF_GRAD_DENOMINATOR = 2, GF_TRUST_CLIP = 4, GF_PLAIN_ZERO = 8,
                  GF_NESTEROV = 16, GF_WD_L2 = 32, GF_WD_DECOUPLED = 64, GF_BC_MOMENTS = 128,
                  GF_BC_STEP_SIZE = 256, GF_BC_FIRST_MOMENT = 512;
// bits of seg_table[:, SEG_FLAGS]
constexpr int64_t FLAG_SKIP_WEIGHT_DECAY = 1, FLAG_SKIP_ADAPTATION = 2;

}  // namespace tvlars
