// Entry points of the bucket step (docs/SPEC.md, "The bucket ABI"), registered as the custom op
// tvlars_fused::bucket_step in bindings.cpp.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>

namespace tvlars {

// The ops' arguments after the parameters, in schema order (bindings.cpp), written once for every
// implementation: tensors marked (x!) in the schema are the mutable references. param_offsets:
// int64 [S] on the device, element offsets of each segment's parameter from the first one's.
// state: [slots, N], one row per state slot of the algorithm (abi.h: ALGO_*, *_STATE_SLOTS).
#define TVLARS_BUCKET_TABLES_PARAMS                                                                   \
  const at::Tensor &param_offsets, const at::Tensor &grads, at::Tensor &state, const at::Tensor &seg_table, \
      const at::Tensor &seg_active, const at::Tensor &chunk_table, const at::Tensor &group_table,     \
      at::Tensor &step, at::Tensor &partials, at::Tensor &counters, at::Tensor &stats,                \
      const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf,        \
      int64_t chunk_elems, int64_t algorithm
#define TVLARS_BUCKET_TABLES_ARGS                                                                    \
  param_offsets, grads, state, seg_table, seg_active, chunk_table, group_table, step, partials, counters, \
      stats, grad_scale, found_inf, chunk_elems, algorithm

// Two entry points with the same tables:
//  - bucket_step(Tensor(a!)[] params, ...): the parameters as a list, their mutation declared, so
//    torch.compile can trace it (Meta implementation: the checks); CPU only (the CUDA kernels address
//    the parameters from params[0]: kernels/traced.py is their way through torch.compile);
//  - bucket_step_at(int params_address, ...): the first parameter's address instead of the list
//    (the others by param_offsets): what an eager step calls, without converting a list of
//    thousands of tensors every step. The caller vouches for the addresses (tvlars_fused checks
//    that no parameter moved before every step).

// Host-side checks of dtypes, shapes, devices and layout (metadata only: never reads device
// memory, so it is also the Meta / fake-tensor implementation). P and the device are the
// parameters'.
void check_bucket_args(at::ScalarType P, const at::Device& dev, TVLARS_BUCKET_TABLES_PARAMS);
void check_params_list(at::TensorList params, const at::Tensor& seg_table);

void bucket_step_cpu(at::TensorList params, TVLARS_BUCKET_TABLES_PARAMS);
void bucket_step_at_cpu(int64_t params_address, TVLARS_BUCKET_TABLES_PARAMS);

#ifdef TVLARS_WITH_CUDA
void bucket_step_cuda(at::TensorList params, TVLARS_BUCKET_TABLES_PARAMS);
void bucket_step_at_cuda(int64_t params_address, TVLARS_BUCKET_TABLES_PARAMS);
#endif

}  // namespace tvlars
