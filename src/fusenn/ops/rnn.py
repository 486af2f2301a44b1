"""LSTM and GRU layers: one layer, one direction, over a padded batch; the choice of backend.

`lstm_layer` / `gru_layer` take the signature of fusenn.reference.rnn's functions (see there for the
equations and the meaning of `lengths` and `reverse`) and return the same results. The modules in
fusenn.nn.rnn call them once per layer and direction after projecting the input with one GEMM.

The Triton path (fusenn.kernels.lstm / .gru) runs the recurrence forward in one launch and backward in
one launch; the weight gradients are then one GEMM each over all T*B rows here. It runs in gx's dtype:
h0, c0 and the weights are cast to it first (differentiably), so a module under torch.autocast, whose
gx comes out of the input GEMM in half precision, gets a half-precision recurrence with fp32 state and
fp32 gradients for its fp32 weights.

`lstm_layer` also takes the reference's recurrent_dropout=(p, seed) and zoneout=(p, seed or None); the
Triton kernels regenerate those masks from Philox in forward and backward, so nothing extra is saved.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fusenn import dispatch
from fusenn.ops.dropout import dropout_mask
from fusenn.reference import rnn as reference

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_reason(gx: Tensor, *_) -> Optional[str]:
    if gx.dtype not in _TRITON_DTYPES:
        return f"the Triton RNN kernels take float16, bfloat16 or float32 inputs, got {gx.dtype}"
    return None


# Backends that implement the layers, each mapped to a function giving the reason it cannot take
# particular inputs (None when it can).
LSTM_SUPPORT = {"reference": lambda *args: None, "triton": _triton_reason}
GRU_SUPPORT = {"reference": lambda *args: None, "triton": _triton_reason}


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _lengths(lengths: Optional[Tensor], device) -> Optional[Tensor]:
    return lengths.to(device=device, dtype=torch.int64).contiguous() if lengths is not None else None


def _grad_matmul(grad_rows: Tensor, inputs: Tensor, dtype) -> Tensor:
    """sum over all T*B rows of grad_row^T input_row, in fp32: the weight gradient of a per-step GEMM.
    Autocast is off here: backward may run inside the caller's autocast region."""
    with torch.autocast(grad_rows.device.type, enabled=False):
        return (grad_rows.reshape(-1, grad_rows.shape[-1]).t() @ inputs.reshape(-1, inputs.shape[-1])).to(dtype)


class _TritonLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, h0, c0, w_hh, w_hr, lengths, reverse, recurrent_dropout=None, zoneout=None):
        from fusenn.kernels import lstm as kernels

        gx, h0, c0, w_hh, w_hr = _contiguous(gx, h0, c0, w_hh, w_hr)
        save = any(ctx.needs_input_grad[:5])
        y, h_n, c_n, states = kernels.lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, save,
                                                   recurrent_dropout, zoneout)
        if save:
            hs, cs, ms = states
            ctx.save_for_backward(gx, w_hh, w_hr, lengths, hs, cs, ms)
            ctx.reverse = reverse
            ctx.recurrent_dropout, ctx.zoneout = recurrent_dropout, zoneout
        return y, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        from fusenn.kernels import lstm as kernels

        gx, w_hh, w_hr, lengths, hs, cs, ms = ctx.saved_tensors
        dy, dh_n, dc_n = _contiguous(dy, dh_n, dc_n)
        dg, dh0, dc0, dhs = kernels.lstm_backward(dy, dh_n, dc_n, gx, w_hh, w_hr, lengths, ctx.reverse, hs, cs,
                                                  ctx.recurrent_dropout, ctx.zoneout)
        needs = ctx.needs_input_grad
        T, rev = gx.shape[0], int(ctx.reverse)
        grad_w_hh = None
        if needs[3]:
            h_prev = hs[rev:T + rev]  # the states entering each step
            if ctx.recurrent_dropout is not None:  # as they entered the product: times r/(1-p), regenerated
                p, seed = ctx.recurrent_dropout
                h_prev = h_prev * (dropout_mask(h_prev.shape[1:], p, seed, 0, h_prev.device).to(h_prev.dtype)
                                   * (1.0 / (1.0 - p)))
            grad_w_hh = _grad_matmul(dg, h_prev, w_hh.dtype)
        grad_w_hr = _grad_matmul(dhs, ms, w_hr.dtype) if w_hr is not None and needs[4] else None
        return (dg.to(gx.dtype) if needs[0] else None, dh0.to(gx.dtype) if needs[1] else None,
                dc0.to(gx.dtype) if needs[2] else None, grad_w_hh, grad_w_hr, None, None, None, None)


class _TritonGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, h0, w_hh, b_hh, lengths, reverse):
        from fusenn.kernels import gru as kernels

        gx, h0, w_hh, b_hh = _contiguous(gx, h0, w_hh, b_hh)
        save = any(ctx.needs_input_grad[:4])
        y, h_n, hs = kernels.gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, save)
        if save:
            ctx.save_for_backward(gx, w_hh, b_hh, lengths, hs)
            ctx.reverse = reverse
        return y, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        from fusenn.kernels import gru as kernels

        gx, w_hh, b_hh, lengths, hs = ctx.saved_tensors
        dy, dh_n = _contiguous(dy, dh_n)
        dg, dghn, dh0 = kernels.gru_backward(dy, dh_n, gx, w_hh, b_hh, lengths, ctx.reverse, hs)
        needs = ctx.needs_input_grad
        T, H, rev = gx.shape[0], w_hh.shape[-1], int(ctx.reverse)
        grad_w_hh = grad_b_hh = None
        if needs[2]:  # gh = h W_hh^T + b_hh gets [dr, dz] from gx's gradient and dn * r for its n part
            h_prev = hs[rev:T + rev]
            grad_w_hh = torch.cat([_grad_matmul(dg[..., :2 * H], h_prev, w_hh.dtype),
                                   _grad_matmul(dghn, h_prev, w_hh.dtype)])
        if b_hh is not None and needs[3]:
            grad_b_hh = torch.cat([dg[..., :2 * H].sum((0, 1)), dghn.sum((0, 1))]).to(b_hh.dtype)
        return (dg.to(gx.dtype) if needs[0] else None, dh0.to(gx.dtype) if needs[1] else None, grad_w_hh, grad_b_hh,
                None, None)


def _check_regularisers(recurrent_dropout, zoneout):
    # recurrent dropout scales by 1/(1-p), so p = 1 is out; zoneout p = 1 just freezes the state
    if recurrent_dropout is not None and not 0.0 <= recurrent_dropout[0] < 1.0:
        raise ValueError(f"recurrent_dropout probability must be in [0, 1), got {recurrent_dropout[0]}")
    if zoneout is not None and not 0.0 <= zoneout[0] <= 1.0:
        raise ValueError(f"zoneout probability must be in [0, 1], got {zoneout[0]}")


def lstm_layer(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor] = None,
               lengths: Optional[Tensor] = None, reverse: bool = False,
               recurrent_dropout: Optional[tuple[float, int]] = None,
               zoneout: Optional[tuple[float, Optional[int]]] = None):
    _check_regularisers(recurrent_dropout, zoneout)
    reasons = {name: why(gx, h0, w_hh, w_hr) for name, why in LSTM_SUPPORT.items()}
    name = dispatch.choose("lstm", gx.device, reasons)
    if name == "reference":
        return reference.lstm_layer(gx, h0, c0, w_hh, w_hr, lengths, reverse, recurrent_dropout, zoneout)
    if name == "triton":
        dtype = gx.dtype
        return _TritonLSTM.apply(gx, h0.to(dtype), c0.to(dtype), w_hh.to(dtype),
                                 w_hr.to(dtype) if w_hr is not None else None, _lengths(lengths, gx.device),
                                 bool(reverse), recurrent_dropout, zoneout)
    raise AssertionError(name)


def gru_layer(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, reverse: bool = False):
    reasons = {name: why(gx, h0, w_hh, b_hh) for name, why in GRU_SUPPORT.items()}
    name = dispatch.choose("gru", gx.device, reasons)
    if name == "reference":
        return reference.gru_layer(gx, h0, w_hh, b_hh, lengths, reverse)
    if name == "triton":
        dtype = gx.dtype
        return _TritonGRU.apply(gx, h0.to(dtype), w_hh.to(dtype), b_hh.to(dtype) if b_hh is not None else None,
                                _lengths(lengths, gx.device), bool(reverse))
    raise AssertionError(name)
