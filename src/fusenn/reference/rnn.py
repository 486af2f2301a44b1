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

Regularisers inside the recurrence (both optional, masks from fusenn.reference.philox by coordinates,
so the kernels regenerate the same ones in forward and backward instead of storing them); the GRU takes
both too, with zoneout on h only:
  recurrent_dropout=(p, seed): h_{t-1} enters h W_hh^T as h * r / (1 - p), r a time-locked mask over
    (row b, unit k) with counter b*P + k (Gal & Ghahramani style, on the recurrent product only).
  zoneout=(p, seed) (Krueger et al.): at each step each unit keeps its previous value with probability p,
    separate masks for h and c: h_t = u * h_new + (1 - u) * h_{t-1}, u = 1 where the element is kept by
    Philox (probability 1 - p); h's element (t, b, j) uses counter (t*B + b)*P + j, c's uses
    T*B*P + (t*B + b)*H + j (same seed, after h's counters). y_t is the zoned h_t.
  zoneout=(p, None): the expectation, u = 1 - p everywhere (eval mode).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusenn.reference.philox import dropout_mask


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _steps(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid(lengths: Optional[Tensor], t: int, B: int, device) -> Optional[Tensor]:
    """(B, 1) bool: which rows have step t, or None when all do."""
    if lengths is None:
        return None
    return (lengths.to(device) > t).view(B, 1)


def _zone(p: float, seed: Optional[int], T: int, B: int, W: int, offset: int, device, dtype) -> Tensor:
    """(T, B, W): 1 where a unit takes its new value, 0 where it keeps the previous (counters offset +
    (t*B + b)*W + j), or the expectation 1 - p everywhere when seed is None."""
    if seed is None:
        return torch.full((T, B, W), 1.0 - p, dtype=dtype, device=device)
    return dropout_mask(T * B * W, p, seed, offset, device).view(T, B, W).to(dtype)


def zoneout_update(p: float, seed: Optional[int], T: int, B: int, H: int, P: int, device, dtype):
    """(u_h (T, B, P), u_c (T, B, H)) of the LSTM. See the module docstring for the counters."""
    return _zone(p, seed, T, B, P, 0, device, dtype), _zone(p, seed, T, B, H, T * B * P, device, dtype)


def _recurrent_scale(recurrent_dropout, B: int, P: int, device, dtype) -> Optional[Tensor]:
    """(B, P) r / (1 - p), time-locked, or None; times the scale rounded to dtype once, as the kernels do,
    so both agree bit for bit."""
    if recurrent_dropout is None:
        return None
    p, seed = recurrent_dropout
    return dropout_mask(B * P, p, seed, 0, device).view(B, P).to(dtype) * (1.0 / (1.0 - p))


def lstm_layer(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor] = None,
               lengths: Optional[Tensor] = None, reverse: bool = False,
               recurrent_dropout: Optional[tuple[float, int]] = None,
               zoneout: Optional[tuple[float, Optional[int]]] = None):
    """gx (T, B, 4H) with both biases added; h0 (B, P); c0 (B, H); w_hh (4H, P); w_hr (P, H) or None,
    P = proj_size or H; recurrent_dropout, zoneout: see the module docstring.
    Returns y (T, B, P), h_n (B, P), c_n (B, H)."""
    T, B, _ = gx.shape
    H, P = gx.shape[-1] // 4, h0.shape[-1]
    dtype, ct = gx.dtype, _compute_dtype(gx)
    gx, w_hh = gx.to(ct), w_hh.to(ct)
    w_hr = w_hr.to(ct) if w_hr is not None else None
    h, c = h0.to(ct), c0.to(ct)
    r = _recurrent_scale(recurrent_dropout, B, P, gx.device, ct)
    u_h = u_c = None
    if zoneout is not None:
        u_h, u_c = zoneout_update(zoneout[0], zoneout[1], T, B, H, P, gx.device, ct)
    ys = [None] * T
    for t in _steps(T, reverse):
        i, f, g, o = (gx[t] + (h if r is None else h * r) @ w_hh.t()).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if u_h is not None:  # h_new above used the new c, as in Krueger et al.
            h_new = u_h[t] * h_new + (1 - u_h[t]) * h
            c_new = u_c[t] * c_new + (1 - u_c[t]) * c
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
              lengths: Optional[Tensor] = None, reverse: bool = False,
              recurrent_dropout: Optional[tuple[float, int]] = None,
              zoneout: Optional[tuple[float, Optional[int]]] = None):
    """gx (T, B, 3H) with b_ih added; h0 (B, H); w_hh (3H, H); b_hh (3H,) or None; recurrent_dropout and
    zoneout as the LSTM's (zoneout on h only, with h's counters). Returns y (T, B, H), h_n (B, H)."""
    T, B, _ = gx.shape
    H = h0.shape[-1]
    dtype, ct = gx.dtype, _compute_dtype(gx)
    gx, w_hh = gx.to(ct), w_hh.to(ct)
    b_hh = b_hh.to(ct) if b_hh is not None else None
    h = h0.to(ct)
    rd = _recurrent_scale(recurrent_dropout, B, H, gx.device, ct)
    u = _zone(zoneout[0], zoneout[1], T, B, H, 0, gx.device, ct) if zoneout is not None else None
    ys = [None] * T
    for t in _steps(T, reverse):
        gh = (h if rd is None else h * rd) @ w_hh.t()
        if b_hh is not None:
            gh = gh + b_hh
        xr, xz, xn = gx[t].chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h
        if u is not None:
            h_new = u[t] * h_new + (1 - u[t]) * h
        valid = _valid(lengths, t, B, gx.device)
        if valid is not None:
            ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            h_new = torch.where(valid, h_new, h)
        else:
            ys[t] = h_new
        h = h_new
    y = torch.stack(ys) if T else gx.new_zeros((0, B, h0.shape[-1]))
    return y.to(dtype), h.to(dtype)
