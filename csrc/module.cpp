// The pybind11 module kfac_fast._C: build facts plus each feature's bindings.
// Every feature file defines a `register_<feature>(py::module_&)` and is listed here.
#include <pybind11/pybind11.h>

#include "registry.h"

namespace py = pybind11;

#ifndef KFAC_FAST_WITH_CUDA
#define KFAC_FAST_WITH_CUDA 0
#endif

static py::dict build_info() {
  py::dict info;
  info["cuda"] = static_cast<bool>(KFAC_FAST_WITH_CUDA);
#if KFAC_FAST_WITH_CUDA
  info["cuda_archs"] = std::string(KFAC_FAST_CUDA_ARCH_LIST);
  info["cuda_compiler"] = std::string(KFAC_FAST_CUDA_COMPILER);
  info["cuda_runtime_major"] = KFAC_FAST_CUDA_RUNTIME_MAJOR;
#else
  info["cuda_archs"] = std::string("");
  info["cuda_compiler"] = std::string("");
  info["cuda_runtime_major"] = 0;
#endif
  info["cxx_compiler"] = std::string(KFAC_FAST_CXX_COMPILER);
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kfac_fast compiled kernels (raw pointers and streams; no libtorch)";
  m.def("build_info", &build_info,
        "dict: cuda (bool), cuda_archs, cuda_compiler, cuda_runtime_major, cxx_compiler");
  kfac_fast::register_all(m);
}
