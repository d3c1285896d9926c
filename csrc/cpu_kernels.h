// The CPU kernels' inner loops, generic over the algorithm (algo/*.h): pass 1 (the partial sums of
// one chunk, updating the state where the algorithm does) and pass 2 (the update of one chunk),
// for every parameter dtype.
//
// bucket_step_cpu.cpp includes this file several times, each time inside its own namespace and,
// with GCC on x86-64, under its own `#pragma GCC target` (baseline x86-64, AVX2+FMA+F16C,
// AVX-512), and picks one copy at run time. So: no include guard and no #include here. The
// includer provides <cstring>, <type_traits>, arith.h, the algorithms, c10's types,
// TVLARS_ALWAYS_INLINE and <immintrin.h>, and defines
//   TVLARS_VECTOR_EXT  where GCC/Clang vector extensions exist,
//   TVLARS_VEC_BYTES   the native vector width of this copy (16, 32 or 64 bytes),
//   TVLARS_ISA_F16C    where this copy may use the F16C conversion instructions.
// Every copy computes the same bits: the partial sums always have the same lanes (16 float / 8
// double accumulators, however many native vectors that takes), sqrt is the IEEE instruction, and
// nothing is contracted into an FMA (-ffp-contract=off; the per-element math is the algorithm's).
//
// Defines pass1_<algo>_<dtype> and pass2_<algo>_<dtype> for algo in {lars, lamb}, dtype in {f32,
// f64, bf16, f16}.
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
template <typename U>
TVLARS_ALWAYS_INLINE U splat_bits(uint32_t x) {
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
    const u32v r = (f != f) ? splat_bits<u32v>(0x7FC0u) : rounded;
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
    bias = (bias < 0x71000000u) ? splat_bits<u32v>(0x71000000u) : bias;
    base = reinterpret_cast<V>((bias >> 1) + 0x07800000u) + base;
    const u32v bits = reinterpret_cast<u32v>(base);
    const u32v nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const u32v r = (sign >> 16) | ((shl1_w > 0xFF000000u) ? splat_bits<u32v>(0x7E00u) : nonsign);
    vstore(p, __builtin_convertvector(r, u16v));
  }
#endif
  static TVLARS_ALWAYS_INLINE V load_state(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(float* p, V v) { vstore(p, v); }
};
#endif  // TVLARS_VECTOR_EXT

// sqrt of a native vector: the IEEE instruction of this copy's width (one lane at a time where the
// intrinsics are not available). Not always_inline: the algorithms' element functions that call it
// are compiled for the baseline target, so it is inlined where they are, into the flattened entry
// points below (which carry this copy's target).
struct VecMath {
#if defined(TVLARS_VECTOR_EXT)
  static inline f32v sqrt(f32v x) {
#if defined(TVLARS_MULTI_ISA) && TVLARS_VEC_BYTES == 64
    return reinterpret_cast<f32v>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#elif defined(TVLARS_MULTI_ISA) && TVLARS_VEC_BYTES == 32
    return reinterpret_cast<f32v>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#elif defined(TVLARS_MULTI_ISA) && TVLARS_VEC_BYTES == 16
    return reinterpret_cast<f32v>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
#else
    for (int k = 0; k < TVLARS_VEC_BYTES / 4; ++k) x[k] = sqrt_(static_cast<float>(x[k]));
    return x;
#endif
  }
  static inline f64v sqrt(f64v x) {
#if defined(TVLARS_MULTI_ISA) && TVLARS_VEC_BYTES == 64
    return reinterpret_cast<f64v>(_mm512_sqrt_pd(reinterpret_cast<__m512d>(x)));
#elif defined(TVLARS_MULTI_ISA) && TVLARS_VEC_BYTES == 32
    return reinterpret_cast<f64v>(_mm256_sqrt_pd(reinterpret_cast<__m256d>(x)));
#elif defined(TVLARS_MULTI_ISA) && TVLARS_VEC_BYTES == 16
    return reinterpret_cast<f64v>(_mm_sqrt_pd(reinterpret_cast<__m128d>(x)));
#else
    for (int k = 0; k < TVLARS_VEC_BYTES / 8; ++k) x[k] = sqrt_(static_cast<double>(x[k]));
    return x;
#endif
  }
#endif
};

template <typename P, typename = void>
struct HasSimd : std::false_type {};
#if defined(TVLARS_VECTOR_EXT)
template <typename P>
struct HasSimd<P, std::void_t<decltype(Simd<P>::N)>> : std::true_type {};
#endif

// ---- pass 1: sum(w_term^2), sum(u_term^2), sum(g'^2) of one chunk -----------------------------------
// Lane j of the partial sums accumulates elements j, j + L, j + 2L, ... (L = 16 floats / 8 doubles,
// K native vectors of N lanes); the lanes are then folded pairwise. The same on every copy, and in
// the scalar fallback. s[k] points at the chunk's elements of state slot k.
template <class Algo, typename P, typename S, typename A>
TVLARS_ALWAYS_INLINE void chunk_pass1_impl(const P* __restrict w, const P* __restrict g, S* const* s, int64_t n,
                                           const typename Algo::template Pass1<A>& p, A* __restrict out) {
  constexpr int SL = Algo::SLOTS;
  int64_t i = 0;
  constexpr int L = 64 / sizeof(A);
  A sw[L], su[L], sg[L];
  // one element at a time: the scalar fallback and a chunk's last n % L elements
  auto scalar = [&](int64_t at, int j) {
    A sv[SL];
    if constexpr (Algo::PASS1_STATE) {
      for (int k = 0; k < SL; ++k) sv[k] = static_cast<A>(s[k][at]);
    }
    A gs, wt, ut;
    Algo::template pass1<ScalarMath>(p, to_acc<A>(w[at]), to_acc<A>(g[at]), sv, gs, wt, ut);
    if constexpr (Algo::PASS1_STATE) {
      for (int k = 0; k < SL; ++k) s[k][at] = static_cast<S>(sv[k]);
    }
    sw[j] = add(sw[j], mul(wt, wt));
    su[j] = add(su[j], mul(ut, ut));
    sg[j] = add(sg[j], mul(gs, gs));
  };
#if defined(TVLARS_VECTOR_EXT)
  if constexpr (HasSimd<P>::value) {
    using Sd = Simd<P>;
    using V = typename Sd::V;
    constexpr int K = L / Sd::N;
    static_assert(K * Sd::N == L, "the lanes are whole native vectors");
    V vw[K], vu[K], vg[K];
    for (int k = 0; k < K; ++k) vw[k] = vu[k] = vg[k] = V{};
    for (; i + L <= n; i += L) {
      for (int k = 0; k < K; ++k) {
        const int64_t at = i + k * Sd::N;
        V sv[SL];
        if constexpr (Algo::PASS1_STATE) {
          for (int q = 0; q < SL; ++q) sv[q] = Sd::load_state(s[q] + at);
        }
        V gs, wt, ut;
        Algo::template pass1<VecMath>(p, Sd::load(w + at), Sd::load(g + at), sv, gs, wt, ut);
        if constexpr (Algo::PASS1_STATE) {
          for (int q = 0; q < SL; ++q) Sd::store_state(s[q] + at, sv[q]);
        }
        vw[k] = add(vw[k], mul(wt, wt));
        vu[k] = add(vu[k], mul(ut, ut));
        vg[k] = add(vg[k], mul(gs, gs));
      }
    }
    std::memcpy(sw, vw, sizeof sw);
    std::memcpy(su, vu, sizeof su);
    std::memcpy(sg, vg, sizeof sg);
  } else
#endif
  {
    for (int j = 0; j < L; ++j) sw[j] = su[j] = sg[j] = A(0);
    for (; i + L <= n; i += L) {
      for (int j = 0; j < L; ++j) scalar(i + j, j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) scalar(i, j);   // only when a chunk is not a multiple of L long
  for (int h = L / 2; h > 0; h /= 2) {
    for (int j = 0; j < h; ++j) {
      sw[j] = add(sw[j], sw[j + h]);
      su[j] = add(su[j], su[j + h]);
      sg[j] = add(sg[j], sg[j + h]);
    }
  }
  out[PART_W2] = sw[0];
  out[PART_U2] = su[0];
  out[PART_G2] = sg[0];
}

// ---- pass 2: the update of one chunk ------------------------------------------------------------------
// VARIANT: the algorithm's compile-time specialisation (Algo::variant; LARS: the momentum form).
template <class Algo, int VARIANT, typename P, typename S, typename A>
TVLARS_ALWAYS_INLINE void chunk_pass2_impl(P* __restrict w, const P* __restrict g, S* const* s, int64_t n,
                                           const typename Algo::template Pass2<A>& p) {
  constexpr int SL = Algo::SLOTS;
  int64_t i = 0;
#if defined(TVLARS_VECTOR_EXT)
  if constexpr (HasSimd<P>::value) {
    using Sd = Simd<P>;
    using V = typename Sd::V;
    for (; i + Sd::N <= n; i += Sd::N) {
      V wv = Sd::load(w + i);
      V sv[SL];
      for (int k = 0; k < SL; ++k) sv[k] = Sd::load_state(s[k] + i);
      V gv{};
      if constexpr (Algo::PASS2_GRAD) gv = Sd::load(g + i);
      Algo::template pass2<VecMath, VARIANT>(p, wv, gv, sv);
      Sd::store(w + i, wv);
      if constexpr (Algo::PASS2_STATE) {
        for (int k = 0; k < SL; ++k) Sd::store_state(s[k] + i, sv[k]);
      }
    }
  }
#endif
  for (; i < n; ++i) {
    A wv = to_acc<A>(w[i]);
    A sv[SL];
    for (int k = 0; k < SL; ++k) sv[k] = static_cast<A>(s[k][i]);
    Algo::template pass2<ScalarMath, VARIANT>(p, wv, Algo::PASS2_GRAD ? to_acc<A>(g[i]) : A(0), sv);
    w[i] = from_acc<P>(wv);
    if constexpr (Algo::PASS2_STATE) {
      for (int k = 0; k < SL; ++k) s[k][i] = static_cast<S>(sv[k]);
    }
  }
}

template <class Algo, int VARIANT, typename P, typename S, typename A>
TVLARS_ALWAYS_INLINE void chunk_pass2_variant(P* w, const P* g, S* const* s, int64_t n,
                                              const typename Algo::template Pass2<A>& p, int variant) {
  if constexpr (VARIANT + 1 < Algo::VARIANTS) {
    if (variant != VARIANT) return chunk_pass2_variant<Algo, VARIANT + 1, P, S, A>(w, g, s, n, p, variant);
  }
  chunk_pass2_impl<Algo, VARIANT, P, S, A>(w, g, s, n, p);
}

// Non-template entry points per algorithm and dtype (the kernel tables in bucket_step_cpu.cpp
// point at these), flattened: everything they call is inlined into them, under this copy's target.
#define TVLARS_DEFINE_CHUNK_KERNELS(NAME, ALGO, P)                                                          \
  TVLARS_FLATTEN void pass1_##NAME(const P* w, const P* g, Types<P>::state* const* s, int64_t n,                           \
                    const ALGO::Pass1<Types<P>::acc>& p, Types<P>::acc* out) {                               \
    chunk_pass1_impl<ALGO, P, Types<P>::state, Types<P>::acc>(w, g, s, n, p, out);                          \
  }                                                                                                          \
  TVLARS_FLATTEN void pass2_##NAME(P* w, const P* g, Types<P>::state* const* s, int64_t n, const ALGO::Pass2<Types<P>::acc>& p) { \
    chunk_pass2_variant<ALGO, 0, P, Types<P>::state, Types<P>::acc>(w, g, s, n, p, ALGO::variant(p));        \
  }
TVLARS_DEFINE_CHUNK_KERNELS(lars_f32, Lars, float)
TVLARS_DEFINE_CHUNK_KERNELS(lars_f64, Lars, double)
TVLARS_DEFINE_CHUNK_KERNELS(lars_bf16, Lars, c10::BFloat16)
TVLARS_DEFINE_CHUNK_KERNELS(lars_f16, Lars, c10::Half)
TVLARS_DEFINE_CHUNK_KERNELS(lamb_f32, Lamb, float)
TVLARS_DEFINE_CHUNK_KERNELS(lamb_f64, Lamb, double)
TVLARS_DEFINE_CHUNK_KERNELS(lamb_bf16, Lamb, c10::BFloat16)
TVLARS_DEFINE_CHUNK_KERNELS(lamb_f16, Lamb, c10::Half)
#undef TVLARS_DEFINE_CHUNK_KERNELS
