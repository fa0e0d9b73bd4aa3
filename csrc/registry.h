// Declarations of each feature's pybind11 registration; module.cpp calls register_all.
#pragma once
#include <pybind11/pybind11.h>

namespace kfac_fast {
// Calls every register_* below; defined in registry.cpp.
void register_all(pybind11::module_& m);

// jacobi_host.cpp: the Jacobi eigensolver core on the host, and its launch plan.
void register_jacobi_host(pybind11::module_& m);
// cuda_ops.cpp: the CUDA launchers (registers nothing in a CPU-only build).
void register_cuda_ops(pybind11::module_& m);
}  // namespace kfac_fast
