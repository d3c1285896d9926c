// Entry points of the bucket step (docs/SPEC.md, "The bucket ABI"), registered as the custom op
// tvlars_fused::bucket_step in bindings.cpp.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>

namespace tvlars {

// The op's arguments in schema order (bindings.cpp), written once for every implementation:
// tensors marked (x!) in the schema are the mutable references.
// params: one tensor per segment (the parameters, in their own memory); param_offsets: int64 [S]
// on the device, element offsets of each from params[0] (what the CUDA kernels read; the CPU
// kernel takes the pointers from the list).
#define TVLARS_BUCKET_STEP_PARAMS                                                                     \
  at::TensorList params, const at::Tensor &param_offsets, const at::Tensor &grads, at::Tensor &state, \
      const at::Tensor &seg_table, const at::Tensor &seg_active, const at::Tensor &chunk_table,       \
      const at::Tensor &group_table, at::Tensor &step, at::Tensor &partials, at::Tensor &counters,    \
      at::Tensor &stats, const std::optional<at::Tensor> &grad_scale,                                 \
      const std::optional<at::Tensor> &found_inf, int64_t chunk_elems
#define TVLARS_BUCKET_STEP_ARGS                                                                      \
  params, param_offsets, grads, state, seg_table, seg_active, chunk_table, group_table, step, partials, \
      counters, stats, grad_scale, found_inf, chunk_elems

// Host-side checks of dtypes, shapes, devices and layout (metadata only: never reads device
// memory, so it is also the Meta / fake-tensor implementation).
void check_bucket_args(TVLARS_BUCKET_STEP_PARAMS);

void bucket_step_cpu(TVLARS_BUCKET_STEP_PARAMS);

#ifdef TVLARS_WITH_CUDA
void bucket_step_cuda(TVLARS_BUCKET_STEP_PARAMS);
#endif

}  // namespace tvlars
