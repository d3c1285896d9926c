// What every algorithm's math (algo/*.h) is written with, on the CPU and on CUDA: the accumulation
// types, exactly rounded arithmetic, conversions, group-table access and the bucket-step interface
// an algorithm implements. Every function is __host__ __device__ under nvcc and plain inline on
// the host compiler.
//
// Rounding: every multiply, divide, square root and add is a separate IEEE operation. On the device
// they go through __fmul_rn/__fadd_rn/... (never contracted into an FMA); host code is compiled
// with -ffp-contract=off (setup.py). So for the same inputs the CPU and CUDA kernels produce the
// same bits per element, and the CPU kernel's bits do not depend on the instruction set the
// compiler picked.
//
// An algorithm (algo/lars.h, algo/lamb.h) is a struct with:
//   SLOTS                      state slots per element (rows of the state buffer)
//   PASS1_STATE                pass 1 reads and writes the state (LAMB's moments)
//   PASS2_GRAD, PASS2_STATE    pass 2 reads the gradient / writes the state
//   Pass1<A>, pass1_params     per-segment values of pass 1, from the group row, flags, gmul, t
//   pass1<M>(p, w, g, s, wt, ut)  one element (or one CPU vector): updates s[SLOTS] if PASS1_STATE,
//                              returns in wt / ut the weight and update terms whose squares pass 1 sums
//   finish(out, sw, su, sg, group, flags, t)  a segment's sums -> its stats row (STAT_COLS values)
//   Pass2<A>, pass2_params     per-segment values of pass 2, from the group row, flags, the stats
//                              row and gmul (never t: pass 2's block 0 increments it meanwhile)
//   pass2<M>(p, w, g, s)       one element (or vector): the update of w (and s if PASS2_STATE)
// M supplies sqrt for the value type (scalar here; the CPU kernels' SIMD vectors there).
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
// Templates so that the host can also run them on GCC vector types (cpu_kernels.h); on the device
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

// sqrt for scalars (the CUDA kernels and the CPU kernels' scalar tails)
struct ScalarMath {
  template <typename T>
  static TVLARS_HD T sqrt(T x) { return sqrt_(x); }
};

// a broadcast of a scalar to the value type V (V itself for scalars, every lane for GCC vectors)
template <typename V, typename A>
TVLARS_HD V splat(A x) { return V{} + x; }

// beta^k in float64 for an integer k > 0, by binary exponentiation (docs/SPEC.md, "LAMB"): the
// same multiplications as the Triton kernels' pow_int, so every backend forms the same bits.
TVLARS_HD double pow_int(double beta, int64_t k) {
  double r = 1.0, b = beta;
  while (k > 0) {
    if (k & 1) r = mul(r, b);
    b = mul(b, b);
    k >>= 1;
  }
  return r;
}

// ---- conversions between the parameter dtype and acc --------------------------------------------
// c10's conversions: bfloat16/float16 -> float is exact, float -> bfloat16/float16 rounds to
// nearest even.
template <typename A, typename P> TVLARS_HD A to_acc(P x) { return static_cast<A>(x); }
template <typename P, typename A> TVLARS_HD P from_acc(A x) { return static_cast<P>(x); }

// A row of the group table (exact float64 hyperparameters): g[c] is column c rounded once to A,
// g.exact(c) the float64 value, g.flags() the GF_* bits.
template <typename A>
struct GroupRow {
  const double* p;
  TVLARS_HD A operator[](int c) const { return static_cast<A>(p[c]); }
  TVLARS_HD double exact(int c) const { return p[c]; }
  TVLARS_HD int64_t flags() const { return static_cast<int64_t>(p[COL_GFLAGS]); }
};

// the group's weight decay, 0 where the segment skips it
template <typename A>
TVLARS_HD A segment_weight_decay(const GroupRow<A>& g, int64_t seg_flags) {
  return (seg_flags & FLAG_SKIP_WEIGHT_DECAY) != 0 ? A(0) : g[COL_WEIGHT_DECAY];
}

// whether the segment takes the trust ratio at all
template <typename A>
TVLARS_HD bool segment_adapts(const GroupRow<A>& g, int64_t seg_flags) {
  return (g.flags() & GF_NO_ADAPT) == 0 && (seg_flags & FLAG_SKIP_ADAPTATION) == 0;
}

// min(norm, clip), propagating a NaN norm like torch.minimum (clip is +inf for "no clipping")
template <typename A>
TVLARS_HD A clip_norm(A norm, A clip) { return clip < norm ? clip : norm; }

}  // namespace tvlars
