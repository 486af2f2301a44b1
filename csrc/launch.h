// Host launchers of the device code in csrc/*.cu: plain pointers, a raw stream and an int status
// (a cudaError_t value, 0 on success), so bindings.cpp needs neither torch's CUDA headers nor the
// CUDA runtime's, and the .cu files compile with nvcc alone.
#pragma once
#include <cstdint>

struct CUstream_st;

namespace fusenn {

using Stream = CUstream_st*;

// seed: one int64 in device memory.
int launch_dropout_mask(bool* out, int64_t numel, const int64_t* seed, uint64_t offset, uint32_t threshold,
                        Stream stream);
const char* cuda_error_string(int status);

// Makes `device` the current CUDA device for the guard's lifetime, then restores the previous one, so an
// op on tensors of cuda:1 launches its kernels there (defined in csrc/philox.cu, CUDA builds only).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_;
};

}  // namespace fusenn
