// Declarations of each feature's pybind11 registration; module.cpp calls register_all.
#pragma once
#include <pybind11/pybind11.h>

namespace kfac_fast {
// Calls every register_* below; defined in registry.cpp.
void register_all(pybind11::module_& m);
}  // namespace kfac_fast
