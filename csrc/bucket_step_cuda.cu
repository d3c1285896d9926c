// The bucket step on CUDA (docs/SPEC.md, "The bucket ABI"): two kernels per bucket per step, on
// the current stream, no host sync, deterministic; generic over the algorithm (algo/*.h: the
// kernels are templates over it, instantiated for every algorithm and dtype).
//
// The weights stay in the parameters' own memory: segment i's parameter starts params[0] +
// param_offsets[i] elements; gradients and state are flat padded buffers. Only a parameter's own
// elements are read or written (never past its end), and the state's padding is never written.
//
// pass 1: one block per chunk. 128-bit loads of w (where aligned), g (and the state where the
//   algorithm updates it in pass 1), per-thread sums of the three squares (only of the parameter's
//   own elements), a fixed block reduction (warp shuffles, then warps in order) into partials[chunk].
//   The block then bumps counters[segment] (after __threadfence); the block that sees the count
//   complete adds the segment's chunk partials in the order of docs/SPEC.md (tiles of REDUCE_TILE
//   chunks loaded by all threads, a pairwise tree each, tiles in chunk order), writes
//   the segment's stats row (Algo::finish) and resets the counter. Which block finishes last changes
//   nothing: every block's partial is a fixed function of its chunk, and the order is fixed.
// pass 2: one block per chunk, the algorithm's elementwise update from its stats row (never t,
//   which block 0 increments meanwhile), 128-bit loads and stores; each segment's first block
//   zeroes its counter (pass 1 is over), so a counter left non-zero by an interrupted launch heals
//   at the next step.
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

#include "algo/algorithms.h"
#include "arith.h"
#include "bucket_step.h"

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

// Sums of x, y, z over the block in a fixed order (results valid in thread 0).
template <typename A>
__device__ __forceinline__ void block_sum3(A& x, A& y, A& z) {
  __shared__ A sx[WARPS], sy[WARPS], sz[WARPS];
  x = warp_sum(x);
  y = warp_sum(y);
  z = warp_sum(z);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sx[warp] = x;
    sy[warp] = y;
    sz[warp] = z;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    x = sx[0];
    y = sy[0];
    z = sz[0];
#pragma unroll
    for (int i = 1; i < WARPS; ++i) {
      x = add(x, sx[i]);
      y = add(y, sy[i]);
      z = add(z, sz[i]);
    }
  }
}

// x[0] + ... + x[N-1] as a pairwise tree (N a power of two).
template <int N, typename A>
__device__ __forceinline__ A pairwise_sum(const A* x) {
  if constexpr (N == 1) {
    return x[0];
  } else {
    return add(pairwise_sum<N / 2>(x), pairwise_sum<N / 2>(x + N / 2));
  }
}

// Column col of partials[first, first + count) added as docs/SPEC.md says (result in thread 0):
// tiles of REDUCE_TILE chunks; in a tile thread t holds chunks 4t..4t+3 (+0 past the end) and
// adds them pairwise, then adjacent threads are combined pairwise (shuffles within a warp, then
// the warps' results, also pairwise), so each tile is the pairwise tree; tiles in chunk order.
template <typename A>
__device__ __forceinline__ A segment_sum(const A* partials, int64_t first, int64_t count, int col) {
  static_assert(REDUCE_TILE == 4 * THREADS, "a tile is four partials per thread");
  __shared__ A warp_sums[WARPS];
  A total = A(0);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t base = first; base < first + count; base += REDUCE_TILE) {
    A v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = base + 4 * static_cast<int64_t>(threadIdx.x) + j;
      v[j] = k < first + count ? __ldcg(partials + k * PART_COLS + col) : A(0);
    }
    A x = add(add(v[0], v[1]), add(v[2], v[3]));
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) x = add(x, __shfl_down_sync(0xffffffffu, x, offset));
    if (lane == 0) warp_sums[warp] = x;
    __syncthreads();
    if (threadIdx.x == 0) total = add(total, pairwise_sum<WARPS>(warp_sums));
    __syncthreads();
  }
  return total;
}

// 1 / grad_scale (one when there is no AMP scale): g/scale as g * (1/scale), the same bits for
// GradScaler's powers of two, as the CPU and Triton kernels do
template <typename A>
__device__ __forceinline__ A inv_scale(const float* grad_scale, A one) {
  return grad_scale != nullptr ? div(one, static_cast<A>(*grad_scale)) : one;
}

// Segment sid's parameter as a pointer indexed by flat buffer positions: wseg[i] is the
// parameter's element i - seg_start (integer arithmetic on the address: the parameter need not
// lie inside params[0]'s allocation).
template <typename P>
__device__ __forceinline__ P* segment_weights(P* w0, const int64_t* offsets, int64_t sid, int64_t seg_start) {
  return reinterpret_cast<P*>(reinterpret_cast<intptr_t>(w0) +
                              (offsets[sid] - seg_start) * static_cast<intptr_t>(sizeof(P)));
}

// V consecutive weights from flat position i: one 128-bit load when the address is aligned and all
// V lie inside the parameter, else element by element (0 past its end).
template <typename P, int V>
__device__ __forceinline__ Vec<P, V> load_weights(const P* wseg, int64_t i, int64_t real_end) {
  if (i + V <= real_end && (reinterpret_cast<uintptr_t>(wseg + i) % 16) == 0) return load_vec<P, V>(wseg + i);
  Vec<P, V> out;
#pragma unroll
  for (int j = 0; j < V; ++j) out.v[j] = i + j < real_end ? wseg[i + j] : P(0.0f);
  return out;
}

// Store V values at flat position i, only the parameter's own elements (never the padding).
template <typename T, int V>
__device__ __forceinline__ void store_real(T* ptr, int64_t i, int64_t real_end, const Vec<T, V>& v) {
  if (i + V <= real_end && (reinterpret_cast<uintptr_t>(ptr + i) % 16) == 0) {
    store_vec<T, V>(ptr + i, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (i + j < real_end) ptr[i + j] = v.v[j];
  }
}

// g' = g * gmul: (maximize ? -1 : 1) / grad_scale
template <typename A>
__device__ __forceinline__ A grad_multiplier(const GroupRow<A>& group, const float* grad_scale) {
  return mul(group[COL_GRAD_SIGN], inv_scale(grad_scale, A(1)));
}

template <class Algo, typename P>
__global__ void __launch_bounds__(THREADS)
    pass1_kernel(P* w0, const int64_t* __restrict__ w_offsets, const P* __restrict__ g,
                 typename Types<P>::state* s, int64_t numel, const int64_t* __restrict__ seg,
                 const int32_t* __restrict__ active, const int64_t* __restrict__ chunks,
                 const double* __restrict__ groups, typename Types<P>::acc* partials, int32_t* counters,
                 typename Types<P>::acc* stats, const float* __restrict__ step, const float* __restrict__ grad_scale,
                 const float* __restrict__ found_inf, int64_t num_segs, int64_t num_chunks, int64_t chunk_elems) {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;
  // elements per access: 128 bits of the parameter dtype, or of the state where pass 1 streams it
  // too (bfloat16/float16 w and g then move 64 bits at a time: fewer registers)
  constexpr int V = Algo::PASS1_STATE ? Width<S>::value : Width<P>::value, SL = Algo::SLOTS;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float t = *step;   // (pass 2 increments it, after this launch)

  const int64_t c = blockIdx.x;
  if (c < num_chunks) {
    const int64_t start = chunks[c * CHUNK_COLS + CHUNK_START];
    const int64_t sid = chunks[c * CHUNK_COLS + CHUNK_SEG];
    if (active[sid] != 0) {
      const int64_t* row = seg + sid * SEG_COLS;
      const int64_t end = row[SEG_END];
      const int64_t real_end = row[SEG_OFFSET] + row[SEG_NUMEL];
      const int64_t flags = row[SEG_FLAGS];
      const GroupRow<A> group{groups + row[SEG_GROUP] * GROUP_COLS};
      const int64_t stop = start + chunk_elems < end ? start + chunk_elems : end;
      const auto p = Algo::pass1_params(group, flags, grad_multiplier(group, grad_scale), t);
      const P* w = segment_weights(w0, w_offsets, sid, row[SEG_OFFSET]);

      A sw = A(0), su = A(0), sg = A(0);
      // one element; only the parameter's own (the padding contributes nothing)
      auto accumulate = [&](A wa, A ga, A* sl) {
        A gs, wt, ut;
        Algo::template pass1<ScalarMath>(p, wa, ga, sl, gs, wt, ut);
        sw = add(sw, mul(wt, wt));
        su = add(su, mul(ut, ut));
        sg = add(sg, mul(gs, gs));
      };
      if (((start | stop) % V) == 0) {  // always, for a bucket built by buckets.py
        // four iterations in flight; one where the state streams too (registers: tests/test_nvcc.py)
        constexpr int UNROLL = Algo::PASS1_STATE ? 1 : 4;
#pragma unroll UNROLL
        for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * V; i < stop; i += THREADS * V) {
          const Vec<P, V> wv = load_weights<P, V>(w, i, real_end);
          const Vec<P, V> gv = load_vec<P, V>(g + i);
          Vec<S, V> sv[SL];
          if constexpr (Algo::PASS1_STATE) {
#pragma unroll
            for (int k = 0; k < SL; ++k) sv[k] = load_vec<S, V>(s + k * numel + i);
          }
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (i + j >= real_end) break;
            A sl[SL];
#pragma unroll
            for (int k = 0; k < SL; ++k) sl[k] = Algo::PASS1_STATE ? static_cast<A>(sv[k].v[j]) : A(0);
            accumulate(to_acc<A>(wv.v[j]), to_acc<A>(gv.v[j]), sl);
#pragma unroll
            for (int k = 0; k < SL; ++k) sv[k].v[j] = static_cast<S>(sl[k]);
          }
          if constexpr (Algo::PASS1_STATE) {
#pragma unroll
            for (int k = 0; k < SL; ++k) store_real<S, V>(s + k * numel, i, real_end, sv[k]);
          }
        }
      } else {
        for (int64_t i = start + threadIdx.x; i < stop && i < real_end; i += THREADS) {
          A sl[SL];
#pragma unroll
          for (int k = 0; k < SL; ++k) sl[k] = Algo::PASS1_STATE ? static_cast<A>(s[k * numel + i]) : A(0);
          accumulate(to_acc<A>(w[i]), to_acc<A>(g[i]), sl);
          if constexpr (Algo::PASS1_STATE) {
#pragma unroll
            for (int k = 0; k < SL; ++k) s[k * numel + i] = static_cast<S>(sl[k]);
          }
        }
      }
      block_sum3(sw, su, sg);

      __shared__ int32_t last;
      if (threadIdx.x == 0) {
        partials[c * PART_COLS + PART_W2] = sw;
        partials[c * PART_COLS + PART_U2] = su;
        partials[c * PART_COLS + PART_G2] = sg;
        __threadfence();  // the partial is visible device-wide before the count says so
        last = atomicAdd(counters + sid, 1) == row[SEG_NUM_CHUNKS] - 1;
      }
      __syncthreads();
      if (last) {  // the segment's last chunk: every thread helps add the partials
        __threadfence();
        const int64_t first = row[SEG_FIRST_CHUNK], count = row[SEG_NUM_CHUNKS];
        const A tw = segment_sum(partials, first, count, PART_W2);
        const A tu = segment_sum(partials, first, count, PART_U2);
        const A tg = segment_sum(partials, first, count, PART_G2);
        if (threadIdx.x == 0) {
          Algo::finish(stats + sid * STAT_COLS, tw, tu, tg, group, flags, t);
          counters[sid] = 0;  // workspace is zero between launches
        }
      }
    }
  }

  // Active segments without chunks (zero-size parameters): no block finishes them above.
  if (threadIdx.x == 0) {
    for (int64_t sid = blockIdx.x; sid < num_segs; sid += gridDim.x) {
      const int64_t* row = seg + sid * SEG_COLS;
      if (row[SEG_NUM_CHUNKS] == 0 && active[sid] != 0) {
        Algo::finish(stats + sid * STAT_COLS, A(0), A(0), A(0), GroupRow<A>{groups + row[SEG_GROUP] * GROUP_COLS},
                     row[SEG_FLAGS], t);
      }
    }
  }
}

template <class Algo, typename P>
__global__ void __launch_bounds__(THREADS)
    pass2_kernel(P* w0, const int64_t* __restrict__ w_offsets, const P* __restrict__ g,
                 typename Types<P>::state* __restrict__ s, int64_t numel, const int64_t* __restrict__ seg,
                 const int32_t* __restrict__ active, const int64_t* __restrict__ chunks,
                 const double* __restrict__ groups, const typename Types<P>::acc* __restrict__ stats, float* step,
                 int32_t* counters, const float* __restrict__ grad_scale, const float* __restrict__ found_inf,
                 int64_t num_chunks, int64_t chunk_elems) {
  using A = typename Types<P>::acc;
  using S = typename Types<P>::state;
  constexpr int V = Width<P>::value, SL = Algo::SLOTS;
  const int64_t c = blockIdx.x;
  if (c < num_chunks && threadIdx.x == 0) {  // pass 1 is over: heal a counter left non-zero
    const int64_t sid = chunks[c * CHUNK_COLS + CHUNK_SEG];
    if (chunks[c * CHUNK_COLS + CHUNK_START] == seg[sid * SEG_COLS + SEG_OFFSET]) counters[sid] = 0;
  }
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) *step = add(*step, 1.0f);

  if (c >= num_chunks) return;
  const int64_t start = chunks[c * CHUNK_COLS + CHUNK_START];
  const int64_t sid = chunks[c * CHUNK_COLS + CHUNK_SEG];
  if (active[sid] == 0) return;
  const int64_t* row = seg + sid * SEG_COLS;
  const int64_t end = row[SEG_END];
  const int64_t real_end = row[SEG_OFFSET] + row[SEG_NUMEL];
  P* w = segment_weights(w0, w_offsets, sid, row[SEG_OFFSET]);
  const GroupRow<A> group{groups + row[SEG_GROUP] * GROUP_COLS};
  const int64_t stop = start + chunk_elems < end ? start + chunk_elems : end;
  const auto p = Algo::pass2_params(group, row[SEG_FLAGS], stats + sid * STAT_COLS, grad_multiplier(group, grad_scale));

  if (((start | stop) % V) == 0) {
#pragma unroll 2
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * V; i < stop; i += THREADS * V) {
      Vec<P, V> wv = load_weights<P, V>(w, i, real_end);
      Vec<P, V> gv;
      if constexpr (Algo::PASS2_GRAD) gv = load_vec<P, V>(g + i);
      Vec<S, V> sv[SL];
#pragma unroll
      for (int k = 0; k < SL; ++k) sv[k] = load_vec<S, V>(s + k * numel + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A wa = to_acc<A>(wv.v[j]);
        A sl[SL];
#pragma unroll
        for (int k = 0; k < SL; ++k) sl[k] = static_cast<A>(sv[k].v[j]);
        Algo::template pass2<ScalarMath>(p, wa, Algo::PASS2_GRAD ? to_acc<A>(gv.v[j]) : A(0), sl);
        wv.v[j] = from_acc<P>(wa);
#pragma unroll
        for (int k = 0; k < SL; ++k) sv[k].v[j] = static_cast<S>(sl[k]);
      }
      store_real<P, V>(w, i, real_end, wv);
      if constexpr (Algo::PASS2_STATE) {
#pragma unroll
        for (int k = 0; k < SL; ++k) store_real<S, V>(s + k * numel, i, real_end, sv[k]);
      }
    }
  } else {
    for (int64_t i = start + threadIdx.x; i < real_end && i < stop; i += THREADS) {
      A wa = to_acc<A>(w[i]);
      A sl[SL];
#pragma unroll
      for (int k = 0; k < SL; ++k) sl[k] = static_cast<A>(s[k * numel + i]);
      Algo::template pass2<ScalarMath>(p, wa, Algo::PASS2_GRAD ? to_acc<A>(g[i]) : A(0), sl);
      w[i] = from_acc<P>(wa);
      if constexpr (Algo::PASS2_STATE) {
#pragma unroll
        for (int k = 0; k < SL; ++k) s[k * numel + i] = static_cast<S>(sl[k]);
      }
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

namespace {

// The two launches of one algorithm over the segments' parameters at base + param_offsets.
template <class Algo>
void launch(void* base, TVLARS_BUCKET_TABLES_PARAMS) {
  const int64_t num_segs = seg_table.size(0), num_chunks = chunk_table.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(num_chunks > 0 ? num_chunks : 1);
  const float* scale_ptr = grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const float* inf_ptr = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  const int64_t numel = grads.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads.scalar_type(), "tvlars_bucket_step_cuda", [&] {
    using P = scalar_t;
    using A = typename Types<P>::acc;
    using St = typename Types<P>::state;
    P* w0 = static_cast<P*>(base);
    const int64_t* w_offsets = param_offsets.const_data_ptr<int64_t>();
    if (num_segs > 0) {
      pass1_kernel<Algo, P><<<grid, THREADS, 0, stream>>>(
          w0, w_offsets, grads.const_data_ptr<P>(), state.mutable_data_ptr<St>(), numel,
          seg_table.const_data_ptr<int64_t>(), seg_active.const_data_ptr<int32_t>(),
          chunk_table.const_data_ptr<int64_t>(), group_table.const_data_ptr<double>(), partials.mutable_data_ptr<A>(),
          counters.mutable_data_ptr<int32_t>(), stats.mutable_data_ptr<A>(), step.const_data_ptr<float>(), scale_ptr,
          inf_ptr, num_segs, num_chunks, chunk_elems);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pass2_kernel<Algo, P><<<grid, THREADS, 0, stream>>>(
        w0, w_offsets, grads.const_data_ptr<P>(), state.mutable_data_ptr<St>(), numel,
        seg_table.const_data_ptr<int64_t>(), seg_active.const_data_ptr<int32_t>(),
        chunk_table.const_data_ptr<int64_t>(), group_table.const_data_ptr<double>(), stats.const_data_ptr<A>(),
        step.mutable_data_ptr<float>(), counters.mutable_data_ptr<int32_t>(), scale_ptr, inf_ptr, num_chunks,
        chunk_elems);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void step_cuda(void* base, TVLARS_BUCKET_TABLES_PARAMS) {
  TORCH_CHECK(aligned16(grads.const_data_ptr()) && aligned16(state.const_data_ptr()),
              "tvlars_fused::bucket_step: grads and state must be 16-byte aligned (128-bit access)");
  TORCH_CHECK(chunk_table.size(0) < (int64_t(1) << 31), "tvlars_fused::bucket_step: too many chunks (",
              chunk_table.size(0), "); use a larger chunk_elems");
  const c10::cuda::CUDAGuard guard(grads.device());
  with_algorithm(algorithm, [&](auto algo) { launch<decltype(algo)>(base, TVLARS_BUCKET_TABLES_ARGS); });
}

}  // namespace

void bucket_step_cuda(at::TensorList params, TVLARS_BUCKET_TABLES_PARAMS) {
  // The kernels reach segment s at params[0] + param_offsets[s] (a device table the host cannot read
  // without a sync), so a list whose tensors lie elsewhere (the copies a compiled graph passes)
  // would be written out of bounds: refused. tvlars_fused steps CUDA buckets with bucket_step_at,
  // and inside torch.compile with tvlars_fused::traced_bucket_step (kernels/traced.py).
  check_params_list(params, seg_table);
  check_bucket_args(params[0].scalar_type(), params[0].device(), TVLARS_BUCKET_TABLES_ARGS);
  TORCH_CHECK(false, "tvlars_fused::bucket_step: a parameter list is not supported on CUDA (the kernels address "
              "the parameters from params[0] by param_offsets); call bucket_step_at with the first parameter's "
              "address, or step through the optimizer");
}

void bucket_step_at_cuda(int64_t params_address, TVLARS_BUCKET_TABLES_PARAMS) {
  check_bucket_args(grads.scalar_type(), grads.device(), TVLARS_BUCKET_TABLES_ARGS);
  step_cuda(reinterpret_cast<void*>(params_address), TVLARS_BUCKET_TABLES_ARGS);
}

}  // namespace tvlars
