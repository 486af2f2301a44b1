"""LSTM and GRU layers: one layer, one direction, over a padded batch; the choice of backend.

`lstm_layer` / `gru_layer` take the signature of fusenn.reference.rnn's functions (see there for the
equations and the meaning of `lengths` and `reverse`) and return the same results. The modules in
fusenn.nn.rnn call them once per layer and direction after projecting the input with one GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusenn import dispatch
from fusenn.reference import rnn as reference

# Backends that implement the layers, each mapped to a function giving the reason it cannot take
# particular inputs (None when it can). The Triton entries are added with the kernels.
LSTM_SUPPORT = {"reference": lambda *args: None}
GRU_SUPPORT = {"reference": lambda *args: None}


def lstm_layer(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor] = None,
               lengths: Optional[Tensor] = None, reverse: bool = False):
    reasons = {name: why(gx, h0, w_hh, w_hr) for name, why in LSTM_SUPPORT.items()}
    name = dispatch.choose("lstm", gx.device, reasons)
    if name == "reference":
        return reference.lstm_layer(gx, h0, c0, w_hh, w_hr, lengths, reverse)
    raise AssertionError(name)


def gru_layer(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, reverse: bool = False):
    reasons = {name: why(gx, h0, w_hh, b_hh) for name, why in GRU_SUPPORT.items()}
    name = dispatch.choose("gru", gx.device, reasons)
    if name == "reference":
        return reference.gru_layer(gx, h0, w_hh, b_hh, lengths, reverse)
    raise AssertionError(name)
