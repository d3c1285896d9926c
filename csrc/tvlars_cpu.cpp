// The bucket step on the CPU (docs/SPEC.md, "The bucket ABI").
//
// Determinism: a chunk's partial sums are computed by one thread in a fixed order (16 float / 8
// double lanes, folded pairwise), and a segment's sums are its chunk partials added in chunk
// order. Which thread computes a chunk, and when, never changes the bits, so 1 thread and N
// threads agree exactly.
//
// Scheduling and cache use (run_bucket_step): the whole step is one parallel region with work
// handed out dynamically. A segment whose w and g fit comfortably in L2 is one work item, done
// start to finish by one thread (pass 1 over its chunks, the reduction, then pass 2 while w and g
// are still in cache). Larger segments are split into runs of chunks; pass 2 of a segment starts
// as soon as its pass 1 is complete, so it re-reads data that was just streamed through; threads
// that would wait for that run pass 1 of the next segments (a bounded window ahead) instead.
// Compared with static splits and a barrier per phase, this keeps a preempted thread (a loaded
// machine, data-loader workers) from stalling the others at every barrier.
//
// Vectorization: GCC/Clang vector extensions over 64-byte vectors (one lane layout whatever the
// instruction set). The hot loops are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and
// baseline x86-64 (GCC function multiversioning, chosen at load time); the results are the same
// bits on each (no FMA contraction: -ffp-contract=off, see tvlars_math.h). Other compilers get a
// scalar loop with the same lane layout.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "tvlars_math.h"
#include "tvlars_ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(TVLARS_NO_MULTIVERSION)
#define TVLARS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TVLARS_CLONES
#endif

#if defined(__GNUC__)
#define TVLARS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TVLARS_ALWAYS_INLINE inline
#endif

namespace tvlars {
namespace {

// Tuning (overridable at build time with -D): segments with at most SMALL_BYTES of w+g are
// processed by one thread in one go; pass 1 of larger ones runs at most one WINDOW_BYTES (of w+g)
// window ahead of pass 2; fewer than MIN_ELEMS_PER_THREAD elements per thread are not worth a
// parallel region.
#ifndef TVLARS_SMALL_BYTES
#define TVLARS_SMALL_BYTES (512 * 1024)
#endif
#ifndef TVLARS_WINDOW_BYTES
#define TVLARS_WINDOW_BYTES (8 * 1024 * 1024)
#endif
#ifndef TVLARS_MIN_ELEMS_PER_THREAD
#define TVLARS_MIN_ELEMS_PER_THREAD (32 * 1024)
#endif
constexpr int64_t SMALL_BYTES = TVLARS_SMALL_BYTES;
constexpr int64_t WINDOW_BYTES = TVLARS_WINDOW_BYTES;
constexpr int64_t MIN_ELEMS_PER_THREAD = TVLARS_MIN_ELEMS_PER_THREAD;

// Per-element values a chunk kernel needs, fixed for the whole segment.
template <typename A>
struct SegParams {
  A scale;         // grad_scale (when has_scale)
  A weight_decay;  // group weight decay
  A lr, momentum;
  bool has_scale, decay, paper;
};

// ---- SIMD: GCC/Clang vector extensions ---------------------------------------------------------
// One "vector" is 64 bytes of acc (16 floats / 8 doubles). The compiler maps its operations onto
// whatever the clone targets (4 SSE, 2 AVX2 or 1 AVX-512 register), always with the same lane
// layout, so the reduction order -- and so the bits -- is the same on every clone.
// Simd<P>: V (acc vector), N (lanes), load/store of P, load_state/store_state of the state dtype.
#if defined(__GNUC__)
#define TVLARS_VECTOR_EXT 1
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

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

template <typename P>
struct Simd;

template <>
struct Simd<float> {
  using V = f32x16;
  static constexpr int N = 16;
  static TVLARS_ALWAYS_INLINE V load(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store(float* p, V v) { vstore(p, v); }
  static TVLARS_ALWAYS_INLINE V load_state(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(float* p, V v) { vstore(p, v); }
};
template <>
struct Simd<double> {
  using V = f64x8;
  static constexpr int N = 8;
  static TVLARS_ALWAYS_INLINE V load(const double* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store(double* p, V v) { vstore(p, v); }
  static TVLARS_ALWAYS_INLINE V load_state(const double* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(double* p, V v) { vstore(p, v); }
};
template <>
struct Simd<c10::BFloat16> {  // bfloat16 = upper 16 bits of a float32
  using V = f32x16;
  static constexpr int N = 16;
  static TVLARS_ALWAYS_INLINE V load(const c10::BFloat16* p) {
    const u32x16 u = __builtin_convertvector(vload<u16x16>(p), u32x16) << 16;
    return reinterpret_cast<V>(u);
  }
  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  static TVLARS_ALWAYS_INLINE void store(c10::BFloat16* p, V f) {
    const u32x16 u = reinterpret_cast<u32x16>(f);
    const u32x16 rounded = (u + (0x7FFFu + ((u >> 16) & 1u))) >> 16;
    const u32x16 qnan = u32x16{} + 0x7FC0u;
    const u32x16 r = (f != f) ? qnan : rounded;
    vstore(p, __builtin_convertvector(r, u16x16));
  }
  static TVLARS_ALWAYS_INLINE V load_state(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(float* p, V v) { vstore(p, v); }
};
#if defined(TVLARS_HOST_FLOAT16)
typedef _Float16 f16x16 __attribute__((vector_size(32)));
template <>
struct Simd<c10::Half> {  // IEEE conversions (F16C where the clone has it), round to nearest even
  using V = f32x16;
  static constexpr int N = 16;
  static TVLARS_ALWAYS_INLINE V load(const c10::Half* p) {
    return __builtin_convertvector(vload<f16x16>(p), V);
  }
  static TVLARS_ALWAYS_INLINE void store(c10::Half* p, V f) { vstore(p, __builtin_convertvector(f, f16x16)); }
  static TVLARS_ALWAYS_INLINE V load_state(const float* p) { return vload<V>(p); }
  static TVLARS_ALWAYS_INLINE void store_state(float* p, V v) { vstore(p, v); }
};
#endif

template <typename V, typename A>
TVLARS_ALWAYS_INLINE V broadcast(A x) {
  return V{} + x;
}
#endif  // __GNUC__

// Scalar fallback (no vector extensions, or float16 without _Float16): one lane.
template <typename P, typename = void>
struct HasSimd : std::false_type {};
#if defined(TVLARS_VECTOR_EXT)
template <typename P>
struct HasSimd<P, std::void_t<decltype(Simd<P>::N)>> : std::true_type {};
#endif

// ---- pass 1: sum(w^2), sum(d^2) of one chunk -----------------------------------------------------
template <typename P, typename A, bool SCALE, bool DECAY>
TVLARS_ALWAYS_INLINE void chunk_sums_impl(const P* __restrict w, const P* __restrict g, int64_t n, A scale,
                                          A wd, A* __restrict out) {
  int64_t i = 0;
  constexpr int L = 64 / sizeof(A);  // lanes of the partial sums
  A sw[L], sd[L];
#if defined(TVLARS_VECTOR_EXT)
  if constexpr (HasSimd<P>::value) {
    using Sd = Simd<P>;
    using V = typename Sd::V;
    static_assert(Sd::N == L, "one vector of acc per lane set");
    const V scale_v = broadcast<V>(scale), wd_v = broadcast<V>(wd);
    V vw = V{}, vd = V{};
    for (; i + L <= n; i += L) {
      const V wv = Sd::load(w + i);
      const V d = direction(Sd::load(g + i), wv, scale_v, wd_v, SCALE, DECAY);
      vw = add(vw, mul(wv, wv));
      vd = add(vd, mul(d, d));
    }
    std::memcpy(sw, &vw, sizeof sw);
    std::memcpy(sd, &vd, sizeof sd);
  } else
#endif
  {
    for (int j = 0; j < L; ++j) sw[j] = sd[j] = A(0);
    for (; i + L <= n; i += L) {
      for (int j = 0; j < L; ++j) {
        const A wv = to_acc<A>(w[i + j]);
        const A d = direction(to_acc<A>(g[i + j]), wv, scale, wd, SCALE, DECAY);
        sw[j] = add(sw[j], mul(wv, wv));
        sd[j] = add(sd[j], mul(d, d));
      }
    }
  }
  for (int j = 0; i < n; ++i, ++j) {  // only when a chunk is not a multiple of L long
    const A wv = to_acc<A>(w[i]);
    const A d = direction(to_acc<A>(g[i]), wv, scale, wd, SCALE, DECAY);
    sw[j] = add(sw[j], mul(wv, wv));
    sd[j] = add(sd[j], mul(d, d));
  }
  for (int h = L / 2; h > 0; h /= 2) {
    for (int j = 0; j < h; ++j) {
      sw[j] = add(sw[j], sw[j + h]);
      sd[j] = add(sd[j], sd[j + h]);
    }
  }
  out[PART_W2] = sw[0];
  out[PART_D2] = sd[0];
}

// Non-template entry points per dtype, so that each can be multiversioned.
#define TVLARS_DEFINE_SUMS(NAME, P, A)                                                            \
  TVLARS_CLONES void NAME(const P* w, const P* g, int64_t n, A scale, A wd, bool has_scale,       \
                          bool decay, A* out) {                                                   \
    if (has_scale) {                                                                              \
      if (decay) chunk_sums_impl<P, A, true, true>(w, g, n, scale, wd, out);                      \
      else chunk_sums_impl<P, A, true, false>(w, g, n, scale, wd, out);                           \
    } else {                                                                                      \
      if (decay) chunk_sums_impl<P, A, false, true>(w, g, n, scale, wd, out);                     \
      else chunk_sums_impl<P, A, false, false>(w, g, n, scale, wd, out);                          \
    }                                                                                             \
  }
TVLARS_DEFINE_SUMS(chunk_sums_f32, float, float)
TVLARS_DEFINE_SUMS(chunk_sums_f64, double, double)
TVLARS_DEFINE_SUMS(chunk_sums_bf16, c10::BFloat16, float)
TVLARS_DEFINE_SUMS(chunk_sums_f16, c10::Half, float)
#undef TVLARS_DEFINE_SUMS

inline void chunk_sums(const float* w, const float* g, int64_t n, const SegParams<float>& sp, float* out) {
  chunk_sums_f32(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}
inline void chunk_sums(const double* w, const double* g, int64_t n, const SegParams<double>& sp, double* out) {
  chunk_sums_f64(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}
inline void chunk_sums(const c10::BFloat16* w, const c10::BFloat16* g, int64_t n, const SegParams<float>& sp,
                       float* out) {
  chunk_sums_bf16(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}
inline void chunk_sums(const c10::Half* w, const c10::Half* g, int64_t n, const SegParams<float>& sp,
                       float* out) {
  chunk_sums_f16(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}

// ---- pass 2: the update of one chunk -------------------------------------------------------------
template <typename P, typename S, typename A, bool SCALE, bool DECAY, bool PAPER>
TVLARS_ALWAYS_INLINE void chunk_update_scalar(P* __restrict w, const P* __restrict g, S* __restrict s,
                                              int64_t i, int64_t n, A scale, A wd, A q, A lr, A momentum) {
  for (; i < n; ++i) {
    A wv = to_acc<A>(w[i]);
    A sv = static_cast<A>(s[i]);
    const A u = mul(q, direction(to_acc<A>(g[i]), wv, scale, wd, SCALE, DECAY));
    if (PAPER) {
      paper_update(wv, sv, u, lr, momentum);
    } else {
      heavy_ball_update(wv, sv, u, lr, momentum);
    }
    w[i] = from_acc<P>(wv);
    s[i] = static_cast<S>(sv);
  }
}

template <typename P, typename S, typename A, bool SCALE, bool DECAY, bool PAPER>
TVLARS_ALWAYS_INLINE void chunk_update_impl(P* __restrict w, const P* __restrict g, S* __restrict s, int64_t n,
                                            A scale, A wd, A q, A lr, A momentum) {
  int64_t i = 0;
#if defined(TVLARS_VECTOR_EXT)
  if constexpr (HasSimd<P>::value) {
    using Sd = Simd<P>;
    using V = typename Sd::V;
    const V scale_v = broadcast<V>(scale), wd_v = broadcast<V>(wd), q_v = broadcast<V>(q),
            lr_v = broadcast<V>(lr), mom_v = broadcast<V>(momentum);
    for (; i + Sd::N <= n; i += Sd::N) {
      V wv = Sd::load(w + i);
      V sv = Sd::load_state(s + i);
      const V u = mul(q_v, direction(Sd::load(g + i), wv, scale_v, wd_v, SCALE, DECAY));
      if (PAPER) {
        paper_update(wv, sv, u, lr_v, mom_v);
      } else {
        heavy_ball_update(wv, sv, u, lr_v, mom_v);
      }
      Sd::store(w + i, wv);
      Sd::store_state(s + i, sv);
    }
  }
#endif
  chunk_update_scalar<P, S, A, SCALE, DECAY, PAPER>(w, g, s, i, n, scale, wd, q, lr, momentum);
}

#define TVLARS_DEFINE_UPDATE(NAME, P, S, A)                                                        \
  TVLARS_CLONES void NAME(P* w, const P* g, S* s, int64_t n, A scale, A wd, A q, A lr, A momentum, \
                          bool has_scale, bool decay, bool paper) {                                \
    const int k = (has_scale ? 4 : 0) | (decay ? 2 : 0) | (paper ? 1 : 0);                        \
    switch (k) {                                                                                   \
      case 0: chunk_update_impl<P, S, A, false, false, false>(w, g, s, n, scale, wd, q, lr, momentum); break; \
      case 1: chunk_update_impl<P, S, A, false, false, true>(w, g, s, n, scale, wd, q, lr, momentum); break;  \
      case 2: chunk_update_impl<P, S, A, false, true, false>(w, g, s, n, scale, wd, q, lr, momentum); break;  \
      case 3: chunk_update_impl<P, S, A, false, true, true>(w, g, s, n, scale, wd, q, lr, momentum); break;   \
      case 4: chunk_update_impl<P, S, A, true, false, false>(w, g, s, n, scale, wd, q, lr, momentum); break;  \
      case 5: chunk_update_impl<P, S, A, true, false, true>(w, g, s, n, scale, wd, q, lr, momentum); break;   \
      case 6: chunk_update_impl<P, S, A, true, true, false>(w, g, s, n, scale, wd, q, lr, momentum); break;   \
      default: chunk_update_impl<P, S, A, true, true, true>(w, g, s, n, scale, wd, q, lr, momentum); break;   \
    }                                                                                              \
  }
TVLARS_DEFINE_UPDATE(chunk_update_f32, float, float, float)
TVLARS_DEFINE_UPDATE(chunk_update_f64, double, double, double)
TVLARS_DEFINE_UPDATE(chunk_update_bf16, c10::BFloat16, float, float)
TVLARS_DEFINE_UPDATE(chunk_update_f16, c10::Half, float, float)
#undef TVLARS_DEFINE_UPDATE

#define TVLARS_UPDATE_OVERLOAD(NAME, P, S, A)                                                     \
  inline void chunk_update(P* w, const P* g, S* s, int64_t n, A q, const SegParams<A>& sp) {     \
    NAME(w, g, s, n, sp.scale, sp.weight_decay, q, sp.lr, sp.momentum, sp.has_scale, sp.decay,    \
         sp.paper);                                                                               \
  }
TVLARS_UPDATE_OVERLOAD(chunk_update_f32, float, float, float)
TVLARS_UPDATE_OVERLOAD(chunk_update_f64, double, double, double)
TVLARS_UPDATE_OVERLOAD(chunk_update_bf16, c10::BFloat16, float, float)
TVLARS_UPDATE_OVERLOAD(chunk_update_f16, c10::Half, float, float)
#undef TVLARS_UPDATE_OVERLOAD

// ---- the bucket step -------------------------------------------------------------------------------
template <typename P>
struct BucketStep {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;

  P* w;
  const P* g;
  S* s;
  const int64_t* seg;
  const int64_t* chunks;
  const A* groups;
  A* partials;
  A* stats;
  int64_t chunk_elems;
  A scale;
  bool has_scale;
  float t;

  SegParams<A> seg_params(int64_t sid) const {
    const int64_t* row = seg + sid * SEG_COLS;
    const A* grp = groups + row[SEG_GROUP] * GROUP_COLS;
    SegParams<A> sp;
    sp.scale = scale;
    sp.has_scale = has_scale;
    sp.weight_decay = grp[COL_WEIGHT_DECAY];
    sp.decay = (row[SEG_FLAGS] & FLAG_SKIP_WEIGHT_DECAY) == 0;
    sp.lr = grp[COL_LR];
    sp.momentum = grp[COL_MOMENTUM];
    sp.paper = grp[COL_PAPER_FORM] != A(0);
    return sp;
  }

  // [begin, end) of chunk c (element indices into the flat buffers)
  void chunk_range(int64_t c, int64_t* begin, int64_t* end) const {
    const int64_t start = chunks[c * CHUNK_COLS + CHUNK_START];
    const int64_t seg_end = seg[chunks[c * CHUNK_COLS + CHUNK_SEG] * SEG_COLS + SEG_END];
    *begin = start;
    *end = std::min(start + chunk_elems, seg_end);
  }

  void pass1_chunk(int64_t c, const SegParams<A>& sp) const {
    int64_t b, e;
    chunk_range(c, &b, &e);
    chunk_sums(w + b, g + b, e - b, sp, partials + c * PART_COLS);
  }

  // adds the chunk partials in chunk order, writes stats, returns q
  A reduce(int64_t sid) const {
    const int64_t* row = seg + sid * SEG_COLS;
    const int64_t first = row[SEG_FIRST_CHUNK], count = row[SEG_NUM_CHUNKS];
    A sw = A(0), sd = A(0);
    for (int64_t c = first; c < first + count; ++c) {
      sw = add(sw, partials[c * PART_COLS + PART_W2]);
      sd = add(sd, partials[c * PART_COLS + PART_D2]);
    }
    const SegmentStats<A> st =
        segment_stats(sw, sd, groups + row[SEG_GROUP] * GROUP_COLS, row[SEG_FLAGS], t);
    A* out = stats + sid * STAT_COLS;
    out[STAT_WEIGHT_NORM] = st.wn;
    out[STAT_UPDATE_NORM] = st.dn;
    out[STAT_TRUST_RATIO] = st.q;
    out[STAT_PHI] = st.phi;
    return st.q;
  }

  void pass2_chunk(int64_t c, A q, const SegParams<A>& sp) const {
    int64_t b, e;
    chunk_range(c, &b, &e);
    chunk_update(w + b, g + b, s + b, e - b, q, sp);
  }

  // a whole segment by the calling thread
  void segment(int64_t sid) const {
    const int64_t* row = seg + sid * SEG_COLS;
    const int64_t first = row[SEG_FIRST_CHUNK], count = row[SEG_NUM_CHUNKS];
    const SegParams<A> sp = seg_params(sid);
    for (int64_t c = first; c < first + count; ++c) pass1_chunk(c, sp);
    const A q = reduce(sid);
    for (int64_t c = first; c < first + count; ++c) pass2_chunk(c, q, sp);
  }
};

// One unit of work: a small segment (both passes), or a run of chunks of a large segment for
// pass 1 or for pass 2.
struct WorkItem {
  enum Kind : int32_t { kSmallSegment, kPass1, kPass2 } kind;
  int32_t slot;   // large segments: index into the per-large-segment arrays
  int64_t first;  // small: the segment id; large: the first chunk
  int64_t count;  // large: number of chunks
  int64_t window;  // large: the lookahead window it belongs to (small: -1)
};

// The whole step is one parallel region; work is handed out dynamically (atomic cursors), so a
// thread that the OS preempts holds up at most the item it is working on, where static splits
// with a barrier per phase would each wait for it (a time slice on a loaded machine).
//
// Two lists: pass-1 work (small segments, each start to finish by one thread, then the pass-1
// chunk runs of the large segments, in segment order) and pass-2 work (chunk runs of the large
// segments, same order). A thread takes the next pass-2 item as soon as its segment is finished,
// which keeps pass 2 right behind pass 1 (one thread: P1(seg) P2(seg) P1(seg') P2(seg') ...,
// while the segment is still in cache); otherwise it takes pass-1 work, at most one window
// (WINDOW_BYTES of w+g) ahead of the pass-2 head, and otherwise waits. The thread that finishes a
// segment's last pass-1 chunk adds its partials in chunk order, writes stats and publishes q. No
// deadlock: a pass-2 item waits only when all pass-1 work up to the next window has been handed
// out, and pass-1 work never waits.
template <typename P>
void run_bucket_step(BucketStep<P>& k, const int64_t S, const int32_t* active) {
  using A = typename BucketStep<P>::A;
  const int64_t elem_bytes = 2 * static_cast<int64_t>(sizeof(P));  // w and g
  const int64_t small_elems = SMALL_BYTES / elem_bytes;
  const int64_t window_elems = WINDOW_BYTES / elem_bytes;
  // chunks per large-segment work item: about 64K elements
  const int64_t group = std::max<int64_t>(1, (int64_t(64) * 1024) / k.chunk_elems);

  std::vector<WorkItem> p1, p2;
  std::vector<int64_t> large;
  int64_t total = 0;
  for (int64_t sid = 0; sid < S; ++sid) {
    const int64_t* row = k.seg + sid * SEG_COLS;
    if (active[sid] == 0 || row[SEG_NUM_CHUNKS] == 0) continue;
    const int64_t len = row[SEG_END] - row[SEG_OFFSET];
    total += len;
    if (len <= small_elems) {
      p1.push_back({WorkItem::kSmallSegment, 0, sid, 0, -1});
    } else {
      large.push_back(sid);
    }
  }
  const size_t num_large = large.size();
  std::vector<SegParams<A>> sp(num_large);
  std::vector<A> q(num_large);
  std::unique_ptr<std::atomic<int64_t>[]> remaining(new std::atomic<int64_t>[num_large]);
  std::unique_ptr<std::atomic<int32_t>[]> ready(new std::atomic<int32_t>[num_large]);
  int64_t window = 0, in_window = 0;
  for (size_t slot = 0; slot < num_large; ++slot) {
    const int64_t* row = k.seg + large[slot] * SEG_COLS;
    sp[slot] = k.seg_params(large[slot]);
    remaining[slot].store(row[SEG_NUM_CHUNKS], std::memory_order_relaxed);
    ready[slot].store(0, std::memory_order_relaxed);
    const int64_t first = row[SEG_FIRST_CHUNK], end = first + row[SEG_NUM_CHUNKS];
    for (int64_t c = first; c < end; c += group) {
      const int64_t n = std::min(group, end - c);
      p1.push_back({WorkItem::kPass1, static_cast<int32_t>(slot), c, n, window});
      p2.push_back({WorkItem::kPass2, static_cast<int32_t>(slot), c, n, window});
    }
    in_window += row[SEG_END] - row[SEG_OFFSET];
    if (in_window >= window_elems) {
      ++window;
      in_window = 0;
    }
  }

  auto run_pass1 = [&](const WorkItem& it) {
    if (it.kind == WorkItem::kSmallSegment) {
      k.segment(it.first);
      return;
    }
    for (int64_t c = it.first; c < it.first + it.count; ++c) k.pass1_chunk(c, sp[it.slot]);
    // acq_rel: the thread that finishes the segment sees every other thread's partials
    if (remaining[it.slot].fetch_sub(it.count, std::memory_order_acq_rel) == it.count) {
      q[it.slot] = k.reduce(large[it.slot]);
      ready[it.slot].store(1, std::memory_order_release);
    }
  };
  auto run_pass2 = [&](const WorkItem& it) {
    for (int64_t c = it.first; c < it.first + it.count; ++c) k.pass2_chunk(c, q[it.slot], sp[it.slot]);
  };
  std::atomic<size_t> next1{0}, next2{0};
  auto worker = [&]() {
    for (;;) {
      size_t j = next2.load(std::memory_order_relaxed);
      if (j < p2.size() && ready[p2[j].slot].load(std::memory_order_acquire) != 0) {
        if (next2.compare_exchange_weak(j, j + 1, std::memory_order_relaxed)) run_pass2(p2[j]);
        continue;
      }
      const size_t i = next1.load(std::memory_order_relaxed);
      const bool p2_left = j < p2.size();
      if (i < p1.size() && (!p2_left || p1[i].window <= p2[j].window + 1)) {
        const size_t mine = next1.fetch_add(1, std::memory_order_relaxed);
        if (mine < p1.size()) run_pass1(p1[mine]);
        continue;
      }
      if (!p2_left && i >= p1.size()) break;
      std::this_thread::yield();  // the pass-2 head's segment is being finished by another thread
    }
  };
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t use = std::max<int64_t>(1, std::min(threads, total / MIN_ELEMS_PER_THREAD));
  if (use <= 1) {
    worker();
  } else {
    at::parallel_for(0, use, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) worker();
    });
  }

  // Segments without chunks (zero-size parameters): sums are 0, so wn = dn = 0 and q = 1.
  for (int64_t sid = 0; sid < S; ++sid) {
    if (active[sid] != 0 && k.seg[sid * SEG_COLS + SEG_NUM_CHUNKS] == 0) k.reduce(sid);
  }
}

// Table contents are on the host here, so check them once per step (cheap: O(S + C)) before any
// pointer arithmetic relies on them.
void check_tables_cpu(const int64_t* seg, int64_t S, const int64_t* chunks, int64_t C, int64_t G,
                      int64_t numel, int64_t chunk_elems) {
  for (int64_t sid = 0; sid < S; ++sid) {
    const int64_t* row = seg + sid * SEG_COLS;
    const int64_t off = row[SEG_OFFSET], end = row[SEG_END], first = row[SEG_FIRST_CHUNK],
                  count = row[SEG_NUM_CHUNKS];
    TORCH_CHECK(0 <= off && off <= end && end <= numel && row[SEG_NUMEL] >= 0 &&
                    row[SEG_NUMEL] <= end - off,
                "tvlars_fused::bucket_step: seg_table row ", sid, " has an invalid range [", off, ", ",
                end, ") (numel ", row[SEG_NUMEL], ") for a bucket of ", numel, " elements");
    TORCH_CHECK(0 <= row[SEG_GROUP] && row[SEG_GROUP] < G, "tvlars_fused::bucket_step: seg_table row ",
                sid, " names group ", row[SEG_GROUP], " but group_table has ", G, " rows");
    TORCH_CHECK(0 <= first && 0 <= count && first + count <= C &&
                    count == (end - off + chunk_elems - 1) / chunk_elems,
                "tvlars_fused::bucket_step: seg_table row ", sid, " has chunks [", first, ", ",
                first + count, ") which do not cover [", off, ", ", end, ") in chunks of ", chunk_elems,
                " (chunk_table has ", C, " rows)");
    for (int64_t c = first; c < first + count; ++c) {
      TORCH_CHECK(chunks[c * CHUNK_COLS + CHUNK_SEG] == sid &&
                      chunks[c * CHUNK_COLS + CHUNK_START] == off + (c - first) * chunk_elems,
                  "tvlars_fused::bucket_step: chunk_table row ", c, " = (",
                  chunks[c * CHUNK_COLS + CHUNK_START], ", ", chunks[c * CHUNK_COLS + CHUNK_SEG],
                  ") does not match segment ", sid, " (offset ", off, ", chunk_elems ", chunk_elems, ")");
    }
  }
}

}  // namespace

void bucket_step_cpu(at::Tensor& params, const at::Tensor& grads, at::Tensor& state,
                     const at::Tensor& seg_table, const at::Tensor& seg_active,
                     const at::Tensor& chunk_table, const at::Tensor& group_table, at::Tensor& step,
                     at::Tensor& partials, at::Tensor& counters, at::Tensor& stats,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, int64_t chunk_elems) {
  check_bucket_args(params, grads, state, seg_table, seg_active, chunk_table, group_table, step,
                    partials, counters, stats, grad_scale, found_inf, chunk_elems);
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) return;  // AMP: skip all

  const int64_t S = seg_table.size(0), C = chunk_table.size(0);
  check_tables_cpu(seg_table.const_data_ptr<int64_t>(), S, chunk_table.const_data_ptr<int64_t>(), C,
                   group_table.size(0), params.numel(), chunk_elems);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "tvlars_bucket_step_cpu", [&] {
    using P = scalar_t;
    using A = typename Types<P>::acc;
    using St = typename Types<P>::state;
    BucketStep<P> k;
    k.w = params.mutable_data_ptr<P>();
    k.g = grads.const_data_ptr<P>();
    k.s = state.mutable_data_ptr<St>();
    k.seg = seg_table.const_data_ptr<int64_t>();
    k.chunks = chunk_table.const_data_ptr<int64_t>();
    k.groups = group_table.const_data_ptr<A>();
    k.partials = partials.mutable_data_ptr<A>();
    k.stats = stats.mutable_data_ptr<A>();
    k.chunk_elems = chunk_elems;
    k.has_scale = grad_scale.has_value();
    k.scale = k.has_scale ? static_cast<A>(*grad_scale->const_data_ptr<float>()) : A(1);
    k.t = *step.const_data_ptr<float>();
    run_bucket_step(k, S, seg_active.const_data_ptr<int32_t>());
  });
  *step.mutable_data_ptr<float>() += 1.0f;  // not reached when found_inf is set
}

}  // namespace tvlars
