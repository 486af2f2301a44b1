// The element-wise steps of the C++ LSTM and GRU layers (csrc/rnn_host.cpp runs the time loop and the
// GEMMs). Host/device code with no torch headers: csrc/rnn.cu runs each step as a CUDA kernel,
// csrc/rnn_host.cpp as a plain loop over the same functions on CPU tensors (what the CPU tests check
// against the reference).
// Equations, gate orders, `lengths` and the Philox counters of zoneout are fusenn.reference.rnn's.
//
// T is the layer's storage type (float, or a 16-bit float: __half / __nv_bfloat16 in rnn.cu, c10::Half /
// c10::BFloat16 in rnn_host.cpp). Whoever includes this file first declares, for each 16-bit T,
// `FUSENN_HD float to_float(T)` and `FUSENN_HD T from_float(float, T*)` (torch's build turns off their
// implicit conversions). Everything is computed in fp32: gates, cell state, gradients.
// run_at<T>(step, b, j) does element (b, j) of a step, run<T>(step, i) element i of its flattened (B, W)
// (csrc/rnn_persist.cuh and the CPU loops call run_at, which spares them a 64-bit division).
#pragma once
#include <cmath>
#include <cstdint>

#include "launch.h"
#include "philox.cuh"

namespace fusenn {

FUSENN_HD float to_float(float x) { return x; }
FUSENN_HD float from_float(float x, float*) { return x; }

template <class T>
FUSENN_HD float load(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}

template <class T>
FUSENN_HD void store(void* p, int64_t i, float v) {
  static_cast<T*>(p)[i] = from_float(v, static_cast<T*>(nullptr));
}

// On the GPU without the IEEE division's slow-path subroutine (a call, and spills around it, in every kernel):
// __fdividef is within 2 ulp on [1, 2^126] and gives 0 above, where the sigmoid is below 2^-126 anyway.
FUSENN_HD float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, 1.0f + expf(-x));
#else
  return 1.0f / (1.0f + expf(-x));
#endif
}

// Zoneout: mode 0 off; 1 Philox masks keyed by *seed (u = 1 where the unit takes its new value); 2 the
// expectation u everywhere (eval mode).
struct Zoneout {
  const int64_t* seed;
  int32_t mode;
  uint32_t threshold;
  float u;
  const uint8_t* keep = nullptr;  // mode 1: philox_keep of every counter, precomputed (CPU), or null
};

FUSENN_HD float zoneout_u(const Zoneout& z, uint64_t counter) {
  if (z.mode != 1) return z.u;
  if (z.keep != nullptr) return z.keep[counter] ? 1.0f : 0.0f;
  return philox_keep(counter, static_cast<uint64_t>(*z.seed), z.threshold) ? 1.0f : 0.0f;
}

// What every step shares: the time step t of T, the batch B, per-row lengths (null: all rows run every
// step), the recurrent-dropout scale r/(1-p) as a (B, width of h) fp32 buffer (null: none), zoneout.
struct Step {
  int64_t t, T, B;
  const int64_t* lengths;
  const float* rscale;
  Zoneout zo;
  // gh holds the activated gates, gx (and b_hh) already added: the LSTM's i, f, g, o, the GRU's r, z. Set by
  // csrc/rnn_host.cpp, whose CPU loops activate a whole step in one vectorised pass first; false on the GPU.
  bool activated = false;
};

FUSENN_HD bool has_step(const Step& s, int64_t b) { return s.lengths == nullptr || s.t < s.lengths[b]; }

// Element (b, k) of h_t, of width W: the zoneout mix with h_{t-1} (counter (t*B + b)*W + k), rows without
// step t keep h_{t-1} and output 0; also writes the next step's GEMM operand h_t * r/(1-p) in T (op null: h_out
// itself is the operand, fp32 without recurrent dropout on CPU).
template <class T>
FUSENN_HD void emit_h(const Step& s, int64_t W, int64_t b, int64_t k, float h_new, const float* h_in, float* h_out,
                      void* y, void* op) {
  const int64_t i = b * W + k;
  const float h_prev = h_in[i];
  if (s.zo.mode) {
    const float u = zoneout_u(s.zo, static_cast<uint64_t>((s.t * s.B + b) * W + k));
    h_new = u * h_new + (1.0f - u) * h_prev;
  }
  const bool valid = has_step(s, b);
  const float h = valid ? h_new : h_prev;
  h_out[i] = h;
  store<T>(y, i, valid ? h_new : 0.0f);
  if (op != nullptr) store<T>(op, i, s.rscale ? h * s.rscale[i] : h);
}

// Activated LSTM gates i, f, g, o of element (b, j): gx_t + gh, gh = h_{t-1} [* r/(1-p)] W_hh^T in fp32; gh points
// at the element's first gate product, the others ld apart (H in a (B, 4H) buffer; the persistent kernels pass
// their shared-memory sums).
template <class T>
FUSENN_HD void lstm_gates(const void* gx, const float* gh, int64_t ld, int64_t H, int64_t b, int64_t j, float* i,
                          float* f, float* g, float* o, bool activated) {
  const int64_t row = b * 4 * H + j;
  if (activated) {
    *i = gh[0], *f = gh[ld], *g = gh[2 * ld], *o = gh[3 * ld];
    return;
  }
  *i = sigmoid(load<T>(gx, row) + gh[0]);
  *f = sigmoid(load<T>(gx, row + H) + gh[ld]);
  *g = tanhf(load<T>(gx, row + 2 * H) + gh[2 * ld]);
  *o = sigmoid(load<T>(gx, row + 3 * H) + gh[3 * ld]);
}

// The LSTM's new cell state before zoneout (from the activated gates), and the GRU's candidate's
// pre-activation: shared by the steps and csrc/rnn_host.cpp's vectorised passes.
FUSENN_HD float lstm_c_new(float i, float f, float g, float c_prev) { return f * c_prev + i * g; }
FUSENN_HD float gru_n_pre(float gx_n, float r, float gh_n) { return gx_n + r * gh_n; }

// LSTM forward, one element (b, j) of B x H per call: c_t, and h_t (no projection) or m_t = o tanh(c_t)
// (projection: h_t = m_t W_hr^T comes from a GEMM and then EmitH).
struct LstmCell {
  Step s;
  int64_t H, P;
  const void* gx;  // (B, 4H) of step t, T
  const float* gh;
  const float* c_in;
  float* c_out;
  const float* h_in;
  float* h_out;
  void* y;     // (B, P) of step t, T
  void* op;    // (B, P) T: the next step's GEMM operand
  float* m;    // (B, H) with projection, else null
  void* m_op;  // (B, H) T: m as the projection GEMM's operand
  const float* tc = nullptr;  // (B, H): tanh of the new c before zoneout, precomputed (CPU), or null
};

// gh: element (b, j)'s first gate product, the others ld apart (a.gh's, or the persistent kernels' sums).
template <class T>
FUSENN_HD void run_at(const LstmCell& a, int64_t b, int64_t j, const float* gh, int64_t ld) {
  const int64_t idx = b * a.H + j;
  float i, f, g, o;
  lstm_gates<T>(a.gx, gh, ld, a.H, b, j, &i, &f, &g, &o, a.s.activated);
  const float c_prev = a.c_in[idx];
  float c = lstm_c_new(i, f, g, c_prev);
  const float m = o * (a.tc != nullptr ? a.tc[idx] : tanhf(c));  // from the new c, before zoneout
  if (a.s.zo.mode) {
    const float u = zoneout_u(a.s.zo, static_cast<uint64_t>(a.s.T * a.s.B * a.P + (a.s.t * a.s.B + b) * a.H + j));
    c = u * c + (1.0f - u) * c_prev;
  }
  a.c_out[idx] = has_step(a.s, b) ? c : c_prev;
  if (a.m != nullptr) {
    a.m[idx] = m;
    store<T>(a.m_op, idx, m);
  } else {
    emit_h<T>(a.s, a.P, b, j, m, a.h_in, a.h_out, a.y, a.op);
  }
}

template <class T>
FUSENN_HD void run_at(const LstmCell& a, int64_t b, int64_t j) {
  run_at<T>(a, b, j, a.gh + b * 4 * a.H + j, a.H);
}

template <class T>
FUSENN_HD void run(const LstmCell& a, int64_t idx) {
  run_at<T>(a, idx / a.H, idx % a.H);
}

// h_t from its pre-zoneout value h_new (B, W) fp32: the LSTM's projection output.
struct EmitH {
  Step s;
  int64_t W;
  const float* h_new;
  const float* h_in;
  float* h_out;
  void* y;
  void* op;
};

template <class T>
FUSENN_HD void run_at(const EmitH& a, int64_t b, int64_t k) {
  emit_h<T>(a.s, a.W, b, k, a.h_new[b * a.W + k], a.h_in, a.h_out, a.y, a.op);
}

template <class T>
FUSENN_HD void run(const EmitH& a, int64_t idx) {
  run_at<T>(a, idx / a.W, idx % a.W);
}

// LSTM backward, first part of step t, element (b, k) of B x P: the gradient reaching h_t (carried dh plus
// dy_t), its part reaching the pre-zoneout h_new (dhz, also as T for the projection GEMM and, with a
// projection, saved per step in dhs for grad W_hr), and in dh the part of dh_{t-1} that bypasses the gates
// (zoneout's (1 - u) share; everything for rows without step t). AddRecurrent adds the rest.
struct LstmDh {
  Step s;
  int64_t P;
  const void* dy;  // (B, P) of step t, T
  float* dh;
  float* dhz;
  void* dhz_op;  // null without projection
  float* dhs;    // (B, P) of step t; null without projection
};

template <class T>
FUSENN_HD void run_at(const LstmDh& a, int64_t b, int64_t k) {
  const int64_t idx = b * a.P + k;
  const bool valid = has_step(a.s, b);
  const float dh = a.dh[idx] + (valid ? load<T>(a.dy, idx) : 0.0f);
  const float u = a.s.zo.mode ? zoneout_u(a.s.zo, static_cast<uint64_t>((a.s.t * a.s.B + b) * a.P + k)) : 1.0f;
  a.dhz[idx] = u * dh;
  if (a.dhz_op != nullptr) store<T>(a.dhz_op, idx, u * dh);
  if (a.dhs != nullptr) a.dhs[idx] = valid ? u * dh : 0.0f;
  a.dh[idx] = valid ? (1.0f - u) * dh : dh;
}

template <class T>
FUSENN_HD void run(const LstmDh& a, int64_t idx) {
  run_at<T>(a, idx / a.P, idx % a.P);
}

// LSTM backward, element (b, j) of B x H: gate gradients dg (= grad gx_t, fp32 and as T for the GEMM giving
// dh_{t-1}) from dm (the gradient reaching m_t), and dc carried to c_{t-1}.
struct LstmCellBackward {
  Step s;
  int64_t H, P;
  const void* gx;
  const float* gh;
  const float* c_in;
  const float* c_out;
  const float* dm;
  float* dc;
  float* dg;    // (B, 4H) of step t
  void* dg_op;  // (B, 4H) T, or null where dg itself is the GEMM operand (fp32 on CPU)
  const float* tc = nullptr;  // (B, H): tanh of the new c before zoneout, precomputed (CPU), or null
};

template <class T>
FUSENN_HD void run_at(const LstmCellBackward& a, int64_t b, int64_t j) {
  const int64_t idx = b * a.H + j, H = a.H;
  float i, f, g, o;
  lstm_gates<T>(a.gx, a.gh + b * 4 * H + j, H, H, b, j, &i, &f, &g, &o, a.s.activated);
  const float c_prev = a.c_in[idx], dc_next = a.dc[idx], dm = a.dm[idx];
  float tc, dc, dc_pass = 0.0f;
  if (a.s.zo.mode) {  // c_t = u c_new + (1 - u) c_{t-1}: the saved c_t is not c_new
    const float u = zoneout_u(a.s.zo, static_cast<uint64_t>(a.s.T * a.s.B * a.P + (a.s.t * a.s.B + b) * H + j));
    tc = a.tc != nullptr ? a.tc[idx] : tanhf(lstm_c_new(i, f, g, c_prev));
    dc = u * dc_next + dm * o * (1.0f - tc * tc);
    dc_pass = (1.0f - u) * dc_next;
  } else {  // c_t is the new c where the row has step t (tc is used nowhere else)
    tc = a.tc != nullptr ? a.tc[idx] : tanhf(a.c_out[idx]);
    dc = dc_next + dm * o * (1.0f - tc * tc);
  }
  const bool valid = has_step(a.s, b);
  const float grads[4] = {dc * g * i * (1.0f - i), dc * c_prev * f * (1.0f - f), dc * i * (1.0f - g * g),
                          dm * tc * o * (1.0f - o)};
  for (int q = 0; q < 4; ++q) {
    const int64_t at = b * 4 * H + q * H + j;
    a.dg[at] = valid ? grads[q] : 0.0f;
    if (a.dg_op != nullptr) store<T>(a.dg_op, at, valid ? grads[q] : 0.0f);
  }
  a.dc[idx] = valid ? dc_pass + dc * f : dc_next;
}

template <class T>
FUSENN_HD void run(const LstmCellBackward& a, int64_t idx) {
  run_at<T>(a, idx / a.H, idx % a.H);
}

// dh_{t-1} += its recurrent part acc = dgates_t W_hh (times r/(1-p): h_{t-1} entered the product scaled),
// for rows that have step t. Element (b, k) of B x W.
struct AddRecurrent {
  Step s;
  int64_t W;
  const float* acc;
  float* dh;
};

template <class T>
FUSENN_HD void run_at(const AddRecurrent& a, int64_t b, int64_t k) {
  const int64_t idx = b * a.W + k;
  if (has_step(a.s, b)) a.dh[idx] += a.s.rscale ? a.acc[idx] * a.s.rscale[idx] : a.acc[idx];
}

template <class T>
FUSENN_HD void run(const AddRecurrent& a, int64_t idx) {
  run_at<T>(a, idx / a.W, idx % a.W);
}

// r, z, n and gh_n = h_{t-1} W_hn^T + b_hn of GRU element (b, j); gh points at its first gate product, the others
// ld apart (as for lstm_gates).
template <class T>
FUSENN_HD void gru_gates(const void* gx, const float* gh, int64_t ld, const void* b_hh, int64_t H, int64_t b, int64_t j,
                         float* r, float* z, float* n, float* gh_n, bool activated) {
  const int64_t row = b * 3 * H + j;
  *gh_n = gh[2 * ld] + (b_hh ? load<T>(b_hh, 2 * H + j) : 0.0f);
  if (activated) {
    *r = gh[0], *z = gh[ld];
  } else {
    const float br = b_hh ? load<T>(b_hh, j) : 0.0f, bz = b_hh ? load<T>(b_hh, H + j) : 0.0f;
    *r = sigmoid(load<T>(gx, row) + gh[0] + br);
    *z = sigmoid(load<T>(gx, row + H) + gh[ld] + bz);
  }
  *n = tanhf(gru_n_pre(load<T>(gx, row + 2 * H), *r, *gh_n));
}

// GRU forward, element (b, j) of B x H.
struct GruCell {
  Step s;
  int64_t H;
  const void* gx;  // (B, 3H) of step t, T
  const float* gh;
  const void* b_hh;  // (3H,) T, or null
  const float* h_in;
  float* h_out;
  void* y;
  void* op;
};

template <class T>
FUSENN_HD void run_at(const GruCell& a, int64_t b, int64_t j, const float* gh, int64_t ld) {
  const int64_t idx = b * a.H + j;
  float r, z, n, gh_n;
  gru_gates<T>(a.gx, gh, ld, a.b_hh, a.H, b, j, &r, &z, &n, &gh_n, a.s.activated);
  const float h_prev = a.h_in[idx];
  emit_h<T>(a.s, a.H, b, j, (1.0f - z) * n + z * h_prev, a.h_in, a.h_out, a.y, a.op);
}

template <class T>
FUSENN_HD void run_at(const GruCell& a, int64_t b, int64_t j) {
  run_at<T>(a, b, j, a.gh + b * 3 * a.H + j, a.H);
}

template <class T>
FUSENN_HD void run(const GruCell& a, int64_t idx) {
  run_at<T>(a, idx / a.H, idx % a.H);
}

// GRU backward, element (b, j) of B x H: dg = grad gx_t (dr, dz, dn), dghn = grad (h W_hn^T + b_hn) = dn r,
// g_op = [dr, dz, dn r] as T (the GEMM with W_hh gives dh_{t-1}'s recurrent part), and in dh the part of
// dh_{t-1} that bypasses the gates (through z, past h_new under zoneout; all of it for rows without step t).
struct GruCellBackward {
  Step s;
  int64_t H;
  const void* gx;
  const float* gh;
  const void* b_hh;
  const float* h_in;
  const void* dy;
  float* dh;
  float* dg;    // (B, 3H) of step t
  float* dghn;  // (B, H) of step t
  void* g_op;   // (B, 3H) T
};

template <class T>
FUSENN_HD void run_at(const GruCellBackward& a, int64_t b, int64_t j) {
  const int64_t idx = b * a.H + j, H = a.H;
  float r, z, n, gh_n;
  gru_gates<T>(a.gx, a.gh + b * 3 * H + j, H, a.b_hh, H, b, j, &r, &z, &n, &gh_n, a.s.activated);
  const bool valid = has_step(a.s, b);
  const float dh_in = a.dh[idx] + (valid ? load<T>(a.dy, idx) : 0.0f);  // reaching h_t
  const float u = a.s.zo.mode ? zoneout_u(a.s.zo, static_cast<uint64_t>((a.s.t * a.s.B + b) * H + j)) : 1.0f;
  const float dh = u * dh_in;  // reaching h_new
  const float dn = dh * (1.0f - z) * (1.0f - n * n);
  const float grads[3] = {dn * gh_n * r * (1.0f - r), dh * (a.h_in[idx] - n) * z * (1.0f - z), dn};
  for (int q = 0; q < 3; ++q) {
    const int64_t at = b * 3 * H + q * H + j;
    a.dg[at] = valid ? grads[q] : 0.0f;
    store<T>(a.g_op, at, valid ? (q == 2 ? dn * r : grads[q]) : 0.0f);
  }
  a.dghn[idx] = valid ? dn * r : 0.0f;
  a.dh[idx] = valid ? dh * z + (dh_in - dh) : dh_in;
}

template <class T>
FUSENN_HD void run(const GruCellBackward& a, int64_t idx) {
  run_at<T>(a, idx / a.H, idx % a.H);
}

enum class Dtype : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

// Runs run<T>(step, i) for i in [0, n) as one kernel on `stream` (csrc/rnn.cu); returns a cudaError_t value.
template <class StepArgs>
int launch_step(const StepArgs& step, int64_t n, Dtype dtype, Stream stream);

}  // namespace fusenn
