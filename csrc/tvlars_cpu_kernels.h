// The CPU kernels' inner loops: pass 1 (sums of w^2 and d^2 of one chunk) and pass 2 (the update
// of one chunk), for every parameter dtype.
//
// tvlars_cpu.cpp includes this file several times, each time inside its own namespace and, with
// GCC on x86-64, under its own `#pragma GCC target` (baseline x86-64, AVX2+FMA+F16C, AVX-512),
// and picks one copy at run time. So: no include guard and no #include here. The includer
// provides <cstring>, <type_traits>, tvlars_math.h, c10's types, TVLARS_ALWAYS_INLINE and
// <immintrin.h>, and defines
//   TVLARS_VECTOR_EXT  where GCC/Clang vector extensions exist,
//   TVLARS_VEC_BYTES   the native vector width of this copy (16, 32 or 64 bytes),
//   TVLARS_ISA_F16C    where this copy may use the F16C conversion instructions.
// Every copy computes the same bits: the partial sums always have the same lanes (16 float / 8
// double accumulators, however many native vectors that takes), and nothing is contracted into
// an FMA (-ffp-contract=off; the per-element math is tvlars_math.h).
//
// Defines chunk_sums_{f32,f64,bf16,f16} and chunk_update_{f32,f64,bf16,f16}.
// NOLINT(build/header_guard)

// ---- SIMD: GCC/Clang vector extensions at the native width ---------------------------------------
// Simd<P>: V (a native vector of acc), N (its lanes), load/store of P values, load_state/store_state
// of the state dtype.
#if defined(TVLARS_VECTOR_EXT)
typedef float f32v __attribute__((vector_size(TVLARS_VEC_BYTES)));
typedef double f64v __attribute__((vector_size(TVLARS_VEC_BYTES)));
typedef uint32_t u32v __attribute__((vector_size(TVLARS_VEC_BYTES)));
typedef uint16_t u16v __attribute__((vector_size(TVLARS_VEC_BYTES / 2)));

template <typename V, typename T>
TVLARS_ALWAYS_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
TVLARS_ALWAYS_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename A>
TVLARS_ALWAYS_INLINE V broadcast(A x) {
  return V{} + x;
}
template <typename U>
TVLARS_ALWAYS_INLINE U splat(uint32_t x) {
  return U{} + x;
}

template <typename P>
struct Simd;

// float and double: parameters, state and arithmetic share one type, loaded and stored as is
template <typename T, typename VT>
struct SimdNative {
  using V = VT;
  static constexpr int N = TVLARS_VEC_BYTES / sizeof(T);
  static TVLARS_ALWAYS_INLINE V load(const T* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store(T* p, V v) { vstore(p, v); }
  static TVLARS_ALWAYS_INLINE V load_state(const T* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(T* p, V v) { vstore(p, v); }
};
template <>
struct Simd<float> : SimdNative<float, f32v> {};
template <>
struct Simd<double> : SimdNative<double, f64v> {};
template <>
struct Simd<c10::BFloat16> {  // bfloat16 = the upper 16 bits of a float32
  using V = f32v;
  static constexpr int N = TVLARS_VEC_BYTES / 4;
  static TVLARS_ALWAYS_INLINE V load(const c10::BFloat16* p) {
    const u32v u = __builtin_convertvector(vload<u16v>(p), u32v) << 16;
    return reinterpret_cast<V>(u);
  }
  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  static TVLARS_ALWAYS_INLINE void store(c10::BFloat16* p, V f) {
    const u32v u = reinterpret_cast<u32v>(f);
    const u32v rounded = (u + (0x7FFFu + ((u >> 16) & 1u))) >> 16;
    const u32v r = (f != f) ? splat<u32v>(0x7FC0u) : rounded;
    vstore(p, __builtin_convertvector(r, u16v));
  }
  static TVLARS_ALWAYS_INLINE V load_state(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(float* p, V v) { vstore(p, v); }
};
template <>
struct Simd<c10::Half> {
  using V = f32v;
  static constexpr int N = TVLARS_VEC_BYTES / 4;
#if defined(TVLARS_ISA_F16C)
  // The F16C instructions, 8 values at a time: exact, round to nearest even.
  static TVLARS_ALWAYS_INLINE V load(const c10::Half* p) {
    V v;
    for (int k = 0; k < N; k += 8) {
      const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)));
      std::memcpy(reinterpret_cast<char*>(&v) + 4 * k, &f, sizeof f);
    }
    return v;
  }
  static TVLARS_ALWAYS_INLINE void store(c10::Half* p, V v) {
    for (int k = 0; k < N; k += 8) {
      __m256 f;
      std::memcpy(&f, reinterpret_cast<const char*>(&v) + 4 * k, sizeof f);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + k), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
    }
  }
#else
  // float16 <-> float32 as c10::Half's portable conversions (the FP16 library's algorithms),
  // exact and round to nearest even, in integer and float vector operations (GCC 12 would
  // scalarize _Float16 vector conversions). NaN -> 0x7E00 with the sign.
  static TVLARS_ALWAYS_INLINE V load(const c10::Half* p) {
    const u32v w = __builtin_convertvector(vload<u16v>(p), u32v) << 16;
    const u32v sign = w & 0x80000000u;
    const u32v two_w = w + w;
    const V normalized = reinterpret_cast<V>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const V denormalized = reinterpret_cast<V>((two_w >> 17) | (126u << 23)) - 0.5f;
    const u32v r = sign | ((two_w < (1u << 27)) ? reinterpret_cast<u32v>(denormalized)
                                                : reinterpret_cast<u32v>(normalized));
    return reinterpret_cast<V>(r);
  }
  static TVLARS_ALWAYS_INLINE void store(c10::Half* p, V f) {
    const u32v w = reinterpret_cast<u32v>(f);
    V base = (reinterpret_cast<V>(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const u32v shl1_w = w + w;
    const u32v sign = w & 0x80000000u;
    u32v bias = shl1_w & 0xFF000000u;
    bias = (bias < 0x71000000u) ? splat<u32v>(0x71000000u) : bias;
    base = reinterpret_cast<V>((bias >> 1) + 0x07800000u) + base;
    const u32v bits = reinterpret_cast<u32v>(base);
    const u32v nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const u32v r = (sign >> 16) | ((shl1_w > 0xFF000000u) ? splat<u32v>(0x7E00u) : nonsign);
    vstore(p, __builtin_convertvector(r, u16v));
  }
#endif
  static TVLARS_ALWAYS_INLINE V load_state(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(float* p, V v) { vstore(p, v); }
};
#endif  // TVLARS_VECTOR_EXT

template <typename P, typename = void>
struct HasSimd : std::false_type {};
#if defined(TVLARS_VECTOR_EXT)
template <typename P>
struct HasSimd<P, std::void_t<decltype(Simd<P>::N)>> : std::true_type {};
#endif

// ---- pass 1: sum(w^2), sum(d^2), sum(g'^2) of one chunk ---------------------------------------
// Lane j of the partial sums accumulates elements j, j + L, j + 2L, ... (L = 16 floats / 8 doubles,
// K native vectors of N lanes); the lanes are then folded pairwise. The same on every copy, and in
// the scalar fallback.
template <typename P, typename A, bool DECAY>
TVLARS_ALWAYS_INLINE void chunk_sums_impl(const P* __restrict w, const P* __restrict g, int64_t n, A gmul, A wd,
                                          A* __restrict out) {
  int64_t i = 0;
  constexpr int L = 64 / sizeof(A);
  A sw[L], sd[L], sg[L];
#if defined(TVLARS_VECTOR_EXT)
  if constexpr (HasSimd<P>::value) {
    using Sd = Simd<P>;
    using V = typename Sd::V;
    constexpr int K = L / Sd::N;
    static_assert(K * Sd::N == L, "the lanes are whole native vectors");
    const V gmul_v = broadcast<V>(gmul), wd_v = broadcast<V>(wd);
    V vw[K], vd[K], vg[K];
    for (int k = 0; k < K; ++k) vw[k] = vd[k] = vg[k] = V{};
    for (; i + L <= n; i += L) {
      for (int k = 0; k < K; ++k) {
        const V wv = Sd::load(w + i + k * Sd::N);
        const V gs = scaled_grad(Sd::load(g + i + k * Sd::N), gmul_v);
        const V d = direction(gs, wv, wd_v, DECAY);
        vw[k] = add(vw[k], mul(wv, wv));
        vd[k] = add(vd[k], mul(d, d));
        vg[k] = add(vg[k], mul(gs, gs));
      }
    }
    std::memcpy(sw, vw, sizeof sw);
    std::memcpy(sd, vd, sizeof sd);
    std::memcpy(sg, vg, sizeof sg);
  } else
#endif
  {
    for (int j = 0; j < L; ++j) sw[j] = sd[j] = sg[j] = A(0);
    for (; i + L <= n; i += L) {
      for (int j = 0; j < L; ++j) {
        const A wv = to_acc<A>(w[i + j]);
        const A gs = scaled_grad(to_acc<A>(g[i + j]), gmul);
        const A d = direction(gs, wv, wd, DECAY);
        sw[j] = add(sw[j], mul(wv, wv));
        sd[j] = add(sd[j], mul(d, d));
        sg[j] = add(sg[j], mul(gs, gs));
      }
    }
  }
  for (int j = 0; i < n; ++i, ++j) {  // only when a chunk is not a multiple of L long
    const A wv = to_acc<A>(w[i]);
    const A gs = scaled_grad(to_acc<A>(g[i]), gmul);
    const A d = direction(gs, wv, wd, DECAY);
    sw[j] = add(sw[j], mul(wv, wv));
    sd[j] = add(sd[j], mul(d, d));
    sg[j] = add(sg[j], mul(gs, gs));
  }
  for (int h = L / 2; h > 0; h /= 2) {
    for (int j = 0; j < h; ++j) {
      sw[j] = add(sw[j], sw[j + h]);
      sd[j] = add(sd[j], sd[j + h]);
      sg[j] = add(sg[j], sg[j + h]);
    }
  }
  out[PART_W2] = sw[0];
  out[PART_D2] = sd[0];
  out[PART_G2] = sg[0];
}

// Non-template entry points per dtype (the function table in tvlars_cpu.cpp points at these).
#define TVLARS_DEFINE_SUMS(NAME, P, A)                                      \
  void NAME(const P* w, const P* g, int64_t n, A gmul, A wd, A* out) {     \
    if (wd != A(0)) chunk_sums_impl<P, A, true>(w, g, n, gmul, wd, out);   \
    else chunk_sums_impl<P, A, false>(w, g, n, gmul, wd, out);             \
  }
TVLARS_DEFINE_SUMS(chunk_sums_f32, float, float)
TVLARS_DEFINE_SUMS(chunk_sums_f64, double, double)
TVLARS_DEFINE_SUMS(chunk_sums_bf16, c10::BFloat16, float)
TVLARS_DEFINE_SUMS(chunk_sums_f16, c10::Half, float)
#undef TVLARS_DEFINE_SUMS

// ---- pass 2: the update of one chunk -------------------------------------------------------------
// FORM and DECAY are compile-time (they shape the arithmetic); nesterov and first are uniform
// runtime flags the compiler hoists out of the loop.
template <typename P, typename S, typename A, int FORM, bool DECAY>
TVLARS_ALWAYS_INLINE void chunk_update_impl(P* __restrict w, const P* __restrict g, S* __restrict s, int64_t n,
                                            const UpdateParams<A>& up) {
  int64_t i = 0;
#if defined(TVLARS_VECTOR_EXT)
  if constexpr (HasSimd<P>::value) {
    using Sd = Simd<P>;
    using V = typename Sd::V;
    const V gmul = broadcast<V>(up.gmul), wd = broadcast<V>(up.weight_decay), q = broadcast<V>(up.q),
            lr = broadcast<V>(up.lr), mom = broadcast<V>(up.momentum), und = broadcast<V>(up.undamped);
    for (; i + Sd::N <= n; i += Sd::N) {
      V wv = Sd::load(w + i);
      V sv = Sd::load_state(s + i);
      update(wv, sv, Sd::load(g + i), gmul, wd, DECAY, q, lr, mom, und, FORM, up.nesterov, up.first);
      Sd::store(w + i, wv);
      Sd::store_state(s + i, sv);
    }
  }
#endif
  for (; i < n; ++i) {
    A wv = to_acc<A>(w[i]);
    A sv = static_cast<A>(s[i]);
    update(wv, sv, to_acc<A>(g[i]), up.gmul, up.weight_decay, DECAY, up.q, up.lr, up.momentum, up.undamped, FORM,
           up.nesterov, up.first);
    w[i] = from_acc<P>(wv);
    s[i] = static_cast<S>(sv);
  }
}

#define TVLARS_UPDATE_CASE(FORM)                                                               \
  case FORM:                                                                                   \
    if (up.weight_decay != A(0)) chunk_update_impl<P, S, A, FORM, true>(w, g, s, n, up);       \
    else chunk_update_impl<P, S, A, FORM, false>(w, g, s, n, up);                              \
    break;
#define TVLARS_DEFINE_UPDATE(NAME, P_, S_, A_)                                      \
  void NAME(P_* w, const P_* g, S_* s, int64_t n, const UpdateParams<A_>& up) {   \
    using P = P_;                                                                   \
    using S = S_;                                                                   \
    using A = A_;                                                                   \
    switch (up.form) {                                                              \
      TVLARS_UPDATE_CASE(FORM_PAPER)                                                \
      TVLARS_UPDATE_CASE(FORM_LR_SCALED)                                            \
      default: TVLARS_UPDATE_CASE(FORM_HEAVY_BALL)                                  \
    }                                                                               \
  }
TVLARS_DEFINE_UPDATE(chunk_update_f32, float, float, float)
TVLARS_DEFINE_UPDATE(chunk_update_f64, double, double, double)
TVLARS_DEFINE_UPDATE(chunk_update_bf16, c10::BFloat16, float, float)
TVLARS_DEFINE_UPDATE(chunk_update_f16, c10::Half, float, float)
#undef TVLARS_DEFINE_UPDATE
#undef TVLARS_UPDATE_CASE
