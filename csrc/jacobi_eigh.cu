// Batched Jacobi eigensolver: one thread block diagonalises one matrix held in shared
// memory (fp64), with the algorithm of jacobi_core.h (shared with the CPU build).
#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "cuda_launch.h"
#include "jacobi_core.h"

namespace kfac_fast {
namespace {

// A thread block as a jacobi_core team. sum() is a fixed-order reduction (warp shuffles,
// then warp 0's partials in index order), so results are bit-reproducible.
struct BlockTeam {
  int rank;
  int size;
  double* scratch;  // size/32 + 1 doubles of shared memory

  __host__ __device__ void sync() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  __host__ __device__ double sum(double x) {
#if defined(__CUDA_ARCH__)
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
    const int warps = size / 32;
    if ((rank & 31) == 0) scratch[rank >> 5] = x;
    __syncthreads();
    if (rank == 0) {
      double t = 0.0;
      for (int w = 0; w < warps; ++w) t += scratch[w];
      scratch[warps] = t;
    }
    __syncthreads();
    const double total = scratch[warps];
    __syncthreads();  // scratch is reused by the next call
    return total;
#else
    return x;
#endif
  }
};

// Computes the ascending eigenvalues and orthonormal eigenvectors (columns) of the
// symmetrised matrix (in + in^T)/2 for matrix blockIdx.x; info = (status, sweeps), status
// 1 converged, 0 not converged, -1 a NaN or infinity in the input (jacobi::status_of).
// blockDim.x must be a multiple of 32 (jacobi::threads_for); the dynamic shared memory is
// jacobi::smem_bytes(n, vt_in_smem, blockDim.x). 512 threads at most so the compiler may
// use up to 128 registers per thread without spilling.
template <typename T>
__global__ void __launch_bounds__(512)
    _jacobi_eigh(const T* __restrict__ in, T* __restrict__ vals, T* __restrict__ vecs,
                 double* __restrict__ vt_global, int* __restrict__ info, int n, double tol,
                 int max_sweeps, int vt_in_smem) {
  extern __shared__ double smem[];
  const int m = jacobi::padded_size(n), ld = jacobi::leading_dim(m);
  const int64_t b = blockIdx.x;
  double* a = smem;
  double* vt = vt_in_smem ? a + m * ld : vt_global + b * m * m;
  const int ldv = vt_in_smem ? ld : m;
  double* c = a + (vt_in_smem ? 2 : 1) * m * ld;
  double* s = c + m / 2;
  double* scratch = s + m / 2;
  int* pair = reinterpret_cast<int*>(scratch + blockDim.x / 32 + 1);

  const T* src = in + b * n * n;
  for (int e = threadIdx.x; e < m * m; e += blockDim.x) {
    const int i = e / m, j = e % m;
    a[i * ld + j] = (i < n && j < n)
                        ? 0.5 * (static_cast<double>(src[i * n + j]) + static_cast<double>(src[j * n + i]))
                        : 0.0;
  }
  __syncthreads();

  BlockTeam team{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), scratch};
  jacobi::Work w{a, vt, c, s, pair, ld, ldv};
  const jacobi::Result res = jacobi::solve(team, w, n, tol, max_sweeps);

  int* perm = pair;  // perm[r] = index of the r-th smallest eigenvalue (NaN last)
  jacobi::ascending_order(team, a, ld, n, perm);
  for (int r = threadIdx.x; r < n; r += blockDim.x)
    vals[b * n + r] = static_cast<T>(a[perm[r] * ld + perm[r]]);
  T* dst = vecs + b * n * n;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n, r = e % n;  // consecutive threads write consecutive columns
    dst[e] = static_cast<T>(vt[perm[r] * ldv + i]);
  }
  if (threadIdx.x == 0) {
    info[2 * b] = jacobi::status_of(res);  // 1 converged, 0 not, -1 non-finite input
    info[2 * b + 1] = res.sweeps;
  }
}

template <typename T>
std::string launch(uint64_t in, uint64_t vals, uint64_t vecs, uint64_t work, uint64_t info,
                   int64_t batch, int n, double tol, int max_sweeps, const jacobi::Plan& pl,
                   cudaStream_t stream) {
  auto kernel = &_jacobi_eigh<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(pl.smem));
  if (err != cudaSuccess) return cuda_error("jacobi_eigh_cuda: cudaFuncSetAttribute", err);
  kernel<<<static_cast<unsigned>(batch), pl.threads, pl.smem, stream>>>(
      reinterpret_cast<const T*>(in), reinterpret_cast<T*>(vals), reinterpret_cast<T*>(vecs),
      reinterpret_cast<double*>(work), reinterpret_cast<int*>(info), n, tol, max_sweeps,
      pl.vt_in_smem ? 1 : 0);
  return check_launch("jacobi_eigh_cuda: kernel launch");
}

}  // namespace

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return v;
}

JacobiDevicePlan jacobi_cuda_plan(int n) {
  JacobiDevicePlan out;
  int dev = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) {
    cudaGetLastError();
    out.error = cuda_error("jacobi_cuda_plan", err);
    return out;
  }
  const jacobi::Plan pl = jacobi::plan(n, static_cast<std::size_t>(limit));
  out.threads = pl.threads;
  out.vt_in_smem = pl.vt_in_smem;
  out.smem_bytes = pl.smem;
  out.fits = pl.fits;
  out.workspace_doubles =
      pl.vt_in_smem ? 0 : static_cast<int64_t>(jacobi::padded_size(n)) * jacobi::padded_size(n);
  out.smem_limit = static_cast<std::size_t>(limit);
  return out;
}

std::string jacobi_eigh_cuda(int elem_bytes, uint64_t in, uint64_t vals, uint64_t vecs,
                             uint64_t work, uint64_t info, int64_t batch, int n, double tol,
                             int max_sweeps, uint64_t stream) {
  const char* fn = "jacobi_eigh_cuda";
  cudaGetLastError();  // start from a clean error state (this runtime's own, not torch's)
  if (elem_bytes != 4 && elem_bytes != 8)
    return std::string(fn) + ": elem_bytes must be 4 (float32) or 8 (float64), got " +
           std::to_string(elem_bytes);
  if (n < 1 || n > jacobi::kMaxN)
    return std::string(fn) + ": n must be in [1, " + std::to_string(jacobi::kMaxN) + "], got " +
           std::to_string(n);
  if (batch < 0 || batch > 0x7fffffff)
    return std::string(fn) + ": batch must be in [0, 2^31), got " + std::to_string(batch);
  if (!(tol > 0.0) || !(tol < 1.0))
    return std::string(fn) + ": tol must be in (0, 1), got " + std::to_string(tol);
  if (max_sweeps < 0 || max_sweeps > 1000)
    return std::string(fn) + ": max_sweeps must be in [0, 1000], got " + std::to_string(max_sweeps);
  if (batch == 0) return "";

  const JacobiDevicePlan dp = jacobi_cuda_plan(n);
  if (!dp.error.empty()) return dp.error;
  if (!dp.fits)
    return std::string(fn) + ": n=" + std::to_string(n) + " needs " +
           std::to_string(dp.smem_bytes) + " bytes of shared memory, the device allows " +
           std::to_string(dp.smem_limit);
  int dev = 0;
  cudaGetDevice(&dev);
  const struct { const char* name; uint64_t ptr; int align; } ptrs[] = {
      {"in", in, elem_bytes}, {"vals", vals, elem_bytes}, {"vecs", vecs, elem_bytes},
      {"info", info, 4}, {"work", work, 8}};
  for (const auto& p : ptrs) {
    if (p.ptr == 0 && std::string(p.name) == "work" && dp.vt_in_smem) continue;
    std::string e = check_ptr(fn, p.name, p.ptr, p.align);
    if (e.empty()) e = check_device_ptr(fn, p.name, p.ptr, dev);
    if (!e.empty()) return e + (std::string(p.name) == "work"
                                    ? " (n=" + std::to_string(n) + " needs a workspace of " +
                                          std::to_string(dp.workspace_doubles) +
                                          " doubles per matrix)"
                                    : "");
  }
  std::string e = check_stream(fn, stream);
  if (!e.empty()) return e;

  jacobi::Plan pl{dp.threads, dp.vt_in_smem, dp.smem_bytes, dp.fits};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  return elem_bytes == 4 ? launch<float>(in, vals, vecs, work, info, batch, n, tol, max_sweeps, pl, s)
                         : launch<double>(in, vals, vecs, work, info, batch, n, tol, max_sweeps, pl, s);
}

}  // namespace kfac_fast
