// Persistent LSTM and GRU: one cooperative launch per layer and direction keeps each CTA's slice of W_hh in
// shared memory for the whole sequence. Host/device code with no torch headers: csrc/rnn_persist.cu runs
// it as CUDA kernels with a grid-wide barrier per step; csrc/rnn_host.cpp emulates the grid on CPU tensors
// (every CTA's slice of a step in turn, then the next step) through the very same functions.
//
// Partition: with U units per CTA, CTA c owns hidden units J_c = [c U, min((c + 1) U, H)).
// - Forward keeps the gate rows of J_c (gates x U rows of W_hh, row q U + u = W_hh row q H + c U + u). Per
//   step and round of up to kMaxTiles 16-row batch tiles (Plan::tiles: each weight fragment or row read from
//   shared memory serves every tile of the round): stage h_{t-1} (the previous step's operand, T, B x H) in
//   shared memory in K-chunks, gate products with fp32 accumulation (wmma tensor cores for fp16/bf16; for fp32
//   TF32 mma.sync m16n8k8 where the launch allows TF32 and its padded slice fits, else exact fp32 FMA), then
//   csrc/rnn.cuh's LstmCell / GruCell for each (b, j in J_c): gates, cell, zoneout, lengths, outputs and the
//   next step's operand (times recurrent dropout's r/(1-p), rounded to T). One grid barrier per step publishes
//   the operand; two operand buffers alternate.
// - Backward keeps the columns J_c of W_hh (every gate row). Per step: dh_{t-1}[:, J_c] += dgates_t W_hh[:,
//   J_c] from the operand every CTA published before the last barrier (csrc/rnn.cuh's AddRecurrent), then
//   LstmDh + LstmCellBackward / GruCellBackward for J_c, which publish dgates_t; one barrier per step.
//   The gates' pre-activations (gh) of all steps come from one GEMM before the launch, the weight
//   gradients from one GEMM after it (fusenn.ops.rnn).
// - Projection (LSTM, proj_size P < H): CTA c also owns V = ceil(P / grid) columns Q_c of h (Plan::vrows).
//   Forward: the cell leaves m_t = o tanh(c_t) (and m_t in T) for J_c; a barrier; forward_project makes
//   h_t[:, Q_c] = m_t W_hr[Q_c]^T and emits it; a barrier. Backward: dh[:, Q_c] from W_hh's columns Q_c,
//   LstmDh for Q_c (dhz published); a barrier; dm_t[:, J_c] = dhz W_hr[:, J_c], the cells for J_c; a barrier.
//   Two barriers a step, two weight slices per CTA (Layouts).
// TF32 (fp32 layers under torch.backends.cudnn.allow_tf32): W_hh's slice and each staged chunk are rounded
// to TF32 once, as cvt.rna.tf32.f32 does (round_tf32), and mma.sync m16n8k8 products accumulate in fp32. Its
// 8-row tiles pad a slice's rows (forward) or columns (backward) to a multiple of 8, not wmma's 16, and only in
// registers (zero fragments), not in shared memory: so the slice takes what the exact layout's does (rows 16
// bytes apart in both), its K-split partial sums a little more, and the LSTM's backward slice at H = 1024 (8
// columns over K = 4096 on 128 CTAs) fits a CTA's shared memory.
// The includer declares to_float / from_float for its 16-bit types first, as for rnn.cuh.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "rnn.cuh"

#if defined(__CUDA_ARCH__)
#include <mma.h>
#define FUSENN_SYNC() __syncthreads()
#else
#define FUSENN_SYNC() (::fusenn::persist::host_sync != nullptr ? ::fusenn::persist::host_sync() : (void)0)
#endif

namespace fusenn {
namespace persist {

#if !defined(__CUDA_ARCH__)
// The host's __syncthreads: nothing, where one host thread plays a whole CTA; csrc/rnn_host.cpp's emulation sets
// it in threads that play a CTA's threads in turns.
inline thread_local void (*host_sync)() = nullptr;
// A bug made on purpose for the emulation's poison mode to show (FUSENN_PERSIST_EMULATION unstaged=R): staging
// leaves batch row R of every tile out, as an off-by-one bound would; -1: none.
inline int64_t host_unstaged_row = -1;
#endif

constexpr int kThreads = 256;  // 8 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTileB = 16;     // batch rows per MMA tile
constexpr int64_t kChunk = 256;       // K columns of the activation operand staged at once, as a rule;
constexpr int64_t kWideChunk = 1024;  // up to this where shared memory allows (fewer rounds per step),
constexpr int64_t kMinChunk = 64;     // down to this where the weight slice needs the room (staging rounds are
                                      // latency, so not below: K / 64 rounds a step)
constexpr int64_t kMaxRows = 128;  // weight rows (forward) / columns (backward) one CTA's warps cover
constexpr int64_t kMaxTiles = 4;   // batch tiles staged and multiplied together (Plan::tiles): each weight operand
                                   // read from shared memory serves them all, and the staging rounds are fewer

FUSENN_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
FUSENN_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// x / d and x % d for 0 <= x < 2^32 in 32 bits (a 64-bit division is a subroutine call, and spills, on the GPU).
FUSENN_HD void divmod(int64_t x, int64_t d, int64_t* q, int64_t* r) {
  const uint32_t xx = static_cast<uint32_t>(x), dd = static_cast<uint32_t>(d), qq = xx / dd;
  *q = qq;
  *r = xx - qq * dd;
}

// x rounded to TF32 (10 mantissa bits) to nearest, ties away from zero: cvt.rna.tf32.f32 on the GPU, its
// bit-exact twin on the host (NaN and infinity pass through; a carry out of the mantissa rounds up the exponent).
FUSENN_HD float round_tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
  float r;
  memcpy(&r, &u, 4);
  return r;
#endif
}

// One CTA's shared memory for out[b][n] = sum_k A[b][k] W[n][k] over N weight rows (padded to Np) and K:
// the weight slice (`rows` x ldw: Np rows for wmma, whose loads read whole tiles; N for FMA and for TF32,
// whose fragments of the padding rows are zeros in registers), a staged activation chunk of `tiles` batch tiles
// (tiles x kTileB rows, lda apart), and fp32 partial sums (splits x tiles x kTileB x Np; splits > 1 when the MMA
// warps split K). mma: tensor-core tiles
// (always for 16-bit, TF32 for fp32), else fp32 FMA. Each MMA warp's item is 16 of the Np columns: one wmma
// 16x16x16 tile for 16-bit (Np a multiple of 16), two m16n8k8 products for TF32 (Np a multiple of 8; the
// second absent past Np). Offsets in bytes, 128-byte aligned.
struct Layout {
  int64_t N, Np, rows, K, Kp, ldw, chunk, lda, splits, tiles;
  int64_t w_off, a_off, acc_off, bytes;
  bool mma;
};

FUSENN_HD Layout layout(int64_t N, int64_t K, int elem, int64_t chunk, bool tf32, int64_t tiles) {
  Layout l{};
  l.tiles = tiles;
  l.mma = elem == 2 || tf32;
  l.N = N;
  l.Np = l.mma ? round_up(N, elem == 2 ? 16 : 8) : N;  // MMA tiles of 16 (TF32: 8) rows; FMA needs no padding
  l.rows = elem == 2 ? l.Np : N;
  l.K = K;
  l.Kp = round_up(K, 16);
  // weights: rows padded by 16 bytes (wmma needs ldm a multiple of 16 bytes; TF32's fragment loads hit 32
  // distinct banks with rows 4 floats apart; FMA's 16-byte loads of 8 rows, an odd multiple of 4 floats apart,
  // hit 8 distinct 4-bank groups); the staged chunk's rows stay 16-byte aligned for vector stores and loads (and
  // 4 floats apart in banks for fp32)
  l.ldw = l.Kp + (elem == 2 ? 8 : 4);
  l.chunk = min64(l.Kp, chunk);  // a multiple of 16
  l.lda = l.chunk + (elem == 2 ? 8 : 4);
  const int64_t cols = (l.Np + 15) / 16;  // the warps' 16-column items
  l.splits = (l.mma && cols < kWarps) ? kWarps / cols : 1;
  l.w_off = 0;
  l.a_off = round_up(l.rows * l.ldw * elem, 128);
  l.acc_off = l.a_off + round_up(tiles * kTileB * l.lda * elem, 128);
  l.bytes = l.acc_off + l.splits * tiles * kTileB * l.Np * 4;
  return l;
}

// Forward: N = gates x U rows over K = H; backward: N = U columns over K = gates x H.
FUSENN_HD Layout layout_for(int gates, bool backward, int elem, int64_t H, int64_t U, int64_t chunk, bool tf32,
                           int64_t tiles) {
  return backward ? layout(U, gates * H, elem, chunk, tf32, tiles) : layout(gates * U, H, elem, chunk, tf32, tiles);
}

// With a projection (LSTM, proj_size P < H; V of the P rows of h per CTA) each CTA keeps two slices, which
// share the staging buffer and the partial sums: forward a = the gate rows of its units over K = P and b = its
// V rows of W_hr over K = H; backward a = its V columns of W_hh over K = gates x H (for dh_{t-1}) and b = its U
// columns of W_hr over K = P (for dm_t). Without one (P = 0) a is layout_for's and b unused.
struct Layouts {
  Layout a, b;
};

FUSENN_HD Layouts layouts_for(int gates, bool backward, int elem, int64_t H, int64_t P, int64_t U, int64_t V,
                              int64_t chunk, bool tf32, int64_t tiles) {
  Layouts ls{};
  if (P == 0) {
    ls.a = ls.b = layout_for(gates, backward, elem, H, U, chunk, tf32, tiles);
    return ls;
  }
  ls.a = backward ? layout(V, gates * H, elem, chunk, tf32, tiles) : layout(gates * U, P, elem, chunk, tf32, tiles);
  ls.b = backward ? layout(U, P, elem, chunk, tf32, tiles) : layout(V, H, elem, chunk, tf32, tiles);
  const int64_t wa = round_up(ls.a.rows * ls.a.ldw * elem, 128), wb = round_up(ls.b.rows * ls.b.ldw * elem, 128);
  const int64_t lda = ls.a.lda > ls.b.lda ? ls.a.lda : ls.b.lda;
  const int64_t acc_a = ls.a.splits * tiles * kTileB * ls.a.Np, acc_b = ls.b.splits * tiles * kTileB * ls.b.Np;
  ls.a.w_off = 0;
  ls.b.w_off = wa;
  ls.a.a_off = ls.b.a_off = wa + wb;
  ls.a.acc_off = ls.b.acc_off = wa + wb + round_up(tiles * kTileB * lda * elem, 128);
  ls.a.bytes = ls.b.bytes = ls.a.acc_off + (acc_a > acc_b ? acc_a : acc_b) * 4;
  return ls;
}

// What one machine offers a CTA: SMs, shared memory a block may opt into and an SM holds, registers and
// threads an SM holds, resident blocks per SM. The launcher fills it from the device; the host build and
// the static test (tests/test_persist.py) from sm_90a's numbers (kH200).
struct Machine {
  int64_t sms, smem_block, smem_sm, regs_sm, threads_sm, blocks_sm;
};
constexpr Machine kH200{132, 232448, 233472, 65536, 2048, 32};
constexpr int64_t kReservedSmem = 1024;  // per block, sm_80 and later

struct Plan {
  int64_t grid, units, smem, per_sm, chunk;
  int64_t tiles;    // batch tiles staged and multiplied together (Layout::tiles): 1 when the batch is not given
  int64_t vrows;    // rows of the projection's output per CTA (P = 0: units)
  bool tf32;        // fp32 products on TF32 tensor cores (Layout::mma)
  double step_ns;   // the cost model's time a step (step_ns; 0 when the batch is not given)
  std::string why;  // empty when the launch can go ahead
};

// What the plan's cost model assumes of the GPU (an H100 / H200, from its data sheet and the kernels' code, not
// yet measured: benchmarks/bench_rnn.py times the persistent kernels on grids around the plan's,
// fusenn-persistent-gN, for the first GPU run to fit these to). FLOP rates are per SM as these kernels can reach
// them with one batch tile a staging round: wmma reloads both fragments from shared memory for every 16x16x16
// product (1 KB per 8 KFLOP, against shared memory's 128 B a cycle); the FMA path loads 4 floats of a weight row
// and of a staged row for every 4 FMAs (a warp's 4 FMA instructions wait on 5 shared-memory wavefronts: 4 for the
// weight rows, 1 for the staged row, a broadcast). With t tiles a round each weight read serves all t: wmma's rate
// times 2 t / (t + 1), FMA's times 5 t / (t + 4) (step_ns).
struct Costs {
  double l2_bytes_per_ns = 5500;  // L2's bandwidth, every SM together
  double round_ns = 500;          // one staging round of a CTA: an L2 round trip and two __syncthreads
  double mma16_flops_per_ns = 1500, tf32_flops_per_ns = 750, fma_flops_per_ns = 160;
  double barrier_ns = 700, barrier_ns_per_cta = 5;  // one grid barrier: a base and each CTA's arrival
};
constexpr Costs kCosts{};

// The modelled time of one step on `grid` CTAs for a batch of B rows (the layouts' products, and with a
// projection the second product and barrier): every CTA stages the whole operand (B x K) from L2, which all CTAs
// share; computes its products (MMA tiles of 16 batch rows) at its SM's rate; waits out each staging round's
// latency (no overlap inside a CTA; a round stages a chunk of K for up to `tiles` batch tiles); and meets the grid
// at a barrier. More CTAs spread the products but read the operand more often: backward's operand, dgates
// (B x gates H), makes that broadcast 3-4x forward's.
inline double step_ns(const Layouts& ls, bool proj, int64_t grid, int64_t B, int elem, const Costs& c) {
  const int64_t Bp = round_up(B, kTileB), t = ls.a.tiles, groups = (Bp / kTileB + t - 1) / t;
  double ns = (proj ? 2 : 1) * (c.barrier_ns + c.barrier_ns_per_cta * static_cast<double>(grid));
  for (const Layout* l : {&ls.a, &ls.b}) {
    const double tt = static_cast<double>(t);
    const double rate = !l->mma ? c.fma_flops_per_ns * 5.0 * tt / (tt + 4.0)
                                : (elem == 2 ? c.mma16_flops_per_ns : c.tf32_flops_per_ns) * 2.0 * tt / (tt + 1.0);
    ns += static_cast<double>(grid) * static_cast<double>(B * l->K * elem) / c.l2_bytes_per_ns;
    ns += 2.0 * static_cast<double>((l->mma ? Bp : B) * l->Np) * static_cast<double>(l->Kp) / rate;
    ns += static_cast<double>(groups * ((l->Kp + l->chunk - 1) / l->chunk)) * c.round_ns;
    if (!proj) break;  // ls.b is ls.a
  }
  return ns;
}

// A layer on `units` hidden units per CTA: its grid, its layouts, and whether that grid can be co-resident with
// `regs` registers per thread (0: unknown) and `static_smem` bytes of static shared memory; B > 0: the batch, for
// the modelled step time and the batch tiles a round (of every tiles x chunk layout that fits, the fewest modelled
// ns; without the batch, one tile: whether the layer launches does not depend on it); max_tiles (> 0) caps the
// tiles afterwards, the grid and chunk kept (to time what the tiles buy, and to test that they change no bit).
// P: the LSTM's proj_size (0: none), spread as ceil(P / grid) rows per CTA.
inline Plan plan_units(int gates, bool backward, int elem, int64_t H, int64_t P, const Machine& m, int64_t regs,
                       int64_t static_smem, int64_t units, bool tf32, int64_t B, int64_t max_tiles) {
  Plan p{};
  p.tf32 = elem == 4 && tf32;
  if (H <= 0) {
    p.why = "hidden_size must be positive";
    return p;
  }
  p.units = units;
  p.grid = (H + p.units - 1) / p.units;
  p.vrows = P > 0 ? (P + p.grid - 1) / p.grid : p.units;
  p.chunk = kChunk;
  p.tiles = 1;
  const auto layouts = [&](int64_t chunk, int64_t tiles) {
    return layouts_for(gates, backward, elem, H, P, p.units, p.vrows, chunk, p.tf32, tiles);
  };
  Layouts ls = layouts(p.chunk, 1);
  // a narrower staged chunk (down to kMinChunk) where the slice leaves too little room for kChunk's
  while (ls.a.bytes + static_smem > m.smem_block && p.chunk > kMinChunk) {
    p.chunk /= 2;
    ls = layouts(p.chunk, 1);
  }
  p.smem = ls.a.bytes;
  const char* what = backward ? "backward" : "forward";
  const int64_t rows = ls.a.Np > ls.b.Np ? ls.a.N : ls.b.N;
  if (ls.a.mma && (ls.a.Np > kMaxRows || ls.b.Np > kMaxRows)) {
    p.why = std::string("the persistent ") + what + " kernel covers at most " + std::to_string(kMaxRows) +
            " weight rows per CTA, hidden_size " + std::to_string(H) + " on " + std::to_string(p.grid) +
            " CTAs needs " + std::to_string(rows);
    return p;
  }
  if (p.smem + static_smem > m.smem_block) {
    p.why = "the persistent " + std::string(what) + " kernel's W_hh slice for hidden_size " + std::to_string(H) +
            " in " + std::to_string(8 * elem) + "-bit needs " + std::to_string(p.smem + static_smem) +
            " bytes of shared memory per CTA on " + std::to_string(p.grid) + " CTAs; a CTA may have " +
            std::to_string(m.smem_block);
    return p;
  }
  const auto per_sm_for = [&](int64_t smem) {
    int64_t n = min64(m.blocks_sm, m.threads_sm / kThreads);
    n = min64(n, m.smem_sm / (smem + static_smem + kReservedSmem));
    return regs > 0 ? min64(n, m.regs_sm / (round_up(regs, 8) * kThreads)) : n;
  };
  int64_t per_sm = per_sm_for(p.smem);
  // a wider staged chunk where the grid still fits: fewer staging rounds (and barriers inside the CTA) a step
  for (int64_t chunk = kWideChunk; per_sm * m.sms >= p.grid && chunk > kChunk; chunk /= 2) {
    const int64_t smem = layouts(chunk, 1).a.bytes;
    if (smem + static_smem <= m.smem_block && per_sm_for(smem) * m.sms >= p.grid) {
      p.chunk = chunk;
      p.smem = smem;
      per_sm = per_sm_for(smem);
      break;
    }
  }
  p.per_sm = per_sm;
  if (per_sm * m.sms < p.grid) {
    p.why = "the persistent " + std::string(what) + " kernel needs " + std::to_string(p.grid) +
            " co-resident CTAs for hidden_size " + std::to_string(H) + ", the GPU holds " +
            std::to_string(per_sm * m.sms) + " (" + std::to_string(per_sm) + " per SM x " + std::to_string(m.sms) +
            " SMs)";
  }
  if (B > 0) {
    p.step_ns = step_ns(layouts(p.chunk, 1), P > 0, p.grid, B, elem, kCosts);
    for (int64_t tiles = 2; p.why.empty() && tiles <= min64(kMaxTiles, (B + kTileB - 1) / kTileB); ++tiles) {
      for (int64_t chunk = kMinChunk; chunk <= kWideChunk; chunk *= 2) {
        const Layouts l = layouts(chunk, tiles);
        if (l.a.bytes + static_smem > m.smem_block || per_sm_for(l.a.bytes) * m.sms < p.grid) continue;
        const double ns = step_ns(l, P > 0, p.grid, B, elem, kCosts);
        if (ns < p.step_ns) {
          p.tiles = tiles;
          p.chunk = chunk;
          p.smem = l.a.bytes;
          p.per_sm = per_sm_for(l.a.bytes);
          p.step_ns = ns;
        }
      }
    }
    if (max_tiles > 0 && p.tiles > max_tiles) {
      p.tiles = max_tiles;
      const Layouts l = layouts(p.chunk, p.tiles);
      p.smem = l.a.bytes;
      p.per_sm = per_sm_for(l.a.bytes);
      p.step_ns = step_ns(l, P > 0, p.grid, B, elem, kCosts);
    }
  }
  return p;
}

// The grid for a layer: ceil(H / grid_req) units per CTA when a grid is asked for; else, without the batch
// (B = 0, as for the reason a layer cannot launch), U units (a multiple of 4, so an LSTM CTA's gate rows fill
// 16-row MMA tiles) spreading H over the SMs; with it, of that grid and every smaller one (ceil(H / grid) units
// each) that launches, the one of the fewest modelled nanoseconds a step (step_ns: fewer CTAs with more units
// each, where the operand's broadcast outweighs spreading the products). A smaller grid launches whenever the
// spread one does, until its slice outgrows shared memory or the warps' rows: more units per CTA need no more CTAs.
inline Plan plan_layout(int gates, bool backward, int elem, int64_t H, int64_t P, const Machine& m, int64_t regs,
                        int64_t static_smem, int64_t grid_req, bool tf32, int64_t B) {
  if (grid_req > 0) {
    return plan_units(gates, backward, elem, H, P, m, regs, static_smem, (H + grid_req - 1) / grid_req, tf32, B, 0);
  }
  Plan best = plan_units(gates, backward, elem, H, P, m, regs, static_smem, round_up((H + m.sms - 1) / m.sms, 4),
                         tf32, B, 0);
  for (int64_t grid = best.grid - 1; B > 0 && best.why.empty() && grid >= 1; --grid) {
    const int64_t units = (H + grid - 1) / grid;
    if ((H + units - 1) / units != grid) continue;  // no units count gives this grid
    const Plan p = plan_units(gates, backward, elem, H, P, m, regs, static_smem, units, tf32, B, 0);
    if (!p.why.empty()) break;  // the slice no longer fits: nor will a larger one
    if (p.step_ns < best.step_ns) best = p;
  }
  return best;
}

// plan_layout's grid; tf32 (fp32 layers only) allows TF32 tensor cores, which the plan takes where their
// layout (gate rows / columns padded to 8-row tiles in the products) can launch, else exact FMA as without it:
// allowed, not required, like torch's flag for cuDNN. TF32's layout needs a little more than the exact one's
// (the warps' K-split partial sums, splits x 16 x Np floats instead of 16 x N), so just below the exact layout's
// own limit it still falls to exact FMA: on an H200, fp32 LSTM forward at H 1137-1152 (the exact limit; its rows
// 16 bytes apart for 16-byte loads cost the 1153-1168 that rows 4 bytes apart fitted) and backward at
// 1141-1180, GRU forward 1537-1552 and backward 1521-1573 (a few proj_size cases near their limits too). Fewer K
// splits where shared memory is short (a Plan field the kernels' Layouts would take) would close most of that
// gap (TF32's layout with no split takes the exact one's bytes), but leave most warps idle in the
// products (one of 8 busy at 12 columns with no split), perhaps slower than the FMA it replaces: not done
// before GPU timings say which wins. max_tiles > 0: that plan with at most max_tiles batch tiles a round, its grid
// and chunk kept.
inline Plan plan(int gates, bool backward, int elem, int64_t H, int64_t P, const Machine& m, int64_t regs,
                 int64_t static_smem, int64_t grid_req, bool tf32, int64_t B = 0, int64_t max_tiles = 0) {
  Plan p{};
  if (elem == 4 && tf32) p = plan_layout(gates, backward, elem, H, P, m, regs, static_smem, grid_req, true, B);
  if (!(elem == 4 && tf32) || !p.why.empty()) {
    p = plan_layout(gates, backward, elem, H, P, m, regs, static_smem, grid_req, false, B);
  }
  if (max_tiles > 0 && p.why.empty() && p.tiles > max_tiles) {
    p = plan_units(gates, backward, elem, H, P, m, regs, static_smem, p.units, p.tf32, B, max_tiles);
  }
  return p;
}

// Everything a launch needs. Tensors are contiguous; T is the layer's dtype, state and gradients fp32.
struct Args {
  // P: the width of h (proj_size with a projection, else H); vrows: h's columns per CTA (units without one)
  int64_t T, B, H, P;
  int32_t gates, grid, units, chunk, vrows;  // gates: 4 LSTM, 3 GRU; units per CTA; K staged at once (Plan)
  int32_t tiles;                             // batch tiles staged and multiplied at once (Plan)
  bool reverse, save;
  bool proj;          // LSTM with a projection: h_t = m_t W_hr^T
  bool tf32;          // fp32: TF32 products allowed in; the plan's choice (Plan::tf32) once planned
  const void* gx;     // (T, B, gates H) T
  const void* w_hh;   // (gates H, P) T
  const void* b_hh;   // (gates H,) T or null (GRU)
  const void* w_hr;   // (P, H) T or null
  const int64_t* lengths;
  const float* rscale;  // (B, P) r/(1-p) or null
  Zoneout zo;
  // forward
  float* hs;  // state slots (T + 1 or 2, B, P) fp32, see slots()
  float* cs;  // LSTM cell slots (T + 1 or 2, B, H), likewise
  void* y;    // (T, B, P) T
  void* op;   // (2, B, P) T: the recurrent product's operand, [0] holds h0 (times r/(1-p))
  float* ms;  // projection: (T or 1, B, H) fp32, m_t = o tanh(c_t) of every step when saving
  void* m_op;  // projection: (B, H) T, m_t as the operand of m_t W_hr^T
  // backward
  const float* ghs;  // (T, B, gates H) fp32: h_{t-1} W_hh^T of every step
  const void* dy;    // (T, B, P) T
  float* dh;         // (B, P) fp32: dh_n in, dh_0 out
  float* dc;         // (B, H) fp32: dc_n in, dc_0 out (LSTM)
  float* dhz;        // (B, P) fp32 scratch (LSTM)
  void* dhz_op;      // projection: (B, P) T, the gradient reaching h_new as the operand of dm = dhz W_hr
  float* dhs;        // projection: (T, B, P) fp32, that gradient of every step (for grad W_hr)
  float* dm;         // projection: (B, H) fp32, the gradient reaching m_t
  float* dg;         // (T, B, gates H) fp32
  float* dghn;       // (T, B, H) fp32 (GRU)
  void* dg_op;       // (2, B, gates H) T: dgates as the operand of dgates W_hh
  // grid barrier (device only): arrival counter, error flag, how long a barrier may wait
  unsigned* barrier;
  int* error;
  uint64_t timeout_ns;
};

// Whether a grid barrier's arrival counter has reached its target (csrc/rnn_persist.cu): both count modulo 2^32
// (barriers x grid arrivals, past 2^32 after 2^31 / grid steps at two barriers a step: 16 million at 128 CTAs),
// and the counter is always within one grid's arrivals of the target, so their difference read as signed decides.
FUSENN_HD constexpr bool arrived(uint32_t count, uint32_t target) { return static_cast<int32_t>(count - target) >= 0; }
static_assert(arrived(640u, 640u) && !arrived(639u, 640u) && arrived(700u, 640u), "arrivals in plain counting");
static_assert(!arrived(0xffffff80u, 0x80u) && arrived(0x80u, 0x80u) && arrived(0x10u, 0xfffffff0u),
              "arrivals across the counter's wrap past 2^32: the last barrier before it must still wait");

// The state slots entering and leaving step t, processed k-th (as csrc/rnn_host.cpp's slots()).
FUSENN_HD void slots(int64_t t, int64_t k, bool reverse, bool save, int64_t* before, int64_t* after) {
  if (save) {
    *before = reverse ? t + 1 : t;
    *after = reverse ? t : t + 1;
  } else {
    *before = k % 2;
    *after = 1 - *before;
  }
}

template <class T>
FUSENN_HD T zero() {
  return from_float(0.0f, static_cast<T*>(nullptr));
}

// A load of data other CTAs wrote before the last grid barrier: past L1 on the GPU.
template <class T>
FUSENN_HD T load_fresh(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &bits, 2);
    return v;
  } else {
    return __ldcg(p);
  }
#else
  return *p;
#endif
}

// An MMA operand as the tensor cores take it: fp32 rounded to TF32 on the TF32 path, 16-bit as it is.
template <class T>
FUSENN_HD T mma_operand(T v, const Layout& l) {
  if constexpr (sizeof(T) == 4) {
    return l.mma ? round_tf32(v) : v;
  } else {
    return v;
  }
}

// Phase 0, once per launch: a weight slice of the CTA into shared memory, zero-padded to Np x Kp (TF32-rounded
// on the TF32 path). Rows: w[q per + u][k] = M[q size + first + u][k] (M's rows ld long); columns:
// w[n][k] = M[k][first + n] (M's rows size long); zero past `size`.
struct Source {
  const void* m;
  bool columns;
  int64_t size, ld, per, first;
};

// The CTA's slice a (second: b) of Layouts, see there.
FUSENN_HD Source source_of(const Args& a, bool backward, bool second, int64_t cta) {
  const int64_t U = a.units, V = a.vrows;
  if (!second) {
    return backward ? Source{a.w_hh, true, a.P, 0, 0, cta * V} : Source{a.w_hh, false, a.H, a.P, U, cta * U};
  }
  return backward ? Source{a.w_hr, true, a.H, 0, 0, cta * U} : Source{a.w_hr, false, a.P, a.H, V, cta * V};
}

template <class T>
FUSENN_HD void load_weights(const Source& s, T* w, const Layout& l, int tid, int nt) {
  const T* src = static_cast<const T*>(s.m);
  for (int64_t idx = tid; idx < l.rows * l.Kp; idx += nt) {
    int64_t n, k;
    divmod(idx, l.Kp, &n, &k);
    T v = zero<T>();
    if (n < l.N && k < l.K) {
      if (s.columns) {
        const int64_t j = s.first + n;
        if (j < s.size) v = src[k * s.size + j];
      } else {
        int64_t q, u;
        divmod(n, s.per, &q, &u);
        const int64_t j = s.first + u;
        if (j < s.size) v = src[(q * s.size + j) * s.ld + k];
      }
    }
    w[n * l.ldw + k] = mma_operand(v, l);
  }
}

// 16 bytes of data other CTAs wrote before the last grid barrier (past L1 on the GPU), p 16-byte aligned.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

FUSENN_HD Vec16 load_fresh16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldcg(static_cast<const uint4*>(p));
  return Vec16{{v.x, v.y, v.z, v.w}};
#else
  Vec16 v;
  memcpy(&v, p, 16);
  return v;
#endif
}

// Rows b0 .. b0 + n of A (rows x K, T; n: `tiles` batch tiles of kTileB rows) from column c0 into the staging
// buffer, zero past the ends (TF32-rounded on the TF32 path): 16 bytes at a time when K allows (rows 16-byte
// aligned), each thread's loads kStageLoads at a time before any of their stores, so that they wait out one L2
// round trip together (a load and its store in turn wait one each: the compiler keeps the GPU-scope loads in
// order with the stores between); else element by element.
constexpr int kStageLoads = 8;

template <class T>
FUSENN_HD void stage(const T* A, int64_t rows, int64_t b0, int64_t c0, T* dst, const Layout& l, int64_t tiles,
                     int tid, int nt) {
  const int64_t width = min64(l.chunk, l.Kp - c0);  // a multiple of 16
  constexpr int64_t V = 16 / sizeof(T);
  if (l.K % V == 0) {
    const int64_t vectors = width / V, total = tiles * kTileB * vectors;
    for (int64_t first = tid; first < total; first += kStageLoads * static_cast<int64_t>(nt)) {
      Vec16 v[kStageLoads];
      int64_t at[kStageLoads];  // where each lands in the staging buffer (-1: past the tile)
#pragma unroll
      for (int i = 0; i < kStageLoads; ++i) {
        const int64_t idx = first + i * static_cast<int64_t>(nt);
        v[i] = Vec16{{0u, 0u, 0u, 0u}};
        at[i] = -1;
        if (idx < total) {
          int64_t b, kv;
          divmod(idx, vectors, &b, &kv);
          const int64_t gb = b0 + b, gk = c0 + kv * V;
          if (gb < rows && gk < l.K) v[i] = load_fresh16(A + gb * l.K + gk);
          at[i] = b * l.lda + kv * V;
#if !defined(__CUDA_ARCH__)
          if (b % kTileB == host_unstaged_row) at[i] = -1;
#endif
        }
      }
#pragma unroll
      for (int i = 0; i < kStageLoads; ++i) {
        if (at[i] < 0) continue;
        if (sizeof(T) == 4 && l.mma) {
          for (uint32_t& word : v[i].w) {
            float f;
            memcpy(&f, &word, 4);
            f = round_tf32(f);
            memcpy(&word, &f, 4);
          }
        }
#if defined(__CUDA_ARCH__)
        *reinterpret_cast<Vec16*>(dst + at[i]) = v[i];  // +0.0 is all-zero bits in every T
#else
        memcpy(dst + at[i], &v[i], 16);
#endif
      }
    }
    return;
  }
  for (int64_t idx = tid; idx < tiles * kTileB * width; idx += nt) {
    int64_t b, k;
    divmod(idx, width, &b, &k);
#if !defined(__CUDA_ARCH__)
    if (b % kTileB == host_unstaged_row) continue;
#endif
    const int64_t gb = b0 + b, gk = c0 + k;
    dst[b * l.lda + k] = (gb < rows && gk < l.K) ? mma_operand(load_fresh(A + gb * l.K + gk), l) : zero<T>();
  }
}

// Tensor-core fragments for a 16-row batch tile times a 16-wide K block of kN weight rows (A row-major, B
// column-major, fp32 accumulator): wmma 16x16x16 for 16-bit, mma.sync m16n8k8 for TF32 on the GPU; on the host
// plain arrays with fp32 FMA accumulation, so the grid's emulation runs the MMA path's tiling, K-split and
// reduction on the same fp16/bf16 (or TF32-rounded fp32) operands.
#if defined(__CUDA_ARCH__)
template <class T>
struct Mma {
  static constexpr int kN = 16;  // weight rows (columns of the product) per MMA
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using C = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void zero(C& c) { nvcuda::wmma::fill_fragment(c, 0.0f); }
  static __device__ __forceinline__ void load_a(A& a, const T* p, int64_t ld) {
    nvcuda::wmma::load_matrix_sync(a, p, static_cast<unsigned>(ld));
  }
  static __device__ __forceinline__ void load_b(B& b, const T* p, int64_t ld, int64_t) {  // all 16 rows stored
    nvcuda::wmma::load_matrix_sync(b, p, static_cast<unsigned>(ld));
  }
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) { nvcuda::wmma::mma_sync(c, a, b, c); }
  static __device__ __forceinline__ void store(float* p, const C& c, int64_t ld) {
    nvcuda::wmma::store_matrix_sync(p, c, static_cast<unsigned>(ld), nvcuda::wmma::mem_row_major);
  }
};
// fp32 on TF32 tensor cores: mma.sync m16n8k8 (TF32 operands, fp32 accumulation) in PTX, so a product covers
// 8 weight rows (kN) and a 16-wide K block is two of them. The operands in shared memory are TF32 already
// (stage, load_weights), so the fragments take their bits as they are. Lane l = 4 g + i holds A (16 x 8, row
// major) at (g, i), (g + 8, i), (g, i + 4), (g + 8, i + 4); B (8 x 8, K by column) at (i, g), (i + 4, g); C
// (16 x 8) at (g, 2 i), (g, 2 i + 1), (g + 8, 2 i), (g + 8, 2 i + 1).
template <>
struct Mma<float> {
  static constexpr int kN = 8;
  struct A {
    uint32_t r[2][4];  // [K half][register]
  };
  struct B {
    uint32_t r[2][2];
  };
  struct C {
    float v[4];
  };
  static __device__ __forceinline__ int lane() { return static_cast<int>(threadIdx.x) & 31; }
  static __device__ __forceinline__ void zero(C& c) {
    for (float& x : c.v) x = 0.0f;
  }
  static __device__ __forceinline__ void load_a(A& a, const float* p, int64_t ld) {
    const int g = lane() >> 2, i = lane() & 3, l = static_cast<int>(ld);
    const float* r0 = p + g * l + i;
    const float* r1 = r0 + 8 * l;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      a.r[h][0] = __float_as_uint(r0[8 * h]);
      a.r[h][1] = __float_as_uint(r1[8 * h]);
      a.r[h][2] = __float_as_uint(r0[8 * h + 4]);
      a.r[h][3] = __float_as_uint(r1[8 * h + 4]);
    }
  }
  // p: weight row n0, K column k0 of w (rows ld apart): B[k][n] = p[n ld + k] for the `stored` rows n, zero past
  static __device__ __forceinline__ void load_b(B& b, const float* p, int64_t ld, int64_t stored) {
    const int n = lane() >> 2;
    const bool here = n < stored;
    const float* r = p + (here ? n : 0) * static_cast<int>(ld) + (lane() & 3);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      b.r[h][0] = here ? __float_as_uint(r[8 * h]) : 0u;
      b.r[h][1] = here ? __float_as_uint(r[8 * h + 4]) : 0u;
    }
  }
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};"
          : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])
          : "r"(a.r[h][0]), "r"(a.r[h][1]), "r"(a.r[h][2]), "r"(a.r[h][3]), "r"(b.r[h][0]), "r"(b.r[h][1]));
    }
  }
  static __device__ __forceinline__ void store(float* p, const C& c, int64_t ld) {
    const int l = static_cast<int>(ld);
    float* r0 = p + (lane() >> 2) * l + 2 * (lane() & 3);
    r0[0] = c.v[0];
    r0[1] = c.v[1];
    r0[8 * l] = c.v[2];
    r0[8 * l + 1] = c.v[3];
  }
};
constexpr int kWarpSlots = 1;  // a warp's one (tile, split) item
#else
// The host's fragments: a 16 x 16 A block, a 16-wide K block of N weight rows, fp32 sums of products in k order
// (fmaf; TF32 and 16-bit operands multiply exactly in fp32, so the emulation differs from the tensor cores only
// in the order and rounding of the adds inside one MMA, which PTX leaves to the hardware).
template <class T, int N>
struct HostMma {
  static constexpr int kN = N;
  struct A {
    float v[16][16];  // [row][k]
  };
  struct B {
    float v[16][N];  // [k][column]
  };
  struct C {
    float v[16][N];  // [row][column]
  };
  static void zero(C& c) {
    for (auto& r : c.v) for (float& x : r) x = 0.0f;
  }
  static void load_a(A& a, const T* p, int64_t ld) {
    for (int r = 0; r < 16; ++r) for (int k = 0; k < 16; ++k) a.v[r][k] = to_float(p[r * ld + k]);
  }
  static void load_b(B& b, const T* p, int64_t ld, int64_t stored) {  // rows past `stored` are not read: zero
    for (int n = 0; n < N; ++n) {
      for (int k = 0; k < 16; ++k) b.v[k][n] = n < stored ? to_float(p[n * ld + k]) : 0.0f;
    }
  }
  static void mma(C& c, const A& a, const B& b) {
    for (int r = 0; r < 16; ++r) {
      for (int n = 0; n < N; ++n) {
        float s = c.v[r][n];
        for (int k = 0; k < 16; ++k) s = fmaf(a.v[r][k], b.v[k][n], s);
        c.v[r][n] = s;
      }
    }
  }
  static void store(float* p, const C& c, int64_t ld) {
    for (int r = 0; r < 16; ++r) for (int n = 0; n < N; ++n) p[r * ld + n] = c.v[r][n];
  }
};
template <class T>
struct Mma : HostMma<T, 16> {};  // wmma 16x16x16
template <>
struct Mma<float> : HostMma<float, 8> {};  // mma.sync m16n8k8, two per 16-wide K block
constexpr int kWarpSlots = kWarps;  // the host plays every warp in turn
#endif

// The tensor-core product of a round of G batch tiles: warp w takes item w = (16-column tile w % cols of the Np
// rows, K-split w / cols: every splits-th 16-wide K block), 16 / kN MMAs per K block and batch tile (TF32: the
// second 8 columns only where Np has them), the weight fragments of a K block loaded once for all G tiles; the
// splits' partial sums are added after. Each accumulator takes its K blocks in the same order whatever G is. On
// the host thread tid of nt plays warps tid, tid + nt, ...
template <int G, class T>
FUSENN_HD void tile_product_mma(const T* A, int64_t rows, int64_t b0, const T* w, const Layout& l, T* st, float* acc,
                                int tid, int nt) {
  using M = Mma<T>;
  constexpr int kParts = 16 / M::kN;  // MMAs per 16-column item
  const int cols = static_cast<int>((l.Np + 15) / 16), splits = static_cast<int>(l.splits), items = cols * splits;
  const int64_t tile_acc = kTileB * l.Np, split_acc = l.tiles * tile_acc;  // partial sums: [split][tile][row][n]
#if defined(__CUDA_ARCH__)
  const int first = tid / 32, stride = kWarps;
#else
  const int first = tid, stride = nt;  // the host's threads play the warps (one thread: all of them)
#endif
  typename M::C c[kWarpSlots][G][kParts];
  for (int slot = 0; slot < kWarpSlots; ++slot) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int h = 0; h < kParts; ++h) M::zero(c[slot][g][h]);
    }
  }
  for (int64_t c0 = 0; c0 < l.Kp; c0 += l.chunk) {
    FUSENN_SYNC();  // the previous chunk's readers are done with the staging buffer
    stage(A, rows, b0, c0, st, l, G, tid, nt);
    FUSENN_SYNC();
    const int64_t width = min64(l.chunk, l.Kp - c0);
    for (int item = first, slot = 0; item < items; item += stride, ++slot) {
      const int n16 = item % cols, ks = item / cols;
      const int parts = static_cast<int>(min64(kParts, (l.Np - n16 * 16) / M::kN));  // the same in a warp
      auto& cs = c[kWarpSlots == 1 ? 0 : slot];
      for (int64_t kk = ks * 16; kk < width; kk += splits * 16) {
        typename M::B fb[kParts];
        typename M::A fa[G];
#pragma unroll
        for (int h = 0; h < kParts; ++h) {
          const int64_t n0 = n16 * 16 + h * M::kN;
          if (h < parts) M::load_b(fb[h], w + n0 * l.ldw + c0 + kk, l.ldw, l.rows - n0);
        }
#pragma unroll
        for (int g = 0; g < G; ++g) M::load_a(fa[g], st + g * kTileB * l.lda + kk, l.lda);
#pragma unroll
        for (int h = 0; h < kParts; ++h) {
#pragma unroll
          for (int g = 0; g < G; ++g) {
            if (h < parts) M::mma(cs[g][h], fa[g], fb[h]);
          }
        }
      }
    }
  }
  for (int item = first, slot = 0; item < items; item += stride, ++slot) {
    const int n16 = item % cols, ks = item / cols;
    const int parts = static_cast<int>(min64(kParts, (l.Np - n16 * 16) / M::kN));
    auto& cs = c[kWarpSlots == 1 ? 0 : slot];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int h = 0; h < kParts; ++h) {
        if (h < parts) M::store(acc + ks * split_acc + g * tile_acc + n16 * 16 + h * M::kN, cs[g][h], l.Np);
      }
    }
  }
  FUSENN_SYNC();
  if (l.splits > 1) {
    for (int64_t idx = tid; idx < G * tile_acc; idx += nt) {
      float s = acc[idx];
      for (int64_t p = 1; p < l.splits; ++p) s += acc[p * split_acc + idx];
      acc[idx] = s;
    }
  }
  FUSENN_SYNC();
}

// Four consecutive floats from shared memory, p 16-byte aligned: one 16-byte load on the GPU.
FUSENN_HD void load4(const float* p, float v[4]) {
#if defined(__CUDA_ARCH__)
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
#else
  for (int i = 0; i < 4; ++i) v[i] = p[i];
#endif
}

// The exact fp32 product of a round of G batch tiles: thread tid takes (tile row r, column n) for idx = tid,
// tid + nt, ... over kTileB x N (r = idx / N), each for all G tiles (rows r, r + kTileB, ...), so that one load of
// w[n][k..k+3] serves them all (register blocking across batch rows; a warp's lanes mostly share r, so their loads
// of the staged rows are broadcasts) and the G sums' FMAs interleave. Every sum runs in k order through fmaf: k in
// fours from 16-byte loads, then the tail; the same bits whatever G and the chunks.
template <int G, class T>
FUSENN_HD void tile_product_fma(const T* A, int64_t rows, int64_t b0, const T* w, const Layout& l, T* st, float* acc,
                                int tid, int nt) {
  static_assert(sizeof(T) == 4, "the FMA product is fp32's");
  for (int64_t c0 = 0; c0 < l.Kp; c0 += l.chunk) {
    FUSENN_SYNC();
    stage(A, rows, b0, c0, st, l, G, tid, nt);
    FUSENN_SYNC();
    const int64_t width = min64(l.chunk, l.K - c0), fours = width / 4 * 4;
    for (int64_t idx = tid; idx < kTileB * l.N; idx += nt) {
      int64_t r, n;
      divmod(idx, l.N, &r, &n);
      const float* wr = w + n * l.ldw + c0;
      const float* ar = st + r * l.lda;
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        s[g] = (c0 > 0 && b0 + g * kTileB + r < rows) ? acc[(g * kTileB + r) * l.Np + n] : 0.0f;
      }
      for (int64_t k = 0; k < fours; k += 4) {
        float wv[4], av[G][4];
        load4(wr + k, wv);
#pragma unroll
        for (int g = 0; g < G; ++g) load4(ar + g * kTileB * l.lda + k, av[g]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int g = 0; g < G; ++g) s[g] = fmaf(av[g][i], wv[i], s[g]);
        }
      }
      for (int64_t k = fours; k < width; ++k) {
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] = fmaf(ar[g * kTileB * l.lda + k], wr[k], s[g]);
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (b0 + g * kTileB + r < rows) acc[(g * kTileB + r) * l.Np + n] = s[g];
      }
    }
  }
  FUSENN_SYNC();
}

// acc[b][n] = sum_k A[b0 + b][k] w[n][k] for the round's batch tiles from b0 (b < l.tiles x kTileB), fp32
// accumulation: fp16/bf16 and TF32 on the MMA path (tensor cores on the GPU), fp32 otherwise by exact FMA in k order.
// G (the round's batch tiles that hold rows, at most l.tiles) is a constant in the products, so that the tiles'
// loads and MMAs / FMAs unroll without branches between them.
template <class T, int G = 1>
FUSENN_HD void tile_product(const T* A, int64_t rows, int64_t b0, const T* w, const Layout& l, T* st, float* acc,
                            int tid, int nt) {
  if constexpr (G < kMaxTiles) {
    if (l.tiles > G && rows - b0 > G * kTileB) {
      tile_product<T, G + 1>(A, rows, b0, w, l, st, acc, tid, nt);
      return;
    }
  }
  if constexpr (sizeof(T) == 2) {
    tile_product_mma<G>(A, rows, b0, w, l, st, acc, tid, nt);
  } else if (l.mma) {
    tile_product_mma<G>(A, rows, b0, w, l, st, acc, tid, nt);
  } else {
    tile_product_fma<G>(A, rows, b0, w, l, st, acc, tid, nt);
  }
}

// The number of units CTA c owns, and of h's P columns (vrows per CTA; the units without a projection).
FUSENN_HD int64_t units_of(const Args& a, int64_t cta) { return min64(a.units, a.H - cta * a.units); }
FUSENN_HD int64_t vrows_of(const Args& a, int64_t cta) { return min64(a.vrows, a.P - cta * a.vrows); }

// Forward, the k-th step processed, CTA c: gate products for its rows, then the cell for each (b, j in J_c);
// with a projection the cell leaves m_t (forward_project then makes h_t).
template <class T>
FUSENN_HD void forward_step(const Args& a, int64_t cta, int64_t k, const T* w, T* st, float* acc, const Layout& l,
                            int tid, int nt) {
  const int64_t B = a.B, H = a.H, P = a.P, G = a.gates, U = a.units, Uc = units_of(a, cta), j0 = cta * U;
  const int64_t t = a.reverse ? a.T - 1 - k : k;
  int64_t before, after;
  slots(t, k, a.reverse, a.save, &before, &after);
  const T* op_in = static_cast<const T*>(a.op) + (k % 2) * B * P;
  T* op_out = static_cast<T*>(a.op) + ((k + 1) % 2) * B * P;
  const Step s{t, a.T, B, a.lengths, a.rscale, a.zo};
  const void* gx = static_cast<const T*>(a.gx) + t * B * G * H;
  void* y = static_cast<T*>(a.y) + t * B * P;
  float* m = a.proj ? a.ms + (a.save ? t : 0) * B * H : nullptr;
  for (int64_t b0 = 0; b0 < B; b0 += kTileB * l.tiles) {
    tile_product(op_in, B, b0, w, l, st, acc, tid, nt);
    for (int64_t idx = tid; idx < kTileB * l.tiles * Uc; idx += nt) {
      int64_t bl, u;
      divmod(idx, Uc, &bl, &u);
      const int64_t b = b0 + bl, j = j0 + u;
      if (b >= B) continue;
      const float* gh = acc + bl * l.Np + u;  // the gate products, U apart: read where the products left them
      if (G == 4) {
        const LstmCell cell{s,        H,       P,  gx, nullptr, a.cs + before * B * H, a.cs + after * B * H,
                            a.hs + before * B * P, a.hs + after * B * P, y, op_out, m, a.m_op};
        run_at<T>(cell, b, j, gh, U);
      } else {
        const GruCell cell{s, H, gx, nullptr, a.b_hh, a.hs + before * B * H, a.hs + after * B * H, y, op_out};
        run_at<T>(cell, b, j, gh, U);
      }
    }
  }
}

// Forward with a projection, after a grid barrier: CTA c's columns Q_c of h_t = m_t W_hr^T (from the m_t
// every CTA published), then zoneout, lengths, outputs and the next step's operand for them (EmitH's).
template <class T>
FUSENN_HD void forward_project(const Args& a, int64_t cta, int64_t k, const T* w, T* st, float* acc,
                               const Layout& l, int tid, int nt) {
  const int64_t B = a.B, P = a.P, Vc = vrows_of(a, cta), p0 = cta * a.vrows;
  if (Vc <= 0) return;  // the whole CTA alike
  const int64_t t = a.reverse ? a.T - 1 - k : k;
  int64_t before, after;
  slots(t, k, a.reverse, a.save, &before, &after);
  T* op_out = static_cast<T*>(a.op) + ((k + 1) % 2) * B * P;
  const Step s{t, a.T, B, a.lengths, a.rscale, a.zo};
  void* y = static_cast<T*>(a.y) + t * B * P;
  for (int64_t b0 = 0; b0 < B; b0 += kTileB * l.tiles) {
    tile_product(static_cast<const T*>(a.m_op), B, b0, w, l, st, acc, tid, nt);
    for (int64_t idx = tid; idx < kTileB * l.tiles * Vc; idx += nt) {
      int64_t bl, v;
      divmod(idx, Vc, &bl, &v);
      const int64_t b = b0 + bl;
      if (b >= B) continue;
      emit_h<T>(s, P, b, p0 + v, acc[bl * l.Np + v], a.hs + before * B * P, a.hs + after * B * P, y, op_out);
    }
  }
}

// Backward: dh[:, Q_c] += (dgates W_hh)[:, Q_c] of the step processed k-th (AddRecurrent's update: times
// r/(1-p), rows that have that step), from the operand every CTA published for it (Q_c = J_c without a
// projection).
template <class T>
FUSENN_HD void backward_recurrent(const Args& a, int64_t cta, int64_t k, const T* w, T* st, float* acc,
                                  const Layout& l, int tid, int nt) {
  const int64_t B = a.B, H = a.H, P = a.P, G = a.gates, Vc = vrows_of(a, cta), p0 = cta * a.vrows;
  if (Vc <= 0) return;
  const int64_t t = a.reverse ? k : a.T - 1 - k;
  const Step s{t, a.T, B, a.lengths, a.rscale, a.zo};
  const T* g = static_cast<const T*>(a.dg_op) + (k % 2) * B * G * H;
  for (int64_t b0 = 0; b0 < B; b0 += kTileB * l.tiles) {
    tile_product(g, B, b0, w, l, st, acc, tid, nt);
    for (int64_t idx = tid; idx < kTileB * l.tiles * Vc; idx += nt) {
      int64_t bl, v;
      divmod(idx, Vc, &bl, &v);
      const int64_t b = b0 + bl;
      if (b >= B || !has_step(s, b)) continue;
      const int64_t i = b * P + p0 + v;
      const float val = acc[bl * l.Np + v];
      a.dh[i] += a.rscale ? val * a.rscale[i] : val;
    }
  }
}

// Backward with a projection, the k-th step processed, CTA c: the gradient reaching h_t's columns Q_c and
// its share reaching the pre-zoneout h_new (LstmDh: dhz, published as the operand of dm_t = dhz W_hr, and
// dhs for grad W_hr); a grid barrier follows.
template <class T>
FUSENN_HD void backward_dh(const Args& a, int64_t cta, int64_t k, int tid, int nt) {
  const int64_t B = a.B, P = a.P, Vc = vrows_of(a, cta), p0 = cta * a.vrows;
  if (Vc <= 0) return;
  const int64_t t = a.reverse ? k : a.T - 1 - k;
  const Step s{t, a.T, B, a.lengths, a.rscale, a.zo};
  const void* dy = static_cast<const T*>(a.dy) + t * B * P;
  FUSENN_SYNC();  // backward_recurrent's writes of dh come from other threads
  for (int64_t idx = tid; idx < B * Vc; idx += nt) {
    int64_t b, v;
    divmod(idx, Vc, &b, &v);
    run_at<T>(LstmDh{s, P, dy, a.dh, a.dhz, a.dhz_op, a.dhs + t * B * P}, b, p0 + v);
  }
}

// Backward, the k-th step processed, CTA c: the gradients reaching J_c's gates (publishing dgates_t). With a
// projection, first dm_t[:, J_c] = dhz W_hr[:, J_c] from the dhz every CTA published before the last barrier
// (w, l: the CTA's slice b of W_hr's columns).
template <class T>
FUSENN_HD void backward_cells(const Args& a, int64_t cta, int64_t k, const T* w, T* st, float* acc, const Layout& l,
                              int tid, int nt) {
  const int64_t B = a.B, H = a.H, P = a.P, G = a.gates, Uc = units_of(a, cta), j0 = cta * a.units;
  const int64_t t = a.reverse ? k : a.T - 1 - k;
  int64_t before, after;
  slots(t, k, a.reverse, true, &before, &after);
  const Step s{t, a.T, B, a.lengths, a.rscale, a.zo};
  const void* gx = static_cast<const T*>(a.gx) + t * B * G * H;
  const void* dy = static_cast<const T*>(a.dy) + t * B * P;
  const float* gh = a.ghs + t * B * G * H;
  void* g_op = static_cast<T*>(a.dg_op) + (k % 2) * B * G * H;
  if (a.proj) {
    for (int64_t b0 = 0; b0 < B; b0 += kTileB * l.tiles) {
      tile_product(static_cast<const T*>(a.dhz_op), B, b0, w, l, st, acc, tid, nt);
      for (int64_t idx = tid; idx < kTileB * l.tiles * Uc; idx += nt) {
        int64_t bl, u;
        divmod(idx, Uc, &bl, &u);
        if (b0 + bl < B) a.dm[(b0 + bl) * H + j0 + u] = acc[bl * l.Np + u];
      }
    }
  }
  FUSENN_SYNC();  // backward_recurrent's writes of dh (dm's with a projection) come from other threads
  for (int64_t idx = tid; idx < B * Uc; idx += nt) {
    int64_t b, u;
    divmod(idx, Uc, &b, &u);
    const int64_t j = j0 + u;
    if (G == 4) {
      if (!a.proj) run_at<T>(LstmDh{s, H, dy, a.dh, a.dhz, nullptr, nullptr}, b, j);
      const LstmCellBackward cell{s,  H, P, gx, gh, a.cs + before * B * H, a.cs + after * B * H,
                                  a.proj ? a.dm : a.dhz, a.dc, a.dg + t * B * G * H, g_op};
      run_at<T>(cell, b, j);
    } else {
      const GruCellBackward cell{s, H, gx, gh, a.b_hh, a.hs + before * B * H, dy, a.dh, a.dg + t * B * G * H,
                                 a.dghn + t * B * H, g_op};
      run_at<T>(cell, b, j);
    }
  }
}

// The CUDA side (csrc/rnn_persist.cu), for the current device. launch_persist plans the grid for args
// (units and grid filled in there; grid_req > 0 asks for that many CTAs, max_tiles > 0 at most that many batch
// tiles a staging round), checks that it can be co-resident, launches it cooperatively on `stream` and returns a
// cudaError_t value; a grid it cannot launch leaves a reason in *why and launches nothing. persist_reason gives
// that reason alone (empty: it can launch).
int launch_persist(const Args& args, Dtype dtype, bool backward, int64_t grid_req, int64_t max_tiles, Stream stream,
                   std::string* why);
std::string persist_reason(Dtype dtype, int gates, bool backward, int64_t H, int64_t P, int64_t grid_req);

}  // namespace persist
}  // namespace fusenn
