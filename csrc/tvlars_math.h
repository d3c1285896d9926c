// The TVLARS/LARS math of docs/SPEC.md, shared by the CPU kernel (tvlars_cpu.cpp) and the CUDA
// kernels (tvlars_cuda.cu): per-element direction and update, the per-segment phi(t) and trust
// ratio (table layouts: abi.h). Every function is __host__ __device__ under nvcc and plain inline on the
// host compiler.
//
// Rounding: every multiply and add below is a separate IEEE operation. On the device they go
// through __fmul_rn/__fadd_rn (never contracted into an FMA); host code is compiled with
// -ffp-contract=off (setup.py). So for the same inputs (and the same trust ratio q) the CPU and
// CUDA kernels produce the same bits per element, and the CPU kernel's bits do not depend on the
// instruction set the compiler picked.
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "abi.h"

#if defined(__CUDACC__)
#define TVLARS_HD __host__ __device__ __forceinline__
#else
#define TVLARS_HD inline
#endif

namespace tvlars {

// ---- types ------------------------------------------------------------------------------------
// acc: float64 for float64 parameters, float32 otherwise. state: float32 for bfloat16/float16.
template <typename P> struct Types { using acc = float; using state = P; };
template <> struct Types<double> { using acc = double; using state = double; };
template <> struct Types<c10::BFloat16> { using acc = float; using state = float; };
template <> struct Types<c10::Half> { using acc = float; using state = float; };

// ---- exactly rounded arithmetic (no FMA contraction on the device) -----------------------------
// Templates so that the host can also run them on GCC vector types (tvlars_cpu.cpp); on the device
// they are only used with float and double.
#if defined(__CUDA_ARCH__)
namespace device {
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
}  // namespace device
#define TVLARS_ARITH(name, op) \
  template <typename T>        \
  TVLARS_HD T name(T a, T b) { return device::name(a, b); }
#else
#define TVLARS_ARITH(name, op) \
  template <typename T>        \
  TVLARS_HD T name(T a, T b) { return a op b; }
#endif
TVLARS_ARITH(add, +)
TVLARS_ARITH(sub, -)
TVLARS_ARITH(mul, *)
TVLARS_ARITH(div, /)
#undef TVLARS_ARITH

TVLARS_HD float sqrt_(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
TVLARS_HD double sqrt_(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
TVLARS_HD float exp_(float a) {
#if defined(__CUDA_ARCH__)
  return expf(a);
#else
  return std::exp(a);
#endif
}
TVLARS_HD double exp_(double a) {
#if defined(__CUDA_ARCH__)
  return ::exp(a);
#else
  return std::exp(a);
#endif
}
TVLARS_HD float abs_(float a) { return a < 0.0f ? -a : a; }
TVLARS_HD double abs_(double a) { return a < 0.0 ? -a : a; }

// ---- conversions between the parameter dtype and acc --------------------------------------------
// c10's conversions: bfloat16/float16 -> float is exact, float -> bfloat16/float16 rounds to
// nearest even.
template <typename A, typename P> TVLARS_HD A to_acc(P x) { return static_cast<A>(x); }
template <typename P, typename A> TVLARS_HD P from_acc(A x) { return static_cast<P>(x); }


// ---- per element -------------------------------------------------------------------------------
// g' = g * gmul, gmul = (maximize ? -1 : 1) / grad_scale: the gradient as the step uses it.
template <typename A>
TVLARS_HD A scaled_grad(A g, A gmul) { return mul(g, gmul); }

// d = g' + weight_decay * w; the term is left out where the segment's weight decay is 0 (so an
// infinite weight without weight decay does not make d NaN).
template <typename A>
TVLARS_HD A direction(A gs, A w, A weight_decay, bool decay) {
  return decay ? add(gs, mul(weight_decay, w)) : gs;
}

// heavy_ball, torch's SGD momentum (the authors' code, timm, LARC, Lightning):
//   s = first ? u : momentum*s + (1 - dampening)*u ; step = nesterov ? u + momentum*s : s ;
//   w = w - lr*step          (first: the parameter's first update, only flagged with dampening)
template <typename A>
TVLARS_HD void heavy_ball_update(A& w, A& s, A u, A lr, A momentum, A undamped, bool nesterov, bool first) {
  s = first ? u : add(mul(momentum, s), mul(undamped, u));
  w = sub(w, mul(lr, nesterov ? add(u, mul(momentum, s)) : s));
}

// lr_scaled, TensorFlow's ApplyMomentum (the MLPerf LARS): the buffer accumulates lr-scaled steps
//   s = momentum*s + lr*u ; w = w - (nesterov ? lr*u + momentum*s : s)
template <typename A>
TVLARS_HD void lr_scaled_update(A& w, A& s, A u, A lr, A momentum, bool nesterov) {
  const A lu = mul(lr, u);
  s = add(mul(momentum, s), lu);
  w = sub(w, nesterov ? add(lu, mul(momentum, s)) : s);
}

// the paper's Algorithm 1: mn = w - lr*u ; w = mn + momentum*(mn - m) ; m = mn  (s holds m)
template <typename A>
TVLARS_HD void paper_update(A& w, A& s, A u, A lr, A momentum) {
  const A mn = sub(w, mul(lr, u));
  w = add(mn, mul(momentum, sub(mn, s)));
  s = mn;
}

// What pass 2 applies to every element of a segment (q and the weight decay from its stats).
template <typename A>
struct UpdateParams {
  A gmul, weight_decay, q, lr, momentum, undamped;
  int form;
  bool nesterov, first;
};

// Pass 2 on one element (A) or one vector of elements (the CPU kernel's V: every V argument a
// broadcast of the segment's value): u = q*d, then the momentum form.
template <typename V>
TVLARS_HD void update(V& w, V& s, V g, V gmul, V weight_decay, bool decay, V q, V lr, V momentum, V undamped,
                      int form, bool nesterov, bool first) {
  const V u = mul(q, direction(scaled_grad(g, gmul), w, weight_decay, decay));
  if (form == FORM_PAPER) {
    paper_update(w, s, u, lr, momentum);
  } else if (form == FORM_LR_SCALED) {
    lr_scaled_update(w, s, u, lr, momentum, nesterov);
  } else {
    heavy_ball_update(w, s, u, lr, momentum, undamped, nesterov, first);
  }
}

// ---- per segment -------------------------------------------------------------------------------
// phi(t) = 1/(alpha + exp(lmbda*(t - delay_steps))) + gamma_min without overflow: with
// x = lmbda*(t - delay_steps), e = exp(-|x|) <= 1:  x > 0: e/(1 + alpha*e) + gamma_min,
// x <= 0: 1/(alpha + e) + gamma_min.
template <typename A>
TVLARS_HD A phi(A t, A lmbda, A delay_steps, A alpha, A gamma_min) {
  const A x = mul(sub(t, delay_steps), lmbda);
  const A e = exp_(-abs_(x));
  const A core = x > A(0) ? div(e, add(A(1), mul(alpha, e))) : div(A(1), add(alpha, e));
  return add(core, gamma_min);
}

// min(norm, clip), propagating a NaN norm like torch.minimum (clip is +inf for "no clipping")
template <typename A>
TVLARS_HD A clip_norm(A norm, A clip) { return clip < norm ? clip : norm; }

// trust_clip (LARC's clip mode): min(q / lr, 1), a NaN staying NaN as with torch.clamp
template <typename A>
TVLARS_HD A clip_ratio(A q, A lr) {
  const A x = div(q, lr);
  return x > A(1) ? A(1) : x;
}

template <typename A>
struct SegmentStats {
  A wn, dn, q, phi, gn, weight_decay;
};

// From the segment's sums of w^2, d^2 and g'^2 (its chunk partials added as SPEC says), the
// group's table row, the segment flags and t: the stats row (norms after norm_clip, the trust
// ratio, phi(t), and the weight decay pass 2 applies).
template <typename A>
TVLARS_HD SegmentStats<A> segment_stats(A sum_w2, A sum_d2, A sum_g2, const A* group, int64_t seg_flags, float t) {
  SegmentStats<A> r;
  const A clip = group[COL_NORM_CLIP];
  r.wn = clip_norm(sqrt_(sum_w2), clip);
  r.dn = clip_norm(sqrt_(sum_d2), clip);
  r.gn = clip_norm(sqrt_(sum_g2), clip);
  const A tt = static_cast<A>(t);
  r.phi = group[COL_USE_PHI] != A(0) && !(tt < group[COL_HOLD])
              ? phi(tt, group[COL_LMBDA], group[COL_DELAY], group[COL_ALPHA], group[COL_GAMMA_MIN])
              : A(1);
  const int64_t gflags = static_cast<int64_t>(group[COL_GFLAGS]);
  const A wd = (seg_flags & FLAG_SKIP_WEIGHT_DECAY) != 0 ? A(0) : group[COL_WEIGHT_DECAY];
  const bool trust_clip = (gflags & GF_TRUST_CLIP) != 0;
  r.q = A(1);
  r.weight_decay = wd;
  if ((gflags & GF_NO_ADAPT) == 0 && (seg_flags & FLAG_SKIP_ADAPTATION) == 0) {
    const bool grad_form = (gflags & GF_GRAD_DENOMINATOR) != 0;
    if (r.wn > A(0) && (grad_form ? r.gn : r.dn) > A(0)) {
      const A denom = grad_form ? add(add(r.gn, mul(wd, r.wn)), group[COL_EPS]) : add(r.dn, group[COL_EPS]);
      r.q = div(mul(mul(group[COL_ETA], r.phi), r.wn), denom);
      if (trust_clip) r.q = clip_ratio(r.q, group[COL_LR]);
    } else if ((gflags & GF_PLAIN_ZERO) != 0) {
      r.weight_decay = A(0);   // apex LARC / Lightning: a zero norm gives the plain gradient step
    } else if (trust_clip) {
      r.q = clip_ratio(A(1), group[COL_LR]);   // timm: the fallback ratio 1 is clipped too
    }
  }
  return r;
}

// The per-segment parameters of pass 2 from its group row, flags, stats and the grad scale.
template <typename A>
TVLARS_HD UpdateParams<A> update_params(const A* group, int64_t seg_flags, const A* stats_row, A inv_scale) {
  UpdateParams<A> p;
  p.gmul = mul(group[COL_GRAD_SIGN], inv_scale);
  p.weight_decay = stats_row[STAT_WEIGHT_DECAY];
  p.q = stats_row[STAT_TRUST_RATIO];
  p.lr = group[COL_LR];
  p.momentum = group[COL_MOMENTUM];
  p.undamped = group[COL_UNDAMPED];
  p.form = static_cast<int>(group[COL_FORM]);
  p.nesterov = (static_cast<int64_t>(group[COL_GFLAGS]) & GF_NESTEROV) != 0;
  p.first = (seg_flags & FLAG_FIRST_STEP) != 0;
  return p;
}

// pass 1's weight decay for d (before the trust ratio decides anything): the group's, 0 where the
// segment skips it
template <typename A>
TVLARS_HD A pass1_weight_decay(const A* group, int64_t seg_flags) {
  return (seg_flags & FLAG_SKIP_WEIGHT_DECAY) != 0 ? A(0) : group[COL_WEIGHT_DECAY];
}

}  // namespace tvlars
