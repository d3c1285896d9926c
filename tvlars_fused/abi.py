"""Every table layout and flag the kernels read (docs/SPEC.md, "The bucket ABI"), defined once.

The Triton kernels import these as compile-time constants, the torch backend indexes with them,
and csrc/abi.h mirrors them for the C++/CUDA kernels (tests/test_abi.py checks the two agree).
"""
from __future__ import annotations

ALIGN = 16  # every segment starts at a multiple of ALIGN elements of the flat grad/state buffers

# the layer-wise algorithms (the ops' `algorithm` argument; tvlars_fused/algorithms/)
ALGO_LARS, ALGO_LAMB = 0, 1
# state slots per element: rows of the state buffer [slots, N], in the order of the algorithm's
# state keys (LARS: the momentum buffer or the paper's m; LAMB: exp_avg, exp_avg_sq)
LARS_STATE_SLOTS, LAMB_STATE_SLOTS = 1, 2

# seg_table int64 [S, SEG_COLS]: one row per parameter (segment)
SEG_OFFSET, SEG_END, SEG_NUMEL, SEG_GROUP, SEG_FLAGS, SEG_FIRST_CHUNK, SEG_NUM_CHUNKS = range(7)
SEG_COLS = 7

# chunk_table int64 [C, CHUNK_COLS]
CHUNK_START, CHUNK_SEG = 0, 1
CHUNK_COLS = 2

# partials acc [C, PART_COLS]: per chunk the sums of squares of the three vectors whose norms the
# trust ratio uses: the weights w (LAMB: w after decoupled decay), the update direction (LARS:
# d = g' + wd*w; LAMB: u = r + wd*w) and the gradient g'
PART_W2, PART_U2, PART_G2 = 0, 1, 2
PART_COLS = 3
# a segment's sum: its chunk partials in tiles of REDUCE_TILE chunks, each tile a pairwise tree
# (docs/SPEC.md, "The segment sum"), the tiles added in chunk order
REDUCE_TILE = 1024

# stats acc [S, STAT_COLS]: per segment, from the last step that updated it (norms after the clip):
# STAT_PUBLIC columns that layer_stats() shows, then values pass 1 hands to pass 2 (pass 2 never
# reads t: its program 0 increments t while the others run)
STAT_WEIGHT_NORM, STAT_UPDATE_NORM, STAT_TRUST_RATIO, STAT_SCALE, STAT_GRAD_NORM, STAT_WEIGHT_DECAY = range(6)
STAT_PUBLIC = 6
LAMB_STAT_BC1, LAMB_STAT_BC2 = 6, 7   # LAMB's bias corrections (1 unless bias_correction="moments")
LAMB_STAT_STEP = 8                    # LAMB's (lr*s)*q: w = w' - that*u
# LARS's first update (heavy_ball with dampening: buf = u, as torch's SGD), decided on the device so
# that a step skipped by found_inf does not count: the host sets PENDING when it starts a
# parameter's state; pass 1 of the step that updates it moves PENDING to FIRST (pass 2 reads FIRST)
LARS_STAT_FIRST, LARS_STAT_PENDING = 6, 7
STAT_COLS = 9
# STAT_SCALE is phi(t) for TVLARS/LARS, LAMB's step-size bias correction s (docs/SPEC.md)
LARS_STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "phi", "grad_norm", "weight_decay")
LAMB_STAT_NAMES = ("weight_norm", "update_norm", "trust_ratio", "step_scale", "grad_norm", "weight_decay")

# group_table float64 [G, GROUP_COLS]: one row per param group, exact hyperparameters (each
# kernel rounds a value to its accumulation dtype where it reads it). Columns every algorithm has:
COL_LR, COL_WEIGHT_DECAY, COL_GRAD_SIGN, COL_GFLAGS, COL_NORM_CLIP = range(5)
#   COL_GRAD_SIGN: -1.0 with maximize, else 1.0; COL_GFLAGS: the group's GF_* bits, as a float;
#   COL_NORM_CLIP: LARS norm_clip / LAMB weight_norm_clip, +inf for none
GROUP_COLS = 16
# then the algorithm's own columns:
LARS_MOMENTUM, LARS_ETA, LARS_LMBDA, LARS_DELAY, LARS_ALPHA, LARS_GAMMA_MIN = range(5, 11)
LARS_USE_PHI = 11          # 1.0 for TVLARS, 0.0 for LARS (phi == 1)
LARS_FORM = 12             # the momentum form: FORMS[momentum_form]
LARS_HOLD = 13             # hold_steps: phi(t) = 1 while t < hold_steps
LARS_EPS = 14              # added to the trust ratio's denominator
LARS_UNDAMPED = 15         # 1 - dampening
LAMB_BETA1, LAMB_BETA2 = 5, 6
LAMB_BETA3 = 7             # 1 - beta1 with grad_averaging, else 1
LAMB_ONE_MINUS_BETA2 = 8
LAMB_EPS = 9               # Adam's epsilon (added to sqrt(v_hat))
LAMB_RATIO_EPS = 10        # added to ||u|| in the trust ratio

# momentum forms (LARS_FORM)
FORM_HEAVY_BALL, FORM_PAPER, FORM_LR_SCALED = 0, 1, 2
FORMS = {"heavy_ball": FORM_HEAVY_BALL, "paper": FORM_PAPER, "lr_scaled": FORM_LR_SCALED}

# bits of group_table[:, COL_GFLAGS]; one namespace, distinct bits for every algorithm
GF_NO_ADAPT = 1            # no trust ratio (adapt=False, or always_adapt=False and weight_decay == 0)
GF_GRAD_DENOMINATOR = 2    # LARS denominator="grad": ||g|| + wd*||w|| (else ||g + wd*w||)
GF_TRUST_CLIP = 4          # LARS: q = min(q / lr, 1); LAMB: q = min(q, 1)
GF_PLAIN_ZERO = 8          # LARS plain_step_on_zero_norm: a zero norm gives the plain gradient step (no wd)
GF_NESTEROV = 16           # LARS
GF_WD_L2 = 32              # LAMB weight_decay_mode="l2": wd*w joins the gradient before the moments
GF_WD_DECOUPLED = 64       # LAMB "decoupled": w' = w*(1 - lr*wd) before the norms and the step
GF_BC_MOMENTS = 128        # LAMB bias_correction="moments": m/(1 - beta1^k), v/(1 - beta2^k)
GF_BC_STEP_SIZE = 256      # LAMB bias_correction="step_size": lr * sqrt(1 - beta2^k)/(1 - beta1^k)
GF_BC_FIRST_MOMENT = 512   # LAMB bias_correction="first_moment": lr / (1 - beta1^k)

# bits of seg_table[:, SEG_FLAGS]
FLAG_SKIP_WEIGHT_DECAY = 1   # weight_decay_filter and ndim == 1
FLAG_SKIP_ADAPTATION = 2     # the adaptation filter and ndim == 1
