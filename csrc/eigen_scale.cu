// The eigen method's scale, batched over layers in one launch:
// out = x / (max(d_G, 0) max(d_A, 0)^T + damping), the eigenvalue clamp fused.
#include <cuda_runtime.h>

#include "cuda_check.cuh"
#include "cuda_launch.h"

namespace kfac_fast {
namespace {

struct ScaleLayer {
  const void* x;        // (rows, cols) with row stride ld_x, or null: write R itself
  void* out;            // (rows, cols) with row stride ld_out; may alias x
  const void* dg;       // (rows,) eigenvalues of G
  const void* da;       // (cols,) eigenvalues of A
  const void* damping;  // device scalar, or null: use damping_value
  double damping_value;
  int64_t rows, cols, ld_x, ld_out;
};

// Passed by value in the kernel parameters: no host-to-device copy of a work list and so
// no sync. 32 layers x 80 B = 2.5 KiB, under the classic 4 KiB parameter limit.
struct ScaleBatch {
  ScaleLayer layer[kEigenScaleLayersPerLaunch];
};

// Clamp that keeps NaN (as torch.clamp does), so bad eigenvalues stay visible.
template <typename T>
__device__ __forceinline__ double clamp0(T v) {
  const double d = static_cast<double>(v);
  return d < 0.0 ? 0.0 : d;
}

// out[i, j] = x[i, j] / (max(dg[i],0) max(da[j],0) + damping) for tile blockIdx.x of layer
// blockIdx.y; partial[layer * tiles + tile] = sum over the tile of x * out (fixed-order
// reduction, deterministic). Arithmetic in fp64: it is memory-bound, fp64 costs nothing
// visible and rounds once. 256 threads x 8 elements per tile: untuned, chosen because
// 2048-element tiles keep small layers to one block and large ones well spread.
template <typename T>
__global__ void __launch_bounds__(256)
    _eigen_scale(ScaleBatch batch, int first_layer, double* __restrict__ partial, int64_t tiles) {
  __shared__ double warp_sums[256 / 32];
  const ScaleLayer& L = batch.layer[blockIdx.y];
  const int64_t size = L.rows * L.cols;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kEigenScaleTile;
  double acc = 0.0;
  if (start < size) {
    const double damping =
        L.damping ? static_cast<double>(*static_cast<const T*>(L.damping)) : L.damping_value;
    const T* x = static_cast<const T*>(L.x);
    T* out = static_cast<T*>(L.out);
    const T* dg = static_cast<const T*>(L.dg);
    const T* da = static_cast<const T*>(L.da);
    const int64_t end = start + kEigenScaleTile < size ? start + kEigenScaleTile : size;
    for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
      const int64_t i = e / L.cols, j = e - i * L.cols;
      const double r = 1.0 / (clamp0(dg[i]) * clamp0(da[j]) + damping);
      if (x) {
        const double xv = static_cast<double>(x[i * L.ld_x + j]);
        const double y = xv * r;
        out[i * L.ld_out + j] = static_cast<T>(y);
        acc += xv * y;
      } else {
        out[i * L.ld_out + j] = static_cast<T>(r);
      }
    }
  }
  if (partial == nullptr) return;
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += warp_sums[w];
    partial[(first_layer + static_cast<int64_t>(blockIdx.y)) * tiles + blockIdx.x] = t;
  }
}

}  // namespace

std::string eigen_scale_cuda(int elem_bytes, const std::vector<uint64_t>& x_ptrs,
                             const std::vector<uint64_t>& out_ptrs,
                             const std::vector<uint64_t>& dg_ptrs,
                             const std::vector<uint64_t>& da_ptrs,
                             const std::vector<uint64_t>& damping_ptrs,
                             const std::vector<double>& damping_values,
                             const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                             const std::vector<int64_t>& ld_x, const std::vector<int64_t>& ld_out,
                             uint64_t partial, int64_t tiles, uint64_t stream) {
  const char* fn = "eigen_scale_cuda";
  cudaGetLastError();  // start from a clean error state (this runtime's own, not torch's)
  if (elem_bytes != 4 && elem_bytes != 8)
    return std::string(fn) + ": elem_bytes must be 4 (float32) or 8 (float64), got " +
           std::to_string(elem_bytes);
  const size_t L = x_ptrs.size();
  const std::vector<size_t> lens = {out_ptrs.size(), dg_ptrs.size(), da_ptrs.size(),
                                    damping_ptrs.size(), damping_values.size(), rows.size(),
                                    cols.size(), ld_x.size(), ld_out.size()};
  for (size_t len : lens)
    if (len != L)
      return std::string(fn) + ": every per-layer list must have the same length as x_ptrs (" +
             std::to_string(L) + "), got one of length " + std::to_string(len);
  if (L == 0) return "";
  int64_t max_size = 0;
  for (size_t l = 0; l < L; ++l) {
    const std::string at = " of layer " + std::to_string(l);
    if (rows[l] < 0 || cols[l] < 0)
      return std::string(fn) + ": rows/cols" + at + " must be >= 0, got " +
             std::to_string(rows[l]) + "x" + std::to_string(cols[l]);
    if (ld_out[l] < cols[l] || (x_ptrs[l] && ld_x[l] < cols[l]))
      return std::string(fn) + ": row strides" + at + " must be >= cols (" +
             std::to_string(cols[l]) + ")";
    const int64_t size = rows[l] * cols[l];
    if (size > max_size) max_size = size;
    if (size == 0) continue;
    std::string e = check_ptr(fn, ("out" + at).c_str(), out_ptrs[l], elem_bytes);
    if (e.empty()) e = check_ptr(fn, ("dg" + at).c_str(), dg_ptrs[l], elem_bytes);
    if (e.empty()) e = check_ptr(fn, ("da" + at).c_str(), da_ptrs[l], elem_bytes);
    if (e.empty() && x_ptrs[l]) e = check_ptr(fn, ("x" + at).c_str(), x_ptrs[l], elem_bytes);
    if (e.empty() && damping_ptrs[l])
      e = check_ptr(fn, ("damping" + at).c_str(), damping_ptrs[l], elem_bytes);
    if (!e.empty()) return e;
    if (!damping_ptrs[l] && !(damping_values[l] >= 0.0))
      return std::string(fn) + ": damping" + at + " must be >= 0, got " +
             std::to_string(damping_values[l]);
  }
  const int64_t need_tiles = (max_size + kEigenScaleTile - 1) / kEigenScaleTile;
  if (partial) {
    std::string e = check_ptr(fn, "partial", partial, 8);
    if (!e.empty()) return e;
    if (tiles < need_tiles)
      return std::string(fn) + ": tiles must be >= " + std::to_string(need_tiles) +
             " (ceil(max rows*cols / " + std::to_string(kEigenScaleTile) + ")), got " +
             std::to_string(tiles);
  }
  if (need_tiles == 0) return "";
  if (need_tiles > 0x7fffffff) return std::string(fn) + ": a layer is too large for one grid";
  std::string e = check_stream(fn, stream);
  if (!e.empty()) return e;

  auto s = reinterpret_cast<cudaStream_t>(stream);
  for (size_t first = 0; first < L; first += kEigenScaleLayersPerLaunch) {
    const size_t count = L - first < static_cast<size_t>(kEigenScaleLayersPerLaunch)
                             ? L - first
                             : static_cast<size_t>(kEigenScaleLayersPerLaunch);
    ScaleBatch batch{};
    for (size_t k = 0; k < count; ++k) {
      const size_t l = first + k;
      batch.layer[k] = ScaleLayer{reinterpret_cast<const void*>(x_ptrs[l]),
                                  reinterpret_cast<void*>(out_ptrs[l]),
                                  reinterpret_cast<const void*>(dg_ptrs[l]),
                                  reinterpret_cast<const void*>(da_ptrs[l]),
                                  reinterpret_cast<const void*>(damping_ptrs[l]),
                                  damping_values[l], rows[l], cols[l], ld_x[l], ld_out[l]};
    }
    const dim3 grid(static_cast<unsigned>(need_tiles), static_cast<unsigned>(count));
    auto* part = reinterpret_cast<double*>(partial);
    if (elem_bytes == 4)
      _eigen_scale<float><<<grid, 256, 0, s>>>(batch, static_cast<int>(first), part, tiles);
    else
      _eigen_scale<double><<<grid, 256, 0, s>>>(batch, static_cast<int>(first), part, tiles);
    e = check_launch("eigen_scale_cuda: kernel launch");
    if (!e.empty()) return e;
  }
  return "";
}

}  // namespace kfac_fast
