// Entry points of the bucket step (docs/SPEC.md, "The bucket ABI"), registered as the custom op
// tvlars_fused::bucket_step in bindings.cpp.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace tvlars {

// Host-side checks of dtypes, shapes, devices and layout (metadata only: never reads device
// memory, so it is also the Meta / fake-tensor implementation).
void check_bucket_args(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state,
                       const at::Tensor& seg_table, const at::Tensor& seg_active,
                       const at::Tensor& chunk_table, const at::Tensor& group_table,
                       const at::Tensor& step, const at::Tensor& partials,
                       const at::Tensor& counters, const at::Tensor& stats,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, int64_t chunk_elems);

void bucket_step_cpu(at::Tensor& params, const at::Tensor& grads, at::Tensor& state,
                     const at::Tensor& seg_table, const at::Tensor& seg_active,
                     const at::Tensor& chunk_table, const at::Tensor& group_table,
                     at::Tensor& step, at::Tensor& partials, at::Tensor& counters,
                     at::Tensor& stats, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, int64_t chunk_elems);

#ifdef TVLARS_WITH_CUDA
void bucket_step_cuda(at::Tensor& params, const at::Tensor& grads, at::Tensor& state,
                      const at::Tensor& seg_table, const at::Tensor& seg_active,
                      const at::Tensor& chunk_table, const at::Tensor& group_table,
                      at::Tensor& step, at::Tensor& partials, at::Tensor& counters,
                      at::Tensor& stats, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, int64_t chunk_elems);
#endif

}  // namespace tvlars
