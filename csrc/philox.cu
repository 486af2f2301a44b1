// Dropout-mask kernel: a grid-stride loop, counter = offset + element index. The seed is read from device
// memory, not passed by value, so a CUDA graph replays the kernel with the seed torch's RNG drew anew.
#include <cuda_runtime.h>

#include "launch.h"
#include "philox.cuh"

namespace fusenn {

__global__ void dropout_mask_kernel(bool* __restrict__ out, int64_t numel, const int64_t* __restrict__ seed_ptr,
                                    uint64_t offset, uint32_t threshold) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = philox_keep(offset + static_cast<uint64_t>(i), seed, threshold);
  }
}

int launch_dropout_mask(bool* out, int64_t numel, const int64_t* seed, uint64_t offset, uint32_t threshold,
                        Stream stream) {
  if (numel == 0) return 0;
  constexpr int threads = 256;
  const int64_t wanted = (numel + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  dropout_mask_kernel<<<blocks, threads, 0, stream>>>(out, numel, seed, offset, threshold);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

DeviceGuard::DeviceGuard(int device) : previous_(-1) {
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  if (previous_ != device) cudaSetDevice(device);
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

}  // namespace fusenn
