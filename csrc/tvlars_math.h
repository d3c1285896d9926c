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
// g / grad_scale (when given), then + weight_decay * w (unless the segment skips weight decay).
template <typename A>
TVLARS_HD A direction(A g, A w, A scale, A weight_decay, bool has_scale, bool decay) {
  A d = has_scale ? div(g, scale) : g;
  return decay ? add(d, mul(weight_decay, w)) : d;
}

// heavy ball (the authors' code): s = momentum*s + u ; w = w - lr*s
template <typename A>
TVLARS_HD void heavy_ball_update(A& w, A& s, A u, A lr, A momentum) {
  s = add(mul(momentum, s), u);
  w = sub(w, mul(lr, s));
}

// the paper's Algorithm 1: mn = w - lr*u ; w = mn + momentum*(mn - m) ; m = mn  (s holds m)
template <typename A>
TVLARS_HD void paper_update(A& w, A& s, A u, A lr, A momentum) {
  const A mn = sub(w, mul(lr, u));
  w = add(mn, mul(momentum, sub(mn, s)));
  s = mn;
}

template <typename A>
TVLARS_HD void update(A& w, A& s, A u, A lr, A momentum, bool paper) {
  if (paper) {
    paper_update(w, s, u, lr, momentum);
  } else {
    heavy_ball_update(w, s, u, lr, momentum);
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

// q = eta*phi*wn/dn when the segment adapts and both norms are > 0, else 1
template <typename A>
TVLARS_HD A trust_ratio(A wn, A dn, A eta, A ph, bool adapt) {
  return (adapt && wn > A(0) && dn > A(0)) ? div(mul(mul(eta, ph), wn), dn) : A(1);
}

template <typename A>
struct SegmentStats {
  A wn, dn, q, phi;
};

// From the segment's sums of w^2 and d^2 (the chunk partials added in chunk order), the group's
// table row, the segment flags and t: (wn, dn, q, phi) as stored in stats.
template <typename A>
TVLARS_HD SegmentStats<A> segment_stats(A sum_w2, A sum_d2, const A* group, int64_t flags, float t) {
  SegmentStats<A> r;
  r.wn = clip_norm(sqrt_(sum_w2), group[COL_NORM_CLIP]);
  r.dn = clip_norm(sqrt_(sum_d2), group[COL_NORM_CLIP]);
  r.phi = group[COL_USE_PHI] != A(0)
              ? phi(static_cast<A>(t), group[COL_LMBDA], group[COL_DELAY], group[COL_ALPHA],
                    group[COL_GAMMA_MIN])
              : A(1);
  r.q = trust_ratio(r.wn, r.dn, group[COL_ETA], r.phi, (flags & FLAG_SKIP_ADAPTATION) == 0);
  return r;
}

}  // namespace tvlars
