// The bucket step on the CPU (docs/SPEC.md, "The bucket ABI"), for every algorithm (algo/*.h).
//
// Determinism: a chunk's partial sums are computed by one thread in a fixed order (16 float / 8
// double lanes, folded pairwise), and a segment's sums are its chunk partials added in chunk
// order. Which thread computes a chunk, and when, never changes the bits, so 1 thread and N
// threads agree exactly.
//
// Scheduling and cache use (run_bucket_step): the whole step is one parallel region. A segment
// whose w and g fit comfortably in L2 is done start to finish by one thread (pass 1, the
// reduction, then pass 2 while w and g are still in cache). A larger segment is split into one
// part per thread, so that pass 2 re-reads w and g from the caches of the thread that read them in
// pass 1; idle threads steal unclaimed work, so a preempted thread (a loaded machine, data-loader
// workers) holds up the others by at most one item.
//
// Vectorization (cpu_kernels.h): GCC/Clang vector extensions at the native width. With GCC
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

#include "algo/algorithms.h"
#include "arith.h"
#include "bucket_step.h"

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
#define TVLARS_FLATTEN __attribute__((flatten))
#else
#define TVLARS_ALWAYS_INLINE inline
#define TVLARS_FLATTEN
#endif

namespace tvlars {
namespace {

// Tuning (overridable at build time with -D): segments with at most SMALL_BYTES of w+g are
// processed by one thread in one go (they stay in its L2 between the passes); larger ones are
// claimed in items of ITEM_ELEMS elements; fewer than MIN_ELEMS_PER_THREAD elements per thread are
// not worth a parallel region.
#ifndef TVLARS_SMALL_BYTES
#define TVLARS_SMALL_BYTES (512 * 1024)
#endif
#ifndef TVLARS_ITEM_ELEMS
#define TVLARS_ITEM_ELEMS (64 * 1024)
#endif
#ifndef TVLARS_MIN_ELEMS_PER_THREAD
#define TVLARS_MIN_ELEMS_PER_THREAD (32 * 1024)
#endif
constexpr int64_t SMALL_BYTES = TVLARS_SMALL_BYTES;
constexpr int64_t ITEM_ELEMS = TVLARS_ITEM_ELEMS;
constexpr int64_t MIN_ELEMS_PER_THREAD = TVLARS_MIN_ELEMS_PER_THREAD;

// ---- the kernels, once per instruction set ------------------------------------------------------
#define TVLARS_VEC_BYTES 16
namespace isa_baseline {
#include "cpu_kernels.h"
}  // namespace isa_baseline
#undef TVLARS_VEC_BYTES

#if defined(TVLARS_MULTI_ISA)
#define TVLARS_ISA_F16C 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define TVLARS_VEC_BYTES 32
namespace isa_avx2 {
#include "cpu_kernels.h"
}  // namespace isa_avx2
#undef TVLARS_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#define TVLARS_VEC_BYTES 64
namespace isa_avx512 {
#include "cpu_kernels.h"
}  // namespace isa_avx512
#undef TVLARS_VEC_BYTES
#pragma GCC pop_options
#undef TVLARS_ISA_F16C
#endif  // TVLARS_MULTI_ISA

// The chunk kernels of one algorithm and parameter dtype, in one instruction-set copy.
template <class Algo, typename P>
struct ChunkKernels {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;
  void (*pass1)(const P*, const P*, S* const*, int64_t, const typename Algo::template Pass1<A>&, A*);
  void (*pass2)(P*, const P*, S* const*, int64_t, const typename Algo::template Pass2<A>&);
};

#define TVLARS_ISA_KERNELS(NS)                                                                              \
  template <class Algo, typename P>                                                                         \
  ChunkKernels<Algo, P> NS##_kernels() {                                                                    \
    if constexpr (std::is_same_v<Algo, Lars>) {                                                             \
      if constexpr (std::is_same_v<P, float>) return {&NS::pass1_lars_f32, &NS::pass2_lars_f32};            \
      else if constexpr (std::is_same_v<P, double>) return {&NS::pass1_lars_f64, &NS::pass2_lars_f64};      \
      else if constexpr (std::is_same_v<P, c10::BFloat16>) return {&NS::pass1_lars_bf16, &NS::pass2_lars_bf16}; \
      else return {&NS::pass1_lars_f16, &NS::pass2_lars_f16};                                               \
    } else {                                                                                                \
      if constexpr (std::is_same_v<P, float>) return {&NS::pass1_lamb_f32, &NS::pass2_lamb_f32};            \
      else if constexpr (std::is_same_v<P, double>) return {&NS::pass1_lamb_f64, &NS::pass2_lamb_f64};      \
      else if constexpr (std::is_same_v<P, c10::BFloat16>) return {&NS::pass1_lamb_bf16, &NS::pass2_lamb_bf16}; \
      else return {&NS::pass1_lamb_f16, &NS::pass2_lamb_f16};                                               \
    }                                                                                                       \
  }
TVLARS_ISA_KERNELS(isa_baseline)
#if defined(TVLARS_MULTI_ISA)
TVLARS_ISA_KERNELS(isa_avx2)
TVLARS_ISA_KERNELS(isa_avx512)
#endif
#undef TVLARS_ISA_KERNELS

// The best copy this CPU runs (0 baseline, 1 AVX2, 2 AVX-512); TVLARS_FUSED_CPU_ISA=
// baseline|avx2|avx512 caps it (tests, debugging; read at every step). All copies give the same bits.
int isa_level() {
#if defined(TVLARS_MULTI_ISA)
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
  return std::min(best, cap);
#else
  return 0;
#endif
}

template <class Algo, typename P>
ChunkKernels<Algo, P> chunk_kernels() {
#if defined(TVLARS_MULTI_ISA)
  static const ChunkKernels<Algo, P> avx512 = isa_avx512_kernels<Algo, P>(), avx2 = isa_avx2_kernels<Algo, P>();
#endif
  static const ChunkKernels<Algo, P> baseline = isa_baseline_kernels<Algo, P>();
#if defined(TVLARS_MULTI_ISA)
  const int level = isa_level();
  return level == 2 ? avx512 : level == 1 ? avx2 : baseline;
#else
  return baseline;
#endif
}

// ---- the bucket step -------------------------------------------------------------------------------
template <class Algo, typename P>
struct BucketStep {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;
  using Pass1 = typename Algo::template Pass1<A>;
  using Pass2 = typename Algo::template Pass2<A>;

  ChunkKernels<Algo, P> kt;
  P* const* w;  // per segment: the parameter's memory
  const P* g;
  S* s;         // state slot 0; slot k at s + k * numel
  int64_t numel;
  const int64_t* seg;
  const int64_t* chunks;
  const double* groups;
  A* partials;
  A* stats;
  int64_t chunk_elems;
  A inv_scale;  // 1 / grad_scale (1 without AMP)
  float t;

  GroupRow<A> group_of(int64_t sid) const { return {groups + seg[sid * SEG_COLS + SEG_GROUP] * GROUP_COLS}; }
  // g' = g * gmul: (maximize ? -1 : 1) / grad_scale
  A gmul(int64_t sid) const { return mul(group_of(sid)[COL_GRAD_SIGN], inv_scale); }

  Pass1 pass1_params(int64_t sid) const {
    return Algo::pass1_params(group_of(sid), seg[sid * SEG_COLS + SEG_FLAGS], gmul(sid), t);
  }

  // Chunk c's elements of the parameter: [begin, end) in flat buffer indices (the padding past
  // the parameter's end is never touched) and the parameter's memory at `begin`.
  P* chunk_range(int64_t c, int64_t* begin, int64_t* end) const {
    const int64_t start = chunks[c * CHUNK_COLS + CHUNK_START];
    const int64_t sid = chunks[c * CHUNK_COLS + CHUNK_SEG];
    const int64_t* row = seg + sid * SEG_COLS;
    *begin = start;
    *end = std::min(start + chunk_elems, row[SEG_OFFSET] + row[SEG_NUMEL]);
    return w[sid] + (start - row[SEG_OFFSET]);
  }

  // the state slots at flat position b
  void slots_at(int64_t b, S** out) const {
    for (int k = 0; k < Algo::SLOTS; ++k) out[k] = s + k * numel + b;
  }

  void pass1_chunk(int64_t c, const Pass1& p1) const {
    int64_t b, e;
    const P* wc = chunk_range(c, &b, &e);
    S* sl[Algo::SLOTS];
    slots_at(b, sl);
    kt.pass1(wc, g + b, sl, e - b, p1, partials + c * PART_COLS);
  }

  // Column col of the segment's chunk partials added in the order of docs/SPEC.md ("The segment
  // sum"): tiles of REDUCE_TILE chunks, each a pairwise tree, the tiles in chunk order. (A tree
  // over a tile padded with zeros equals the tree over the next power of two: x + 0 = x for the
  // non-negative sums.)
  A segment_sum(int64_t first, int64_t count, int col) const {
    A total = A(0);
    A v[REDUCE_TILE];
    for (int64_t base = first; base < first + count; base += REDUCE_TILE) {
      const int64_t n = std::min<int64_t>(REDUCE_TILE, first + count - base);
      int64_t width = 1;
      while (width < n) width *= 2;
      for (int64_t i = 0; i < width; ++i) v[i] = i < n ? partials[(base + i) * PART_COLS + col] : A(0);
      for (width /= 2; width >= 1; width /= 2) {
        for (int64_t i = 0; i < width; ++i) v[i] = add(v[2 * i], v[2 * i + 1]);
      }
      total = add(total, v[0]);
    }
    return total;
  }

  // the segment's sums -> its stats row; returns what pass 2 applies to it
  Pass2 reduce(int64_t sid) const {
    const int64_t* row = seg + sid * SEG_COLS;
    const int64_t first = row[SEG_FIRST_CHUNK], count = row[SEG_NUM_CHUNKS];
    A* out = stats + sid * STAT_COLS;
    Algo::finish(out, segment_sum(first, count, PART_W2), segment_sum(first, count, PART_U2),
                 segment_sum(first, count, PART_G2), group_of(sid), row[SEG_FLAGS], t);
    return Algo::pass2_params(group_of(sid), row[SEG_FLAGS], out, gmul(sid));
  }

  void pass2_chunk(int64_t c, const Pass2& up) const {
    int64_t b, e;
    P* wc = chunk_range(c, &b, &e);
    S* sl[Algo::SLOTS];
    slots_at(b, sl);
    kt.pass2(wc, g + b, sl, e - b, up);
  }

  // a whole segment by the calling thread
  void segment(int64_t sid) const {
    const int64_t* row = seg + sid * SEG_COLS;
    const int64_t first = row[SEG_FIRST_CHUNK], count = row[SEG_NUM_CHUNKS];
    const Pass1 p1 = pass1_params(sid);
    for (int64_t c = first; c < first + count; ++c) pass1_chunk(c, p1);
    const Pass2 up = reduce(sid);
    for (int64_t c = first; c < first + count; ++c) pass2_chunk(c, up);
  }
};

// Large-segment work is claimed in items of about 64K elements. A segment's items are split into
// one contiguous part per thread; the owner claims items from the front of its part, other
// threads steal from the back. Both ends of a part live in one 64-bit word (front << 32 | back),
// so a claim is one compare-and-swap.
class alignas(64) Part {  // one cache line each: threads claim from different parts at once
 public:
  void reset(uint32_t front, uint32_t back) { v_.store(pack(front, back), std::memory_order_relaxed); }
  bool take_front(int64_t* item) { return take(item, true); }
  bool take_back(int64_t* item) { return take(item, false); }

 private:
  static uint64_t pack(uint64_t front, uint64_t back) { return front << 32 | back; }
  bool take(int64_t* item, bool front_end) {
    uint64_t v = v_.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = static_cast<uint32_t>(v >> 32), b = static_cast<uint32_t>(v);
      if (f >= b) return false;
      const uint64_t next = front_end ? pack(f + 1, b) : pack(f, b - 1);
      if (v_.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
        *item = front_end ? f : b - 1;
        return true;
      }
    }
  }
  std::atomic<uint64_t> v_{0};
};

// The whole step is one parallel region. Every thread walks the segments in order:
//  - a small segment (w+g within SMALL_BYTES) is claimed whole by the first thread to reach it and
//    done start to finish (pass 1, reduction, pass 2) while it sits in that thread's L2;
//  - a large segment: pass 1 of the thread's own part, then of what is left of the other parts;
//    the thread that completes the segment's pass 1 adds the chunk partials in chunk order, writes
//    stats and publishes q; every thread waits for q, then runs pass 2 of its own part, then of
//    what is left.
// Why parts and not a shared queue: pass 2 re-reads w and g that pass 1 just streamed through, and
// only the thread that read them has them in its own caches. With a shared queue the items of a
// segment alternate between threads, so pass 2 reads the other thread's lines. On this project's
// 2-vCPU VM that schedule flipped, for minutes at a time, between 16 and 33 ms/step at ResNet-50
// size, pass 2 alone 3x slower, while this one ran 13-17 ms in the same process at the same time
// (most likely the host placing the two vCPUs on different L3 slices). With parts, each thread
// re-reads its own data.
// Stealing keeps it dynamic: a thread that is preempted or late loses its unclaimed items to the
// others, so it holds up at most the item it is running (as a static split with barriers would not).
// No deadlock: a thread waits for q only after every pass-1 item of that segment has been claimed,
// and claimed items are finished without waiting.
template <class Algo, typename P>
void run_bucket_step(BucketStep<Algo, P>& k, const int64_t S, const int32_t* active) {
  using Step = BucketStep<Algo, P>;
  const int64_t small_elems = SMALL_BYTES / (2 * static_cast<int64_t>(sizeof(P)));  // w and g
  const int64_t item_chunks = std::max<int64_t>(1, ITEM_ELEMS / k.chunk_elems);

  int64_t total = 0, num_large = 0;
  std::vector<int64_t> slot_of(S, -1);  // large segments: index into the per-large-segment arrays
  for (int64_t sid = 0; sid < S; ++sid) {
    const int64_t* row = k.seg + sid * SEG_COLS;
    if (active[sid] == 0 || row[SEG_NUM_CHUNKS] == 0) continue;
    const int64_t len = row[SEG_END] - row[SEG_OFFSET];
    total += len;
    if (len > small_elems) slot_of[sid] = num_large++;
  }
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t T = std::max<int64_t>(1, std::min(threads, total / MIN_ELEMS_PER_THREAD));

  std::unique_ptr<std::atomic<int32_t>[]> claimed(new std::atomic<int32_t>[S]);  // small segments
  std::unique_ptr<Part[]> parts1(new Part[num_large * T]), parts2(new Part[num_large * T]);
  std::unique_ptr<std::atomic<int64_t>[]> remaining(new std::atomic<int64_t>[num_large]);  // pass-1 chunks
  std::unique_ptr<std::atomic<int32_t>[]> ready(new std::atomic<int32_t>[num_large]);
  std::vector<typename Step::Pass1> p1(num_large);
  std::vector<typename Step::Pass2> up(num_large);
  for (int64_t sid = 0; sid < S; ++sid) {
    claimed[sid].store(0, std::memory_order_relaxed);
    const int64_t slot = slot_of[sid];
    if (slot < 0) continue;
    const int64_t count = k.seg[sid * SEG_COLS + SEG_NUM_CHUNKS];
    const int64_t items = (count + item_chunks - 1) / item_chunks;
    TORCH_CHECK(items < (int64_t(1) << 32), "tvlars_fused::bucket_step: segment ", sid, " is too large");
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t lo = static_cast<uint32_t>(items * t / T), hi = static_cast<uint32_t>(items * (t + 1) / T);
      parts1[slot * T + t].reset(lo, hi);
      parts2[slot * T + t].reset(lo, hi);
    }
    p1[slot] = k.pass1_params(sid);
    remaining[slot].store(count, std::memory_order_relaxed);
    ready[slot].store(0, std::memory_order_relaxed);
  }

  // chunks [*c0, *c1) of item `item` of the segment
  auto item_chunk_range = [&](int64_t sid, int64_t item, int64_t* c0, int64_t* c1) {
    const int64_t* row = k.seg + sid * SEG_COLS;
    *c0 = row[SEG_FIRST_CHUNK] + item * item_chunks;
    *c1 = std::min(*c0 + item_chunks, row[SEG_FIRST_CHUNK] + row[SEG_NUM_CHUNKS]);
  };
  auto pass1_item = [&](int64_t sid, int64_t slot, int64_t item) {
    int64_t c0, c1;
    item_chunk_range(sid, item, &c0, &c1);
    for (int64_t c = c0; c < c1; ++c) k.pass1_chunk(c, p1[slot]);
    // acq_rel: the thread that completes the segment sees every other thread's partials
    if (remaining[slot].fetch_sub(c1 - c0, std::memory_order_acq_rel) == c1 - c0) {
      up[slot] = k.reduce(sid);
      ready[slot].store(1, std::memory_order_release);
    }
  };
  auto pass2_item = [&](int64_t sid, int64_t slot, int64_t item) {
    int64_t c0, c1;
    item_chunk_range(sid, item, &c0, &c1);
    for (int64_t c = c0; c < c1; ++c) k.pass2_chunk(c, up[slot]);
  };
  // own part from the front, then the others' parts from the back
  auto drain = [&](Part* segment_parts, int64_t me, auto&& run) {
    int64_t item;
    while (segment_parts[me].take_front(&item)) run(item);
    for (int64_t off = 1; off < T; ++off) {
      Part& other = segment_parts[(me + off) % T];
      while (other.take_back(&item)) run(item);
    }
  };
  // noexcept: nothing in the region throws (the tables were checked before it); if something
  // ever did, the other threads would wait for its segment's q forever, so terminate instead.
  auto worker = [&](int64_t me) noexcept {
    for (int64_t sid = 0; sid < S; ++sid) {
      const int64_t* row = k.seg + sid * SEG_COLS;
      if (active[sid] == 0 || row[SEG_NUM_CHUNKS] == 0) continue;
      const int64_t slot = slot_of[sid];
      if (slot < 0) {
        if (claimed[sid].load(std::memory_order_relaxed) == 0 &&
            claimed[sid].exchange(1, std::memory_order_relaxed) == 0) {
          k.segment(sid);
        }
        continue;
      }
      drain(&parts1[slot * T], me, [&](int64_t item) { pass1_item(sid, slot, item); });
      while (ready[slot].load(std::memory_order_acquire) == 0) {
        std::this_thread::yield();  // another thread is finishing this segment's last pass-1 item
      }
      drain(&parts2[slot * T], me, [&](int64_t item) { pass2_item(sid, slot, item); });
    }
  };
  if (T <= 1) {
    worker(0);
  } else {
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) worker(t);
    });
  }

  // Segments without chunks (zero-size parameters): sums are 0, so wn = dn = 0 and q = 1.
  for (int64_t sid = 0; sid < S; ++sid) {
    if (active[sid] != 0 && k.seg[sid * SEG_COLS + SEG_NUM_CHUNKS] == 0) k.reduce(sid);
  }
}

// Table contents are on the host here, so check them once per step (cheap: O(S + C)) before any
// pointer arithmetic relies on them.
void check_tables_cpu(const int64_t* seg, int64_t S, const int64_t* chunks, int64_t C, int64_t G, int64_t numel,
                      int64_t chunk_elems) {
  int64_t prev_end = 0;
  for (int64_t sid = 0; sid < S; ++sid) {
    const int64_t* row = seg + sid * SEG_COLS;
    const int64_t off = row[SEG_OFFSET], end = row[SEG_END], first = row[SEG_FIRST_CHUNK],
                  count = row[SEG_NUM_CHUNKS];
    TORCH_CHECK(0 <= off && off <= end && end <= numel && row[SEG_NUMEL] >= 0 &&
                    row[SEG_NUMEL] <= end - off,
                "tvlars_fused::bucket_step: seg_table row ", sid, " has an invalid range [", off, ", ",
                end, ") (numel ", row[SEG_NUMEL], ") for a bucket of ", numel, " elements");
    // segments are updated by different threads: they must not overlap
    TORCH_CHECK(off >= prev_end, "tvlars_fused::bucket_step: seg_table row ", sid, " starts at ", off,
                " inside the previous segment (which ends at ", prev_end,
                "); segments must be in offset order and disjoint");
    prev_end = end;
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

namespace {

// One algorithm's step: the dtype dispatch and the scheduler.
template <class Algo>
void step_algorithm_cpu(const std::vector<void*>& weights, TVLARS_BUCKET_TABLES_PARAMS) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "tvlars_bucket_step_cpu", [&] {
    using P = scalar_t;
    using A = typename Types<P>::acc;
    using St = typename Types<P>::state;
    BucketStep<Algo, P> k;
    k.kt = chunk_kernels<Algo, P>();
    k.w = reinterpret_cast<P* const*>(weights.data());
    k.g = grads.const_data_ptr<P>();
    k.s = state.mutable_data_ptr<St>();
    k.numel = grads.numel();
    k.seg = seg_table.const_data_ptr<int64_t>();
    k.chunks = chunk_table.const_data_ptr<int64_t>();
    k.groups = group_table.const_data_ptr<double>();
    k.partials = partials.mutable_data_ptr<A>();
    k.stats = stats.mutable_data_ptr<A>();
    k.chunk_elems = chunk_elems;
    // g/scale as g * (1/scale): the same bits for GradScaler's powers of two (and as Triton's)
    k.inv_scale = grad_scale.has_value() ? div(A(1), static_cast<A>(*grad_scale->const_data_ptr<float>())) : A(1);
    k.t = *step.const_data_ptr<float>();
    run_bucket_step(k, seg_table.size(0), seg_active.const_data_ptr<int32_t>());
  });
}

// The step over the segments' parameters at weights[sid] (from the list or from the address).
void step_cpu(const std::vector<void*>& weights, TVLARS_BUCKET_TABLES_PARAMS) {
  if (found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f) return;  // AMP: skip all
  const int64_t S = seg_table.size(0), C = chunk_table.size(0);
  check_tables_cpu(seg_table.const_data_ptr<int64_t>(), S, chunk_table.const_data_ptr<int64_t>(), C,
                   group_table.size(0), grads.numel(), chunk_elems);
  with_algorithm(algorithm, [&](auto algo) {
    step_algorithm_cpu<decltype(algo)>(weights, TVLARS_BUCKET_TABLES_ARGS);
  });
  *step.mutable_data_ptr<float>() += 1.0f;  // not reached when found_inf is set
}

}  // namespace

void bucket_step_cpu(at::TensorList params, TVLARS_BUCKET_TABLES_PARAMS) {
  check_params_list(params, seg_table);
  check_bucket_args(params[0].scalar_type(), params[0].device(), TVLARS_BUCKET_TABLES_ARGS);
  const int64_t* seg = seg_table.const_data_ptr<int64_t>();
  std::vector<void*> weights(params.size());
  for (size_t sid = 0; sid < params.size(); ++sid) {
    // the list is public: each entry must be the dense memory its segment says (threads write it)
    TORCH_CHECK(params[sid].numel() == seg[sid * SEG_COLS + SEG_NUMEL] && params[sid].is_non_overlapping_and_dense(),
                "tvlars_fused::bucket_step: params[", sid, "] (", params[sid].numel(),
                " elements) must be dense in memory with seg_table's numel ", seg[sid * SEG_COLS + SEG_NUMEL]);
    weights[sid] = params[sid].data_ptr();
  }
  step_cpu(weights, TVLARS_BUCKET_TABLES_ARGS);
}

void bucket_step_at_cpu(int64_t params_address, TVLARS_BUCKET_TABLES_PARAMS) {
  check_bucket_args(grads.scalar_type(), grads.device(), TVLARS_BUCKET_TABLES_ARGS);
  const int64_t S = seg_table.size(0);
  const int64_t* offsets = param_offsets.const_data_ptr<int64_t>();
  const int64_t size = static_cast<int64_t>(grads.element_size());
  std::vector<void*> weights(S);
  for (int64_t sid = 0; sid < S; ++sid) {
    weights[sid] = reinterpret_cast<void*>(params_address + offsets[sid] * size);
  }
  step_cpu(weights, TVLARS_BUCKET_TABLES_ARGS);
}

}  // namespace tvlars
