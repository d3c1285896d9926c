// tvlars_fused._C.step_signature(params) -> bytes: what the fused step checks on the host before
// every step, in one pass instead of four Python-level ones: per parameter its data pointer, the
// TensorImpl of its .grad (0 when None) and the grad's data pointer (`p.grad.data = x` keeps the
// TensorImpl), its sizes and strides. Equal to the last step's bytes, nothing moved and every
// gradient is the same tensor over the same memory as then (buckets.py: the fast path).
#include "host_checks.h"

#include <cstdint>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

namespace tvlars {

PyObject* step_signature(PyObject* /*module*/, PyObject* params) {
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "step_signature expects a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(n) * 8);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "step_signature: params[%zd] is not a tensor", i);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    const at::Tensor& g = t.grad();
    out.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
    out.push_back(g.defined() ? reinterpret_cast<int64_t>(g.unsafeGetTensorImpl()) : 0);
    out.push_back(g.defined() && g.has_storage() ? reinterpret_cast<int64_t>(g.const_data_ptr()) : 0);
    out.push_back(t.dim());
    for (const int64_t s : t.sizes()) out.push_back(s);
    for (const int64_t s : t.strides()) out.push_back(s);
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}

}  // namespace tvlars
