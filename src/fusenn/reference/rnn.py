"""Plain PyTorch LSTM and GRU layers: the ground truth for the recurrence kernels and the CPU fallback.

One call runs one layer in one direction over a padded batch. The input projection is done by the
caller as one GEMM over all steps (gx); the layer runs the recurrence. Gate order and equations are
torch.nn's:
  LSTM: i, f, g, o = gx_t + h W_hh^T;  c = sig(f) c + sig(i) tanh(g);  h = sig(o) tanh(c)  [h = h W_hr^T]
  GRU:  r, z, n;  r = sig(gx_r + gh_r), z = sig(gx_z + gh_z), n = tanh(gx_n + r gh_n),
        h = (1 - z) n + z h,  with gh = h W_hh^T + b_hh
Sequences of unequal length (packed input) come as `lengths` (B,): batch row b runs steps
0 .. lengths[b]-1 (in reverse when `reverse`), its state is frozen after them and its outputs there are 0.
Half-precision inputs are computed in float32 and returned in their own dtype; float64 stays float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _steps(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid(lengths: Optional[Tensor], t: int, B: int, device) -> Optional[Tensor]:
    """(B, 1) bool: which rows have step t, or None when all do."""
    if lengths is None:
        return None
    return (lengths.to(device) > t).view(B, 1)


def lstm_layer(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor] = None,
               lengths: Optional[Tensor] = None, reverse: bool = False):
    """gx (T, B, 4H) with both biases added; h0 (B, P); c0 (B, H); w_hh (4H, P); w_hr (P, H) or None,
    P = proj_size or H. Returns y (T, B, P), h_n (B, P), c_n (B, H)."""
    T, B, _ = gx.shape
    dtype, ct = gx.dtype, _compute_dtype(gx)
    gx, w_hh = gx.to(ct), w_hh.to(ct)
    w_hr = w_hr.to(ct) if w_hr is not None else None
    h, c = h0.to(ct), c0.to(ct)
    ys = [None] * T
    for t in _steps(T, reverse):
        i, f, g, o = (gx[t] + h @ w_hh.t()).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        valid = _valid(lengths, t, B, gx.device)
        if valid is not None:
            c_new = torch.where(valid, c_new, c)
            ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            h_new = torch.where(valid, h_new, h)
        else:
            ys[t] = h_new
        h, c = h_new, c_new
    y = torch.stack(ys) if T else gx.new_zeros((0, B, h0.shape[-1]))
    return y.to(dtype), h.to(dtype), c.to(dtype)


def gru_layer(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, reverse: bool = False):
    """gx (T, B, 3H) with b_ih added; h0 (B, H); w_hh (3H, H); b_hh (3H,) or None.
    Returns y (T, B, H), h_n (B, H)."""
    T, B, _ = gx.shape
    dtype, ct = gx.dtype, _compute_dtype(gx)
    gx, w_hh = gx.to(ct), w_hh.to(ct)
    b_hh = b_hh.to(ct) if b_hh is not None else None
    h = h0.to(ct)
    ys = [None] * T
    for t in _steps(T, reverse):
        gh = h @ w_hh.t()
        if b_hh is not None:
            gh = gh + b_hh
        xr, xz, xn = gx[t].chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h
        valid = _valid(lengths, t, B, gx.device)
        if valid is not None:
            ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            h_new = torch.where(valid, h_new, h)
        else:
            ys[t] = h_new
        h = h_new
    y = torch.stack(ys) if T else gx.new_zeros((0, B, h0.shape[-1]))
    return y.to(dtype), h.to(dtype)
