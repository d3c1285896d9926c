// LAMB (You et al. 2019; docs/SPEC.md, "LAMB") for the CPU and CUDA bucket steps: the interface
// of arith.h. Pass 1 updates the moments m, v (state slots 0, 1) and sums w'^2, u^2, g'^2; pass 2
// recomputes u from the new moments and reads no gradient.
#pragma once

#include "../arith.h"

namespace tvlars {

struct Lamb {
  static constexpr int ID = ALGO_LAMB;
  static constexpr int SLOTS = LAMB_STATE_SLOTS;   // exp_avg, exp_avg_sq
  static constexpr bool PASS1_STATE = true, PASS2_GRAD = false, PASS2_STATE = false;

  // The per-group values formed in float64 and rounded once to A (k = t + 1).
  template <typename A>
  struct Terms {
    A bc1, bc2, lr_s, s;   // bias corrections (1 unless "moments"), lr*s, the step-size correction s
  };
  template <typename A>
  static TVLARS_HD Terms<A> terms(const GroupRow<A>& g, float t) {
    const int64_t k = static_cast<int64_t>(t) + 1;
    const double bc1 = 1.0 - pow_int(g.exact(LAMB_BETA1), k), bc2 = 1.0 - pow_int(g.exact(LAMB_BETA2), k);
    const bool moments = (g.flags() & GF_BC_MOMENTS) != 0;
    const double s = (g.flags() & GF_BC_STEP_SIZE) != 0      ? div(sqrt_(bc2), bc1)
                     : (g.flags() & GF_BC_FIRST_MOMENT) != 0 ? div(1.0, bc1)
                                                             : 1.0;
    return {static_cast<A>(moments ? bc1 : 1.0), static_cast<A>(moments ? bc2 : 1.0),
            static_cast<A>(mul(g.exact(COL_LR), s)), static_cast<A>(s)};
  }
  // the decoupled weight decay's factor 1 - lr*wd (float64, rounded once)
  template <typename A>
  static TVLARS_HD A decay_factor(const GroupRow<A>& g) {
    return static_cast<A>(sub(1.0, mul(g.exact(COL_LR), g.exact(COL_WEIGHT_DECAY))));
  }

  // which weight-decay term a segment takes (none without weight decay)
  struct Modes {
    bool l2, decoupled, in_update;
  };
  template <typename A>
  static TVLARS_HD Modes modes(const GroupRow<A>& g, A wd) {
    const bool decay = wd != A(0);
    const bool l2 = decay && (g.flags() & GF_WD_L2) != 0, decoupled = decay && (g.flags() & GF_WD_DECOUPLED) != 0;
    return {l2, decoupled, decay && !l2 && !decoupled};
  }

  // u = r + wd*w ("update" mode), r = (m/bc1) / (sqrt(v/bc2) + eps)
  template <typename M, typename V, typename A>
  static TVLARS_HD V direction(V m, V v, V w, A wd, bool in_update, A bc1, A bc2, A eps) {
    const V r = div(div(m, splat<V>(bc1)), add(M::sqrt(div(v, splat<V>(bc2))), splat<V>(eps)));
    return in_update ? add(r, mul(splat<V>(wd), w)) : r;
  }

  // ---- pass 1: the moments, then w'^2, u^2 -------------------------------------------------------
  template <typename A>
  struct Pass1 {
    A gmul, wd, beta1, beta3, beta2, om2, eps, bc1, bc2, factor;
    Modes mode;
  };
  template <typename A>
  static TVLARS_HD Pass1<A> pass1_params(const GroupRow<A>& g, int64_t seg_flags, A gmul, float t) {
    Pass1<A> p;
    p.gmul = gmul;
    p.wd = segment_weight_decay(g, seg_flags);
    p.beta1 = g[LAMB_BETA1];
    p.beta3 = g[LAMB_BETA3];
    p.beta2 = g[LAMB_BETA2];
    p.om2 = g[LAMB_ONE_MINUS_BETA2];
    p.eps = g[LAMB_EPS];
    const Terms<A> tm = terms(g, t);
    p.bc1 = tm.bc1;
    p.bc2 = tm.bc2;
    p.factor = decay_factor(g);
    p.mode = modes(g, p.wd);
    return p;
  }

  template <typename M, typename V, typename A>
  static TVLARS_HD void pass1(const Pass1<A>& p, V w, V g, V* s, V& gs, V& w_term, V& u_term) {
    gs = mul(g, splat<V>(p.gmul));
    const V x = p.mode.l2 ? add(gs, mul(splat<V>(p.wd), w)) : gs;
    s[0] = add(mul(splat<V>(p.beta1), s[0]), mul(splat<V>(p.beta3), x));
    s[1] = add(mul(splat<V>(p.beta2), s[1]), mul(splat<V>(p.om2), mul(x, x)));
    u_term = direction<M>(s[0], s[1], w, p.wd, p.mode.in_update, p.bc1, p.bc2, p.eps);
    w_term = p.mode.decoupled ? mul(w, splat<V>(p.factor)) : w;
  }

  // ---- the stats row: ||w'||, ||u||, q, s, ||g'||, wd; then for pass 2 bc1, bc2, (lr*s)*q ---------
  template <typename A>
  static TVLARS_HD void finish(A* out, A sum_w2, A sum_u2, A sum_g2, const GroupRow<A>& g, int64_t seg_flags,
                               float t) {
    const A wn = clip_norm(sqrt_(sum_w2), g[COL_NORM_CLIP]);
    const A un = sqrt_(sum_u2), gn = sqrt_(sum_g2);
    const A ratio = segment_adapts(g, seg_flags) && wn > A(0) && un > A(0) ? div(wn, add(un, g[LAMB_RATIO_EPS])) : A(1);
    const A q = (g.flags() & GF_TRUST_CLIP) != 0 && ratio > A(1) ? A(1) : ratio;   // timm's lambc; NaN stays
    const Terms<A> tm = terms(g, t);
    out[STAT_WEIGHT_NORM] = wn;
    out[STAT_UPDATE_NORM] = un;
    out[STAT_TRUST_RATIO] = q;
    out[STAT_SCALE] = tm.s;
    out[STAT_GRAD_NORM] = gn;
    out[STAT_WEIGHT_DECAY] = segment_weight_decay(g, seg_flags);
    out[LAMB_STAT_BC1] = tm.bc1;
    out[LAMB_STAT_BC2] = tm.bc2;
    out[LAMB_STAT_STEP] = mul(tm.lr_s, q);
  }

  // ---- pass 2: w = w' - ((lr*s)*q)*u ---------------------------------------------------------------
  template <typename A>
  struct Pass2 {
    A wd, eps, bc1, bc2, factor, step;
    Modes mode;
  };
  static constexpr int VARIANTS = 1;
  template <typename A>
  static TVLARS_HD int variant(const Pass2<A>&) { return 0; }

  template <typename A>
  static TVLARS_HD Pass2<A> pass2_params(const GroupRow<A>& g, int64_t, const A* stats_row, A) {
    Pass2<A> p;
    p.wd = stats_row[STAT_WEIGHT_DECAY];
    p.eps = g[LAMB_EPS];
    p.bc1 = stats_row[LAMB_STAT_BC1];
    p.bc2 = stats_row[LAMB_STAT_BC2];
    p.factor = decay_factor(g);
    p.step = stats_row[LAMB_STAT_STEP];
    p.mode = modes(g, p.wd);
    return p;
  }

  template <typename M, int FORM = -1, typename V, typename A>
  static TVLARS_HD void pass2(const Pass2<A>& p, V& w, V /*g*/, V* s) {
    const V u = direction<M>(s[0], s[1], w, p.wd, p.mode.in_update, p.bc1, p.bc2, p.eps);
    const V wq = p.mode.decoupled ? mul(w, splat<V>(p.factor)) : w;
    w = sub(wq, mul(splat<V>(p.step), u));
  }
};

}  // namespace tvlars
