// Registers the custom ops tvlars_fused::bucket_step and ::bucket_step_at (docs/SPEC.md, "The bucket
// ABI"; bucket_step.h says how they differ) with their CPU, CUDA (when built with TVLARS_WITH_CUDA)
// and Meta implementations, and defines the Python module tvlars_fused._C whose import loads this
// library (the ops are called as torch.ops.tvlars_fused.*; its one function, step_signature, is the
// fast host check of csrc/host_checks.cpp).
#include <Python.h>

#include <torch/library.h>

#include "host_checks.h"
#include "abi.h"
#include "algo/algorithms.h"
#include "bucket_step.h"

namespace tvlars {
namespace {

const char* const kOp = "tvlars_fused::bucket_step";

// Shape checks go through SymInt so that the same code is the Meta / fake-tensor kernel under
// torch.compile with dynamic shapes (sizes may be symbolic there; in eager they are plain ints).
void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, const c10::SymInt& numel,
                  const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, kOp, ": ", name, " must be 1-D, got shape ", t.sym_sizes());
  TORCH_SYM_CHECK(t.sym_numel().sym_eq(numel), kOp, ": ", name, " must have ", numel, " elements, got ",
                  t.sym_numel());
  TORCH_SYM_CHECK(t.sym_is_contiguous(), kOp, ": ", name, " must be contiguous");
  TORCH_CHECK(t.device() == device, kOp, ": ", name, " is on ", t.device(), " but params on ", device);
}

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, const c10::SymInt& cols,
                 const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must have shape [N, ", cols, "], got ", t.sym_sizes());
  TORCH_SYM_CHECK(t.sym_size(1).sym_eq(cols), kOp, ": ", name, " must have shape [N, ", cols, "], got ",
                  t.sym_sizes());
  TORCH_SYM_CHECK(t.sym_is_contiguous(), kOp, ": ", name, " must be contiguous");
  TORCH_CHECK(t.device() == device, kOp, ": ", name, " is on ", t.device(), " but params on ", device);
}

void check_scalar(const std::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, kOp, ": ", name, " must be a one-element float32 tensor, got ",
              t->scalar_type());
  TORCH_SYM_CHECK(t->sym_numel().sym_eq(1), kOp, ": ", name, " must be a one-element float32 tensor, got shape ",
                  t->sym_sizes());
  TORCH_CHECK(t->device() == device, kOp, ": ", name, " is on ", t->device(), " but params on ", device);
}

}  // namespace

void check_params_list(at::TensorList params, const at::Tensor& seg_table) {
  TORCH_CHECK(!params.empty(), kOp, ": params must list one tensor per segment (got none)");
  const at::ScalarType P = params[0].scalar_type();
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].scalar_type() == P && params[i].device() == dev, kOp, ": params[", i, "] is ",
                params[i].scalar_type(), " on ", params[i].device(), " but params[0] is ", P, " on ", dev);
  }
  TORCH_SYM_CHECK(seg_table.sym_size(0).sym_eq(static_cast<int64_t>(params.size())), kOp,
                  ": params must list one tensor per segment (", seg_table.sym_size(0), "), got ", params.size());
}

void check_bucket_args(at::ScalarType P, const at::Device& dev, TVLARS_BUCKET_TABLES_PARAMS) {
  TORCH_CHECK(P == at::kFloat || P == at::kDouble || P == at::kBFloat16 || P == at::kHalf, kOp,
              ": params must be float32, float64, bfloat16 or float16, got ", P);
  TORCH_CHECK(known_algorithm(algorithm), kOp, ": algorithm must be ", ALGO_LARS, " (LARS) or ", ALGO_LAMB,
              " (LAMB), got ", algorithm);
  const int64_t slots = state_slots(algorithm);
  const bool low = P == at::kBFloat16 || P == at::kHalf;
  const at::ScalarType S = low ? at::kFloat : P;
  const at::ScalarType A = P == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(chunk_elems > 0 && chunk_elems % ALIGN == 0, kOp, ": chunk_elems must be a positive multiple of ",
              ALIGN, ", got ", chunk_elems);
  const c10::SymInt n = grads.sym_numel();
  check_vector(grads, "grads", P, n, dev);
  check_table(state, "state", S, n, dev);
  TORCH_SYM_CHECK(state.sym_size(0).sym_eq(slots), kOp, ": state must have one row per state slot of the algorithm (",
                  slots, "), got ", state.sym_size(0));
  check_table(seg_table, "seg_table", at::kLong, SEG_COLS, dev);
  check_table(chunk_table, "chunk_table", at::kLong, CHUNK_COLS, dev);
  check_table(group_table, "group_table", at::kDouble, GROUP_COLS, dev);
  const c10::SymInt segs = seg_table.sym_size(0), chunks = chunk_table.sym_size(0);
  check_vector(param_offsets, "param_offsets", at::kLong, segs, dev);
  check_vector(seg_active, "seg_active", at::kInt, segs, dev);
  check_vector(counters, "counters", at::kInt, segs, dev);
  check_table(stats, "stats", A, STAT_COLS, dev);
  TORCH_SYM_CHECK(stats.sym_size(0).sym_eq(segs), kOp, ": stats must have one row per segment (", segs,
                  "), got ", stats.sym_size(0));
  check_table(partials, "partials", A, PART_COLS, dev);
  TORCH_SYM_CHECK(partials.sym_size(0).sym_ge(chunks), kOp, ": partials must have at least one row per chunk (",
                  chunks, "), got ", partials.sym_size(0));
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.device() == dev, kOp,
              ": step must be a one-element float32 tensor on ", dev);
  TORCH_SYM_CHECK(step.sym_numel().sym_eq(1), kOp, ": step must be a one-element float32 tensor on ", dev);
  check_scalar(grad_scale, "grad_scale", dev);
  check_scalar(found_inf, "found_inf", dev);
}

namespace {

void bucket_step_meta(at::TensorList params, TVLARS_BUCKET_TABLES_PARAMS) {
  check_params_list(params, seg_table);
  check_bucket_args(params[0].scalar_type(), params[0].device(), TVLARS_BUCKET_TABLES_ARGS);
}

}  // namespace
}  // namespace tvlars

#define TVLARS_TABLES_SCHEMA                                                                          \
  "Tensor param_offsets, Tensor grads, Tensor(b!) state, Tensor seg_table, Tensor seg_active, "       \
  "Tensor chunk_table, Tensor group_table, Tensor(c!) step, Tensor(d!) partials, Tensor(e!) counters, " \
  "Tensor(f!) stats, Tensor? grad_scale, Tensor? found_inf, int chunk_elems, int algorithm) -> ()"

TORCH_LIBRARY(tvlars_fused, m) {
  m.def("bucket_step(Tensor(a!)[] params, " TVLARS_TABLES_SCHEMA);
  m.def("bucket_step_at(int params_address, " TVLARS_TABLES_SCHEMA);
}

TORCH_LIBRARY_IMPL(tvlars_fused, CPU, m) {
  m.impl("bucket_step", TORCH_FN(tvlars::bucket_step_cpu));
  m.impl("bucket_step_at", TORCH_FN(tvlars::bucket_step_at_cpu));
}

TORCH_LIBRARY_IMPL(tvlars_fused, Meta, m) {
  m.impl("bucket_step", TORCH_FN(tvlars::bucket_step_meta));
}

#ifdef TVLARS_WITH_CUDA
TORCH_LIBRARY_IMPL(tvlars_fused, CUDA, m) {
  m.impl("bucket_step", TORCH_FN(tvlars::bucket_step_cuda));
  m.impl("bucket_step_at", TORCH_FN(tvlars::bucket_step_at_cuda));
}
#endif

// The Python module: importing it loads this library, which runs the registrations above.
#define TVLARS_CONCAT_(a, b) a##b
#define TVLARS_CONCAT(a, b) TVLARS_CONCAT_(a, b)
#define TVLARS_STR_(a) #a
#define TVLARS_STR(a) TVLARS_STR_(a)

extern "C" PyMODINIT_FUNC TVLARS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyMethodDef methods[] = {
      {"step_signature", tvlars::step_signature, METH_O,
       "step_signature(params) -> bytes: data pointers, .grad identities, sizes and strides"},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, TVLARS_STR(TORCH_EXTENSION_NAME),
                            "tvlars_fused C++/CUDA kernels: registers torch.ops.tvlars_fused.bucket_step",
                            -1, methods, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
#ifdef TVLARS_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
