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

# partials acc [C, PART_COLS]: per chunk sum(w^2), sum(d^2), sum(g^2)
PART_W2, PART_D2, PART_G2 = 0, 1, 2
PART_COLS = 3
# a segment's sum: its chunk partials in tiles of REDUCE_TILE chunks, each tile a pairwise tree
# (docs/SPEC.md, "The segment sum"), the tiles added in chunk order
REDUCE_TILE = 1024

# stats acc [S, STAT_COLS]: per segment, from the last step that updated it (norms after norm_clip)
STAT_WEIGHT_NORM, STAT_UPDATE_NORM, STAT_TRUST_RATIO, STAT_PHI, STAT_GRAD_NORM, STAT_WEIGHT_DECAY = range(6)
STAT_COLS = 6
STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "phi", "grad_norm", "weight_decay")

# group_table acc [G, GROUP_COLS]: one row per param group
COL_LR, COL_MOMENTUM, COL_WEIGHT_DECAY, COL_ETA = 0, 1, 2, 3
COL_LMBDA, COL_DELAY, COL_ALPHA, COL_GAMMA_MIN = 4, 5, 6, 7
COL_NORM_CLIP = 8          # +inf when norm_clip is None
COL_USE_PHI = 9            # 1.0 for TVLARS, 0.0 for LARS (phi == 1)
COL_FORM = 10              # the momentum form: FORMS[momentum_form]
COL_HOLD = 11              # hold_steps: phi(t) = 1 while t < hold_steps
COL_EPS = 12               # added to the trust ratio's denominator
COL_UNDAMPED = 13          # 1 - dampening
COL_GRAD_SIGN = 14         # -1.0 with maximize, else 1.0
COL_GFLAGS = 15            # the group's switches (GF_* bits), as a float
GROUP_COLS = 16

# momentum forms (COL_FORM)
FORM_HEAVY_BALL, FORM_PAPER, FORM_LR_SCALED = 0, 1, 2
FORMS = {"heavy_ball": FORM_HEAVY_BALL, "paper": FORM_PAPER, "lr_scaled": FORM_LR_SCALED}

# bits of group_table[:, COL_GFLAGS]
GF_GRAD_DENOMINATOR = 1    # denominator="grad": ||g|| + wd*||w|| (else ||g + wd*w||)
GF_TRUST_CLIP = 2          # q = min(q / lr, 1)
GF_NO_ADAPT = 4            # the group takes no trust ratio (adapt=False, or always_adapt=False and wd == 0)
GF_PLAIN_ZERO = 8          # plain_step_on_zero_norm: a zero norm gives the plain gradient step (no wd)
GF_NESTEROV = 16

# bits of seg_table[:, SEG_FLAGS]
FLAG_SKIP_WEIGHT_DECAY = 1   # weight_decay_filter and ndim == 1
FLAG_SKIP_ADAPTATION = 2     # lars_adaptation_filter and ndim == 1
FLAG_FIRST_STEP = 4          # the parameter's first update (heavy_ball with dampening: buf = u, as torch)
