// The C++ LSTM and GRU layers: torch.ops.fusenn_cuda.{lstm,gru}_{forward,backward}, one layer, one
// direction, with the inputs and results of fusenn.kernels.lstm / .gru (see fusenn.ops.rnn).
//
// Design (the cuDNN-style alternative to the Triton kernels' single persistent launch): the time loop runs
// here on the host; per step one GEMM (torch's, so cuBLAS on a GPU, fp32 accumulation and output) forms
// h_{t-1} W_hh^T, and one element-wise kernel (csrc/rnn.cuh) does everything else: gates, cell, zoneout,
// packed lengths, outputs, and the next step's GEMM operand with recurrent dropout applied. With a
// projection, a second GEMM and kernel form h_t = m_t W_hr^T. Backward recomputes the gate pre-activations
// of all steps in one GEMM over the saved states, then per step: kernel, GEMM (dgates W_hh), kernel.
// Masks: the recurrent-dropout scale comes in as a (B, P) tensor (drawn by fusenn.ops.dropout from Philox,
// the same in forward and backward); zoneout's masks are regenerated in the kernels from Philox.
// CPU tensors run the same step functions as plain loops: the twin the CPU tests check.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "launch.h"
#include "philox.cuh"

namespace fusenn {
// rnn.cuh's 16-bit conversions for the host loops.
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline c10::Half from_float(float x, c10::Half*) { return c10::Half(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline c10::BFloat16 from_float(float x, c10::BFloat16*) { return c10::BFloat16(x); }
// e^x in plain arithmetic (no call, no table), so that loops over it vectorise: x = n ln2 + r with |r| <= ln2/2,
// e^r by Cephes' minimax polynomial, n added to the exponent bits. x is clamped to [-86, 88.5] (every caller
// saturates there); NaN gives NaN. Within 1.4 ulp of e^x on that range.
inline float exp_poly(float x) {
  const float xc = x < -86.0f ? -86.0f : (x > 88.5f ? 88.5f : x);
  const float shifted = xc * 1.44269504089f + 12582912.0f;  // + 1.5 * 2^23 rounds n into the low mantissa bits
  const float n = shifted - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t n_bits, p_bits;
  std::memcpy(&n_bits, &shifted, 4);
  std::memcpy(&p_bits, &p, 4);
  p_bits += (n_bits - 0x4B400000) * (1 << 23);
  float e;
  std::memcpy(&e, &p_bits, 4);
  return x == x ? e : x;
}

// rnn.cuh's tanhf in the host loops (found before ::tanhf inside namespace fusenn): glibc's goes through
// expm1f and was the loops' slowest call; this is one exp_poly, within 9e-8 of tanh (absolute; correctly
// rounded fp32 is within 6e-8), with tanhf's NaN and infinities.
inline float tanhf(float x) {
  const float e = exp_poly(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}
}  // namespace fusenn

#include "rnn_persist.cuh"

namespace fusenn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The CUDA device of `t` made current for the op's launches (nothing for CPU tensors or host-only builds).
struct OpDevice {
  explicit OpDevice(const Tensor& t) {
#ifdef FUSENN_WITH_CUDA
    if (t.is_cuda()) guard.emplace(t.get_device());
#endif
    (void)t;
  }
#ifdef FUSENN_WITH_CUDA
  std::optional<DeviceGuard> guard;
#endif
};

Dtype dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "fusenn: the C++ RNN layers take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The width W of a step's (B, W) elements.
int64_t width(const LstmCell& a) { return a.H; }
int64_t width(const EmitH& a) { return a.W; }
int64_t width(const LstmDh& a) { return a.P; }
int64_t width(const LstmCellBackward& a) { return a.H; }
int64_t width(const AddRecurrent& a) { return a.W; }
int64_t width(const GruCell& a) { return a.H; }
int64_t width(const GruCellBackward& a) { return a.H; }

// The LSTM's common rows on CPU (the row has step t; cells: the transcendentals are precomputed, no projection):
// the step function runs on a local copy with those facts, zoneout's mode and which pointers are null written
// into it, so that the compiler folds its branches and vectorises the row (every other row runs it as it is).
#if defined(__GNUC__) && !defined(__clang__)
#define FUSENN_IVDEP _Pragma("GCC ivdep")  // a row's elements touch only their own index (as the kernel's threads)
#else
#define FUSENN_IVDEP
#endif

// field is null (nonnull false: written so), or known not to be (the caller checked).
template <class P>
void assume(P*& field, bool nonnull) {
  if (!nonnull) field = nullptr;
  else if (field == nullptr) __builtin_unreachable();
}

void assume_zoneout(Zoneout& z, int mode) {
  z.mode = mode;
  if (mode == 1 && z.keep == nullptr) __builtin_unreachable();
}

// fast_row, and on x86-64 Linux fast_row_avx2 and (GCC) fast_row_v4, the same code built for AVX2 and AVX-512
// (taken where the CPU has them; no contraction into FMAs, so all compute the same bits).
#define FUSENN_FAST_ROWS(NAME, ATTR)                                                \
  template <class T, int kZo, bool kOp, bool kScale>                                \
  ATTR void NAME(LstmCell a, int64_t b) {                                           \
    a.s.lengths = nullptr, a.s.activated = true, a.m = nullptr, a.m_op = nullptr;   \
    assume_zoneout(a.s.zo, kZo);                                                    \
    assume(a.op, kOp);                                                              \
    assume(a.s.rscale, kScale);                                                     \
    assume(a.tc, true);                                                             \
    FUSENN_IVDEP                                                                    \
    for (int64_t j = 0; j < a.H; ++j) run_at<T>(a, b, j);                           \
  }                                                                                 \
  template <class T, int kZo, bool kOp, bool = false>                               \
  ATTR void NAME(LstmCellBackward a, int64_t b) {                                   \
    a.s.lengths = nullptr, a.s.activated = true;                                    \
    assume_zoneout(a.s.zo, kZo);                                                    \
    assume(a.dg_op, kOp);                                                           \
    assume(a.tc, true);                                                             \
    FUSENN_IVDEP                                                                    \
    for (int64_t j = 0; j < a.H; ++j) run_at<T>(a, b, j);                           \
  }                                                                                 \
  template <class T, int kZo, bool, bool = false>                                   \
  ATTR void NAME(LstmDh a, int64_t b) {                                             \
    a.s.lengths = nullptr, a.dhz_op = nullptr, a.dhs = nullptr;                     \
    assume_zoneout(a.s.zo, kZo);                                                    \
    FUSENN_IVDEP                                                                    \
    for (int64_t k = 0; k < a.P; ++k) run_at<T>(a, b, k);                           \
  }                                                                                 \
  template <class T, int, bool, bool kScale>                                        \
  ATTR void NAME(AddRecurrent a, int64_t b) {                                       \
    a.s.lengths = nullptr;                                                          \
    assume(a.s.rscale, kScale);                                                     \
    FUSENN_IVDEP                                                                    \
    for (int64_t k = 0; k < a.W; ++k) run_at<T>(a, b, k);                           \
  }

FUSENN_FAST_ROWS(fast_row, )
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
FUSENN_FAST_ROWS(fast_row_avx2, __attribute__((target("avx2"))))
#define FUSENN_FAST_ROW_AVX2 1
#endif
#ifdef FUSENN_HAS_V4_CLONES
FUSENN_FAST_ROWS(fast_row_v4, __attribute__((target("arch=x86-64-v4"))))
#endif

template <class T, int kZo, bool kOp, bool kScale, class Cell>
void run_fast_row(const Cell& a, int64_t b) {
#ifdef FUSENN_HAS_V4_CLONES
  static const bool v4 = __builtin_cpu_supports("x86-64-v4");
  if (v4) return fast_row_v4<T, kZo, kOp, kScale>(a, b);
#endif
#ifdef FUSENN_FAST_ROW_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return fast_row_avx2<T, kZo, kOp, kScale>(a, b);
#endif
  fast_row<T, kZo, kOp, kScale>(a, b);
}

// Zoneout's mode as fast_row takes it (0, 1 with its masks precomputed, 2), or -1.
int fast_zoneout(const Zoneout& z) { return z.mode == 1 && z.keep == nullptr ? -1 : z.mode; }

template <class T, int kZo>
bool fast_lstm_cell(const LstmCell& a, int64_t b) {
  if (a.op == nullptr) {
    if (a.s.rscale != nullptr) return false;
    run_fast_row<T, kZo, false, false>(a, b);
  } else if (a.s.rscale != nullptr) {
    run_fast_row<T, kZo, true, true>(a, b);
  } else {
    run_fast_row<T, kZo, true, false>(a, b);
  }
  return true;
}

template <class T, int kZo>
bool fast_lstm_cell(const LstmCellBackward& a, int64_t b) {
  if (a.dg_op != nullptr) run_fast_row<T, kZo, true, false>(a, b);
  else run_fast_row<T, kZo, false, false>(a, b);
  return true;
}

// Whether row b of the step ran here, vectorised (the LSTM's cells, its dh split without a projection, the
// recurrent gradient's sum; false: run it element by element).
template <class T, class Cell>
bool try_fast_row(const Cell& a, int64_t b) {
  if constexpr (std::is_same_v<Cell, AddRecurrent>) {
    if (!has_step(a.s, b)) return false;
    if (a.s.rscale != nullptr) run_fast_row<T, 0, false, true>(a, b);
    else run_fast_row<T, 0, false, false>(a, b);
    return true;
  } else if constexpr (std::is_same_v<Cell, LstmDh>) {
    if (a.dhz_op != nullptr || a.dhs != nullptr || !has_step(a.s, b)) return false;
    switch (fast_zoneout(a.s.zo)) {
      case 0: run_fast_row<T, 0, false, false>(a, b); return true;
      case 1: run_fast_row<T, 1, false, false>(a, b); return true;
      case 2: run_fast_row<T, 2, false, false>(a, b); return true;
      default: return false;
    }
  } else if constexpr (std::is_same_v<Cell, LstmCell> || std::is_same_v<Cell, LstmCellBackward>) {
    if constexpr (std::is_same_v<Cell, LstmCell>) {
      if (a.m != nullptr) return false;
    }
    if (!a.s.activated || a.tc == nullptr || !has_step(a.s, b)) return false;
    switch (fast_zoneout(a.s.zo)) {
      case 0: return fast_lstm_cell<T, 0>(a, b);
      case 1: return fast_lstm_cell<T, 1>(a, b);
      case 2: return fast_lstm_cell<T, 2>(a, b);
      default: return false;
    }
  }
  return false;
}

// run<T>(args, i) for i in [0, n = B * W): a kernel for CUDA tensors, loops over rows for CPU tensors.
template <class StepArgs>
void run_step(const StepArgs& args, int64_t n, const Tensor& like, int64_t stream) {
  if (n == 0) return;
  if (like.is_cuda()) {
#ifdef FUSENN_WITH_CUDA
    const int status = launch_step(args, n, dtype_of(like), reinterpret_cast<Stream>(stream));
    TORCH_CHECK(status == 0, "fusenn: RNN step kernel launch failed: ", cuda_error_string(status));
#else
    TORCH_CHECK(false, "fusenn: this build of the C++ RNN layers has no CUDA kernels");
#endif
    return;
  }
  // Elements are independent (as the kernel's threads are): rows split over torch's intra-op threads.
  const int64_t W = width(args);
  const auto loop = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    at::parallel_for(0, n / W, std::max<int64_t>(1, 4096 / W), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (try_fast_row<T>(args, b)) continue;
        for (int64_t j = 0; j < W; ++j) run_at<T>(args, b, j);
      }
    });
  };
  switch (dtype_of(like)) {
    case Dtype::f32: loop(static_cast<float*>(nullptr)); break;
    case Dtype::f16: loop(static_cast<c10::Half*>(nullptr)); break;
    case Dtype::bf16: loop(static_cast<c10::BFloat16*>(nullptr)); break;
  }
}

// ---- The CPU loops' first passes: a step's transcendentals (gate activations, tanh of the new c) and a layer's
// zoneout masks, over contiguous rows in loops the compiler vectorises (built with -fno-trapping-math, so the
// clamps become blends; FUSENN_VECTOR_CLONES: AVX2 and AVX-512 too). Five scalar expf calls per LSTM element, and
// a Philox evaluation per mask use, were most of a step's element-wise time; the step functions then do the rest.
// ----
// out[j] := sigmoid(g[j] + x[j] + bias[j]) (bias may be null), or tanh(g[j] + x[j]), for j < n.
FUSENN_VECTOR_CLONES void activate_row(float* __restrict out, const float* __restrict g, const float* __restrict x,
                                       const float* __restrict bias, int64_t n, bool tanh) {
  if (tanh) {
    for (int64_t j = 0; j < n; ++j) out[j] = tanhf(g[j] + x[j]);
  } else if (bias != nullptr) {
    for (int64_t j = 0; j < n; ++j) out[j] = 1.0f / (1.0f + exp_poly(-(g[j] + x[j] + bias[j])));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = 1.0f / (1.0f + exp_poly(-(g[j] + x[j])));
  }
}

// tc[j] := tanh(f[j] c_prev[j] + i[j] g[j]) for j < n: the LSTM's tanh of the new c before zoneout.
FUSENN_VECTOR_CLONES void tanh_c_new_row(float* __restrict tc, const float* __restrict i, const float* __restrict f,
                                         const float* __restrict g, const float* __restrict c_prev, int64_t n) {
  for (int64_t j = 0; j < n; ++j) tc[j] = tanhf(lstm_c_new(i[j], f[j], g[j], c_prev[j]));
}

// For CPU tensors (like): act (rows, gates * H) fp32 := the activated gates from gh (the recurrent products) and gx
// (rows, gates * H, in like's dtype): the LSTM's i, f, g, o (gates 4), or the GRU's r and z with bias, its b_hh's
// first 2H as fp32 or null, and its gh_n as it is (gates 3; n needs r). The LSTM's tc (rows, H), where given,
// := tanh of the new c, from c_prev (rows, H). Returns whether it did (Step::activated); CUDA tensors: false.
bool activate_gates(const Tensor& like, float* act, const float* gh, const void* gx, int64_t rows, int64_t gates,
                    int64_t H, const float* bias, const float* c_prev = nullptr, float* tc = nullptr) {
  if (like.is_cuda() || rows == 0) return !like.is_cuda();
  const int64_t width = gates * H;
  const auto pass = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end) {
      std::vector<float> converted(std::is_same_v<T, float> ? 0 : width);
      for (int64_t r = begin; r < end; ++r) {
        float* a = act + r * width;
        const float* g = gh + r * width;
        const T* xt = static_cast<const T*>(gx) + r * width;
        const float* x = reinterpret_cast<const float*>(xt);
        if constexpr (!std::is_same_v<T, float>) {
          for (int64_t k = 0; k < width; ++k) converted[k] = to_float(xt[k]);
          x = converted.data();
        }
        if (gates == 4) {
          activate_row(a, g, x, nullptr, 2 * H, false);
          activate_row(a + 2 * H, g + 2 * H, x + 2 * H, nullptr, H, true);
          activate_row(a + 3 * H, g + 3 * H, x + 3 * H, nullptr, H, false);
          if (tc != nullptr) tanh_c_new_row(tc + r * H, a, a + H, a + 2 * H, c_prev + r * H, H);
        } else {
          activate_row(a, g, x, bias, 2 * H, false);
          std::memcpy(a + 2 * H, g + 2 * H, H * sizeof(float));
        }
      }
    });
  };
  switch (dtype_of(like)) {
    case Dtype::f32: pass(static_cast<float*>(nullptr)); break;
    case Dtype::f16: pass(static_cast<c10::Half*>(nullptr)); break;
    case Dtype::bf16: pass(static_cast<c10::BFloat16*>(nullptr)); break;
  }
  return true;
}

// Below this many multiply-adds a @ b is faster through at::mm than through oneDNN's primitive call (~10 us
// fixed cost on this project's CPU; at::mm is 2-5x faster at, e.g., B 1-4 x H 128).
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 19;

// The right operand b (K, N) of a layer's per-step GEMMs out = a @ b, a (rows, K). On CPU, b^T contiguous (that
// spares oneDNN a reorder a step), and, for fp32 where the steps amortise it (T >= 8, oneDNN serves the shape),
// b^T also in oneDNN's packed layout for `rows` rows (torch's mkldnn::_reorder_linear_weight): no step's call
// then repacks the whole weight (1.2-2x faster a step at H 256-650, B 4-64; the products are the same bits).
struct Rhs {
  Tensor b;
  Tensor packed;  // undefined: none
};

Rhs step_rhs(const Tensor& b, int64_t rows, int64_t steps) {
  if (b.is_cuda()) return {b, Tensor()};
  static const std::optional<c10::OperatorHandle> reorder =
      c10::Dispatcher::singleton().findOp({"mkldnn::_reorder_linear_weight", ""});
  const Tensor bt = b.t().contiguous();
  if (b.scalar_type() != at::kFloat || steps < 8 || rows < 2 || !reorder ||
      rows * b.size(0) * b.size(1) < kOneDnnMinMacs) {
    return {bt.t(), Tensor()};
  }
  std::vector<c10::IValue> stack{bt, c10::IValue(rows)};
  reorder->callBoxed(stack);
  return {bt.t(), stack[0].toTensor()};
}

// out (fp32) = a @ b, a and b in the layer's dtype: fp32 accumulation and result for every dtype; out may be
// replaced by a new tensor (its data pointer is read after the call).
// CPU fp32: a @ b through oneDNN (torch's mkldnn::_linear_pointwise, linear(a, b^T); `packed` is b^T in its
// layout) where torch has it and the shape is large enough: on some CPUs (AMD) MKL's sgemm takes a generic path
// 2-3x slower at these shapes. False where it cannot, for at::mm to serve.
bool onednn_mm(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& packed = Tensor()) {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  if (!op || !a.device().is_cpu() || a.numel() == 0 || b.numel() == 0 || !a.is_contiguous()) return false;
  // b dense in one order or the other: other strides would take oneDNN's reference kernel, ~100x slower
  if (!packed.defined() && (a.size(0) * b.size(0) * b.size(1) < kOneDnnMinMacs ||
                            !(b.is_contiguous() || b.t().is_contiguous()))) {
    return false;
  }
  std::vector<c10::IValue> stack{a, packed.defined() ? packed : b.t(), c10::IValue(), std::string("none"),
                                 c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op->callBoxed(stack);
  out = stack[0].toTensor();
  return true;
}

void mm_f32(Tensor& out, const Tensor& a, const Tensor& b, const Tensor& packed = Tensor()) {
  if (a.scalar_type() == at::kFloat) {
    if (!onednn_mm(out, a, b, packed)) at::mm_out(out, a, b);
  } else if (a.is_cuda()) {
    at::mm_out(out, a, b, at::kFloat);
  } else {  // CPU has no half-in, float-out mm
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  }
}

void mm_f32(Tensor& out, const Tensor& a, const Rhs& b) { mm_f32(out, a, b.b, b.packed); }

// An output buffer; NaN under FUSENN_POISON=1 (the tests), so an element never written cannot pass.
Tensor new_output(at::IntArrayRef shape, at::ScalarType dtype, const Tensor& like) {
  Tensor out = at::empty(shape, like.options().dtype(dtype));
  const char* poison = std::getenv("FUSENN_POISON");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) out.fill_(NAN);
  return out;
}

Tensor none(const Tensor& like) { return at::empty({0}, like.options().dtype(at::kFloat)); }

// Row i of t's first dimension (t contiguous).
template <class P = void>
P* row(const Tensor& t, int64_t i) {
  return reinterpret_cast<P*>(static_cast<char*>(t.data_ptr()) + i * t.stride(0) * t.element_size());
}

template <class P>
P* data_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<P>() : nullptr;
}

void expect(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
            const Tensor& like, bool contiguous = true) {
  TORCH_CHECK(t.sizes() == shape, "fusenn_cuda::", op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fusenn_cuda::", op, ": expected ", name, " of dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fusenn_cuda::", op, ": expected ", name, " on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "fusenn_cuda::", op, ": expected ", name, " to be contiguous");
}

struct Regularisers {
  const float* rscale;
  Zoneout zo;
};

// Checks the inputs every layer op shares: gx (T, B, gates * H) contiguous; w_hh (gates * H, P);
// lengths (B,) int64; rscale (B, P) fp32; zoneout's seed when sampled.
Regularisers check_common(const char* op, const Tensor& gx, int64_t gates, const Tensor& w_hh, int64_t P,
                          const OptTensor& lengths, const OptTensor& rscale, const OptTensor& zo_seed, int64_t zo_mode,
                          int64_t zo_threshold, double zo_u) {
  TORCH_CHECK(gx.dim() == 3 && gx.size(2) % gates == 0, "fusenn_cuda::", op, ": expected gx of shape (T, B, ", gates,
              " * hidden_size), got ", gx.sizes());
  dtype_of(gx);
  TORCH_CHECK(gx.is_contiguous(), "fusenn_cuda::", op, ": expected gx to be contiguous");
  const int64_t B = gx.size(1), H = gx.size(2) / gates;
  expect(op, "w_hh", w_hh, {gates * H, P}, gx.scalar_type(), gx, false);
  if (lengths) expect(op, "lengths", *lengths, {B}, at::kLong, gx);
  if (rscale) expect(op, "rscale", *rscale, {B, P}, at::kFloat, gx);
  TORCH_CHECK(zo_mode >= 0 && zo_mode <= 2, "fusenn_cuda::", op, ": zo_mode must be 0, 1 or 2, got ", zo_mode);
  TORCH_CHECK(zo_threshold >= 0 && zo_threshold <= (1 << 24), "fusenn_cuda::", op, ": zo_threshold out of range");
  if (zo_mode == 1) {
    TORCH_CHECK(zo_seed.has_value(), "fusenn_cuda::", op, ": sampled zoneout (zo_mode 1) needs zo_seed");
    expect(op, "zo_seed", *zo_seed, {}, at::kLong, gx);
  }
  return {data_or_null<float>(rscale),
          {zo_mode == 1 ? zo_seed->data_ptr<int64_t>() : nullptr, static_cast<int32_t>(zo_mode),
           static_cast<uint32_t>(zo_threshold), static_cast<float>(zo_u)}};
}

// For CPU tensors under sampled zoneout: every counter's mask of the layer, [0, counters), which zo.keep then
// points at (one vectorised pass instead of a Philox evaluation per element and use): drawn into keep (a new
// uint8 tensor where undefined, else the caller's buffer), or, where `drawn`, keep already holds them.
void sample_zoneout(const char* op, Zoneout& zo, int64_t counters, const Tensor& like, Tensor& keep,
                    bool drawn = false) {
  if (keep.defined()) expect(op, "zoneout keep", keep, {counters}, at::kByte, like);
  if (zo.mode != 1 || like.is_cuda() || counters == 0) return;
  if (!keep.defined()) keep = at::empty({counters}, like.options().dtype(at::kByte));
  if (!drawn) philox_keep_host(keep.data_ptr<uint8_t>(), 0, counters, static_cast<uint64_t>(*zo.seed), zo.threshold);
  zo.keep = keep.data_ptr<uint8_t>();
}

Step step_at(int64_t t, int64_t T, int64_t B, const OptTensor& lengths, const Regularisers& r) {
  return {t, T, B, data_or_null<int64_t>(lengths), r.rscale, r.zo};
}

// The state-buffer slots entering and leaving the step processed k-th: saving, slot t + reverse holds the
// state entering step t (one slice for the weight-gradient GEMMs); else two slots alternate.
void slots(int64_t t, int64_t k, bool reverse, bool save, int64_t* before, int64_t* after) {
  if (save) {
    *before = reverse ? t + 1 : t;
    *after = reverse ? t : t + 1;
  } else {
    *before = k % 2;
    *after = 1 - *before;
  }
}

// The states entering steps 0..T-1 as they entered the recurrent product (times r/(1-p)), in the layer's
// dtype, as (T * B, P): the operand of the one GEMM that recomputes every step's gh in backward.
Tensor entering_product(const Tensor& hs, int64_t T, bool reverse, const OptTensor& rscale, const Tensor& gx) {
  Tensor h = hs.narrow(0, reverse ? 1 : 0, T);
  if (rscale) h = h * *rscale;
  return h.to(gx.scalar_type()).reshape({T * hs.size(1), hs.size(2)});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const OptTensor& w_hr,
    const OptTensor& lengths, bool reverse, bool save, const OptTensor& rscale, const OptTensor& zo_seed,
    int64_t zo_mode, int64_t zo_threshold, double zo_u, int64_t stream, const OptTensor& gates_out,
    const OptTensor& zo_keep_out) {
  constexpr const char* op = "lstm_forward";
  const OpDevice device(gx);
  TORCH_CHECK(h0.dim() == 2, "fusenn_cuda::", op, ": expected h0 of shape (B, P), got ", h0.sizes());
  const int64_t P = h0.size(1);
  Regularisers regs =
      check_common(op, gx, 4, w_hh, P, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4;
  Tensor zo_keep = zo_keep_out ? *zo_keep_out : Tensor();
  sample_zoneout(op, regs.zo, T * B * (P + H), gx, zo_keep);
  const bool proj = w_hr.has_value();
  expect(op, "h0", h0, {B, P}, gx.scalar_type(), gx, false);
  expect(op, "c0", c0, {B, H}, gx.scalar_type(), gx, false);
  if (proj) expect(op, "w_hr", *w_hr, {P, H}, gx.scalar_type(), gx, false);
  TORCH_CHECK(proj || P == H, "fusenn_cuda::", op, ": without w_hr, h0 must have hidden_size columns");
  if (gates_out) {
    expect(op, "gates_out", *gates_out, {T, B, 4 * H}, at::kFloat, gx);
    TORCH_CHECK(!gx.is_cuda(), "fusenn_cuda::", op, ": gates_out is for CPU tensors (a GPU backward recomputes them)");
  }

  const int64_t slot_count = save ? T + 1 : 2, first = (save && reverse) ? T : 0;
  Tensor hs = new_output({slot_count, B, P}, at::kFloat, gx), cs = new_output({slot_count, B, H}, at::kFloat, gx);
  hs[first].copy_(h0);
  cs[first].copy_(c0);
  Tensor ms = proj ? new_output({save ? T : 1, B, H}, at::kFloat, gx) : none(gx);
  Tensor y = new_output({T, B, P}, gx.scalar_type(), gx);
  if (T > 0 && B > 0) {
    Tensor gh = at::empty({B, 4 * H}, gx.options().dtype(at::kFloat)), tc = at::empty({B, H}, gh.options());
    Tensor act = gates_out ? Tensor() : at::empty_like(gh);  // the activated gates (CPU), kept in gates_out
    // h0 as the first operand: a buffer of its own (the steps write it), never a view of hs
    // fp32 on CPU without recurrent dropout: the state itself is the next GEMM's operand (no copy per step)
    const bool direct = !gx.is_cuda() && gx.scalar_type() == at::kFloat && !rscale;
    Tensor op_h = direct ? Tensor() : (rscale ? hs[first] * *rscale : hs[first]).to(gx.scalar_type(), false, true);
    Tensor m_op = proj ? at::empty({B, H}, gx.options()) : Tensor();
    Tensor hp = proj ? at::empty({B, P}, gx.options().dtype(at::kFloat)) : Tensor();
    const Rhs w_hh_t = step_rhs(w_hh.t(), B, T), w_hr_t = proj ? step_rhs(w_hr->t(), B, T) : Rhs{};
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? T - 1 - k : k;
      int64_t before, after;
      slots(t, k, reverse, save, &before, &after);
      mm_f32(gh, direct ? hs[before] : op_h, w_hh_t);
      Step s = step_at(t, T, B, lengths, regs);
      float* a = gates_out ? row<float>(*gates_out, t) : act.data_ptr<float>();
      s.activated = activate_gates(gx, a, gh.data_ptr<float>(), row(gx, t), B, 4, H, nullptr, row<float>(cs, before),
                                   tc.data_ptr<float>());
      const LstmCell cell{s, H, P, row(gx, t), s.activated ? a : gh.data_ptr<float>(), row<float>(cs, before),
                          row<float>(cs, after),
                          row<float>(hs, before), row<float>(hs, after), row(y, t), direct ? nullptr : op_h.data_ptr(),
                          proj ? row<float>(ms, save ? t : 0) : nullptr, proj ? m_op.data_ptr() : nullptr,
                          s.activated ? tc.data_ptr<float>() : nullptr};
      run_step(cell, B * H, gx, stream);
      if (proj) {
        mm_f32(hp, m_op, w_hr_t);
        const EmitH emit{s, P, hp.data_ptr<float>(), row<float>(hs, before), row<float>(hs, after), row(y, t),
                         direct ? nullptr : op_h.data_ptr()};
        run_step(emit, B * P, gx, stream);
      }
    }
  }
  const int64_t last = save ? (reverse ? 0 : T) : T % 2;
  return {y, hs[last].to(gx.scalar_type(), false, true), cs[last].to(gx.scalar_type(), false, true),
          save ? hs : none(gx), save ? cs : none(gx), save ? ms : none(gx)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& dy_in, const Tensor& dh_n, const Tensor& dc_n, const Tensor& gx, const Tensor& w_hh,
    const OptTensor& w_hr, const OptTensor& lengths, bool reverse, const Tensor& hs, const Tensor& cs,
    const OptTensor& rscale, const OptTensor& zo_seed, int64_t zo_mode, int64_t zo_threshold, double zo_u,
    int64_t stream, const OptTensor& gates, const OptTensor& zo_keep_in) {
  constexpr const char* op = "lstm_backward";
  const OpDevice device(gx);
  TORCH_CHECK(hs.dim() == 3, "fusenn_cuda::", op, ": expected hs of shape (T + 1, B, P), got ", hs.sizes());
  const int64_t P = hs.size(2);
  Regularisers regs =
      check_common(op, gx, 4, w_hh, P, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4;
  Tensor zo_keep = zo_keep_in ? *zo_keep_in : Tensor();
  sample_zoneout(op, regs.zo, T * B * (P + H), gx, zo_keep, zo_keep_in.has_value());
  const bool proj = w_hr.has_value();
  expect(op, "hs", hs, {T + 1, B, P}, at::kFloat, gx);
  expect(op, "cs", cs, {T + 1, B, H}, at::kFloat, gx);
  expect(op, "dy", dy_in, {T, B, P}, dy_in.scalar_type(), gx, false);
  expect(op, "dh_n", dh_n, {B, P}, dh_n.scalar_type(), gx, false);
  expect(op, "dc_n", dc_n, {B, H}, dc_n.scalar_type(), gx, false);
  if (proj) expect(op, "w_hr", *w_hr, {P, H}, gx.scalar_type(), gx, false);
  if (gates) expect(op, "gates", *gates, {T, B, 4 * H}, at::kFloat, gx);

  const Tensor dy = dy_in.to(gx.scalar_type()).contiguous();
  Tensor dh = dh_n.to(at::kFloat, false, true).contiguous(), dc = dc_n.to(at::kFloat, false, true).contiguous();
  Tensor dg = new_output({T, B, 4 * H}, at::kFloat, gx);
  Tensor dhs = proj ? new_output({T, B, P}, at::kFloat, gx) : none(gx);
  if (T > 0 && B > 0) {
    const auto f32 = gx.options().dtype(at::kFloat);
    // Every step's gate pre-activations: gx + the recurrent products, recomputed in one GEMM over the saved states,
    // unless the forward kept the activated gates (CPU). tcs: tanh of each step's new c (CPU).
    Tensor gh, tcs = at::empty({gx.is_cuda() ? 0 : T, B, H}, f32);
    const float* c_prev = row<float>(cs, reverse ? 1 : 0);  // entering step t: slot t (t + 1 in reverse)
    bool activated = false;
    if (gates) {
      gh = *gates;
      activated = true;
      const auto pass = [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const float* a = gh.data_ptr<float>() + r * 4 * H;
          tanh_c_new_row(tcs.data_ptr<float>() + r * H, a, a + H, a + 2 * H, c_prev + r * H, H);
        }
      };
      at::parallel_for(0, T * B, std::max<int64_t>(1, 16384 / H), pass);
    } else {
      Tensor products = at::empty({T * B, 4 * H}, f32);
      mm_f32(products, entering_product(hs, T, reverse, rscale, gx), w_hh.t());
      gh = gx.is_cuda() ? products : at::empty_like(products);
      activated = activate_gates(gx, gh.data_ptr<float>(), products.data_ptr<float>(), gx.data_ptr(), T * B, 4, H,
                                 nullptr, c_prev, tcs.data_ptr<float>());
    }
    Tensor dhz = at::empty({B, P}, f32), acc = at::empty({B, P}, f32);
    Tensor dhz_op = proj ? at::empty({B, P}, gx.options()) : Tensor();
    Tensor dm = proj ? at::empty({B, H}, f32) : dhz;
    // fp32 on CPU: each step's dg is the GEMM's operand itself
    const bool direct = !gx.is_cuda() && gx.scalar_type() == at::kFloat;
    Tensor dg_op = direct ? Tensor() : at::empty({B, 4 * H}, gx.options());
    const Rhs w_hh_b = step_rhs(w_hh, B, T), w_hr_b = proj ? step_rhs(*w_hr, B, T) : Rhs{};
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? k : T - 1 - k;
      int64_t before, after;
      slots(t, k, reverse, true, &before, &after);
      Step s = step_at(t, T, B, lengths, regs);
      s.activated = activated;
      const LstmDh into_h{s, P, row(dy, t), dh.data_ptr<float>(), dhz.data_ptr<float>(),
                          proj ? dhz_op.data_ptr() : nullptr, proj ? row<float>(dhs, t) : nullptr};
      run_step(into_h, B * P, gx, stream);
      if (proj) mm_f32(dm, dhz_op, w_hr_b);
      const LstmCellBackward cell{s, H, P, row(gx, t), gh.data_ptr<float>() + t * B * 4 * H, row<float>(cs, before),
                                  row<float>(cs, after), dm.data_ptr<float>(), dc.data_ptr<float>(), row<float>(dg, t),
                                  direct ? nullptr : dg_op.data_ptr(), activated ? row<float>(tcs, t) : nullptr};
      run_step(cell, B * H, gx, stream);
      mm_f32(acc, direct ? dg[t] : dg_op, w_hh_b);
      run_step(AddRecurrent{s, P, acc.data_ptr<float>(), dh.data_ptr<float>()}, B * P, gx, stream);
    }
  }
  return {dg, dh, dc, dhs};
}

// The GRU's b_hr and b_hz as fp32 (activate_gates adds them), or none.
OptTensor gru_bias_rz(const OptTensor& b_hh, int64_t H) {
  if (!b_hh) return std::nullopt;
  return b_hh->narrow(0, 0, 2 * H).to(at::kFloat).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                               const OptTensor& b_hh, const OptTensor& lengths, bool reverse, bool save,
                                               const OptTensor& rscale, const OptTensor& zo_seed, int64_t zo_mode,
                                               int64_t zo_threshold, double zo_u, int64_t stream,
                                               const OptTensor& gates_out) {
  constexpr const char* op = "gru_forward";
  const OpDevice device(gx);
  TORCH_CHECK(h0.dim() == 2, "fusenn_cuda::", op, ": expected h0 of shape (B, H), got ", h0.sizes());
  const int64_t H = h0.size(1);
  Regularisers regs =
      check_common(op, gx, 3, w_hh, H, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1);
  Tensor zo_keep;
  sample_zoneout(op, regs.zo, T * B * H, gx, zo_keep);
  expect(op, "h0", h0, {B, H}, gx.scalar_type(), gx, false);
  if (b_hh) expect(op, "b_hh", *b_hh, {3 * H}, gx.scalar_type(), gx);
  if (gates_out) {
    expect(op, "gates_out", *gates_out, {T, B, 3 * H}, at::kFloat, gx);
    TORCH_CHECK(!gx.is_cuda(), "fusenn_cuda::", op, ": gates_out is for CPU tensors (a GPU backward recomputes them)");
  }

  const int64_t slot_count = save ? T + 1 : 2, first = (save && reverse) ? T : 0;
  Tensor hs = new_output({slot_count, B, H}, at::kFloat, gx);
  hs[first].copy_(h0);
  Tensor y = new_output({T, B, H}, gx.scalar_type(), gx);
  if (T > 0 && B > 0) {
    Tensor gh = at::empty({B, 3 * H}, gx.options().dtype(at::kFloat));
    Tensor act = gates_out ? Tensor() : at::empty_like(gh);  // the activated gates (CPU), kept in gates_out
    const bool direct = !gx.is_cuda() && gx.scalar_type() == at::kFloat && !rscale;  // as the LSTM's
    Tensor op_h = direct ? Tensor() : (rscale ? hs[first] * *rscale : hs[first]).to(gx.scalar_type(), false, true);
    const Rhs w_hh_t = step_rhs(w_hh.t(), B, T);
    const OptTensor bias_rz = gru_bias_rz(b_hh, H);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? T - 1 - k : k;
      int64_t before, after;
      slots(t, k, reverse, save, &before, &after);
      mm_f32(gh, direct ? hs[before] : op_h, w_hh_t);
      Step s = step_at(t, T, B, lengths, regs);
      float* a = gates_out ? row<float>(*gates_out, t) : act.data_ptr<float>();
      s.activated = activate_gates(gx, a, gh.data_ptr<float>(), row(gx, t), B, 3, H, data_or_null<float>(bias_rz));
      const GruCell cell{s, H, row(gx, t), s.activated ? a : gh.data_ptr<float>(),
                         b_hh ? b_hh->data_ptr() : nullptr, row<float>(hs, before), row<float>(hs, after), row(y, t),
                         direct ? nullptr : op_h.data_ptr()};
      run_step(cell, B * H, gx, stream);
    }
  }
  const int64_t last = save ? (reverse ? 0 : T) : T % 2;
  return {y, hs[last].to(gx.scalar_type(), false, true), save ? hs : none(gx)};
}

std::tuple<Tensor, Tensor, Tensor> gru_backward(const Tensor& dy_in, const Tensor& dh_n, const Tensor& gx,
                                                const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& lengths,
                                                bool reverse, const Tensor& hs, const OptTensor& rscale,
                                                const OptTensor& zo_seed, int64_t zo_mode, int64_t zo_threshold,
                                                double zo_u, int64_t stream, const OptTensor& gates) {
  constexpr const char* op = "gru_backward";
  const OpDevice device(gx);
  TORCH_CHECK(hs.dim() == 3, "fusenn_cuda::", op, ": expected hs of shape (T + 1, B, H), got ", hs.sizes());
  const int64_t H = hs.size(2);
  Regularisers regs =
      check_common(op, gx, 3, w_hh, H, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1);
  Tensor zo_keep;
  sample_zoneout(op, regs.zo, T * B * H, gx, zo_keep);
  expect(op, "hs", hs, {T + 1, B, H}, at::kFloat, gx);
  expect(op, "dy", dy_in, {T, B, H}, dy_in.scalar_type(), gx, false);
  expect(op, "dh_n", dh_n, {B, H}, dh_n.scalar_type(), gx, false);
  if (b_hh) expect(op, "b_hh", *b_hh, {3 * H}, gx.scalar_type(), gx);
  if (gates) expect(op, "gates", *gates, {T, B, 3 * H}, at::kFloat, gx);

  const Tensor dy = dy_in.to(gx.scalar_type()).contiguous();
  Tensor dh = dh_n.to(at::kFloat, false, true).contiguous();
  Tensor dg = new_output({T, B, 3 * H}, at::kFloat, gx), dghn = new_output({T, B, H}, at::kFloat, gx);
  if (T > 0 && B > 0) {
    const auto f32 = gx.options().dtype(at::kFloat);
    // Every step's gates: kept by the forward (CPU, activated), else recomputed in one GEMM over the saved states
    Tensor gh = gates ? *gates : Tensor();
    bool activated = gates.has_value();
    if (!gates) {
      Tensor products = at::empty({T * B, 3 * H}, f32);
      mm_f32(products, entering_product(hs, T, reverse, rscale, gx), w_hh.t());
      const OptTensor bias_rz = gru_bias_rz(b_hh, H);
      gh = gx.is_cuda() ? products : at::empty_like(products);
      activated = activate_gates(gx, gh.data_ptr<float>(), products.data_ptr<float>(), gx.data_ptr(), T * B, 3, H,
                                 data_or_null<float>(bias_rz));
    }
    Tensor acc = at::empty({B, H}, f32), g_op = at::empty({B, 3 * H}, gx.options());
    const Rhs w_hh_b = step_rhs(w_hh, B, T);
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? k : T - 1 - k;
      int64_t before, after;
      slots(t, k, reverse, true, &before, &after);
      Step s = step_at(t, T, B, lengths, regs);
      s.activated = activated;
      const GruCellBackward cell{s, H, row(gx, t), gh.data_ptr<float>() + t * B * 3 * H,
                                 b_hh ? b_hh->data_ptr() : nullptr, row<float>(hs, before), row(dy, t),
                                 dh.data_ptr<float>(), row<float>(dg, t), row<float>(dghn, t), g_op.data_ptr()};
      run_step(cell, B * H, gx, stream);
      mm_f32(acc, g_op, w_hh_b);
      run_step(AddRecurrent{s, H, acc.data_ptr<float>(), dh.data_ptr<float>()}, B * H, gx, stream);
    }
  }
  return {dg, dghn, dh};
}


// ---- The persistent layers (csrc/rnn_persist.cuh): one cooperative launch per layer and direction on a
// GPU; on CPU tensors the grid's emulation through the same per-CTA functions. Same inputs and results as
// the ops above (the LSTM's projection too), plus `grid`: the CTAs asked for (0: the launcher's plan; on the
// host, the plan for an H200), and `tf32`: fp32 products may run on TF32 tensor cores (torch.backends.cudnn.allow_tf32;
// the plan takes them where their layout fits, the host emulation rounds the operands as cvt.rna does). ----

persist::Args persist_args(int gates, const Tensor& gx, const Tensor& w_hh, const OptTensor& b_hh,
                           const OptTensor& lengths, bool reverse, bool save, const Regularisers& regs) {
  persist::Args a{};
  a.T = gx.size(0);
  a.B = gx.size(1);
  a.H = gx.size(2) / gates;
  a.P = w_hh.size(1);  // proj_size with a projection (the caller sets proj and w_hr), else H
  a.gates = gates;
  a.reverse = reverse;
  a.save = save;
  a.gx = gx.data_ptr();
  a.w_hh = w_hh.data_ptr();
  a.b_hh = b_hh ? b_hh->data_ptr() : nullptr;
  a.lengths = data_or_null<int64_t>(lengths);
  a.rscale = regs.rscale;
  a.zo = regs.zo;
  return a;
}

// The grid's emulation runs each CTA's share of a phase (the work between two of the kernels' grid barriers) in
// turn; the GPU runs them at once, so within a phase no CTA may read what another writes, nor two write one
// element. The sequential run hides such a race (a CTA sees the shares run before it), so FUSENN_PERSIST_EMULATION
// (read here only: CPU tensors) changes what it would hide, for tests/test_persist.py to compare bit for bit with
// the plain run. Space-separated words:
//   reverse, shuffle=SEED  the CTAs of every phase in reverse or a seeded random order (plain: index order);
//   snapshot               each CTA's share sees the buffers the kernels write as the last barrier left them (and
//                          its own writes); the shares' writes are merged at the barrier; two shares changing one
//                          byte raise;
//   threads                each CTA played by kWarps host threads taking turns between its __syncthreads
//                          (Turnstile), in index order or as reverse / shuffle order the CTAs; threads of a CTA
//                          reaching different numbers of __syncthreads raise;
//   poison                 the shared memory a CTA stages through (operands, partial sums) all NaN before each of
//                          its shares, and the global buffers the ops leave uninitialised at the start, so that a
//                          read of what was not written first shows;
//   drop=N, twice=C,       races made on purpose, which the modes above must see: the N-th barrier (from 1) left
//   nosync=N, diverge=N,   out; CTA C's share run twice a phase, as if a second CTA owned its slice; every thread's
//   unstaged=R             (diverge: thread 0's) N-th __syncthreads of each share left out; batch row R of every
//                          staged tile not written (a read of what was not written: poison's to show).
// (EmulatedGrid below; first the threads mode's turns.)

// One CTA's share of a phase played by host threads in turns: between two __syncthreads (FUSENN_SYNC) every thread
// runs in `order`, one at a time, so where one thread writes what another reads with no __syncthreads between,
// the reader sees the value or not depending on the order, and the results change.
class Turnstile {
 public:
  Turnstile(std::vector<int> order, int64_t nosync, int64_t diverge)
      : order_(std::move(order)), live_(order_.size(), true), calls_(order_.size(), 0), syncs_(order_.size(), 0),
        nosync_(nosync), diverge_(diverge) {}

  // body(tid, nt) in every thread; returns false if the threads reached different numbers of __syncthreads.
  bool run(const std::function<void(int, int)>& body) {
    const int nt = static_cast<int>(order_.size());
    std::vector<std::thread> threads;
    for (int tid = 0; tid < nt; ++tid) {
      threads.emplace_back([this, &body, tid, nt] {
        current_ = this;
        me_ = tid;
        persist::host_sync = [] { current_->sync(me_); };
        wait_turn(tid);
        body(tid, nt);
        std::lock_guard<std::mutex> lock(mutex_);
        live_[tid] = false;
        if (--alive_ > 0) pass();
        turn_.notify_all();
      });
    }
    for (auto& t : threads) t.join();
    return std::all_of(syncs_.begin(), syncs_.end(), [&](int64_t n) { return n == syncs_[0]; });
  }

 private:
  void wait_turn(int tid) {
    std::unique_lock<std::mutex> lock(mutex_);
    turn_.wait(lock, [&] { return order_[pos_] == tid; });
  }
  void pass() {  // to the next live thread in order; past the last, the next segment begins
    do pos_ = (pos_ + 1) % order_.size();
    while (!live_[order_[pos_]]);
  }
  void sync(int tid) {
    const int64_t n = ++calls_[tid];
    if (n == nosync_ || (tid == 0 && n == diverge_)) return;
    ++syncs_[tid];
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pass();
    }
    turn_.notify_all();
    wait_turn(tid);
  }

  static thread_local Turnstile* current_;
  static thread_local int me_;
  std::vector<int> order_;
  std::vector<bool> live_;
  std::vector<int64_t> calls_, syncs_;  // FUSENN_SYNC calls, and the __syncthreads they made, per thread
  int64_t nosync_, diverge_;
  size_t pos_ = 0;
  int alive_ = static_cast<int>(order_.size());
  std::mutex mutex_;
  std::condition_variable turn_;
};
thread_local Turnstile* Turnstile::current_ = nullptr;
thread_local int Turnstile::me_ = 0;

class EmulatedGrid {
 public:
  struct Buffer {  // a buffer the kernels write: name, data, bytes, bytes per element, left uninitialised
    const char* name;
    void* data;
    int64_t bytes, elem;
    bool undefined;
  };

  // buffers: what the kernels write in global memory; scratch: what the CTAs share as their staging memory
  EmulatedGrid(int64_t grid, std::vector<Buffer> buffers, std::vector<Buffer> scratch)
      : grid_(grid), buffers_(std::move(buffers)), scratch_(std::move(scratch)) {
    const char* env = std::getenv("FUSENN_PERSIST_EMULATION");
    std::istringstream words(env != nullptr ? env : "");
    for (std::string w; words >> w;) {
      const std::string key = w.substr(0, w.find('=')), value = w.find('=') == w.npos ? "" : w.substr(w.find('=') + 1);
      const bool number = !value.empty() && value.find_first_not_of("0123456789") == value.npos;
      if (w == "reverse") {
        reverse_ = true;
      } else if (w == "snapshot") {
        snapshot_ = true;
      } else if (key == "shuffle" && number) {
        shuffle_ = true;
        rng_.seed(std::stoull(value));
      } else if (key == "drop" && number) {
        drop_ = std::stoll(value);
      } else if (key == "twice" && number) {
        twice_ = std::stoll(value);
      } else if (w == "threads") {
        threads_ = true;
      } else if (w == "poison") {
        poison_ = true;
      } else if (key == "nosync" && number) {
        nosync_ = std::stoll(value);
      } else if (key == "diverge" && number) {
        diverge_ = std::stoll(value);
      } else if (key == "unstaged" && number) {
        unstaged_ = std::stoll(value);
      } else {
        TORCH_CHECK(false, "FUSENN_PERSIST_EMULATION: unknown word '", w, "' (reverse, shuffle=SEED, snapshot, "
                    "threads, poison, drop=N, twice=C, nosync=N, diverge=N, unstaged=R)");
      }
    }
    TORCH_CHECK(twice_ < grid_, "FUSENN_PERSIST_EMULATION: twice=", twice_, " names no CTA of the grid's ", grid_);
    TORCH_CHECK(unstaged_ < persist::kTileB, "FUSENN_PERSIST_EMULATION: unstaged=", unstaged_, " names no row of a ",
                persist::kTileB, "-row tile");
    persist::host_unstaged_row = unstaged_;
    for (const Buffer& b : buffers_) {
      if (poison_ && b.undefined) std::memset(b.data, 0xff, b.bytes);
    }
  }
  ~EmulatedGrid() { persist::host_unstaged_row = -1; }
  EmulatedGrid(const EmulatedGrid&) = delete;
  EmulatedGrid& operator=(const EmulatedGrid&) = delete;
  // Every CTA's share of the work up to the next barrier: share(cta, tid, nt).
  void each(std::function<void(int64_t, int, int)> share) { shares_.push_back(std::move(share)); }
  // Where the kernels have a grid barrier: the shares queued since the last one run, CTA by CTA.
  void barrier() {
    if (++barriers_ != drop_) run();
  }
  void finish() { run(); }

 private:
  void run() {
    std::vector<int64_t> order(grid_);
    for (int64_t c = 0; c < grid_; ++c) order[c] = reverse_ ? grid_ - 1 - c : c;
    if (shuffle_) std::shuffle(order.begin(), order.end(), rng_);
    if (twice_ >= 0) order.push_back(twice_);
    if (!snapshot_) {
      for (const int64_t c : order) run_cta(c);
    } else {
      std::vector<std::vector<uint8_t>> last(buffers_.size()), next(buffers_.size());
      std::vector<std::vector<int32_t>> writer(buffers_.size());  // which share wrote each byte (-1: none)
      for (size_t i = 0; i < buffers_.size(); ++i) {
        const auto* p = static_cast<const uint8_t*>(buffers_[i].data);
        last[i].assign(p, p + buffers_[i].bytes);
        next[i] = last[i];
        writer[i].assign(buffers_[i].bytes, -1);
      }
      for (size_t r = 0; r < order.size(); ++r) {
        for (size_t i = 0; i < buffers_.size(); ++i) std::memcpy(buffers_[i].data, last[i].data(), buffers_[i].bytes);
        run_cta(order[r]);
        for (size_t i = 0; i < buffers_.size(); ++i) {
          const auto* p = static_cast<const uint8_t*>(buffers_[i].data);
          for (int64_t j = 0; j < buffers_[i].bytes; ++j) {
            if (p[j] == last[i][j]) continue;
            TORCH_CHECK(writer[i][j] < 0, "persistent kernel emulation: CTAs ", order[writer[i][j]], " and ", order[r],
                        " both write ", buffers_[i].name, "[", j / buffers_[i].elem, "] after grid barrier ", ran_,
                        " (0: the launch)");
            next[i][j] = p[j];
            writer[i][j] = static_cast<int32_t>(r);
          }
        }
      }
      for (size_t i = 0; i < buffers_.size(); ++i) std::memcpy(buffers_[i].data, next[i].data(), buffers_[i].bytes);
    }
    shares_.clear();
    ran_ = barriers_;
  }

  void run_cta(int64_t c) {
    if (poison_) {
      for (const Buffer& b : scratch_) std::memset(b.data, 0xff, b.bytes);  // NaN in fp32, fp16 and bf16
    }
    if (!threads_) {
      for (const auto& share : shares_) share(c, 0, 1);
      return;
    }
    std::vector<int> order(persist::kWarps);
    for (int t = 0; t < persist::kWarps; ++t) order[t] = reverse_ ? persist::kWarps - 1 - t : t;
    if (shuffle_) std::shuffle(order.begin(), order.end(), rng_);
    Turnstile turns(order, nosync_, diverge_);
    TORCH_CHECK(turns.run([&](int tid, int nt) {
      for (const auto& share : shares_) share(c, tid, nt);
    }), "persistent kernel emulation: the threads of CTA ", c, " reach different numbers of __syncthreads after grid "
        "barrier ", ran_, " (0: the launch)");
  }

  int64_t grid_;
  std::vector<Buffer> buffers_, scratch_;
  std::vector<std::function<void(int64_t, int, int)>> shares_;
  int64_t barriers_ = 0, ran_ = 0, drop_ = 0, twice_ = -1, nosync_ = 0, diverge_ = 0, unstaged_ = -1;  // ran_: up to
  // the last phase run
  bool reverse_ = false, shuffle_ = false, snapshot_ = false, threads_ = false, poison_ = false;
  std::mt19937_64 rng_;
};

// Every buffer the kernels write (what the snapshot mode keeps), from the sizes the ops allocate; undefined: what
// they leave uninitialised (at::empty), for the kernels to write before they read it.
std::vector<EmulatedGrid::Buffer> written_buffers(const persist::Args& a, bool backward, int64_t elem) {
  const int64_t T = a.T, B = a.B, H = a.H, P = a.P, G = a.gates, slots = a.save ? T + 1 : 2;
  std::vector<EmulatedGrid::Buffer> v;
  const auto add = [&](const char* name, void* p, int64_t n, int64_t size, bool undefined = false) {
    if (p != nullptr) v.push_back({name, p, n * size, size, undefined});
  };
  if (!backward) {
    add("hs", a.hs, slots * B * P, 4);
    add("cs", a.cs, slots * B * H, 4);
    add("y", a.y, T * B * P, elem);
    add("op", a.op, 2 * B * P, elem);
    add("ms", a.ms, (a.save ? T : 1) * B * H, 4);
    add("m_op", a.m_op, B * H, elem);
  } else {
    add("dh", a.dh, B * P, 4);
    add("dc", a.dc, B * H, 4);
    add("dhz", a.dhz, B * P, 4, true);
    add("dhz_op", a.dhz_op, B * P, elem);
    add("dhs", a.dhs, T * B * P, 4);
    add("dm", a.dm, B * H, 4, true);
    add("dg", a.dg, T * B * G * H, 4);
    add("dghn", a.dghn, T * B * H, 4);
    add("dg_op", a.dg_op, 2 * B * G * H, elem);
  }
  return v;
}

// The kernels' loop (csrc/rnn_persist.cu), barrier for barrier, each phase's CTAs run in turn (EmulatedGrid).
template <class T>
void emulate_grid(const persist::Args& a, bool backward) {
  using namespace persist;
  const Layouts ls =
      layouts_for(a.gates, backward, static_cast<int>(sizeof(T)), a.H, a.proj ? a.P : 0, a.units, a.vrows, a.chunk,
                  a.tf32, a.tiles);
  const Layout &l = ls.a, &l2 = ls.b;
  // each CTA's shared-memory slices; one staging buffer and one set of partial sums, sized for both
  std::vector<std::vector<T>> w(a.grid, std::vector<T>(l.rows * l.ldw));
  std::vector<std::vector<T>> w2(a.grid, std::vector<T>(a.proj ? l2.rows * l2.ldw : 0));
  std::vector<T> staged(a.tiles * kTileB * std::max(l.lda, l2.lda));
  std::vector<float> sums(std::max(l.splits * l.Np, l2.splits * l2.Np) * a.tiles * kTileB);
  T* st = staged.data();
  float* acc = sums.data();
  for (int64_t c = 0; c < a.grid; ++c) {
    load_weights<T>(source_of(a, backward, false, c), w[c].data(), l, 0, 1);
    if (a.proj) load_weights<T>(source_of(a, backward, true, c), w2[c].data(), l2, 0, 1);
  }
  EmulatedGrid grid(a.grid, written_buffers(a, backward, sizeof(T)),
                    {{"staged", st, static_cast<int64_t>(staged.size() * sizeof(T)), sizeof(T), true},
                     {"sums", acc, static_cast<int64_t>(sums.size() * sizeof(float)), 4, true}});
  // each share takes (cta, tid, nt): the CTA, and the thread of nt playing it
  for (int64_t k = 0; k < a.T; ++k) {
    if (!backward) {
      grid.each([&, k](int64_t c, int i, int n) { forward_step<T>(a, c, k, w[c].data(), st, acc, l, i, n); });
      if (a.proj) {
        grid.barrier();
        grid.each([&, k](int64_t c, int i, int n) { forward_project<T>(a, c, k, w2[c].data(), st, acc, l2, i, n); });
      }
      if (k + 1 < a.T) grid.barrier();
    } else {
      if (k > 0) {
        grid.each([&, k](int64_t c, int i, int n) {
          backward_recurrent<T>(a, c, k - 1, w[c].data(), st, acc, l, i, n);
        });
      }
      if (a.proj) {
        grid.each([&, k](int64_t c, int i, int n) { backward_dh<T>(a, c, k, i, n); });
        grid.barrier();
      }
      grid.each([&, k](int64_t c, int i, int n) {
        backward_cells<T>(a, c, k, a.proj ? w2[c].data() : nullptr, st, acc, l2, i, n);
      });
      grid.barrier();
    }
  }
  if (backward && a.T > 0) {
    grid.each([&](int64_t c, int i, int n) { backward_recurrent<T>(a, c, a.T - 1, w[c].data(), st, acc, l, i, n); });
  }
  grid.finish();
}

void run_persist(persist::Args& a, const Tensor& like, bool backward, int64_t grid, bool tf32, int64_t tiles,
                 int64_t stream, const char* op) {
  TORCH_CHECK(grid >= 0, "fusenn_cuda::", op, ": grid must be non-negative, got ", grid);
  TORCH_CHECK(tiles >= 0, "fusenn_cuda::", op, ": tiles must be non-negative, got ", tiles);
  a.tf32 = tf32 && like.scalar_type() == at::kFloat;
  if (like.is_cuda()) {
#ifdef FUSENN_WITH_CUDA
    Tensor sync = at::zeros({2}, like.options().dtype(at::kInt));  // arrivals, error flag
    a.barrier = reinterpret_cast<unsigned*>(sync.data_ptr<int>());
    a.error = sync.data_ptr<int>() + 1;
    // no step takes seconds; FUSENN_PERSIST_TIMEOUT_S raises the bound (e.g. under compute-sanitizer)
    const char* timeout = std::getenv("FUSENN_PERSIST_TIMEOUT_S");
    const double seconds = timeout != nullptr ? std::atof(timeout) : 0.0;
    a.timeout_ns = static_cast<uint64_t>((seconds > 0.0 ? seconds : 10.0) * 1e9);
    std::string why;
    const int status =
        persist::launch_persist(a, dtype_of(like), backward, grid, tiles, reinterpret_cast<Stream>(stream), &why);
    TORCH_CHECK(why.empty(), "fusenn_cuda::", op, ": ", why);
    TORCH_CHECK(status == 0, "fusenn_cuda::", op, ": the persistent kernel's launch failed: ",
                cuda_error_string(status));
    // no wait here: a barrier that times out raises a device-side assert from the kernel queued behind it
#else
    TORCH_CHECK(false, "fusenn_cuda::", op, ": this build of the C++ RNN layers has no CUDA kernels");
#endif
    return;
  }
  const persist::Plan p = persist::plan(a.gates, backward, static_cast<int>(like.element_size()), a.H,
                                        a.proj ? a.P : 0, persist::kH200, 0, 0, grid, a.tf32, a.B, tiles);
  TORCH_CHECK(p.why.empty(), "fusenn_cuda::", op, ": ", p.why);
  a.tf32 = p.tf32;
  a.grid = static_cast<int32_t>(p.grid);
  a.units = static_cast<int32_t>(p.units);
  a.vrows = static_cast<int32_t>(p.vrows);
  a.chunk = static_cast<int32_t>(p.chunk);
  a.tiles = static_cast<int32_t>(p.tiles);
  switch (dtype_of(like)) {
    case Dtype::f32: emulate_grid<float>(a, backward); break;
    case Dtype::f16: emulate_grid<c10::Half>(a, backward); break;
    case Dtype::bf16: emulate_grid<c10::BFloat16>(a, backward); break;
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_persist_forward(
    const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh_in, const OptTensor& w_hr_in,
    const OptTensor& lengths, bool reverse, bool save, const OptTensor& rscale, const OptTensor& zo_seed,
    int64_t zo_mode, int64_t zo_threshold, double zo_u, int64_t stream, int64_t grid, bool tf32,
    int64_t tiles) {
  constexpr const char* op = "lstm_persist_forward";
  const OpDevice device(gx);
  TORCH_CHECK(h0.dim() == 2, "fusenn_cuda::", op, ": expected h0 of shape (B, P), got ", h0.sizes());
  const int64_t P = h0.size(1);
  const Regularisers regs = check_common(op, gx, 4, w_hh_in, P, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4;
  const bool proj = w_hr_in.has_value();
  expect(op, "h0", h0, {B, P}, gx.scalar_type(), gx, false);
  expect(op, "c0", c0, {B, H}, gx.scalar_type(), gx, false);
  if (proj) expect(op, "w_hr", *w_hr_in, {P, H}, gx.scalar_type(), gx, false);
  TORCH_CHECK(proj || P == H, "fusenn_cuda::", op, ": without w_hr, h0 must have hidden_size columns");
  const Tensor w_hh = w_hh_in.contiguous(), w_hr = proj ? w_hr_in->contiguous() : Tensor();

  const int64_t slot_count = save ? T + 1 : 2, first = (save && reverse) ? T : 0;
  Tensor hs = new_output({slot_count, B, P}, at::kFloat, gx), cs = new_output({slot_count, B, H}, at::kFloat, gx);
  hs[first].copy_(h0);
  cs[first].copy_(c0);
  Tensor ms = proj ? new_output({save ? T : 1, B, H}, at::kFloat, gx) : none(gx);
  Tensor y = new_output({T, B, P}, gx.scalar_type(), gx);
  if (T > 0 && B > 0) {
    Tensor op_h = at::zeros({2, B, P}, gx.options());
    op_h[0].copy_(rscale ? hs[first] * *rscale : hs[first]);
    Tensor m_op = proj ? at::zeros({B, H}, gx.options()) : Tensor();
    persist::Args a = persist_args(4, gx, w_hh, std::nullopt, lengths, reverse, save, regs);
    a.proj = proj;
    a.w_hr = proj ? w_hr.data_ptr() : nullptr;
    a.hs = hs.data_ptr<float>();
    a.cs = cs.data_ptr<float>();
    a.y = y.data_ptr();
    a.op = op_h.data_ptr();
    a.ms = proj ? ms.data_ptr<float>() : nullptr;
    a.m_op = proj ? m_op.data_ptr() : nullptr;
    run_persist(a, gx, false, grid, tf32, tiles, stream, op);
  }
  const int64_t last = save ? (reverse ? 0 : T) : T % 2;
  return {y, hs[last].to(gx.scalar_type(), false, true), cs[last].to(gx.scalar_type(), false, true),
          save ? hs : none(gx), save ? cs : none(gx), save ? ms : none(gx)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_persist_backward(
    const Tensor& dy_in, const Tensor& dh_n, const Tensor& dc_n, const Tensor& gx, const Tensor& w_hh_in,
    const OptTensor& w_hr_in, const OptTensor& lengths, bool reverse, const Tensor& hs, const Tensor& cs,
    const OptTensor& rscale, const OptTensor& zo_seed, int64_t zo_mode, int64_t zo_threshold, double zo_u,
    int64_t stream, int64_t grid, bool tf32, int64_t tiles) {
  constexpr const char* op = "lstm_persist_backward";
  const OpDevice device(gx);
  TORCH_CHECK(hs.dim() == 3, "fusenn_cuda::", op, ": expected hs of shape (T + 1, B, P), got ", hs.sizes());
  const int64_t P = hs.size(2);
  const Regularisers regs = check_common(op, gx, 4, w_hh_in, P, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4;
  const bool proj = w_hr_in.has_value();
  expect(op, "hs", hs, {T + 1, B, P}, at::kFloat, gx);
  expect(op, "cs", cs, {T + 1, B, H}, at::kFloat, gx);
  expect(op, "dy", dy_in, {T, B, P}, dy_in.scalar_type(), gx, false);
  expect(op, "dh_n", dh_n, {B, P}, dh_n.scalar_type(), gx, false);
  expect(op, "dc_n", dc_n, {B, H}, dc_n.scalar_type(), gx, false);
  if (proj) expect(op, "w_hr", *w_hr_in, {P, H}, gx.scalar_type(), gx, false);
  TORCH_CHECK(proj || P == H, "fusenn_cuda::", op, ": without w_hr, hs must have hidden_size columns");
  const Tensor w_hh = w_hh_in.contiguous(), w_hr = proj ? w_hr_in->contiguous() : Tensor();

  const Tensor dy = dy_in.to(gx.scalar_type()).contiguous();
  Tensor dh = dh_n.to(at::kFloat, false, true).contiguous(), dc = dc_n.to(at::kFloat, false, true).contiguous();
  Tensor dg = new_output({T, B, 4 * H}, at::kFloat, gx);
  Tensor dhs = proj ? new_output({T, B, P}, at::kFloat, gx) : none(gx);
  if (T > 0 && B > 0) {
    const auto f32 = gx.options().dtype(at::kFloat);
    Tensor gh = at::empty({T * B, 4 * H}, f32);
    mm_f32(gh, entering_product(hs, T, reverse, rscale, gx), w_hh.t());
    Tensor dhz = at::empty({B, P}, f32), dg_op = at::zeros({2, B, 4 * H}, gx.options());
    Tensor dhz_op = proj ? at::zeros({B, P}, gx.options()) : Tensor(), dm = proj ? at::empty({B, H}, f32) : Tensor();
    persist::Args a = persist_args(4, gx, w_hh, std::nullopt, lengths, reverse, true, regs);
    a.proj = proj;
    a.w_hr = proj ? w_hr.data_ptr() : nullptr;
    a.cs = cs.data_ptr<float>();
    a.ghs = gh.data_ptr<float>();
    a.dy = dy.data_ptr();
    a.dh = dh.data_ptr<float>();
    a.dc = dc.data_ptr<float>();
    a.dhz = dhz.data_ptr<float>();
    a.dg = dg.data_ptr<float>();
    a.dg_op = dg_op.data_ptr();
    a.dhz_op = proj ? dhz_op.data_ptr() : nullptr;
    a.dhs = proj ? dhs.data_ptr<float>() : nullptr;
    a.dm = proj ? dm.data_ptr<float>() : nullptr;
    run_persist(a, gx, true, grid, tf32, tiles, stream, op);
  }
  return {dg, dh, dc, dhs};
}

std::tuple<Tensor, Tensor, Tensor> gru_persist_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh_in,
                                                       const OptTensor& b_hh, const OptTensor& lengths, bool reverse,
                                                       bool save, const OptTensor& rscale, const OptTensor& zo_seed,
                                                       int64_t zo_mode, int64_t zo_threshold, double zo_u,
                                                       int64_t stream, int64_t grid, bool tf32, int64_t tiles) {
  constexpr const char* op = "gru_persist_forward";
  const OpDevice device(gx);
  TORCH_CHECK(h0.dim() == 2, "fusenn_cuda::", op, ": expected h0 of shape (B, H), got ", h0.sizes());
  const int64_t H = h0.size(1);
  const Regularisers regs = check_common(op, gx, 3, w_hh_in, H, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1);
  expect(op, "h0", h0, {B, H}, gx.scalar_type(), gx, false);
  if (b_hh) expect(op, "b_hh", *b_hh, {3 * H}, gx.scalar_type(), gx);
  const Tensor w_hh = w_hh_in.contiguous();

  const int64_t slot_count = save ? T + 1 : 2, first = (save && reverse) ? T : 0;
  Tensor hs = new_output({slot_count, B, H}, at::kFloat, gx);
  hs[first].copy_(h0);
  Tensor y = new_output({T, B, H}, gx.scalar_type(), gx);
  if (T > 0 && B > 0) {
    Tensor op_h = at::zeros({2, B, H}, gx.options());
    op_h[0].copy_(rscale ? hs[first] * *rscale : hs[first]);
    persist::Args a = persist_args(3, gx, w_hh, b_hh, lengths, reverse, save, regs);
    a.hs = hs.data_ptr<float>();
    a.y = y.data_ptr();
    a.op = op_h.data_ptr();
    run_persist(a, gx, false, grid, tf32, tiles, stream, op);
  }
  const int64_t last = save ? (reverse ? 0 : T) : T % 2;
  return {y, hs[last].to(gx.scalar_type(), false, true), save ? hs : none(gx)};
}

std::tuple<Tensor, Tensor, Tensor> gru_persist_backward(const Tensor& dy_in, const Tensor& dh_n, const Tensor& gx,
                                                        const Tensor& w_hh_in, const OptTensor& b_hh,
                                                        const OptTensor& lengths, bool reverse, const Tensor& hs,
                                                        const OptTensor& rscale, const OptTensor& zo_seed,
                                                        int64_t zo_mode, int64_t zo_threshold, double zo_u,
                                                        int64_t stream, int64_t grid, bool tf32, int64_t tiles) {
  constexpr const char* op = "gru_persist_backward";
  const OpDevice device(gx);
  TORCH_CHECK(hs.dim() == 3, "fusenn_cuda::", op, ": expected hs of shape (T + 1, B, H), got ", hs.sizes());
  const int64_t H = hs.size(2);
  const Regularisers regs = check_common(op, gx, 3, w_hh_in, H, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1);
  expect(op, "hs", hs, {T + 1, B, H}, at::kFloat, gx);
  expect(op, "dy", dy_in, {T, B, H}, dy_in.scalar_type(), gx, false);
  expect(op, "dh_n", dh_n, {B, H}, dh_n.scalar_type(), gx, false);
  if (b_hh) expect(op, "b_hh", *b_hh, {3 * H}, gx.scalar_type(), gx);
  const Tensor w_hh = w_hh_in.contiguous();

  const Tensor dy = dy_in.to(gx.scalar_type()).contiguous();
  Tensor dh = dh_n.to(at::kFloat, false, true).contiguous();
  Tensor dg = new_output({T, B, 3 * H}, at::kFloat, gx), dghn = new_output({T, B, H}, at::kFloat, gx);
  if (T > 0 && B > 0) {
    const auto f32 = gx.options().dtype(at::kFloat);
    Tensor gh = at::empty({T * B, 3 * H}, f32);
    mm_f32(gh, entering_product(hs, T, reverse, rscale, gx), w_hh.t());
    Tensor dg_op = at::zeros({2, B, 3 * H}, gx.options());
    persist::Args a = persist_args(3, gx, w_hh, b_hh, lengths, reverse, true, regs);
    a.hs = hs.data_ptr<float>();
    a.ghs = gh.data_ptr<float>();
    a.dy = dy.data_ptr();
    a.dh = dh.data_ptr<float>();
    a.dg = dg.data_ptr<float>();
    a.dghn = dghn.data_ptr<float>();
    a.dg_op = dg_op.data_ptr();
    run_persist(a, gx, true, grid, tf32, tiles, stream, op);
  }
  return {dg, dghn, dh};
}

// The persistent launch's plan for a machine (grid, units per CTA, dynamic shared memory per CTA, CTAs per
// SM, and the reason it cannot launch or "", whether fp32 products take TF32, the modelled nanoseconds a step, the
// batch tiles a staging round):
// machine = [SMs, shared memory per block (opt-in), per SM, registers per SM, threads per SM, blocks per SM], empty
// for an H200's; regs: registers per thread of the kernel (0: unknown); tf32: TF32 allowed; B: the batch (0: not
// given, the grid spread over the SMs); tiles: at most that many batch tiles a round (0: the plan's). What the
// static test evaluates with ptxas's numbers.
std::tuple<int64_t, int64_t, int64_t, int64_t, std::string, bool, double, int64_t> persist_plan(
    int64_t gates, bool backward, int64_t elem, int64_t H, int64_t grid, at::IntArrayRef machine, int64_t regs,
    int64_t static_smem, bool tf32, int64_t P, int64_t B, int64_t tiles) {
  TORCH_CHECK(gates == 3 || gates == 4, "fusenn_cuda::persist_plan: gates must be 3 (GRU) or 4 (LSTM), got ", gates);
  TORCH_CHECK(elem == 2 || elem == 4, "fusenn_cuda::persist_plan: elem must be 2 or 4 bytes, got ", elem);
  TORCH_CHECK(machine.empty() || machine.size() == 6, "fusenn_cuda::persist_plan: machine takes 6 numbers, got ",
              machine.size());
  const persist::Machine m = machine.empty() ? persist::kH200
                                             : persist::Machine{machine[0], machine[1], machine[2],
                                                                machine[3], machine[4], machine[5]};
  TORCH_CHECK(P >= 0 && P < H, "fusenn_cuda::persist_plan: P (proj_size, 0: none) must be in [0, H), got ", P);
  TORCH_CHECK(P == 0 || gates == 4, "fusenn_cuda::persist_plan: only the LSTM has a projection");
  TORCH_CHECK(B >= 0, "fusenn_cuda::persist_plan: B (the batch, 0: not given) must be non-negative, got ", B);
  TORCH_CHECK(tiles >= 0, "fusenn_cuda::persist_plan: tiles (0: the plan's) must be non-negative, got ", tiles);
  const persist::Plan p = persist::plan(static_cast<int>(gates), backward, static_cast<int>(elem), H, P, m, regs,
                                        static_smem, grid, tf32, B, tiles);
  return {p.grid, p.units, p.smem, p.per_sm, p.why, p.tf32, p.step_ns, p.tiles};
}

// Why the persistent kernel cannot take hidden_size H in dtype (0 fp32, 1 fp16, 2 bf16) on CUDA device
// `device` (its limits, the kernel's registers, the occupancy API), or ""; device -1: the host emulation's
// plan for an H200.
std::string persist_reason(int64_t device, int64_t dtype, int64_t gates, bool backward, int64_t H, int64_t grid,
                           int64_t P) {
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "fusenn_cuda::persist_reason: dtype must be 0, 1 or 2, got ", dtype);
  TORCH_CHECK(gates == 3 || gates == 4, "fusenn_cuda::persist_reason: gates must be 3 or 4, got ", gates);
  if (device < 0) {
    return persist::plan(static_cast<int>(gates), backward, dtype == 0 ? 4 : 2, H, P, persist::kH200, 0, 0, grid,
                         false)
        .why;
  }
#ifdef FUSENN_WITH_CUDA
  DeviceGuard guard(static_cast<int>(device));
  return persist::persist_reason(static_cast<Dtype>(dtype), static_cast<int>(gates), backward, H, P, grid);
#else
  return "this build of the C++ RNN layers has no CUDA kernels";
#endif
}

}  // namespace
}  // namespace fusenn

// Regularisers as the ops take them: rscale (B, P) fp32, r/(1-p) of recurrent dropout's mask, or None;
// zoneout as (zo_seed, zo_mode, zo_threshold, zo_u), see Zoneout in rnn.cuh. stream: the CUDA stream as an
// integer (ignored for CPU tensors).
TORCH_LIBRARY_FRAGMENT(fusenn_cuda, m) {
  // gates_out (CPU): filled with every step's activated gates (T, B, 4H) fp32, which lstm_backward then takes as
  // `gates` instead of recomputing them with a GEMM; zo_keep_out (CPU, sampled zoneout): filled with its masks
  // (T * B * (P + H) uint8), which lstm_backward takes as zo_keep instead of drawing them again.
  m.def("lstm_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
        "bool save, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream, "
        "Tensor(a!)? gates_out=None, Tensor(b!)? zo_keep_out=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor gx, Tensor w_hh, Tensor? w_hr, Tensor? lengths, "
        "bool reverse, Tensor hs, Tensor cs, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, "
        "float zo_u, int stream, Tensor? gates=None, Tensor? zo_keep=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // The GRU's likewise: gates_out (T, B, 3H) fp32, its activated r and z and the raw product of n.
  m.def("gru_forward(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, bool save, "
        "Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream, "
        "Tensor(a!)? gates_out=None) -> (Tensor, Tensor, Tensor)");
  m.def("gru_backward(Tensor dy, Tensor dh_n, Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, "
        "Tensor hs, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream, "
        "Tensor? gates=None) -> (Tensor, Tensor, Tensor)");
  // The persistent layers: the same arguments and results, plus the CTAs asked for (0: planned), whether fp32
  // products may use TF32, and the most batch tiles a staging round (0: the plan's; else the plan's grid and chunk
  // with at most that many).
  m.def("lstm_persist_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, "
        "bool reverse, bool save, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, "
        "int stream, int grid, bool tf32=False, int tiles=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_persist_backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor gx, Tensor w_hh, Tensor? w_hr, "
        "Tensor? lengths, bool reverse, Tensor hs, Tensor cs, Tensor? rscale, Tensor? zo_seed, int zo_mode, "
        "int zo_threshold, float zo_u, int stream, int grid, bool tf32=False, int tiles=0) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_persist_forward(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, "
        "bool save, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream, "
        "int grid, bool tf32=False, int tiles=0) -> (Tensor, Tensor, Tensor)");
  m.def("gru_persist_backward(Tensor dy, Tensor dh_n, Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor? lengths, "
        "bool reverse, Tensor hs, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, "
        "int stream, int grid, bool tf32=False, int tiles=0) -> (Tensor, Tensor, Tensor)");
  m.def("persist_plan(int gates, bool backward, int elem, int H, int grid, int[] machine, int regs, "
        "int static_smem, bool tf32=False, int P=0, int B=0, int tiles=0) -> "
        "(int, int, int, int, str, bool, float, int)",
        &fusenn::persist_plan);
  m.def("persist_reason(int device, int dtype, int gates, bool backward, int H, int grid, int P=0) -> str",
        &fusenn::persist_reason);
}

#define FUSENN_RNN_IMPLS(m)                                \
  m.impl("lstm_forward", &fusenn::lstm_forward);           \
  m.impl("lstm_backward", &fusenn::lstm_backward);         \
  m.impl("gru_forward", &fusenn::gru_forward);             \
  m.impl("gru_backward", &fusenn::gru_backward);                 \
  m.impl("lstm_persist_forward", &fusenn::lstm_persist_forward);   \
  m.impl("lstm_persist_backward", &fusenn::lstm_persist_backward); \
  m.impl("gru_persist_forward", &fusenn::gru_persist_forward);     \
  m.impl("gru_persist_backward", &fusenn::gru_persist_backward)

TORCH_LIBRARY_IMPL(fusenn_cuda, CPU, m) { FUSENN_RNN_IMPLS(m); }
#ifdef FUSENN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusenn_cuda, CUDA, m) { FUSENN_RNN_IMPLS(m); }
#endif
