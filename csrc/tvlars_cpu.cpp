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
// Vectorization (tvlars_cpu_kernels.h): GCC/Clang vector extensions at the native width. With GCC
// on x86-64 the kernels are compiled three times -- baseline x86-64 (SSE2), AVX2+FMA+F16C and
// AVX-512 -- and the best copy the CPU supports is picked at run time (TVLARS_FUSED_CPU_ISA=
// baseline|avx2|avx512 caps it). All copies give the same bits: the partial sums have the same 16
// float / 8 double lanes everywhere and nothing is contracted into an FMA (-ffp-contract=off).
// Other compilers and architectures get one copy (scalar without vector extensions).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "tvlars_math.h"
#include "tvlars_ops.h"

// Per-instruction-set copies of the kernels (GCC on x86-64; elsewhere one copy for the target).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TVLARS_NO_MULTI_ISA)
#define TVLARS_MULTI_ISA 1
#include <immintrin.h>
#endif
#if defined(__GNUC__)
#define TVLARS_VECTOR_EXT 1
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

// ---- the kernels, once per instruction set ------------------------------------------------------
#define TVLARS_VEC_BYTES 16
namespace isa_baseline {
#include "tvlars_cpu_kernels.h"
}  // namespace isa_baseline
#undef TVLARS_VEC_BYTES

#if defined(TVLARS_MULTI_ISA)
#define TVLARS_ISA_F16C 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define TVLARS_VEC_BYTES 32
namespace isa_avx2 {
#include "tvlars_cpu_kernels.h"
}  // namespace isa_avx2
#undef TVLARS_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#define TVLARS_VEC_BYTES 64
namespace isa_avx512 {
#include "tvlars_cpu_kernels.h"
}  // namespace isa_avx512
#undef TVLARS_VEC_BYTES
#pragma GCC pop_options
#undef TVLARS_ISA_F16C
#endif  // TVLARS_MULTI_ISA

struct KernelTable {
  const char* name;
  void (*sums_f32)(const float*, const float*, int64_t, float, float, bool, bool, float*);
  void (*sums_f64)(const double*, const double*, int64_t, double, double, bool, bool, double*);
  void (*sums_bf16)(const c10::BFloat16*, const c10::BFloat16*, int64_t, float, float, bool, bool, float*);
  void (*sums_f16)(const c10::Half*, const c10::Half*, int64_t, float, float, bool, bool, float*);
  void (*update_f32)(float*, const float*, float*, int64_t, float, float, float, float, float, bool, bool, bool);
  void (*update_f64)(double*, const double*, double*, int64_t, double, double, double, double, double, bool,
                     bool, bool);
  void (*update_bf16)(c10::BFloat16*, const c10::BFloat16*, float*, int64_t, float, float, float, float, float,
                      bool, bool, bool);
  void (*update_f16)(c10::Half*, const c10::Half*, float*, int64_t, float, float, float, float, float, bool,
                     bool, bool);
};

#define TVLARS_TABLE(NS, NAME)                                                                      \
  KernelTable {                                                                                     \
    NAME, &NS::chunk_sums_f32, &NS::chunk_sums_f64, &NS::chunk_sums_bf16, &NS::chunk_sums_f16,      \
        &NS::chunk_update_f32, &NS::chunk_update_f64, &NS::chunk_update_bf16, &NS::chunk_update_f16 \
  }

// The best copy this CPU runs; TVLARS_FUSED_CPU_ISA=baseline|avx2|avx512 caps it (tests, debugging).
// All copies give the same bits.
const KernelTable& kernel_table() {
  static const KernelTable baseline = TVLARS_TABLE(isa_baseline, "baseline");
#if defined(TVLARS_MULTI_ISA)
  static const KernelTable avx2 = TVLARS_TABLE(isa_avx2, "avx2");
  static const KernelTable avx512 = TVLARS_TABLE(isa_avx512, "avx512");
  static const int best = [] {
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
    const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return has_avx512 ? 2 : has_avx2 ? 1 : 0;
  }();
  int cap = 2;
  if (const char* env = std::getenv("TVLARS_FUSED_CPU_ISA")) {
    const std::string v(env);
    TORCH_CHECK(v.empty() || v == "auto" || v == "baseline" || v == "avx2" || v == "avx512",
                "TVLARS_FUSED_CPU_ISA must be auto, baseline, avx2 or avx512, got '", v, "'");
    cap = v == "baseline" ? 0 : v == "avx2" ? 1 : 2;
  }
  const int use = std::min(best, cap);
  return use == 2 ? avx512 : use == 1 ? avx2 : baseline;
#else
  return baseline;
#endif
}
#undef TVLARS_TABLE

inline void chunk_sums(const KernelTable& kt, const float* w, const float* g, int64_t n,
                       const SegParams<float>& sp, float* out) {
  kt.sums_f32(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}
inline void chunk_sums(const KernelTable& kt, const double* w, const double* g, int64_t n,
                       const SegParams<double>& sp, double* out) {
  kt.sums_f64(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}
inline void chunk_sums(const KernelTable& kt, const c10::BFloat16* w, const c10::BFloat16* g, int64_t n,
                       const SegParams<float>& sp, float* out) {
  kt.sums_bf16(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}
inline void chunk_sums(const KernelTable& kt, const c10::Half* w, const c10::Half* g, int64_t n,
                       const SegParams<float>& sp, float* out) {
  kt.sums_f16(w, g, n, sp.scale, sp.weight_decay, sp.has_scale, sp.decay, out);
}

#define TVLARS_UPDATE_OVERLOAD(FIELD, P, S, A)                                                     \
  inline void chunk_update(const KernelTable& kt, P* w, const P* g, S* s, int64_t n, A q,          \
                           const SegParams<A>& sp) {                                               \
    kt.FIELD(w, g, s, n, sp.scale, sp.weight_decay, q, sp.lr, sp.momentum, sp.has_scale, sp.decay, \
             sp.paper);                                                                            \
  }
TVLARS_UPDATE_OVERLOAD(update_f32, float, float, float)
TVLARS_UPDATE_OVERLOAD(update_f64, double, double, double)
TVLARS_UPDATE_OVERLOAD(update_bf16, c10::BFloat16, float, float)
TVLARS_UPDATE_OVERLOAD(update_f16, c10::Half, float, float)
#undef TVLARS_UPDATE_OVERLOAD

// ---- the bucket step -------------------------------------------------------------------------------
template <typename P>
struct BucketStep {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;

  const KernelTable* kt;
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
    chunk_sums(*kt, w + b, g + b, e - b, sp, partials + c * PART_COLS);
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
    chunk_update(*kt, w + b, g + b, s + b, e - b, q, sp);
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

  const KernelTable& kt = kernel_table();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "tvlars_bucket_step_cpu", [&] {
    using P = scalar_t;
    using A = typename Types<P>::acc;
    using St = typename Types<P>::state;
    BucketStep<P> k;
    k.kt = &kt;
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
