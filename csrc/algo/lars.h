// TVLARS / LARS (docs/SPEC.md, "The algorithm") for the CPU and CUDA bucket steps: the interface
// of arith.h. LARS is TVLARS with use_phi = 0 (phi == 1).
#pragma once

#include "../arith.h"

namespace tvlars {

struct Lars {
  static constexpr int ID = ALGO_LARS;
  static constexpr int SLOTS = LARS_STATE_SLOTS;   // the momentum buffer (or the paper's m)
  static constexpr bool PASS1_STATE = false, PASS2_GRAD = true, PASS2_STATE = true;

  // ---- pass 1: d = g' + wd*w (the static weight decay), its norm, ||w||, ||g'|| -----------------
  template <typename A>
  struct Pass1 {
    A gmul, wd;
  };
  template <typename A>
  static TVLARS_HD Pass1<A> pass1_params(const GroupRow<A>& g, int64_t seg_flags, A gmul, float) {
    return {gmul, segment_weight_decay(g, seg_flags)};
  }

  // d = g' + weight_decay * w; the term is left out where the weight decay is 0 (so an infinite
  // weight without weight decay does not make d NaN)
  template <typename V, typename A>
  static TVLARS_HD V direction(V gs, V w, A wd) {
    return wd != A(0) ? add(gs, mul(splat<V>(wd), w)) : gs;
  }

  template <typename M, typename V, typename A>
  static TVLARS_HD void pass1(const Pass1<A>& p, V w, V g, V* /*s*/, V& gs, V& w_term, V& u_term) {
    gs = mul(g, splat<V>(p.gmul));
    w_term = w;
    u_term = direction(gs, w, p.wd);
  }

  // ---- the stats row ----------------------------------------------------------------------------
  // phi(t) = 1/(alpha + exp(lmbda*(t - delay_steps))) + gamma_min without overflow: with
  // x = lmbda*(t - delay_steps), e = exp(-|x|) <= 1:  x > 0: e/(1 + alpha*e) + gamma_min,
  // x <= 0: 1/(alpha + e) + gamma_min.
  template <typename A>
  static TVLARS_HD A phi(A t, A lmbda, A delay_steps, A alpha, A gamma_min) {
    const A x = mul(sub(t, delay_steps), lmbda);
    const A e = exp_(-abs_(x));
    const A core = x > A(0) ? div(e, add(A(1), mul(alpha, e))) : div(A(1), add(alpha, e));
    return add(core, gamma_min);
  }

  // trust_clip (LARC's clip mode): min(q / lr, 1) written as q >= lr ? 1 : q / lr, the same bits
  // for lr > 0, and 1 at lr = 0 (a schedule reaching 0), never 0/0; a NaN q stays NaN
  template <typename A>
  static TVLARS_HD A clip_ratio(A q, A lr) {
    return q >= lr ? A(1) : div(q, lr);
  }

  // the segment's sums of w^2, d^2, g'^2 -> wn, dn, q, phi, gn, the weight decay pass 2 applies
  template <typename A>
  static TVLARS_HD void finish(A* out, A sum_w2, A sum_d2, A sum_g2, const GroupRow<A>& g, int64_t seg_flags,
                               float t) {
    const A clip = g[COL_NORM_CLIP];
    const A wn = clip_norm(sqrt_(sum_w2), clip);
    const A dn = clip_norm(sqrt_(sum_d2), clip);
    const A gn = clip_norm(sqrt_(sum_g2), clip);
    const A tt = static_cast<A>(t);
    const A ph = g[LARS_USE_PHI] != A(0) && !(tt < g[LARS_HOLD])
                     ? phi(tt, g[LARS_LMBDA], g[LARS_DELAY], g[LARS_ALPHA], g[LARS_GAMMA_MIN])
                     : A(1);
    const int64_t gflags = g.flags();
    const A wd = segment_weight_decay(g, seg_flags);
    const bool trust_clip = (gflags & GF_TRUST_CLIP) != 0;
    A q = A(1), applied_wd = wd;
    if (segment_adapts(g, seg_flags)) {
      const bool grad_form = (gflags & GF_GRAD_DENOMINATOR) != 0;
      if (wn > A(0) && (grad_form ? gn : dn) > A(0)) {
        const A denom = grad_form ? add(add(gn, mul(wd, wn)), g[LARS_EPS]) : add(dn, g[LARS_EPS]);
        q = div(mul(mul(g[LARS_ETA], ph), wn), denom);
        if (trust_clip) q = clip_ratio(q, g[COL_LR]);
      } else if ((gflags & GF_PLAIN_ZERO) != 0) {
        applied_wd = A(0);   // apex LARC / Lightning: a zero norm gives the plain gradient step
      } else if (trust_clip) {
        q = clip_ratio(A(1), g[COL_LR]);   // timm: the fallback ratio 1 is clipped too
      }
    }
    out[STAT_WEIGHT_NORM] = wn;
    out[STAT_UPDATE_NORM] = dn;
    out[STAT_TRUST_RATIO] = q;
    out[STAT_SCALE] = ph;
    out[STAT_GRAD_NORM] = gn;
    out[STAT_WEIGHT_DECAY] = applied_wd;
    // the first update, if this is it (PENDING set by the host when it started the state; this
    // runs only in a step that updates the segment, so a step skipped by found_inf keeps it, and
    // so does a step at momentum 0, which leaves the buffer as it is)
    const bool buffer_moves = g[LARS_MOMENTUM] != A(0);
    out[LARS_STAT_FIRST] = buffer_moves ? out[LARS_STAT_PENDING] : A(0);
    out[LARS_STAT_PENDING] = buffer_moves ? A(0) : out[LARS_STAT_PENDING];
  }

  // ---- pass 2: u = q*d, then the momentum form ---------------------------------------------------
  template <typename A>
  struct Pass2 {
    A gmul, wd, q, lr, momentum, undamped;
    int form;
    bool nesterov, first;
  };
  // the CPU kernels compile pass 2 once per momentum form (VARIANT = the form)
  static constexpr int VARIANTS = 3;
  template <typename A>
  static TVLARS_HD int variant(const Pass2<A>& p) { return p.form; }

  template <typename A>
  static TVLARS_HD Pass2<A> pass2_params(const GroupRow<A>& g, int64_t seg_flags, const A* stats_row, A gmul) {
    Pass2<A> p;
    p.gmul = gmul;
    p.wd = stats_row[STAT_WEIGHT_DECAY];
    p.q = stats_row[STAT_TRUST_RATIO];
    p.lr = g[COL_LR];
    p.momentum = g[LARS_MOMENTUM];
    p.undamped = g[LARS_UNDAMPED];
    p.form = static_cast<int>(g.exact(LARS_FORM));
    p.nesterov = (g.flags() & GF_NESTEROV) != 0;
    p.first = stats_row[LARS_STAT_FIRST] != A(0);
    return p;
  }

  // heavy_ball, torch's SGD momentum (the authors' code, timm, LARC, Lightning):
  //   s = first ? u : momentum*s + (1 - dampening)*u ; step = nesterov ? u + momentum*s : s ;
  //   w = w - lr*step          (first: the parameter's first update, only flagged with dampening)
  // and at momentum 0 (moving: false) w = w - lr*u with s as it was, as torch's SGD keeps no buffer
  template <typename V>
  static TVLARS_HD void heavy_ball(V& w, V& s, V u, V lr, V momentum, V undamped, bool nesterov, bool first,
                                   bool moving) {
    if (!moving) {
      w = sub(w, mul(lr, u));
      return;
    }
    s = first ? u : add(mul(momentum, s), mul(undamped, u));
    w = sub(w, mul(lr, nesterov ? add(u, mul(momentum, s)) : s));
  }

  // lr_scaled, TensorFlow's ApplyMomentum (the MLPerf LARS): the buffer accumulates lr-scaled steps
  //   s = momentum*s + lr*u ; w = w - (nesterov ? lr*u + momentum*s : s)
  template <typename V>
  static TVLARS_HD void lr_scaled(V& w, V& s, V u, V lr, V momentum, bool nesterov) {
    const V lu = mul(lr, u);
    s = add(mul(momentum, s), lu);
    w = sub(w, nesterov ? add(lu, mul(momentum, s)) : s);
  }

  // the paper's Algorithm 1: mn = w - lr*u ; w = mn + momentum*(mn - m) ; m = mn  (s holds m)
  template <typename V>
  static TVLARS_HD void paper(V& w, V& s, V u, V lr, V momentum) {
    const V mn = sub(w, mul(lr, u));
    w = add(mn, mul(momentum, sub(mn, s)));
    s = mn;
  }

  // FORM: the momentum form when known at compile time (the CPU kernels' VARIANT), else -1
  template <typename M, int FORM = -1, typename V, typename A>
  static TVLARS_HD void pass2(const Pass2<A>& p, V& w, V g, V* s) {
    const V u = mul(splat<V>(p.q), direction(mul(g, splat<V>(p.gmul)), w, p.wd));
    const V lr = splat<V>(p.lr), mom = splat<V>(p.momentum);
    const int form = FORM >= 0 ? FORM : p.form;
    if (form == FORM_PAPER) {
      paper(w, s[0], u, lr, mom);
    } else if (form == FORM_LR_SCALED) {
      lr_scaled(w, s[0], u, lr, mom, p.nesterov);
    } else {
      heavy_ball(w, s[0], u, lr, mom, splat<V>(p.undamped), p.nesterov, p.first, p.momentum != A(0));
    }
  }
};

}  // namespace tvlars
