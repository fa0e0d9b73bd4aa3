// pybind11 bindings of the CUDA launchers (cuda_launch.h). A CPU-only build registers
// nothing here; Python checks build_info()["cuda"] before looking for these names.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "registry.h"

#ifndef KFAC_FAST_WITH_CUDA
#define KFAC_FAST_WITH_CUDA 0
#endif

#if KFAC_FAST_WITH_CUDA
#include "cuda_launch.h"
#endif

namespace py = pybind11;

namespace kfac_fast {

#if KFAC_FAST_WITH_CUDA
namespace {
void raise_if(const std::string& error) {
  if (!error.empty()) throw std::runtime_error(error);
}
}  // namespace

void register_cuda_ops(py::module_& m) {
  m.attr("EIGEN_SCALE_TILE") = kEigenScaleTile;
  m.def(
      "eigen_scale_cuda",
      [](int elem_bytes, const std::vector<uint64_t>& x, const std::vector<uint64_t>& out,
         const std::vector<uint64_t>& dg, const std::vector<uint64_t>& da,
         const std::vector<uint64_t>& damping_ptrs, const std::vector<double>& damping_values,
         const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
         const std::vector<int64_t>& ld_x, const std::vector<int64_t>& ld_out, uint64_t partial,
         int64_t tiles, uint64_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = eigen_scale_cuda(elem_bytes, x, out, dg, da, damping_ptrs, damping_values, rows,
                                 cols, ld_x, ld_out, partial, tiles, stream);
        }
        raise_if(err);
      },
      py::arg("elem_bytes"), py::arg("x"), py::arg("out"), py::arg("dg"), py::arg("da"),
      py::arg("damping_ptrs"), py::arg("damping_values"), py::arg("rows"), py::arg("cols"),
      py::arg("ld_x"), py::arg("ld_out"), py::arg("partial"), py::arg("tiles"),
      py::arg("stream"),
      "Eigen-method scale over layers: out = x / (max(dg,0) max(da,0)^T + damping) (x=0: "
      "out = R); partial[l*tiles+t] = tile sums of x*out. Raises RuntimeError on bad "
      "arguments or CUDA errors.");
  m.def(
      "jacobi_eigh_cuda",
      [](int elem_bytes, uint64_t in, uint64_t vals, uint64_t vecs, uint64_t work, uint64_t info,
         int64_t batch, int n, double tol, int max_sweeps, uint64_t stream) {
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = jacobi_eigh_cuda(elem_bytes, in, vals, vecs, work, info, batch, n, tol,
                                 max_sweeps, stream);
        }
        raise_if(err);
      },
      py::arg("elem_bytes"), py::arg("mats"), py::arg("vals"), py::arg("vecs"), py::arg("work"),
      py::arg("info"), py::arg("batch"), py::arg("n"), py::arg("tol"), py::arg("max_sweeps"),
      py::arg("stream"),
      "Batched Jacobi eigh of (batch, n, n) contiguous matrices into ascending vals (batch, n), "
      "vecs (batch, n, n), info (batch, 2) int32 = (status, sweeps), status 1 converged, 0 not, "
      "-1 a NaN or infinity in the input.");
  m.def("cuda_driver_version", &cuda_driver_version,
        "CUDA version the driver supports (1000*major + 10*minor), 0 without a driver, -1 "
        "when the query fails; compare with build_info()['cuda_runtime_major'].");
  m.def(
      "jacobi_cuda_plan",
      [](int n) {
        const JacobiDevicePlan p = jacobi_cuda_plan(n);
        raise_if(p.error);
        py::dict d;
        d["threads"] = p.threads;
        d["vt_in_smem"] = p.vt_in_smem;
        d["smem_bytes"] = p.smem_bytes;
        d["fits"] = p.fits;
        d["workspace_doubles"] = p.workspace_doubles;
        d["smem_limit"] = p.smem_limit;
        return d;
      },
      py::arg("n"), "The Jacobi kernel's launch plan for size n on the current device.");
}
#else
void register_cuda_ops(py::module_&) {}
#endif

}  // namespace kfac_fast
