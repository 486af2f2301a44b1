"""Fused LSTM layer: one launch runs the whole sequence forward, one launch runs it backward.

Equations, gate order (i, f, g, o), packed `lengths`, `reverse` and the projection (proj_size) are those
of fusenn.reference.rnn.lstm_layer.

Design. The grid splits the batch into blocks of BLOCK_B rows; each program owns its rows for the whole
sequence and loops over time inside the kernel. Per step it tiles the hidden dimension (BLOCK_H) and the
contraction dimension (BLOCK_P), so any H and P work: for each hidden tile it accumulates the four gate
tiles of h_{t-1} W_hh^T with tl.dot (fp32 accumulators), adds gx_t, applies the nonlinearities and updates
c and h. The recurrent state lives in fp32 global buffers that only its own program reads back;
tl.debug_barrier() separates writing a step's state from reading it in the next step (a no-op in the
interpreter, which runs one program at a time anyway). With a projection, m = o * tanh(c) goes to a
buffer first and a second phase of the step computes h = m W_hr^T.

Saved for backward: h and c after every step in fp32 ((T+1) x B x P and (T+1) x B x H, the state buffers
themselves, so training costs no extra writes) and m when projecting; no gate activations. Backward
recomputes the gates from gx and h_{t-1} (one extra tl.dot per tile), runs t backwards, writes the gate
gradients (which are grad_gx) and carries dh, dc in fp32 buffers; the weight gradients are then single
GEMMs over all T*B rows in torch (ops/rnn.py). Without grad the state buffers shrink to two slots.

Specialisation. H and P are constexpr (one compile per layer size, like an attention head dim: the tile
loops get constant bounds); T, B and the step range are runtime values, never specialised. The time loop is a while loop
because the interpreter (with numpy >= 2.4) cannot range() over a runtime bound.

Precision. fp32 inputs follow torch.backends.cudnn.allow_tf32 as cuDNN's nn.LSTM does: TF32 tensor-core
dots when set (torch's default), else IEEE fp32 (fp32_dot); fp16/bf16 use tensor-core dots (the fp32 state
rounded to the input dtype as the operand) with fp32 accumulation, fp32 gates and fp32 cell state. Under
the interpreter every dot runs in fp32 (its bf16 tl.dot is wrong).

Regularisers (recurrent_dropout, zoneout; definitions and Philox counters in fusenn.reference.rnn).
Recurrent dropout's mask is locked over time, so each launch draws it once as a (B, P) fp32 tensor of
r / (1 - p) (recurrent_scale_tensor; B * P * 4 bytes) that the kernels load with each h_{t-1} tile: RDROP
multiplies the tile entering the gate product by it, and backward multiplies dh_{t-1}'s recurrent term by
the same. Zoneout's masks change every step and are never stored: forward and backward regenerate each
tile's mask with philox_keep from (seed, coordinates) where they use it. ZONEOUT (1: Philox masks,
2: the constant expectation u = 1 - p) mixes h_t = u h_new + (1 - u) h_{t-1} and likewise c; since the
saved c_t is then the zoned one, backward recomputes c_new = f c_{t-1} + i g for tanh(c_new).

GPU speed limits, and the split mode. One program per 16 batch rows means a batch of 64 occupies 4 of an
H100's 132 SMs, and every step re-reads W_hh (4H x P) from L2: for large H this is bandwidth- and
latency-bound at a few percent of peak. The split mode
(NSPLIT > 1, chosen by split_plan) lets NSPLIT programs share each block of rows, each taking every
NSPLIT-th hidden tile in phase 1 of a step and every NSPLIT-th tile of P in phase 2, so a step's work
(and its share of W_hh, which stays in L2) spreads over up to one program per SM. On a GPU it is one
cooperative launch (CUDA's: every program resident at once, or the launch fails, however busy the GPU is
with other streams) whose programs meet at a barrier in global memory after each phase (phase_sync); a
program that still times out at a barrier sets an error flag that the launcher checks and raises on
(check_barriers), so a sync that cannot complete never returns numbers. The interpreter, which runs
programs one after another, runs the same kernel one launch per phase per step (PHASES = 1 or 2), the
launch boundaries standing in for the barriers, so the CPU tests cover all of the split indexing. The
split mode (here and in fusenn.kernels.gru) is opt-in (FUSENN_RNN_SPLIT) until GPU runs show where it wins.
"""

import os

import torch
import triton
import triton.language as tl

from fusenn.kernels import INTERPRET, NEWER_PTXAS, device_guard
from fusenn.kernels.philox import philox_keep, philox_key
from fusenn.ops import new_output

BLOCK_B = 16  # tl.dot needs every dimension >= 16


def dot_warps(*widths: int) -> int:
    """num_warps for a kernel whose dots are BLOCK_B = 16 rows by `widths` columns: one mma.sync m16n8
    instruction gives a warp 8 columns, so more than min(widths) / 8 warps would compute the same
    products on several warps (the static report's replicated dots); at most 8."""
    return max(1, min(8, min(widths) // 8))


def block_size(n: int, cap: int) -> int:
    """A power-of-two tile in [16, cap] covering n where it can."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


@triton.jit
def tanh(x):
    # libdevice tanh does not run under the interpreter; this form runs everywhere and saturates to +-1
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def matmul_acc(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a @ b, accumulated in fp32: fp32 operands at FP32_DOT's precision ("ieee" or "tf32"), or with
    FP32_DOT "none" tensor cores in b's dtype."""
    if FP32_DOT != "none":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=FP32_DOT)
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def load_2d(ptr, r, c, stride_r, stride_c, mask_r, mask_c):
    """The (len(r), len(c)) tile at ptr[r * stride_r + c * stride_c], 0 outside the masks."""
    return tl.load(ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=mask_r[:, None] & mask_c[None, :],
                   other=0.0)


@triton.jit
def store_2d(ptr, r, c, stride_r, value, mask_r, mask_c):
    tl.store(ptr + r[:, None] * stride_r + c[None, :], value.to(ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


@triton.jit
def step_slots(k, T, REVERSE: tl.constexpr, SAVE: tl.constexpr):
    """(t, before, after): the time step processed k-th, and the state-buffer slots holding the state
    entering and leaving it. Saving, slot t + REVERSE holds the state entering step t, so the states
    entering steps 0..T-1 form one contiguous slice for the weight-gradient GEMMs; else two slots alternate."""
    if REVERSE:
        t = T - 1 - k
        before = t + 1
        after = t
    else:
        t = k
        before = t
        after = t + 1
    if not SAVE:
        before = k % 2
        after = 1 - before
    return t, before, after


@triton.jit
def program_rows(B, len_ptr, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's batch rows, which of them exist, their lengths (the rows themselves if none), and
    which of the NSPLIT programs sharing them it is."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lens = tl.load(len_ptr + rows, mask=row_ok, other=0) if HAS_LENGTHS else rows
    return rows, row_ok, lens, tl.program_id(1)


MAX_SPINS = tl.constexpr(1 << 22)  # a few seconds: far beyond any real wait at a barrier


@triton.jit
def phase_sync(bar_ptr, epoch, stuck, NSPLIT: tl.constexpr, PHASES: tl.constexpr):
    """End of a phase of a step: every tile this phase wrote is visible to the phase that reads it next.
    Alone on its batch rows (NSPLIT == 1) a program needs only its own threads in step; in the cooperative
    mode (NSPLIT > 1 in one launch, PHASES == 3) the NSPLIT programs sharing the rows meet at a barrier in
    global memory (a counter each of them adds 1 to per phase, release/acquire at GPU scope), which needs
    all of them resident at once, so it is only launched with at most one program per SM, and never under
    the interpreter. Should they not be (a GPU shared with other work), a program gives up waiting after
    MAX_SPINS polls and never waits again, and the kernel ends by raising the error flag (report_stuck),
    which the launcher checks: an error, never a hung process or stale numbers. Returns (next epoch,
    stuck)."""
    tl.debug_barrier()
    if NSPLIT > 1 and PHASES == 3:
        counter = bar_ptr + tl.program_id(0)  # one per block of rows: only its NSPLIT programs meet here
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        spins = stuck * MAX_SPINS
        while (tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < epoch * NSPLIT) & (spins < MAX_SPINS):
            spins += 1
        stuck = (spins >= MAX_SPINS).to(tl.int32)
        tl.debug_barrier()
    return epoch + 1, stuck


@triton.jit
def report_stuck(bar_ptr, stuck, NSPLIT: tl.constexpr, PHASES: tl.constexpr):
    """At the end of a cooperative kernel: a program that gave up at a barrier sets the error flag after
    the row blocks' counters (launch_split checks it after the launch)."""
    if NSPLIT > 1 and PHASES == 3:
        tl.atomic_max(bar_ptr + tl.num_programs(0), stuck)


@triton.jit
def valid_rows(rows, lens, t, HAS_LENGTHS: tl.constexpr):
    """(BLOCK_B, 1): which rows have step t (rows past their length keep their state and output 0)."""
    if HAS_LENGTHS:
        return (t < lens)[:, None]
    return (rows >= 0)[:, None]


@triton.jit
def recurrent_scale(rd_ptr, rows, cols, P: tl.constexpr, row_ok, col_ok):
    """(len(rows), len(cols)) fp32: r / (1 - p) of the time-locked recurrent-dropout mask, a (B, P) tensor
    built once per launch (recurrent_scale_tensor), not regenerated per tile and step."""
    return load_2d(rd_ptr, rows, cols, P, 1, row_ok, col_ok)


@triton.jit
def recurrent_input(h_in, rows, cols, P: tl.constexpr, row_ok, col_ok, rd_ptr, RDROP: tl.constexpr):
    """The h_{t-1} tile (rows, cols) as it enters the recurrent product: times r/(1-p) under recurrent
    dropout."""
    h = load_2d(h_in, rows, cols, P, 1, row_ok, col_ok)
    if RDROP:
        h = h * recurrent_scale(rd_ptr, rows, cols, P, row_ok, col_ok)
    return h


@triton.jit
def zoneout_update(rows, cols, t, B, W: tl.constexpr, base, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT: tl.constexpr):
    """(len(rows), len(cols)) fp32 u: 1 where a unit takes its new value at step t, 0 where it keeps the old
    (counter base + (t*B + b)*W + j), or the expectation zo_u everywhere when ZONEOUT == 2."""
    if ZONEOUT == 1:
        counter = base + (t.to(tl.int64) * B + rows.to(tl.int64))[:, None] * W + cols[None, :]
        u = tl.where(philox_keep(counter, zo_k0, zo_k1, zo_thr), 1.0, 0.0)
    else:
        u = (rows[:, None] * 0 + cols[None, :] * 0).to(tl.float32) + zo_u
    return u


@triton.jit
def emit_state(h_new, h_prev, h_out, y_t, rows, cols, W: tl.constexpr, valid, row_ok, col_ok, t, B,
               zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT: tl.constexpr):
    """Store step t's state h (mixed with h_{t-1} under zoneout) and output y for columns `cols` of W;
    rows without step t keep h_{t-1} and output 0."""
    if ZONEOUT:
        u = zoneout_update(rows, cols, t, B, W, 0, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
        h_new = u * h_new + (1 - u) * h_prev
    store_2d(h_out, rows, cols, W, tl.where(valid, h_new, h_prev), row_ok, col_ok)
    store_2d(y_t, rows, cols, W, tl.where(valid, h_new, 0.0), row_ok, col_ok)


@triton.jit
def lstm_gates(gx_t, w_hh_ptr, h_in, rows, row_ok, hc, h_ok, H: tl.constexpr, P: tl.constexpr, FP32_DOT: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, rd_ptr, RDROP: tl.constexpr):
    """Activated gates i, f, g, o for hidden columns hc: gx_t + (h_{t-1} [* r/(1-p)]) W_hh^T, in fp32."""
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pc = p0 + tl.arange(0, BLOCK_P)
        p_ok = pc < P
        h = recurrent_input(h_in, rows, pc, P, row_ok, p_ok, rd_ptr, RDROP)
        # W_hh^T tiles (BLOCK_P, BLOCK_H) of the four gates' row blocks of w_hh (4H, P)
        acc_i = matmul_acc(h, load_2d(w_hh_ptr, pc, hc, 1, P, p_ok, h_ok), acc_i, FP32_DOT)
        acc_f = matmul_acc(h, load_2d(w_hh_ptr + H * P, pc, hc, 1, P, p_ok, h_ok), acc_f, FP32_DOT)
        acc_g = matmul_acc(h, load_2d(w_hh_ptr + 2 * H * P, pc, hc, 1, P, p_ok, h_ok), acc_g, FP32_DOT)
        acc_o = matmul_acc(h, load_2d(w_hh_ptr + 3 * H * P, pc, hc, 1, P, p_ok, h_ok), acc_o, FP32_DOT)
    i = tl.sigmoid(acc_i + load_2d(gx_t, rows, hc, 4 * H, 1, row_ok, h_ok).to(tl.float32))
    f = tl.sigmoid(acc_f + load_2d(gx_t + H, rows, hc, 4 * H, 1, row_ok, h_ok).to(tl.float32))
    g = tanh(acc_g + load_2d(gx_t + 2 * H, rows, hc, 4 * H, 1, row_ok, h_ok).to(tl.float32))
    o = tl.sigmoid(acc_o + load_2d(gx_t + 3 * H, rows, hc, 4 * H, 1, row_ok, h_ok).to(tl.float32))
    return i, f, g, o


# Runtime values a compiled kernel must not be specialised on (Triton would recompile for T == 1, for
# T % 16 == 0, for each k_begin of the stepwise mode...).
RUNTIME_ARGS = ["T", "B", "k_begin", "k_end"]
REG_ARGS = ["zo_thr"]


@triton.jit
def seed_words(seed_ptr, USED: tl.constexpr):
    """Philox key words of the seed at seed_ptr; without the regulariser seed_ptr is any buffer, never read."""
    if USED:
        k0, k1 = philox_key(seed_ptr)
    else:
        k0, k1 = 0, 0
    return k0, k1


@triton.jit
def regulariser_keys(zo_seed_ptr, ZONEOUT: tl.constexpr):
    """(zo_k0, zo_k1): the key words of sampled zoneout's seed."""
    return seed_words(zo_seed_ptr, ZONEOUT == 1)


@triton.jit(do_not_specialize=RUNTIME_ARGS + REG_ARGS)
def lstm_forward_kernel(gx_ptr, w_hh_ptr, w_hr_ptr, len_ptr, hs_ptr, cs_ptr, m_ptr, y_ptr, bar_ptr, T, B,
                        k_begin, k_end, rd_ptr, zo_seed_ptr, zo_thr, zo_u,
                        H: tl.constexpr, P: tl.constexpr,
                        HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
                        SAVE: tl.constexpr, FP32_DOT: tl.constexpr, RDROP: tl.constexpr, ZONEOUT: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                        NSPLIT: tl.constexpr, PHASES: tl.constexpr):
    rows, row_ok, lens, split = program_rows(B, len_ptr, HAS_LENGTHS, BLOCK_B)
    epoch, stuck = 1, 0
    zo_k0, zo_k1 = regulariser_keys(zo_seed_ptr, ZONEOUT)
    k = k_begin
    while k < k_end:  # see Specialisation above
        t, before, after = step_slots(k, T, REVERSE, SAVE)
        valid = valid_rows(rows, lens, t, HAS_LENGTHS)
        t64 = t.to(tl.int64)
        gx_t = gx_ptr + t64 * B * 4 * H
        y_t = y_ptr + t64 * B * P
        h_in = hs_ptr + before.to(tl.int64) * B * P
        h_out = hs_ptr + after.to(tl.int64) * B * P
        c_in = cs_ptr + before.to(tl.int64) * B * H
        c_out = cs_ptr + after.to(tl.int64) * B * H
        m_t = m_ptr + t64 * B * H if SAVE else m_ptr
        for jj in range(0, H if PHASES & 1 else 0, NSPLIT * BLOCK_H):  # this program's hidden tiles
            hc = jj + split * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            i, f, g, o = lstm_gates(gx_t, w_hh_ptr, h_in, rows, row_ok, hc, h_ok, H, P, FP32_DOT,
                                    BLOCK_B, BLOCK_H, BLOCK_P, rd_ptr, RDROP)
            c_prev = load_2d(c_in, rows, hc, H, 1, row_ok, h_ok)
            c = f * c_prev + i * g
            m = o * tanh(c)  # from the new c, before zoneout
            if ZONEOUT:
                u_c = zoneout_update(rows, hc, t, B, H, T.to(tl.int64) * B * P, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
                c = u_c * c + (1 - u_c) * c_prev
            store_2d(c_out, rows, hc, H, tl.where(valid, c, c_prev), row_ok, h_ok)
            if HAS_PROJ:
                store_2d(m_t, rows, hc, H, m, row_ok, h_ok)
            else:
                emit_state(m, load_2d(h_in, rows, hc, P, 1, row_ok, h_ok), h_out, y_t, rows, hc, P, valid, row_ok,
                           h_ok, t, B, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
        # this step's m (or h) is complete before it is read
        epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)
        if HAS_PROJ:
            for pp in range(0, P if PHASES & 2 else 0, NSPLIT * BLOCK_P):  # this program's tiles of P
                pc = pp + split * BLOCK_P + tl.arange(0, BLOCK_P)
                p_ok = pc < P
                acc = tl.zeros((BLOCK_B, BLOCK_P), tl.float32)
                for j0 in range(0, H, BLOCK_H):
                    hc = j0 + tl.arange(0, BLOCK_H)
                    h_ok = hc < H
                    m = load_2d(m_t, rows, hc, H, 1, row_ok, h_ok)
                    acc = matmul_acc(m, load_2d(w_hr_ptr, hc, pc, 1, H, h_ok, p_ok), acc, FP32_DOT)  # W_hr^T tile
                emit_state(acc, load_2d(h_in, rows, pc, P, 1, row_ok, p_ok), h_out, y_t, rows, pc, P, valid, row_ok,
                           p_ok, t, B, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
            epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)
        k += 1
    report_stuck(bar_ptr, stuck, NSPLIT, PHASES)


@triton.jit(do_not_specialize=RUNTIME_ARGS + REG_ARGS)
def lstm_backward_kernel(gx_ptr, w_hh_ptr, w_hr_ptr, len_ptr, hs_ptr, cs_ptr, dy_ptr, dh_ptr, dc_ptr, dg_ptr,
                         dhs_ptr, bar_ptr, T, B, k_begin, k_end, rd_ptr, zo_seed_ptr, zo_thr, zo_u,
                         H: tl.constexpr, P: tl.constexpr,
                         HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
                         FP32_DOT: tl.constexpr, RDROP: tl.constexpr, ZONEOUT: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
                         NSPLIT: tl.constexpr, PHASES: tl.constexpr):
    """dh (B, P) and dc (B, H) enter holding the gradients of h_n, c_n and leave holding those of h0, c0."""
    rows, row_ok, lens, split = program_rows(B, len_ptr, HAS_LENGTHS, BLOCK_B)
    epoch, stuck = 1, 0
    zo_k0, zo_k1 = regulariser_keys(zo_seed_ptr, ZONEOUT)
    k = k_begin
    while k < k_end:
        t, before, after = step_slots(T - 1 - k, T, REVERSE, True)
        valid = valid_rows(rows, lens, t, HAS_LENGTHS)
        t64 = t.to(tl.int64)
        gx_t = gx_ptr + t64 * B * 4 * H
        dg_t = dg_ptr + t64 * B * 4 * H
        dy_t = dy_ptr + t64 * B * P
        h_in = hs_ptr + before.to(tl.int64) * B * P
        c_in = cs_ptr + before.to(tl.int64) * B * H
        c_out = cs_ptr + after.to(tl.int64) * B * H
        # Phase 1, per hidden tile: gate gradients (= grad gx_t) and dc_{t-1}
        for jj in range(0, H if PHASES & 1 else 0, NSPLIT * BLOCK_H):  # this program's hidden tiles
            hc = jj + split * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            i, f, g, o = lstm_gates(gx_t, w_hh_ptr, h_in, rows, row_ok, hc, h_ok, H, P, FP32_DOT,
                                    BLOCK_B, BLOCK_H, BLOCK_P, rd_ptr, RDROP)
            if HAS_PROJ:  # dm = dh_t W_hr over all of P (dh_t times u_h under zoneout)
                dm = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
                for p0 in range(0, P, BLOCK_P):
                    pc = p0 + tl.arange(0, BLOCK_P)
                    p_ok = pc < P
                    dh = load_2d(dh_ptr, rows, pc, P, 1, row_ok, p_ok) + tl.where(
                        valid, load_2d(dy_t, rows, pc, P, 1, row_ok, p_ok).to(tl.float32), 0.0)
                    if ZONEOUT:
                        dh = dh * zoneout_update(rows, pc, t, B, P, 0, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
                    dm = matmul_acc(dh, load_2d(w_hr_ptr, pc, hc, H, 1, p_ok, h_ok), dm, FP32_DOT)
            else:
                dm = load_2d(dh_ptr, rows, hc, P, 1, row_ok, h_ok) + tl.where(
                    valid, load_2d(dy_t, rows, hc, P, 1, row_ok, h_ok).to(tl.float32), 0.0)
                if ZONEOUT:
                    dm = dm * zoneout_update(rows, hc, t, B, P, 0, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
            c_prev = load_2d(c_in, rows, hc, H, 1, row_ok, h_ok)
            dc_next = load_2d(dc_ptr, rows, hc, H, 1, row_ok, h_ok)
            if ZONEOUT:  # c_t = u_c c_new + (1 - u_c) c_{t-1}: the saved c_t is not c_new
                u_c = zoneout_update(rows, hc, t, B, H, T.to(tl.int64) * B * P, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
                tc = tanh(f * c_prev + i * g)
                dc = u_c * dc_next + dm * o * (1.0 - tc * tc)
                dc_pass = (1 - u_c) * dc_next
            else:
                tc = tanh(load_2d(c_out, rows, hc, H, 1, row_ok, h_ok))
                dc = dc_next + dm * o * (1.0 - tc * tc)
                dc_pass = 0.0
            store_2d(dg_t, rows, hc, 4 * H, tl.where(valid, dc * g * i * (1.0 - i), 0.0), row_ok, h_ok)
            store_2d(dg_t + H, rows, hc, 4 * H, tl.where(valid, dc * c_prev * f * (1.0 - f), 0.0), row_ok, h_ok)
            store_2d(dg_t + 2 * H, rows, hc, 4 * H, tl.where(valid, dc * i * (1.0 - g * g), 0.0), row_ok, h_ok)
            store_2d(dg_t + 3 * H, rows, hc, 4 * H, tl.where(valid, dm * tc * o * (1.0 - o), 0.0), row_ok, h_ok)
            store_2d(dc_ptr, rows, hc, H, tl.where(valid, dc_pass + dc * f, dc_next), row_ok, h_ok)
        epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)  # all of step t's gate gradients are written
        # Phase 2, per tile of P: dh_{t-1} = dgates_t W_hh; rows without step t pass dh through
        for pp in range(0, P if PHASES & 2 else 0, NSPLIT * BLOCK_P):  # this program's tiles of P
            pc = pp + split * BLOCK_P + tl.arange(0, BLOCK_P)
            p_ok = pc < P
            acc = tl.zeros((BLOCK_B, BLOCK_P), tl.float32)
            for j0 in range(0, H, BLOCK_H):
                hc = j0 + tl.arange(0, BLOCK_H)
                h_ok = hc < H
                for q in tl.static_range(4):
                    acc = matmul_acc(load_2d(dg_t + q * H, rows, hc, 4 * H, 1, row_ok, h_ok),
                                     load_2d(w_hh_ptr + q * H * P, hc, pc, P, 1, h_ok, p_ok), acc, FP32_DOT)
            dh = load_2d(dh_ptr, rows, pc, P, 1, row_ok, p_ok) + tl.where(
                valid, load_2d(dy_t, rows, pc, P, 1, row_ok, p_ok).to(tl.float32), 0.0)
            if RDROP:  # h_{t-1} entered the gates as h * r/(1-p)
                acc = acc * recurrent_scale(rd_ptr, rows, pc, P, row_ok, p_ok)
            if ZONEOUT:  # h_t = u h_new + (1 - u) h_{t-1}
                u_h = zoneout_update(rows, pc, t, B, P, 0, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
                acc = acc + (1 - u_h) * dh
                dh_new = u_h * dh
            else:
                dh_new = dh
            if HAS_PROJ:  # grad of the projected h_new for grad W_hr = sum_t dh_t^T m_t
                store_2d(dhs_ptr + t64 * B * P, rows, pc, P, tl.where(valid, dh_new, 0.0), row_ok, p_ok)
            store_2d(dh_ptr, rows, pc, P, tl.where(valid, acc, dh), row_ok, p_ok)
        # dh_{t-1}, dc_{t-1} are complete before step t-1 reads them
        epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)
        k += 1
    report_stuck(bar_ptr, stuck, NSPLIT, PHASES)


def split_plan(B: int, H: int, device, split=None) -> int:
    """How many programs share each block of batch rows (NSPLIT). `split` (an int), else FUSENN_RNN_SPLIT
    ("auto" or an int), else 1: the one-program-per-rows kernel. "auto" on a GPU fills the SMs: with few
    batch rows the per-step work then spreads over up to one program per SM instead of one program."""
    choice = split if split is not None else os.environ.get("FUSENN_RNN_SPLIT", "1")
    if choice != "auto":
        if not str(choice).isdigit() or int(choice) < 1:
            raise ValueError(f"FUSENN_RNN_SPLIT must be 'auto' or a positive integer, got {choice!r}")
        return int(choice)
    if device.type != "cuda":
        return 1
    return auto_split(B, H, sm_count(device))


def sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_split(B: int, H: int, sms: int) -> int:
    """FUSENN_RNN_SPLIT=auto's NSPLIT: up to one program per SM, at least 16 hidden units each."""
    return max(1, min(sms // triton.cdiv(B, BLOCK_B), triton.cdiv(H, 16)))


def hidden_block(H: int, nsplit: int, cap: int) -> int:
    """The tile of H: the widest up to `cap` alone on the rows, else about H / nsplit (so every program
    gets a tile), never under 16 (tl.dot)."""
    if nsplit == 1:
        return block_size(H, cap)
    return max(16, min(cap, triton.next_power_of_2(triton.cdiv(H, nsplit))))


def launch_split(kernel, args: tuple, T: int, B: int, nsplit: int, cooperative: bool, phases=(1, 2), **consts):
    """Run `kernel` (args, then bar_ptr, T, B, k_begin, k_end, then `consts`) over all T steps with NSPLIT
    programs per block of rows. One launch when NSPLIT == 1 or cooperative (grid barriers between phases);
    else one launch per phase in `phases` per step, the launch boundaries being the barriers (the
    interpreter's mode, since it runs programs one after another; also a GPU fallback)."""
    rows = triton.cdiv(B, BLOCK_B)
    device = args[0].device
    if nsplit == 1 or cooperative:
        if nsplit > 1:
            if INTERPRET:
                raise ValueError("the cooperative RNN kernels cannot run under the Triton interpreter")
            sms = sm_count(device)
            if rows * nsplit > sms:
                raise ValueError(f"the cooperative RNN kernels need all {rows * nsplit} programs resident, more "
                                 f"than the {sms} SMs")
        bar = barrier_buffer(rows, device) if nsplit > 1 else args[0]  # else never read
        coop = dict(launch_cooperative_grid=True) if nsplit > 1 else {}
        with device_guard(args[0]):
            kernel[(rows, nsplit)](*args, bar, T, B, 0, T, **consts, NSPLIT=nsplit, PHASES=3, **coop)
        if nsplit > 1:
            check_barriers(bar[rows:])
        return
    with device_guard(args[0]):
        for k in range(T):
            for phase in phases:
                kernel[(rows, nsplit)](*args, args[0], T, B, k, k + 1, **consts, NSPLIT=nsplit, PHASES=phase)


def barrier_buffer(rows: int, device) -> torch.Tensor:
    """int32 [one barrier counter per block of rows..., the error flag]: all zero."""
    return torch.zeros(rows + 1, dtype=torch.int32, device=device)


def check_barriers(flag: torch.Tensor) -> None:
    """Raise if a cooperative launch's programs gave up waiting at a barrier (report_stuck): its results
    are wrong. On a GPU an asynchronous device assertion queued behind the launch (no host wait, so CUDA graphs
    capture it; the host's next CUDA call raises, as for the persistent kernels' timeouts); elsewhere (the
    interpreter) it reads the flag."""
    if flag.device.type == "meta":  # nothing ran (the static report records launches on meta tensors)
        return
    if flag.device.type == "cuda":
        torch._assert_async(flag[0] == 0, "fusenn: the cooperative RNN kernel's programs were not all resident")
    elif int(flag[0]):
        raise RuntimeError("fusenn: the cooperative RNN kernel's programs were not all resident (a barrier timed "
                           "out), so its results are wrong; run without FUSENN_RNN_SPLIT")


def fp32_dot(dtype) -> str:
    """The dots' precision: fp16/bf16 on tensor cores ("none"); fp32 as cuDNN runs nn.LSTM / nn.GRU, TF32
    tensor cores when torch.backends.cudnn.allow_tf32 (torch's default) and IEEE fp32 otherwise; IEEE
    fp32 for every dtype under the interpreter (its bf16 tl.dot is wrong)."""
    if INTERPRET:
        return "ieee"
    if dtype != torch.float32:
        return "none"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def _consts(H, P, dtype, nsplit, projection: bool, backward: bool, regularised: bool, save: bool = True):
    """Tiles, warps and stages; the dots are 16 x BLOCK_H (gates), and 16 x BLOCK_P with a projection or in
    backward (phase 2). The choices are the static sm_90a report's (benchmarks/static.py): no dot
    replicated across warps, no spill at the benchmark shapes. Backward takes 64-wide tiles of P on 8
    warps, except regularised in fp16/bf16 (4 warps on 32-wide tiles, one stage); the regularised forward
    pipelines less (ptxas spills a few bytes otherwise)."""
    half = dtype != torch.float32
    block_h = hidden_block(H, nsplit, 64)
    narrow = regularised and (half or NEWER_PTXAS)  # Triton 3.8's ptxas spills fp32's 64-wide tiles too
    block_p = block_size(P, 64 if backward and not narrow else 32)
    if backward:
        stages = 1 if narrow else 2
    else:
        stages = (2 if save and half else 1) if regularised else 3
    return dict(H=H, P=P, FP32_DOT=fp32_dot(dtype), BLOCK_B=BLOCK_B, BLOCK_H=block_h, BLOCK_P=block_p,
                num_warps=dot_warps(block_h, block_p) if projection or backward else dot_warps(block_h),
                num_stages=stages)


def recurrent_scale_tensor(B: int, P: int, p: float, seed) -> torch.Tensor:
    """(B, P) fp32 r / (1 - p): recurrent dropout's time-locked mask (Philox counter b * P + k, as in
    fusenn.reference.rnn), drawn once per launch for the kernels to load with h_{t-1}."""
    from fusenn.kernels.philox import dropout_mask
    from fusenn.reference.philox import dropout_threshold

    keep = dropout_mask(torch.empty(B * P, dtype=torch.bool, device=seed.device), 0, seed, dropout_threshold(p))
    return keep.view(B, P).to(torch.float32) * (1.0 / (1.0 - p))


def regulariser_args(recurrent_dropout, zoneout, unused, B: int, P: int):
    """Kernel arguments for the regularisers: (p, seed) or None each, seeds 0-d int64 tensors on the
    kernel's device; zoneout's seed None = expectation; B, P: the shape of the recurrent state h.
    `unused` stands for an absent tensor (never read)."""
    from fusenn.reference.philox import dropout_threshold

    args = dict(rd_ptr=unused, zo_seed_ptr=unused, zo_thr=0, zo_u=1.0, RDROP=False, ZONEOUT=0)
    if recurrent_dropout is not None:
        p, seed = recurrent_dropout
        args.update(rd_ptr=recurrent_scale_tensor(B, P, p, seed), RDROP=True)
    if zoneout is not None:
        p, seed = zoneout
        if seed is None:
            args.update(zo_u=1.0 - p, ZONEOUT=2)
        else:
            args.update(zo_seed_ptr=seed, zo_thr=dropout_threshold(p), ZONEOUT=1)
    return args


def lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse: bool, save: bool, recurrent_dropout=None, zoneout=None,
                 split=None, cooperative=True):
    """gx (T, B, 4H), h0 (B, P), c0 (B, H), w_hh (4H, P), w_hr (P, H) or None, lengths (B,) int64 or None,
    all contiguous, on one device, in gx's dtype; recurrent_dropout, zoneout as in fusenn.reference.rnn;
    split, cooperative: see split_plan and _launch.
    Returns y, h_n, c_n and, for backward, the fp32 state
    buffers hs (T+1, B, P), cs (T+1, B, H) and ms (T, B, H) (None without projection) when `save`."""
    T, B, G = gx.shape
    H, P = G // 4, h0.shape[-1]
    slots = T + 1 if save else 2
    hs = new_output((slots, B, P), torch.float32, gx.device)
    cs = new_output((slots, B, H), torch.float32, gx.device)
    first = T if (save and reverse) else 0
    hs[first] = h0
    cs[first] = c0
    ms = new_output((T if save else 1, B, H), torch.float32, gx.device) if w_hr is not None else None
    y = new_output((T, B, P), gx.dtype, gx.device)
    if T and B:
        nsplit = split_plan(B, H, gx.device, split)
        launch_split(lstm_forward_kernel, (gx, w_hh, w_hr if w_hr is not None else w_hh,
                                           lengths if lengths is not None else hs, hs, cs,
                                           ms if ms is not None else hs, y),
                     T, B, nsplit, cooperative and not INTERPRET, (1, 2) if w_hr is not None else (1,),
                     **_consts(H, P, gx.dtype, nsplit, w_hr is not None, False,
                               recurrent_dropout is not None or zoneout is not None, save),
                     **regulariser_args(recurrent_dropout, zoneout, hs, B, P),
                     HAS_PROJ=w_hr is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse, SAVE=save)
    last = (0 if reverse else T) if save else T % 2
    h_n = hs[last].to(gx.dtype, copy=True)
    c_n = cs[last].to(gx.dtype, copy=True)
    return y, h_n, c_n, (hs, cs, ms) if save else None


def lstm_backward(dy, dh_n, dc_n, gx, w_hh, w_hr, lengths, reverse: bool, hs, cs, recurrent_dropout=None,
                  zoneout=None, split=None, cooperative=True):
    """Gradients through time given those of y, h_n, c_n (contiguous) and lstm_forward's saved buffers,
    with the regularisers of the forward call (their masks regenerated here).
    Returns dg (T, B, 4H) fp32 (the gradient of gx), dh0 (B, P) and dc0 (B, H) fp32, and dhs (T, B, P),
    the gradient reaching each step's projected h, with projection (else None)."""
    T, B, G = gx.shape
    P = hs.shape[-1]
    dh = dh_n.to(torch.float32, copy=True)
    dc = dc_n.to(torch.float32, copy=True)
    dg = new_output((T, B, G), torch.float32, gx.device)
    dhs = new_output((T, B, P), torch.float32, gx.device) if w_hr is not None else None
    if T and B:
        H = G // 4
        nsplit = split_plan(B, H, gx.device, split)
        launch_split(lstm_backward_kernel, (gx, w_hh, w_hr if w_hr is not None else w_hh,
                                            lengths if lengths is not None else hs, hs, cs, dy, dh, dc, dg,
                                            dhs if dhs is not None else dg),
                     T, B, nsplit, cooperative and not INTERPRET,
                     **_consts(H, P, gx.dtype, nsplit, w_hr is not None, True,
                               recurrent_dropout is not None or zoneout is not None),
                     **regulariser_args(recurrent_dropout, zoneout, hs, B, P),
                     HAS_PROJ=w_hr is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse)
    return dg, dh, dc, dhs
