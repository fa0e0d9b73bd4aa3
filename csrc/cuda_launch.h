// Host launchers of the CUDA kernels, callable from plain C++ (no CUDA headers here).
// Pointers and the stream arrive as integers from Python, which has already validated the
// tensors; each launcher re-checks what it can cheaply and returns "" on success or an
// error message naming the bad argument or the CUDA error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kfac_fast {

// Eigen-method scale, batched over layers, one launch per kEigenScaleLayersPerLaunch:
//   out[i, j] = x[i, j] / (max(dg[i], 0) * max(da[j], 0) + damping)   (x given)
//   out[i, j] =       1 / (max(dg[i], 0) * max(da[j], 0) + damping)   (x null: R itself)
// damping is read from damping_ptrs[l] when non-zero (device scalar, no host sync), else
// from damping_values[l]. When partial != 0 it receives, at [l * tiles + t], the sum of
// x * out over tile t of layer l (the KL-clip term <P, dW_bar>), deterministic.
// elem_bytes: 4 (float32) or 8 (float64) for every pointer of every layer.
constexpr int kEigenScaleLayersPerLaunch = 32;
constexpr int kEigenScaleTile = 2048;  // elements per block
std::string eigen_scale_cuda(int elem_bytes, const std::vector<uint64_t>& x_ptrs,
                             const std::vector<uint64_t>& out_ptrs,
                             const std::vector<uint64_t>& dg_ptrs,
                             const std::vector<uint64_t>& da_ptrs,
                             const std::vector<uint64_t>& damping_ptrs,
                             const std::vector<double>& damping_values,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                             const std::vector<int64_t>& ld_x, const std::vector<int64_t>& ld_out,
                             uint64_t partial, int64_t tiles, uint64_t stream);

// Batched Jacobi eigendecomposition of `batch` symmetric n x n matrices (row-major,
// contiguous, elem_bytes 4 or 8) into ascending eigenvalues vals (batch, n) and
// eigenvectors vecs (batch, n, n) (columns), same dtype; info (batch, 2) int32 receives
// (status, sweeps), status 1 converged, 0 not, -1 non-finite input. work: fp64 workspace of workspace_doubles per matrix, required only
// when jacobi_cuda_plan(n) says V^T does not fit in shared memory (else may be 0).
std::string jacobi_eigh_cuda(int elem_bytes, uint64_t in, uint64_t vals, uint64_t vecs,
                             uint64_t work, uint64_t info, int64_t batch, int n, double tol,
                             int max_sweeps, uint64_t stream);

// The launch plan on the current device: threads, vt_in_smem, smem_bytes, fits,
// workspace_doubles; error non-empty when the device cannot be queried.
struct JacobiDevicePlan {
  int threads = 0;
  bool vt_in_smem = false;
  std::size_t smem_bytes = 0;
  bool fits = false;
  int64_t workspace_doubles = 0;
  std::size_t smem_limit = 0;
  std::string error;
};
JacobiDevicePlan jacobi_cuda_plan(int n);

// The CUDA version the installed driver supports (cudaDriverGetVersion: 1000*major +
// 10*minor; 0 when no driver is installed, -1 when the query itself fails). The runtime
// this module links statically needs a driver at least as new as its major version.
int cuda_driver_version();

}  // namespace kfac_fast
