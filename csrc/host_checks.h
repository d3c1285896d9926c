// Host-side helpers exposed on the Python module tvlars_fused._C (host_checks.cpp).
#pragma once

#include <Python.h>

namespace tvlars {

PyObject* step_signature(PyObject* module, PyObject* params);

}  // namespace tvlars
