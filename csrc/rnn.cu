// The C++ RNN layers' element-wise steps (csrc/rnn.cuh) as CUDA kernels: one thread per element, a
// grid-stride loop; each launch is one step of one phase of csrc/rnn_host.cpp's time loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "half.cuh"
#include "philox.cuh"
#include "rnn.cuh"

namespace fusenn {

template <class StepArgs, class T>
__global__ void step_kernel(const StepArgs args, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    run<T>(args, i);
  }
}

template <class StepArgs>
int launch_step(const StepArgs& step, int64_t n, Dtype dtype, Stream stream) {
  if (n == 0) return 0;
  constexpr int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  switch (dtype) {
    case Dtype::f32: step_kernel<StepArgs, float><<<blocks, threads, 0, stream>>>(step, n); break;
    case Dtype::f16: step_kernel<StepArgs, __half><<<blocks, threads, 0, stream>>>(step, n); break;
    case Dtype::bf16: step_kernel<StepArgs, __nv_bfloat16><<<blocks, threads, 0, stream>>>(step, n); break;
  }
  return static_cast<int>(cudaGetLastError());
}

template int launch_step(const LstmCell&, int64_t, Dtype, Stream);
template int launch_step(const EmitH&, int64_t, Dtype, Stream);
template int launch_step(const LstmDh&, int64_t, Dtype, Stream);
template int launch_step(const LstmCellBackward&, int64_t, Dtype, Stream);
template int launch_step(const AddRecurrent&, int64_t, Dtype, Stream);
template int launch_step(const GruCell&, int64_t, Dtype, Stream);
template int launch_step(const GruCellBackward&, int64_t, Dtype, Stream);

}  // namespace fusenn
