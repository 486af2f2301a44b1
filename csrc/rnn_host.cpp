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

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "philox.cuh"

namespace fusenn {
// rnn.cuh's 16-bit conversions for the host loops.
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline c10::Half from_float(float x, c10::Half*) { return c10::Half(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline c10::BFloat16 from_float(float x, c10::BFloat16*) { return c10::BFloat16(x); }
// rnn.cuh's tanhf in the host loops (found before ::tanhf inside namespace fusenn): glibc's goes through
// expm1f and was the loops' slowest call; this is one expf, within 1.1e-7 of tanh (absolute; correctly
// rounded fp32 is within 6e-8), with tanhf's NaN and infinities.
inline float tanhf(float x) {
  const float e = ::expf(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}
}  // namespace fusenn

#include "rnn.cuh"

namespace fusenn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Dtype dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "fusenn: the C++ RNN layers take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// run<T>(args, i) for i in [0, n): a kernel for CUDA tensors, a loop for CPU tensors.
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
  // Elements are independent (as the kernel's threads are): split over torch's intra-op threads.
  const auto loop = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) run<T>(args, i);
    });
  };
  switch (dtype_of(like)) {
    case Dtype::f32: loop(static_cast<float*>(nullptr)); break;
    case Dtype::f16: loop(static_cast<c10::Half*>(nullptr)); break;
    case Dtype::bf16: loop(static_cast<c10::BFloat16*>(nullptr)); break;
  }
}

// out (fp32) = a @ b, a and b in the layer's dtype: fp32 accumulation and result for every dtype.
void mm_f32(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b);
  } else if (a.is_cuda()) {
    at::mm_out(out, a, b, at::kFloat);
  } else {  // CPU has no half-in, float-out mm
    at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
  }
}

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
    int64_t zo_mode, int64_t zo_threshold, double zo_u, int64_t stream) {
  constexpr const char* op = "lstm_forward";
  TORCH_CHECK(h0.dim() == 2, "fusenn_cuda::", op, ": expected h0 of shape (B, P), got ", h0.sizes());
  const int64_t P = h0.size(1);
  const Regularisers regs =
      check_common(op, gx, 4, w_hh, P, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4;
  const bool proj = w_hr.has_value();
  expect(op, "h0", h0, {B, P}, gx.scalar_type(), gx, false);
  expect(op, "c0", c0, {B, H}, gx.scalar_type(), gx, false);
  if (proj) expect(op, "w_hr", *w_hr, {P, H}, gx.scalar_type(), gx, false);
  TORCH_CHECK(proj || P == H, "fusenn_cuda::", op, ": without w_hr, h0 must have hidden_size columns");

  const int64_t slot_count = save ? T + 1 : 2, first = (save && reverse) ? T : 0;
  Tensor hs = new_output({slot_count, B, P}, at::kFloat, gx), cs = new_output({slot_count, B, H}, at::kFloat, gx);
  hs[first].copy_(h0);
  cs[first].copy_(c0);
  Tensor ms = proj ? new_output({save ? T : 1, B, H}, at::kFloat, gx) : none(gx);
  Tensor y = new_output({T, B, P}, gx.scalar_type(), gx);
  if (T > 0 && B > 0) {
    Tensor gh = at::empty({B, 4 * H}, gx.options().dtype(at::kFloat));
    // h0 as the first operand: a buffer of its own (the steps write it), never a view of hs
    Tensor op_h = (rscale ? hs[first] * *rscale : hs[first]).to(gx.scalar_type(), false, true);
    Tensor m_op = proj ? at::empty({B, H}, gx.options()) : Tensor();
    Tensor hp = proj ? at::empty({B, P}, gx.options().dtype(at::kFloat)) : Tensor();
    const Tensor w_hh_t = w_hh.t(), w_hr_t = proj ? w_hr->t() : Tensor();
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? T - 1 - k : k;
      int64_t before, after;
      slots(t, k, reverse, save, &before, &after);
      mm_f32(gh, op_h, w_hh_t);
      const Step s = step_at(t, T, B, lengths, regs);
      const LstmCell cell{s, H, P, row(gx, t), gh.data_ptr<float>(), row<float>(cs, before), row<float>(cs, after),
                          row<float>(hs, before), row<float>(hs, after), row(y, t), op_h.data_ptr(),
                          proj ? row<float>(ms, save ? t : 0) : nullptr, proj ? m_op.data_ptr() : nullptr};
      run_step(cell, B * H, gx, stream);
      if (proj) {
        mm_f32(hp, m_op, w_hr_t);
        const EmitH emit{s, P, hp.data_ptr<float>(), row<float>(hs, before), row<float>(hs, after), row(y, t),
                         op_h.data_ptr()};
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
    int64_t stream) {
  constexpr const char* op = "lstm_backward";
  TORCH_CHECK(hs.dim() == 3, "fusenn_cuda::", op, ": expected hs of shape (T + 1, B, P), got ", hs.sizes());
  const int64_t P = hs.size(2);
  const Regularisers regs =
      check_common(op, gx, 4, w_hh, P, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4;
  const bool proj = w_hr.has_value();
  expect(op, "hs", hs, {T + 1, B, P}, at::kFloat, gx);
  expect(op, "cs", cs, {T + 1, B, H}, at::kFloat, gx);
  expect(op, "dy", dy_in, {T, B, P}, dy_in.scalar_type(), gx, false);
  expect(op, "dh_n", dh_n, {B, P}, dh_n.scalar_type(), gx, false);
  expect(op, "dc_n", dc_n, {B, H}, dc_n.scalar_type(), gx, false);
  if (proj) expect(op, "w_hr", *w_hr, {P, H}, gx.scalar_type(), gx, false);

  const Tensor dy = dy_in.to(gx.scalar_type()).contiguous();
  Tensor dh = dh_n.to(at::kFloat, false, true).contiguous(), dc = dc_n.to(at::kFloat, false, true).contiguous();
  Tensor dg = new_output({T, B, 4 * H}, at::kFloat, gx);
  Tensor dhs = proj ? new_output({T, B, P}, at::kFloat, gx) : none(gx);
  if (T > 0 && B > 0) {
    const auto f32 = gx.options().dtype(at::kFloat);
    Tensor gh = at::empty({T * B, 4 * H}, f32);
    mm_f32(gh, entering_product(hs, T, reverse, rscale, gx), w_hh.t());
    Tensor dhz = at::empty({B, P}, f32), acc = at::empty({B, P}, f32);
    Tensor dhz_op = proj ? at::empty({B, P}, gx.options()) : Tensor();
    Tensor dm = proj ? at::empty({B, H}, f32) : dhz;
    Tensor dg_op = at::empty({B, 4 * H}, gx.options());
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? k : T - 1 - k;
      int64_t before, after;
      slots(t, k, reverse, true, &before, &after);
      const Step s = step_at(t, T, B, lengths, regs);
      const LstmDh into_h{s, P, row(dy, t), dh.data_ptr<float>(), dhz.data_ptr<float>(),
                          proj ? dhz_op.data_ptr() : nullptr, proj ? row<float>(dhs, t) : nullptr};
      run_step(into_h, B * P, gx, stream);
      if (proj) mm_f32(dm, dhz_op, *w_hr);
      const LstmCellBackward cell{s, H, P, row(gx, t), gh.data_ptr<float>() + t * B * 4 * H, row<float>(cs, before),
                                  row<float>(cs, after), dm.data_ptr<float>(), dc.data_ptr<float>(), row<float>(dg, t),
                                  dg_op.data_ptr()};
      run_step(cell, B * H, gx, stream);
      mm_f32(acc, dg_op, w_hh);
      run_step(AddRecurrent{s, P, acc.data_ptr<float>(), dh.data_ptr<float>()}, B * P, gx, stream);
    }
  }
  return {dg, dh, dc, dhs};
}

std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                               const OptTensor& b_hh, const OptTensor& lengths, bool reverse, bool save,
                                               const OptTensor& rscale, const OptTensor& zo_seed, int64_t zo_mode,
                                               int64_t zo_threshold, double zo_u, int64_t stream) {
  constexpr const char* op = "gru_forward";
  TORCH_CHECK(h0.dim() == 2, "fusenn_cuda::", op, ": expected h0 of shape (B, H), got ", h0.sizes());
  const int64_t H = h0.size(1);
  const Regularisers regs =
      check_common(op, gx, 3, w_hh, H, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1);
  expect(op, "h0", h0, {B, H}, gx.scalar_type(), gx, false);
  if (b_hh) expect(op, "b_hh", *b_hh, {3 * H}, gx.scalar_type(), gx);

  const int64_t slot_count = save ? T + 1 : 2, first = (save && reverse) ? T : 0;
  Tensor hs = new_output({slot_count, B, H}, at::kFloat, gx);
  hs[first].copy_(h0);
  Tensor y = new_output({T, B, H}, gx.scalar_type(), gx);
  if (T > 0 && B > 0) {
    Tensor gh = at::empty({B, 3 * H}, gx.options().dtype(at::kFloat));
    Tensor op_h = (rscale ? hs[first] * *rscale : hs[first]).to(gx.scalar_type(), false, true);
    const Tensor w_hh_t = w_hh.t();
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? T - 1 - k : k;
      int64_t before, after;
      slots(t, k, reverse, save, &before, &after);
      mm_f32(gh, op_h, w_hh_t);
      const GruCell cell{step_at(t, T, B, lengths, regs), H, row(gx, t), gh.data_ptr<float>(),
                         b_hh ? b_hh->data_ptr() : nullptr, row<float>(hs, before), row<float>(hs, after), row(y, t),
                         op_h.data_ptr()};
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
                                                double zo_u, int64_t stream) {
  constexpr const char* op = "gru_backward";
  TORCH_CHECK(hs.dim() == 3, "fusenn_cuda::", op, ": expected hs of shape (T + 1, B, H), got ", hs.sizes());
  const int64_t H = hs.size(2);
  const Regularisers regs =
      check_common(op, gx, 3, w_hh, H, lengths, rscale, zo_seed, zo_mode, zo_threshold, zo_u);
  const int64_t T = gx.size(0), B = gx.size(1);
  expect(op, "hs", hs, {T + 1, B, H}, at::kFloat, gx);
  expect(op, "dy", dy_in, {T, B, H}, dy_in.scalar_type(), gx, false);
  expect(op, "dh_n", dh_n, {B, H}, dh_n.scalar_type(), gx, false);
  if (b_hh) expect(op, "b_hh", *b_hh, {3 * H}, gx.scalar_type(), gx);

  const Tensor dy = dy_in.to(gx.scalar_type()).contiguous();
  Tensor dh = dh_n.to(at::kFloat, false, true).contiguous();
  Tensor dg = new_output({T, B, 3 * H}, at::kFloat, gx), dghn = new_output({T, B, H}, at::kFloat, gx);
  if (T > 0 && B > 0) {
    const auto f32 = gx.options().dtype(at::kFloat);
    Tensor gh = at::empty({T * B, 3 * H}, f32);
    mm_f32(gh, entering_product(hs, T, reverse, rscale, gx), w_hh.t());
    Tensor acc = at::empty({B, H}, f32), g_op = at::empty({B, 3 * H}, gx.options());
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? k : T - 1 - k;
      int64_t before, after;
      slots(t, k, reverse, true, &before, &after);
      const Step s = step_at(t, T, B, lengths, regs);
      const GruCellBackward cell{s, H, row(gx, t), gh.data_ptr<float>() + t * B * 3 * H,
                                 b_hh ? b_hh->data_ptr() : nullptr, row<float>(hs, before), row(dy, t),
                                 dh.data_ptr<float>(), row<float>(dg, t), row<float>(dghn, t), g_op.data_ptr()};
      run_step(cell, B * H, gx, stream);
      mm_f32(acc, g_op, w_hh);
      run_step(AddRecurrent{s, H, acc.data_ptr<float>(), dh.data_ptr<float>()}, B * H, gx, stream);
    }
  }
  return {dg, dghn, dh};
}

}  // namespace
}  // namespace fusenn

// Regularisers as the ops take them: rscale (B, P) fp32, r/(1-p) of recurrent dropout's mask, or None;
// zoneout as (zo_seed, zo_mode, zo_threshold, zo_u), see Zoneout in rnn.cuh. stream: the CUDA stream as an
// integer (ignored for CPU tensors).
TORCH_LIBRARY_FRAGMENT(fusenn_cuda, m) {
  m.def("lstm_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
        "bool save, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_backward(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor gx, Tensor w_hh, Tensor? w_hr, Tensor? lengths, "
        "bool reverse, Tensor hs, Tensor cs, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, "
        "float zo_u, int stream) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_forward(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, bool save, "
        "Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("gru_backward(Tensor dy, Tensor dh_n, Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, "
        "Tensor hs, Tensor? rscale, Tensor? zo_seed, int zo_mode, int zo_threshold, float zo_u, int stream) -> "
        "(Tensor, Tensor, Tensor)");
}

#define FUSENN_RNN_IMPLS(m)                                \
  m.impl("lstm_forward", &fusenn::lstm_forward);           \
  m.impl("lstm_backward", &fusenn::lstm_backward);         \
  m.impl("gru_forward", &fusenn::gru_forward);             \
  m.impl("gru_backward", &fusenn::gru_backward)

TORCH_LIBRARY_IMPL(fusenn_cuda, CPU, m) { FUSENN_RNN_IMPLS(m); }
#ifdef FUSENN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusenn_cuda, CUDA, m) { FUSENN_RNN_IMPLS(m); }
#endif
