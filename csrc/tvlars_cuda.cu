// The bucket step on CUDA (docs/SPEC.md, "The bucket ABI"): two kernels per bucket per step, on
// the current stream, no host sync, deterministic.
//
// pass 1: one block per chunk. 128-bit loads of w and g, per-thread sums of w^2 and d^2, a fixed
//   block reduction (warp shuffles, then warps in order) into partials[chunk]. The block then
//   bumps counters[segment] (after __threadfence); the block that sees the count complete adds
//   the segment's chunk partials in chunk order, writes stats[segment] = (wn, dn, q, phi) and
//   resets the counter to zero for the next launch. Which block finishes last changes nothing:
//   every block's partial is a fixed function of its chunk, and the sum runs in chunk order.
// pass 2: one block per chunk, elementwise update with q = stats[segment, 2], 128-bit loads and
//   stores; block 0 increments step.
// Both kernels read found_inf on the device and change nothing when it is nonzero. The grid is
// chunk_table.size(0) blocks (at least 1), a shape the host knows without a sync.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE headers
// a bare CUDA toolkit may lack), so this file also compiles against a CPU build of torch
// (tests/test_nvcc.py).
#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "tvlars_math.h"
#include "tvlars_ops.h"

namespace tvlars {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;

// N consecutive elements moved as 128-bit accesses (one for the parameter dtype; two for the
// float32 state of bfloat16/float16 parameters). Aligned to at most 16 bytes: that is what the host
// checks of the buffers, so the compiler never assumes more (no 256-bit access on newer GPUs).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

template <typename P>
struct Width {
  static constexpr int value = 16 / static_cast<int>(sizeof(P));  // elements per 128 bits
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = add(x, __shfl_down_sync(0xffffffffu, x, offset));
  return x;
}

// Sum of x over the block in a fixed order (result valid in thread 0).
template <typename A>
__device__ __forceinline__ void block_sum2(A& x, A& y) {
  __shared__ A sx[WARPS], sy[WARPS];
  x = warp_sum(x);
  y = warp_sum(y);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sx[warp] = x;
    sy[warp] = y;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    x = sx[0];
    y = sy[0];
#pragma unroll
    for (int i = 1; i < WARPS; ++i) {
      x = add(x, sx[i]);
      y = add(y, sy[i]);
    }
  }
}

template <typename A>
__device__ __forceinline__ void write_stats(A* stats, int64_t sid, A sum_w2, A sum_d2, const A* group,
                                            int64_t flags, float t) {
  const SegmentStats<A> st = segment_stats(sum_w2, sum_d2, group, flags, t);
  A* out = stats + sid * STAT_COLS;
  out[STAT_WEIGHT_NORM] = st.wn;
  out[STAT_UPDATE_NORM] = st.dn;
  out[STAT_TRUST_RATIO] = st.q;
  out[STAT_PHI] = st.phi;
}

template <typename P>
__global__ void __launch_bounds__(THREADS)
    pass1_kernel(const P* __restrict__ w, const P* __restrict__ g, const int64_t* __restrict__ seg,
                 const int32_t* __restrict__ active, const int64_t* __restrict__ chunks,
                 const typename Types<P>::acc* __restrict__ groups, typename Types<P>::acc* partials,
                 int32_t* counters, typename Types<P>::acc* stats, const float* __restrict__ step,
                 const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                 int64_t num_segs, int64_t num_chunks, int64_t chunk_elems) {
  using A = typename Types<P>::acc;
  constexpr int V = Width<P>::value;
  if (found_inf != nullptr && *found_inf != 0.0f) return;

  const int64_t c = blockIdx.x;
  if (c < num_chunks) {
    const int64_t start = chunks[c * CHUNK_COLS + CHUNK_START];
    const int64_t sid = chunks[c * CHUNK_COLS + CHUNK_SEG];
    if (active[sid] != 0) {
      const int64_t* row = seg + sid * SEG_COLS;
      const int64_t end = row[SEG_END];
      const int64_t flags = row[SEG_FLAGS];
      const A* group = groups + row[SEG_GROUP] * GROUP_COLS;
      const int64_t stop = start + chunk_elems < end ? start + chunk_elems : end;
      const bool has_scale = grad_scale != nullptr;
      const A scale = has_scale ? static_cast<A>(*grad_scale) : A(1);
      const bool decay = (flags & FLAG_SKIP_WEIGHT_DECAY) == 0;
      const A wd = group[COL_WEIGHT_DECAY];

      A sw = A(0), sd = A(0);
      if (((start | stop) % V) == 0) {  // always, for a bucket built by buckets.py
#pragma unroll 4
        for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * V; i < stop; i += THREADS * V) {
          const Vec<P, V> wv = load_vec<P, V>(w + i);
          const Vec<P, V> gv = load_vec<P, V>(g + i);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A wa = to_acc<A>(wv.v[j]);
            const A d = direction(to_acc<A>(gv.v[j]), wa, scale, wd, has_scale, decay);
            sw = add(sw, mul(wa, wa));
            sd = add(sd, mul(d, d));
          }
        }
      } else {
        for (int64_t i = start + threadIdx.x; i < stop; i += THREADS) {
          const A wa = to_acc<A>(w[i]);
          const A d = direction(to_acc<A>(g[i]), wa, scale, wd, has_scale, decay);
          sw = add(sw, mul(wa, wa));
          sd = add(sd, mul(d, d));
        }
      }
      block_sum2(sw, sd);

      if (threadIdx.x == 0) {
        partials[c * PART_COLS + PART_W2] = sw;
        partials[c * PART_COLS + PART_D2] = sd;
        __threadfence();  // the partial is visible device-wide before the count says so
        const int64_t first = row[SEG_FIRST_CHUNK], count = row[SEG_NUM_CHUNKS];
        const int32_t done = atomicAdd(counters + sid, 1);
        if (done == count - 1) {  // the segment's last chunk: reduce in chunk order
          __threadfence();
          A tw = A(0), td = A(0);
          for (int64_t k = first; k < first + count; ++k) {
            tw = add(tw, __ldcg(partials + k * PART_COLS + PART_W2));
            td = add(td, __ldcg(partials + k * PART_COLS + PART_D2));
          }
          write_stats(stats, sid, tw, td, group, flags, *step);
          counters[sid] = 0;  // workspace is zero between launches
        }
      }
    }
  }

  // Active segments without chunks (zero-size parameters): no block finishes them above.
  if (threadIdx.x == 0) {
    for (int64_t sid = blockIdx.x; sid < num_segs; sid += gridDim.x) {
      const int64_t* row = seg + sid * SEG_COLS;
      if (row[SEG_NUM_CHUNKS] == 0 && active[sid] != 0)
        write_stats(stats, sid, A(0), A(0), groups + row[SEG_GROUP] * GROUP_COLS, row[SEG_FLAGS], *step);
    }
  }
}

template <typename P>
__global__ void __launch_bounds__(THREADS)
    pass2_kernel(P* __restrict__ w, const P* __restrict__ g, typename Types<P>::state* __restrict__ s,
                 const int64_t* __restrict__ seg, const int32_t* __restrict__ active,
                 const int64_t* __restrict__ chunks, const typename Types<P>::acc* __restrict__ groups,
                 const typename Types<P>::acc* __restrict__ stats, float* step,
                 const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                 int64_t num_chunks, int64_t chunk_elems) {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;
  constexpr int V = Width<P>::value;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) *step = add(*step, 1.0f);

  const int64_t c = blockIdx.x;
  if (c >= num_chunks) return;
  const int64_t start = chunks[c * CHUNK_COLS + CHUNK_START];
  const int64_t sid = chunks[c * CHUNK_COLS + CHUNK_SEG];
  if (active[sid] == 0) return;
  const int64_t* row = seg + sid * SEG_COLS;
  const int64_t end = row[SEG_END];
  const A* group = groups + row[SEG_GROUP] * GROUP_COLS;
  const int64_t stop = start + chunk_elems < end ? start + chunk_elems : end;
  const bool has_scale = grad_scale != nullptr;
  const A scale = has_scale ? static_cast<A>(*grad_scale) : A(1);
  const bool decay = (row[SEG_FLAGS] & FLAG_SKIP_WEIGHT_DECAY) == 0;
  const A wd = group[COL_WEIGHT_DECAY];
  const A lr = group[COL_LR], momentum = group[COL_MOMENTUM];
  const bool paper = group[COL_PAPER_FORM] != A(0);
  const A q = stats[sid * STAT_COLS + STAT_TRUST_RATIO];

  if (((start | stop) % V) == 0) {
#pragma unroll 2
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * V; i < stop; i += THREADS * V) {
      Vec<P, V> wv = load_vec<P, V>(w + i);
      const Vec<P, V> gv = load_vec<P, V>(g + i);
      Vec<S, V> sv = load_vec<S, V>(s + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A wa = to_acc<A>(wv.v[j]);
        A sa = static_cast<A>(sv.v[j]);
        const A u = mul(q, direction(to_acc<A>(gv.v[j]), wa, scale, wd, has_scale, decay));
        update(wa, sa, u, lr, momentum, paper);
        wv.v[j] = from_acc<P>(wa);
        sv.v[j] = static_cast<S>(sa);
      }
      store_vec<P, V>(w + i, wv);
      store_vec<S, V>(s + i, sv);
    }
  } else {
    for (int64_t i = start + threadIdx.x; i < stop; i += THREADS) {
      A wa = to_acc<A>(w[i]);
      A sa = static_cast<A>(s[i]);
      const A u = mul(q, direction(to_acc<A>(g[i]), wa, scale, wd, has_scale, decay));
      update(wa, sa, u, lr, momentum, paper);
      w[i] = from_acc<P>(wa);
      s[i] = static_cast<S>(sa);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void bucket_step_cuda(TVLARS_BUCKET_STEP_PARAMS) {
  check_bucket_args(TVLARS_BUCKET_STEP_ARGS);
  TORCH_CHECK(aligned16(params.const_data_ptr()) && aligned16(grads.const_data_ptr()) &&
                  aligned16(state.const_data_ptr()),
              "tvlars_fused::bucket_step: params, grads and state must be 16-byte aligned (128-bit access)");
  const int64_t num_segs = seg_table.size(0), num_chunks = chunk_table.size(0);
  TORCH_CHECK(num_chunks < (int64_t(1) << 31), "tvlars_fused::bucket_step: too many chunks (", num_chunks,
              "); use a larger chunk_elems");
  const c10::cuda::CUDAGuard guard(params.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(num_chunks > 0 ? num_chunks : 1);
  const float* scale_ptr = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const float* inf_ptr = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params.scalar_type(), "tvlars_bucket_step_cuda", [&] {
    using P = scalar_t;
    using A = typename Types<P>::acc;
    using St = typename Types<P>::state;
    if (num_segs > 0) {
      pass1_kernel<P><<<grid, THREADS, 0, stream>>>(
          params.const_data_ptr<P>(), grads.const_data_ptr<P>(), seg_table.const_data_ptr<int64_t>(),
          seg_active.const_data_ptr<int32_t>(), chunk_table.const_data_ptr<int64_t>(),
          group_table.const_data_ptr<A>(), partials.mutable_data_ptr<A>(), counters.mutable_data_ptr<int32_t>(),
          stats.mutable_data_ptr<A>(), step.const_data_ptr<float>(), scale_ptr, inf_ptr, num_segs, num_chunks,
          chunk_elems);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pass2_kernel<P><<<grid, THREADS, 0, stream>>>(
        params.mutable_data_ptr<P>(), grads.const_data_ptr<P>(), state.mutable_data_ptr<St>(),
        seg_table.const_data_ptr<int64_t>(), seg_active.const_data_ptr<int32_t>(),
        chunk_table.const_data_ptr<int64_t>(), group_table.const_data_ptr<A>(), stats.const_data_ptr<A>(),
        step.mutable_data_ptr<float>(), scale_ptr, inf_ptr, num_chunks, chunk_elems);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace tvlars
