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

// keep[i] for counters lo + i with high word hi, i < n (no carry out of the low word): 32-bit lanes.
FUSENN_VECTOR_CLONES void keep_run(uint8_t* __restrict keep, uint32_t lo, uint32_t hi, int64_t n, uint32_t k0,
                                   uint32_t k1, uint32_t threshold) {
  for (int64_t i = 0; i < n; ++i) {
    keep[i] = (philox4x32_10(Philox4{lo + static_cast<uint32_t>(i), hi, 0u, 0u}, k0, k1).x >> 8) >= threshold;
  }
}

}  // namespace

void philox_keep_host(uint8_t* keep, uint64_t first, int64_t n, uint64_t seed, uint32_t threshold) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {  // runs that end where the counter's low word would carry
      const uint64_t c = first + static_cast<uint64_t>(i);
      const int64_t run = static_cast<int64_t>(std::min<uint64_t>(end - i, (uint64_t{1} << 32) - (c & 0xFFFFFFFFu)));
      keep_run(keep + i, static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), run, static_cast<uint32_t>(seed),
               static_cast<uint32_t>(seed >> 32), threshold);
      i += run;
    }
  });
}

namespace {

// The mask on the host (CPU tensors): the same Philox counters.
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
  philox_keep_host(reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), static_cast<uint64_t>(offset), out.numel(),
                   static_cast<uint64_t>(*seed.data_ptr<int64_t>()), static_cast<uint32_t>(threshold));
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
