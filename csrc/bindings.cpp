// The extension's module and its dropout op (the RNN layers' ops are csrc/rnn_host.cpp's); every op
// lives in torch.ops.fusenn_cuda and checks every input. Built without FUSENN_WITH_CUDA (a host-only
// build, as the CPU tests make), only the ops' CPU implementations exist. The stream comes from Python
// (torch.cuda.current_stream().cuda_stream), which keeps torch's CUDA headers out of the build.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include "launch.h"
#include "philox.cuh"

namespace fusenn {
namespace {

// The mask on the host (CPU tensors): the same Philox counters, rows of elements split over torch's threads.
void dropout_mask_out_cpu(const at::Tensor& out, const at::Tensor& seed, int64_t offset, int64_t threshold,
                          int64_t stream) {
  TORCH_CHECK(out.device().is_cpu() && seed.device().is_cpu(), "fusenn_cuda::dropout_mask_out: expected CPU tensors");
  TORCH_CHECK(out.scalar_type() == at::kBool, "fusenn_cuda::dropout_mask_out: expected a bool tensor, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "fusenn_cuda::dropout_mask_out: expected a contiguous tensor");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fusenn_cuda::dropout_mask_out: expected the seed as one int64, got ", seed.scalar_type(), " of ",
              seed.numel(), " elements");
  TORCH_CHECK(offset >= 0, "fusenn_cuda::dropout_mask_out: offset must be non-negative");
  TORCH_CHECK(threshold >= 0 && threshold <= (1 << 24), "fusenn_cuda::dropout_mask_out: threshold out of range");
  bool* keep = out.data_ptr<bool>();
  const uint64_t key = static_cast<uint64_t>(*seed.data_ptr<int64_t>()), first = static_cast<uint64_t>(offset);
  const uint32_t thr = static_cast<uint32_t>(threshold);
  at::parallel_for(0, out.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) keep[i] = philox_keep(first + static_cast<uint64_t>(i), key, thr);
  });
}

#ifdef FUSENN_WITH_CUDA
void check_launch(int status, const char* what) {
  TORCH_CHECK(status == 0, "fusenn: ", what, " failed: ", cuda_error_string(status));
}

void dropout_mask_out(const at::Tensor& out, const at::Tensor& seed, int64_t offset, int64_t threshold,
                      int64_t stream) {
  TORCH_CHECK(out.is_cuda(), "fusenn_cuda::dropout_mask_out: expected a CUDA tensor, got ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kBool, "fusenn_cuda::dropout_mask_out: expected a bool tensor, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "fusenn_cuda::dropout_mask_out: expected a contiguous tensor");
  TORCH_CHECK(seed.device() == out.device() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fusenn_cuda::dropout_mask_out: expected the seed as one int64 on ", out.device(), ", got ",
              seed.scalar_type(), " of ", seed.numel(), " elements on ", seed.device());
  TORCH_CHECK(offset >= 0, "fusenn_cuda::dropout_mask_out: offset must be non-negative");
  TORCH_CHECK(threshold >= 0 && threshold <= (1 << 24), "fusenn_cuda::dropout_mask_out: threshold out of range");
  const DeviceGuard device(out.get_device());
  check_launch(launch_dropout_mask(out.data_ptr<bool>(), out.numel(), seed.data_ptr<int64_t>(),
                                   static_cast<uint64_t>(offset), static_cast<uint32_t>(threshold),
                                   reinterpret_cast<Stream>(stream)),
               "dropout_mask kernel launch");
}
#endif

}  // namespace
}  // namespace fusenn

TORCH_LIBRARY(fusenn_cuda, m) {
  m.def("dropout_mask_out(Tensor(a!) out, Tensor seed, int offset, int threshold, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(fusenn_cuda, CPU, m) { m.impl("dropout_mask_out", &fusenn::dropout_mask_out_cpu); }
#ifdef FUSENN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusenn_cuda, CUDA, m) { m.impl("dropout_mask_out", &fusenn::dropout_mask_out); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusenn CUDA kernels; ops live in torch.ops.fusenn_cuda";
#ifdef FUSENN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;  // host-only: the RNN layers' CPU implementations
#endif
}
