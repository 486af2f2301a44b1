"""Drop-in LSTM, GRU, LSTMCell and GRUCell: torch.nn's modules with the recurrence run by fusenn.

Each class subclasses its torch.nn twin, overrides forward and adds from_torch / to_torch; the
constructor, parameter names, shapes, registration order, initialisation, state_dict, extra_repr and
flatten_parameters are torch's own, and isinstance(fusenn.LSTM(...), nn.LSTM) holds. forward keeps torch's input layouts
(padded, batch_first, unbatched, PackedSequence sorted or not) and checks; inside, every layer and
direction is one GEMM projecting the whole input (F.linear) followed by fusenn.ops.rnn's layer call,
on a time-major padded batch with per-row lengths.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fusenn.functional import dropout
from fusenn.ops import rnn as ops

__all__ = ["GRU", "LSTM", "GRUCell", "LSTMCell"]


def _check_attributes(input: Tensor, hiddens, params) -> None:
    """Device agreement, and the hidden state's dtype, in the words of torch's RNN kernels (aten RNN.cpp
    check_attributes). Parameter dtypes are left to check_input / F.linear, which autocast relaxes."""
    for kind, tensors in (("hidden", hiddens), ("parameter", params)):
        for t in tensors:
            if t is None:
                continue
            if t.device != input.device:
                raise RuntimeError(f"Input and {kind} tensors are not at the same device, found input tensor at "
                                   f"{input.device} and {kind} tensor at {t.device}")
            if kind == "hidden" and t.dtype != input.dtype:
                raise RuntimeError(f"Input and {kind} tensors are not the same dtype, found input tensor with "
                                   f"{input.dtype} and {kind} tensor with {t.dtype}")


def _packed_cells(batch_sizes: Tensor, device) -> Tensor:
    """(T, B) bool: the (step, row) cells a packed batch holds. Its row-major order is the packed order,
    so padded[mask] packs and a masked index_put unpacks."""
    rows = torch.arange(int(batch_sizes[0]))
    return (rows[None, :] < batch_sizes[:, None]).to(device)


class _Convertible:
    """from_torch / to_torch: a twin built from the constructor arguments (so arguments fusenn adds get
    their defaults), on the meta device to spare the RNG, then given the original's weights."""

    _torch_class: type
    _config: tuple[str, ...]

    @classmethod
    def from_torch(cls, module: nn.Module):
        if not isinstance(module, cls._torch_class):
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls._torch_class.__name__}, "
                            f"got {type(module).__name__}")
        return _twin(module, cls, cls._config)

    def to_torch(self) -> nn.Module:
        return _twin(self, self._torch_class, self._config)


def _twin(module: nn.Module, cls: type, config: tuple[str, ...]) -> nn.Module:
    like = next(module.parameters())
    twin = cls(**{name: getattr(module, name) for name in config}, device="meta", dtype=like.dtype)
    twin = twin.to_empty(device=like.device)
    twin.load_state_dict(module.state_dict())
    for mine, theirs in zip(twin.parameters(), module.parameters()):
        mine.requires_grad_(theirs.requires_grad)
    return twin.train(module.training)


class _Recurrent(_Convertible):
    """forward shared by LSTM and GRU. Hidden state travels in the class's own form (LSTM: (h, c),
    GRU: h) so torch's check_forward_args and permute_hidden apply unchanged."""

    _config = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batch_sizes = sorted_indices = unsorted_indices = None
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                self._check_hidden_dims(hx, batched)
                if not batched:
                    hx = self._map_hidden(hx, lambda t: t.unsqueeze(1))
        if hx is None:
            batch = int(batch_sizes[0]) if batch_sizes is not None else x.size(0 if self.batch_first else 1)
            hx = self._zero_hidden(batch, x)
        self.check_forward_args(x, hx, batch_sizes)
        _check_attributes(x, self._hidden_tuple(hx), [getattr(self, n) for n in self._flat_weights_names])
        # The user's hx rows follow their batch order; the packed rows are sorted by length.
        hx = self.permute_hidden(hx, sorted_indices)

        if batch_sizes is not None:
            cells = _packed_cells(batch_sizes, x.device)
            lengths = cells.sum(0)
            x = x.new_zeros(cells.shape + x.shape[-1:]).index_put((cells,), x)
        else:
            lengths = None
            if self.batch_first:
                x = x.transpose(0, 1)
            if x.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        y, hidden = self._run_layers(x, hx, lengths)

        if batch_sizes is not None:
            output = PackedSequence(y[cells], batch_sizes, sorted_indices, unsorted_indices)
        else:
            output = y.transpose(0, 1) if self.batch_first else y
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                hidden = self._map_hidden(hidden, lambda t: t.squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _run_layers(self, x: Tensor, hx, lengths: Optional[Tensor]):
        """x (T, B, I) time-major; returns the last layer's output (T, B, D*P) and the final states."""
        directions = 2 if self.bidirectional else 1
        states = self._hidden_tuple(hx)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = dropout(x, self.dropout, self.training)
            ys = []
            for direction in range(directions):
                k = layer * directions + direction
                y, final = self._layer(x, [s[k] for s in states], self._layer_weights(k), lengths,
                                       reverse=direction == 1)
                ys.append(y)
                finals.append(final)
            x = torch.cat(ys, dim=-1) if directions == 2 else ys[0]
        # finals holds per (layer, direction) a tuple of states; stack each kind into (L*D, B, ·).
        return x, self._from_tuple(tuple(torch.stack(kind) for kind in zip(*finals)))

    def _layer_weights(self, k: int) -> dict[str, Tensor]:
        """Layer-direction k's parameters by role: weight_ih, weight_hh and, where present, bias_ih,
        bias_hh, weight_hr. Read at every call, so torch.func.functional_call's substitutes are used."""
        return {name.split("_l")[0]: getattr(self, name) for name in self._all_weights[k]}

    def _map_hidden(self, hx, fn):
        return self._from_tuple(tuple(fn(t) for t in self._hidden_tuple(hx)))


class LSTM(_Recurrent, nn.LSTM):
    """torch.nn.LSTM with fusenn's recurrence: same arguments, parameters, inputs and outputs."""

    _torch_class = nn.LSTM
    _config = _Recurrent._config + ("proj_size",)

    def _zero_hidden(self, batch: int, x: Tensor):
        n = self.num_layers * (2 if self.bidirectional else 1)
        h = x.new_zeros((n, batch, self.proj_size or self.hidden_size))
        return h, x.new_zeros((n, batch, self.hidden_size))

    def _check_hidden_dims(self, hx, batched: bool) -> None:
        want = 3 if batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")

    @staticmethod
    def _hidden_tuple(hx):
        return tuple(hx)

    @staticmethod
    def _from_tuple(states):
        return states

    @staticmethod
    def _layer(x, state, w, lengths, reverse):
        # Both biases fold into the one input GEMM; the recurrence then needs no bias.
        bias = w["bias_ih"] + w["bias_hh"] if "bias_ih" in w else None
        gx = F.linear(x, w["weight_ih"], bias)
        y, h, c = ops.lstm_layer(gx, state[0], state[1], w["weight_hh"], w.get("weight_hr"), lengths, reverse)
        return y, (h, c)


class GRU(_Recurrent, nn.GRU):
    """torch.nn.GRU with fusenn's recurrence: same arguments, parameters, inputs and outputs."""

    _torch_class = nn.GRU

    def _zero_hidden(self, batch: int, x: Tensor):
        return x.new_zeros((self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size))

    def _check_hidden_dims(self, hx, batched: bool) -> None:
        want = 3 if batched else 2
        if hx.dim() != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")

    @staticmethod
    def _hidden_tuple(hx):
        return (hx,)

    @staticmethod
    def _from_tuple(states):
        return states[0]

    @staticmethod
    def _layer(x, state, w, lengths, reverse):
        # b_hh stays inside the recurrence: the new-gate term is r * (W_hn h + b_hn).
        gx = F.linear(x, w["weight_ih"], w.get("bias_ih"))
        y, h = ops.gru_layer(gx, state[0], w["weight_hh"], w.get("bias_hh"), lengths, reverse)
        return y, (h,)


def _check_cell(cell, input: Tensor, states) -> None:
    """torch's rnn-cell checks (aten RNN.cpp), on batched input and states."""
    if input.size(1) != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {cell.input_size}")
    for i, h in enumerate(states):
        if h.size(0) != input.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} batch size {h.size(0)}")
        if h.size(1) != cell.hidden_size:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {h.size(1)}, expected {cell.hidden_size}")
    _check_attributes(input, states, [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh])


class LSTMCell(_Convertible, nn.LSTMCell):
    """torch.nn.LSTMCell run as a one-step fusenn LSTM layer."""

    _torch_class = nn.LSTMCell
    _config = ("input_size", "hidden_size", "bias")

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for i, t in enumerate(hx):
                if t.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{i}] to be 1D or 2D, got {t.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros((input.size(0), self.hidden_size))
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        _check_cell(self, input, hx)
        bias = self.bias_ih + self.bias_hh if self.bias else None
        gx = F.linear(input, self.weight_ih, bias).unsqueeze(0)
        _, h, c = ops.lstm_layer(gx, hx[0], hx[1], self.weight_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_Convertible, nn.GRUCell):
    """torch.nn.GRUCell run as a one-step fusenn GRU layer."""

    _torch_class = nn.GRUCell
    _config = ("input_size", "hidden_size", "bias")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = input.new_zeros((input.size(0), self.hidden_size))
        elif not batched:
            hx = hx.unsqueeze(0)
        _check_cell(self, input, (hx,))
        gx = F.linear(input, self.weight_ih, self.bias_ih).unsqueeze(0)
        _, h = ops.gru_layer(gx, hx, self.weight_hh, self.bias_hh)
        return h if batched else h.squeeze(0)
