// Argument and error checks shared by the CUDA launchers; each returns "" when fine, else
// a message naming the argument (launchers return it, the binding raises it).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace kfac_fast {

inline std::string cuda_error(const char* where, cudaError_t err) {
  return std::string(where) + ": CUDA error " + cudaGetErrorName(err) + ": " +
         cudaGetErrorString(err);
}

// Non-null and aligned to `align` bytes (the element size the kernel loads).
inline std::string check_ptr(const char* fn, const char* name, uint64_t ptr, int align) {
  if (ptr == 0) return std::string(fn) + ": " + name + " is a null pointer";
  if (ptr % static_cast<uint64_t>(align) != 0)
    return std::string(fn) + ": " + name + " is not " + std::to_string(align) +
           "-byte aligned (address " + std::to_string(ptr) + ")";
  return "";
}

// Device (or managed) memory of the current device: catches host pointers. Costs a driver
// call, so only the refresh-step launchers use it, never the per-step ones.
inline std::string check_device_ptr(const char* fn, const char* name, uint64_t ptr, int dev) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so it does not leak into the launch check
    return cuda_error((std::string(fn) + ": " + name).c_str(), err);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return std::string(fn) + ": " + name + " is not device memory";
  if (attr.type == cudaMemoryTypeDevice && attr.device != dev)
    return std::string(fn) + ": " + name + " is on device " + std::to_string(attr.device) +
           " but the current device is " + std::to_string(dev);
  return "";
}

// The stream handle is a live stream (0 = the legacy default stream is accepted).
inline std::string check_stream(const char* fn, uint64_t stream) {
  if (stream == 0) return "";
  unsigned int flags = 0;
  const cudaError_t err = cudaStreamGetFlags(reinterpret_cast<cudaStream_t>(stream), &flags);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error((std::string(fn) + ": stream").c_str(), err);
  }
  return "";
}

// After a launch: configuration errors (and earlier asynchronous faults) surface here.
inline std::string check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cuda_error(fn, err);
}

}  // namespace kfac_fast
