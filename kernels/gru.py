"""Fused GRU layer: one launch runs the whole sequence forward, one launch runs it backward.

Equations, gate order (r, z, n), packed `lengths` and `reverse` are those of fusenn.reference.rnn.gru_layer.
The design, precision, GPU speed limits and split mode are the LSTM's (see fusenn.kernels.lstm, whose
tile helpers and launcher this module shares): a program per BLOCK_B batch rows loops over time inside
the kernel, tiling H, or NSPLIT programs share the rows, each taking every NSPLIT-th tile of H; h lives
in an fp32 state buffer, written and read across phase_sync.

Saved for backward: h after every step in fp32, (T+1) x B x H; backward recomputes r, z, n and
gh_n = h W_hn^T + b_hn from gx and h_{t-1}. It writes the gradient of gx (dr, dz, dn pre-activation) and
that of gh_n (dn * r, which differs from gx's n part), so grad W_hh and grad b_hh are GEMMs/sums in torch.

Regularisers: recurrent dropout scales the h_{t-1} tiles entering gh (and dh_{t-1}'s recurrent part in
backward) by the LSTM's time-locked mask; zoneout mixes h_t = u h_new + (1 - u) h_{t-1} with the LSTM's
h counters. Masks are regenerated from Philox where used, never stored.
"""

import torch
import triton
import triton.language as tl

from fusenn.kernels import INTERPRET, NEWER_PTXAS
from fusenn.kernels.lstm import (BLOCK_B, REG_ARGS, RUNTIME_ARGS, dot_warps, emit_state, fp32_dot, hidden_block,
                                 launch_split, load_2d, matmul_acc, phase_sync, program_rows, recurrent_input,
                                 recurrent_scale, regulariser_args, regulariser_keys, report_stuck, split_plan,
                                 step_slots, store_2d, tanh, valid_rows, zoneout_update)
from fusenn.ops import new_output


@triton.jit
def gru_gates(gx_t, w_hh_ptr, b_hh_ptr, h_in, rows, row_ok, hc, h_ok, H: tl.constexpr, HAS_BIAS: tl.constexpr,
              FP32_DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, rd_ptr, RDROP: tl.constexpr):
    """r, z, n and gh_n (h_{t-1} [* r/(1-p)] W_hn^T + b_hn) for hidden columns hc, in fp32."""
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        kc = k0 + tl.arange(0, BLOCK_H)
        k_ok = kc < H
        h = recurrent_input(h_in, rows, kc, H, row_ok, k_ok, rd_ptr, RDROP)
        # W_hh^T tiles (BLOCK_H, BLOCK_H) of the three gates' row blocks of w_hh (3H, H)
        acc_r = matmul_acc(h, load_2d(w_hh_ptr, kc, hc, 1, H, k_ok, h_ok), acc_r, FP32_DOT)
        acc_z = matmul_acc(h, load_2d(w_hh_ptr + H * H, kc, hc, 1, H, k_ok, h_ok), acc_z, FP32_DOT)
        acc_n = matmul_acc(h, load_2d(w_hh_ptr + 2 * H * H, kc, hc, 1, H, k_ok, h_ok), acc_n, FP32_DOT)
    if HAS_BIAS:
        acc_r += tl.load(b_hh_ptr + hc, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(b_hh_ptr + H + hc, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(b_hh_ptr + 2 * H + hc, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    r = tl.sigmoid(acc_r + load_2d(gx_t, rows, hc, 3 * H, 1, row_ok, h_ok).to(tl.float32))
    z = tl.sigmoid(acc_z + load_2d(gx_t + H, rows, hc, 3 * H, 1, row_ok, h_ok).to(tl.float32))
    n = tanh(load_2d(gx_t + 2 * H, rows, hc, 3 * H, 1, row_ok, h_ok).to(tl.float32) + r * acc_n)
    return r, z, n, acc_n


@triton.jit(do_not_specialize=RUNTIME_ARGS + REG_ARGS)
def gru_forward_kernel(gx_ptr, w_hh_ptr, b_hh_ptr, len_ptr, hs_ptr, y_ptr, bar_ptr, T, B, k_begin, k_end,
                       rd_ptr, zo_seed_ptr, zo_thr, zo_u,
                       H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
                       SAVE: tl.constexpr, FP32_DOT: tl.constexpr, RDROP: tl.constexpr, ZONEOUT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, NSPLIT: tl.constexpr, PHASES: tl.constexpr):
    rows, row_ok, lens, split = program_rows(B, len_ptr, HAS_LENGTHS, BLOCK_B)
    epoch, stuck = 1, 0
    zo_k0, zo_k1 = regulariser_keys(zo_seed_ptr, ZONEOUT)
    k = k_begin
    while k < k_end:  # a while loop: see Specialisation in fusenn.kernels.lstm
        t, before, after = step_slots(k, T, REVERSE, SAVE)
        valid = valid_rows(rows, lens, t, HAS_LENGTHS)
        gx_t = gx_ptr + t.to(tl.int64) * B * 3 * H
        y_t = y_ptr + t.to(tl.int64) * B * H
        h_in = hs_ptr + before.to(tl.int64) * B * H
        h_out = hs_ptr + after.to(tl.int64) * B * H
        for jj in range(0, H, NSPLIT * BLOCK_H):  # this program's hidden tiles
            hc = jj + split * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            r, z, n, gh_n = gru_gates(gx_t, w_hh_ptr, b_hh_ptr, h_in, rows, row_ok, hc, h_ok, H, HAS_BIAS,
                                      FP32_DOT, BLOCK_B, BLOCK_H, rd_ptr, RDROP)
            h_prev = load_2d(h_in, rows, hc, H, 1, row_ok, h_ok)
            emit_state((1.0 - z) * n + z * h_prev, h_prev, h_out, y_t, rows, hc, H, valid, row_ok, h_ok, t, B,
                       zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT)
        epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)  # h_t is complete before step t+1
        k += 1
    report_stuck(bar_ptr, stuck, NSPLIT, PHASES)


@triton.jit(do_not_specialize=RUNTIME_ARGS + REG_ARGS)
def gru_backward_kernel(gx_ptr, w_hh_ptr, b_hh_ptr, len_ptr, hs_ptr, dy_ptr, dh_ptr, dg_ptr, dghn_ptr, bar_ptr,
                        T, B, k_begin, k_end, rd_ptr, zo_seed_ptr, zo_thr, zo_u,
                        H: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                        REVERSE: tl.constexpr, FP32_DOT: tl.constexpr, RDROP: tl.constexpr, ZONEOUT: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, NSPLIT: tl.constexpr, PHASES: tl.constexpr):
    """dh (B, H) enters holding the gradient of h_n and leaves holding that of h0."""
    rows, row_ok, lens, split = program_rows(B, len_ptr, HAS_LENGTHS, BLOCK_B)
    epoch, stuck = 1, 0
    zo_k0, zo_k1 = regulariser_keys(zo_seed_ptr, ZONEOUT)
    k = k_begin
    while k < k_end:
        t, before, after = step_slots(T - 1 - k, T, REVERSE, True)
        valid = valid_rows(rows, lens, t, HAS_LENGTHS)
        t64 = t.to(tl.int64)
        gx_t = gx_ptr + t64 * B * 3 * H
        dg_t = dg_ptr + t64 * B * 3 * H
        dghn_t = dghn_ptr + t64 * B * H
        dy_t = dy_ptr + t64 * B * H
        h_in = hs_ptr + before.to(tl.int64) * B * H
        # Phase 1, per hidden tile: gate gradients, and the direct part dh_t * z of dh_{t-1} (in place:
        # this phase reads dh at its own tile only)
        for jj in range(0, H if PHASES & 1 else 0, NSPLIT * BLOCK_H):  # this program's hidden tiles
            hc = jj + split * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = hc < H
            r, z, n, gh_n = gru_gates(gx_t, w_hh_ptr, b_hh_ptr, h_in, rows, row_ok, hc, h_ok, H, HAS_BIAS,
                                      FP32_DOT, BLOCK_B, BLOCK_H, rd_ptr, RDROP)
            h_prev = load_2d(h_in, rows, hc, H, 1, row_ok, h_ok)
            dh_in = load_2d(dh_ptr, rows, hc, H, 1, row_ok, h_ok) + tl.where(
                valid, load_2d(dy_t, rows, hc, H, 1, row_ok, h_ok).to(tl.float32), 0.0)  # reaching h_t
            dh = dh_in  # reaching h_new: h_t = u h_new + (1 - u) h_{t-1} under zoneout
            if ZONEOUT:
                dh = zoneout_update(rows, hc, t, B, H, 0, zo_k0, zo_k1, zo_thr, zo_u, ZONEOUT) * dh_in
            dn = dh * (1.0 - z) * (1.0 - n * n)
            dr = dn * gh_n * r * (1.0 - r)
            dz = dh * (h_prev - n) * z * (1.0 - z)
            store_2d(dg_t, rows, hc, 3 * H, tl.where(valid, dr, 0.0), row_ok, h_ok)
            store_2d(dg_t + H, rows, hc, 3 * H, tl.where(valid, dz, 0.0), row_ok, h_ok)
            store_2d(dg_t + 2 * H, rows, hc, 3 * H, tl.where(valid, dn, 0.0), row_ok, h_ok)
            store_2d(dghn_t, rows, hc, H, tl.where(valid, dn * r, 0.0), row_ok, h_ok)
            # dh_{t-1}'s direct part: through z, and past h_new under zoneout; rows without step t pass dh on
            store_2d(dh_ptr, rows, hc, H, tl.where(valid, dh * z + (dh_in - dh), dh_in), row_ok, h_ok)
        epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)  # all of step t's gate gradients
        # Phase 2, per hidden tile: dh_{t-1} += [dr, dz, dn * r] W_hh for rows that have step t
        for pp in range(0, H if PHASES & 2 else 0, NSPLIT * BLOCK_H):  # this program's hidden tiles
            pc = pp + split * BLOCK_H + tl.arange(0, BLOCK_H)
            p_ok = pc < H
            acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            for j0 in range(0, H, BLOCK_H):
                hc = j0 + tl.arange(0, BLOCK_H)
                h_ok = hc < H
                acc = matmul_acc(load_2d(dg_t, rows, hc, 3 * H, 1, row_ok, h_ok),
                                 load_2d(w_hh_ptr, hc, pc, H, 1, h_ok, p_ok), acc, FP32_DOT)
                acc = matmul_acc(load_2d(dg_t + H, rows, hc, 3 * H, 1, row_ok, h_ok),
                                 load_2d(w_hh_ptr + H * H, hc, pc, H, 1, h_ok, p_ok), acc, FP32_DOT)
                acc = matmul_acc(load_2d(dghn_t, rows, hc, H, 1, row_ok, h_ok),
                                 load_2d(w_hh_ptr + 2 * H * H, hc, pc, H, 1, h_ok, p_ok), acc, FP32_DOT)
            if RDROP:  # h_{t-1} entered the gates as h * r/(1-p)
                acc = acc * recurrent_scale(rd_ptr, rows, pc, H, row_ok, p_ok)
            dh = load_2d(dh_ptr, rows, pc, H, 1, row_ok, p_ok)
            store_2d(dh_ptr, rows, pc, H, dh + tl.where(valid, acc, 0.0), row_ok, p_ok)
        epoch, stuck = phase_sync(bar_ptr, epoch, stuck, NSPLIT, PHASES)  # dh_{t-1} is complete before step t-1
        k += 1
    report_stuck(bar_ptr, stuck, NSPLIT, PHASES)


def _consts(gx, nsplit, backward: bool, regularised: bool, save: bool = True):
    """Tiles, warps and stages as the static sm_90a report chose them (see fusenn.kernels.lstm._consts):
    the stages at which ptxas spills nothing at the benchmark shapes."""
    H = gx.shape[-1] // 3
    block_h = hidden_block(H, nsplit, 32)
    if backward:
        stages = 1 if regularised else 3
    elif regularised and NEWER_PTXAS:
        stages = 1  # Triton 3.8's ptxas spills 8 B at two stages (H 650)
    elif NEWER_PTXAS:  # and 4-8 B at two stages in bf16 (H 256), at one or two in fp32 (H 512-2048)
        stages = 3
    else:
        stages = 2 if gx.dtype != torch.float32 or (regularised and save) else 1
    return dict(H=H, FP32_DOT=fp32_dot(gx.dtype), BLOCK_B=BLOCK_B, BLOCK_H=block_h, num_warps=dot_warps(block_h),
                num_stages=stages)


def gru_forward(gx, h0, w_hh, b_hh, lengths, reverse: bool, save: bool, recurrent_dropout=None, zoneout=None,
                split=None, cooperative=True):
    """gx (T, B, 3H), h0 (B, H), w_hh (3H, H), b_hh (3H,) or None, lengths (B,) int64 or None, all
    contiguous, on one device, in gx's dtype; recurrent_dropout, zoneout, split, cooperative as for
    fusenn.kernels.lstm.lstm_forward.
    Returns y, h_n and, when `save`, the fp32 state buffer
    hs (T+1, B, H) for backward (slot t + reverse holds the state entering step t)."""
    T, B, _ = gx.shape
    slots = T + 1 if save else 2
    hs = new_output((slots, B, h0.shape[-1]), torch.float32, gx.device)
    hs[T if (save and reverse) else 0] = h0
    y = new_output((T, B, h0.shape[-1]), gx.dtype, gx.device)
    if T and B:
        nsplit = split_plan(B, gx.shape[-1] // 3, gx.device, split)
        launch_split(gru_forward_kernel, (gx, w_hh, b_hh if b_hh is not None else w_hh,
                                          lengths if lengths is not None else hs, hs, y),
                     T, B, nsplit, cooperative and not INTERPRET, (1,),
                     **_consts(gx, nsplit, False, recurrent_dropout is not None or zoneout is not None, save),
                     **regulariser_args(recurrent_dropout, zoneout, hs, B, h0.shape[-1]),
                     HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse, SAVE=save)
    last = (0 if reverse else T) if save else T % 2
    return y, hs[last].to(gx.dtype, copy=True), hs if save else None


def gru_backward(dy, dh_n, gx, w_hh, b_hh, lengths, reverse: bool, hs, recurrent_dropout=None, zoneout=None,
                 split=None, cooperative=True):
    """Gradients through time given those of y and h_n (contiguous) and gru_forward's saved buffer.
    Returns dg (T, B, 3H) fp32 (the gradient of gx), dghn (T, B, H) fp32 (that of h W_hn^T + b_hn) and
    dh0 (B, H) fp32."""
    T, B, G = gx.shape
    dh = dh_n.to(torch.float32, copy=True)
    dg = new_output((T, B, G), torch.float32, gx.device)
    dghn = new_output((T, B, G // 3), torch.float32, gx.device)
    if T and B:
        nsplit = split_plan(B, G // 3, gx.device, split)
        launch_split(gru_backward_kernel, (gx, w_hh, b_hh if b_hh is not None else w_hh,
                                           lengths if lengths is not None else hs, hs, dy, dh, dg, dghn),
                     T, B, nsplit, cooperative and not INTERPRET,
                     **_consts(gx, nsplit, True, recurrent_dropout is not None or zoneout is not None),
                     **regulariser_args(recurrent_dropout, zoneout, hs, B, G // 3),
                     HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse)
    return dg, dghn, dh
