"""Drop-in LSTM, GRU, LSTMCell and GRUCell: torch.nn's modules with the recurrence run by fusenn.

Each class overrides forward and adds from_torch / to_torch; the constructor, parameter names, shapes,
registration order, initialisation, state_dict, extra_repr and flatten_parameters are torch's own. forward keeps
torch's input layouts (padded, batch_first, unbatched, PackedSequence sorted or not) and checks; inside, every
layer and direction is one GEMM projecting the whole input (ops.rnn.input_projection: F.linear, or oneDNN's for
the C++ layers on CPU) followed by fusenn.ops.rnn's layer call, on a time-major padded batch with per-row lengths.

Why LSTM and GRU subclass nn.RNNBase, not nn.LSTM / nn.GRU: Dynamo (torch/_dynamo/variables/builder.py,
wrap_module, the same test in torch 2.11 to 2.13) refuses any module for which isinstance(m, (nn.RNN, nn.GRU,
nn.LSTM)) holds unless torch._dynamo.config.allow_rnn is set, so a subclass of nn.LSTM cannot be compiled with
fullgraph=True without a private setting. nn.RNNBase is not in that tuple (and traces whatever a later torch
defaults allow_rnn to). LSTM takes torch's own LSTM methods (get_expected_cell_size, check_forward_args,
permute_hidden; none calls super()), so all but isinstance(m, nn.LSTM) answers as torch's: isinstance(m,
nn.RNNBase), m.mode == "LSTM", flatten_parameters, _flat_weights, all_weights, state_dict, repr; fusenn.patch's
report names each swapped module where isinstance(m, nn.LSTM) no longer holds. Weighed and dropped:
- setting allow_rnn from fusenn: the flag is global and read when Dynamo meets each module, before any fusenn
  code runs, so it cannot be scoped to fusenn's modules; torch's own RNNs in the same program would be traced
  too, and on torch 2.13 a compiled torch nn.LSTM then fails in backward (aot_eager, the AOT path inductor
  takes), where without the flag it graph-breaks and works;
- a __class__ property answering nn.LSTM: isinstance consults __class__, so Dynamo's test refuses it as well,
  and pickle (torch.save of the module) refuses such an object;
- an ABC registration: nn.LSTM's metaclass is type, which has no registry; changing torch's classes is not
  fusenn's to do.
LSTMCell and GRUCell stay subclasses of nn.LSTMCell / nn.GRUCell: Dynamo traces those without a setting.
Under torch.compile, flatten_parameters (which only packs the weights for cuDNN, which fusenn never calls) is a
no-op, so a forward that calls it still traces whole on a GPU.

Regularisers (keyword-only, all off by default, active only in training mode; see _Recurrent):
dropout (torch's, between layers), input_dropout, output_dropout, variational, weight_dropout,
recurrent_dropout and zoneout.

Each forward first asks fusenn.ops.rnn.module_backend for its backend. The "torch" backend (auto's first
choice for CPU tensors) runs torch's own module forward when no fusenn regulariser is on (dropout between
layers is then torch's own), or torch's kernel layer by layer with fusenn's masks between when only
regularisers outside the recurrence are on; any other backend runs fusenn's layers as above.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fusenn.functional import dropout
from fusenn.ops import draw_seed_tensor
from fusenn.ops import rnn as ops
from fusenn.ops.dropout import dropout_mask

_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])

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


def _packed_batch(batch_sizes: Tensor, sorted_indices: Optional[Tensor]) -> int:
    """A packed input's batch size: sorted_indices' length when it has them (a shape, so torch.compile
    traces it), else batch_sizes[0] (data: under torch.compile a graph break, as in torch's own RNNs)."""
    if sorted_indices is None:
        return int(batch_sizes[0])
    batch = sorted_indices.shape[0]
    if not torch.compiler.is_compiling() and int(batch_sizes[0]) != batch:
        raise ValueError(f"PackedSequence: batch_sizes[0] is {int(batch_sizes[0])} but sorted_indices has {batch} "
                         "entries")
    return batch


def _packed_layout(batch_sizes: Tensor, batch: int, numel: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(steps, rows, lengths): packed element i is element (steps[i], rows[i]) of the time-major padded
    batch, and row b has lengths[b] steps. Every shape is static (T, batch, numel), so this traces.
    batch_sizes (kept on the host, as torch keeps it) reaches the device in one non-blocking copy and all
    three are computed there, so no layer or direction copies (and synchronises) again."""
    T = batch_sizes.shape[0]
    if batch_sizes.device != device:
        pin = device.type == "cuda" and not torch.compiler.is_compiling()
        batch_sizes = (batch_sizes.pin_memory() if pin else batch_sizes).to(device, non_blocking=True)
    steps = torch.repeat_interleave(torch.arange(T, device=device), batch_sizes, output_size=numel)
    rows = torch.arange(numel, device=device) - (torch.cumsum(batch_sizes, 0) - batch_sizes)[steps]
    lengths = (batch_sizes[:, None] > torch.arange(batch, device=device)).sum(0)
    return steps, rows, lengths


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


class _LockedDropout(torch.autograd.Function):
    """Variational dropout of x (T, B, F): one mask over (B, F), the same at every step, regenerated in
    backward from (seed, counter b*F + f) rather than stored."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p = p
        ctx.save_for_backward(seed)
        return x * _locked_scale(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        seed, = ctx.saved_tensors
        return grad * _locked_scale(grad, ctx.p, seed), None, None


def _locked_scale(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return dropout_mask(x.shape[1:], p, seed, 0, x.device).to(x.dtype) * (1.0 / (1.0 - p))


# Streams of the per-forward seed: each mask kind and layer(-direction) k gets its own Philox key.
_INPUT, _BETWEEN, _OUTPUT, _WEIGHT, _RECURRENT, _ZONEOUT = range(1, 7)
_GOLDEN, _SEEDS = 0x9E3779B97F4A7C15, 1 << 62


def _sub_seed(seed, kind: int, k: int = 0):
    """(seed + (kind * 1024 + k) * golden) mod 2**62, for an int seed or a 0-d int64 tensor alike (the per-
    forward seed is a tensor, so torch.compile traces it): the stream's step is reduced mod 2**62 in Python
    first, so with seed < 2**62 the sum stays below 2**63 and int64 computes the same value exactly."""
    return (seed + (kind * 1024 + k) * _GOLDEN % _SEEDS) % _SEEDS


class _Recurrent(_Convertible):
    """forward shared by LSTM and GRU. Hidden state travels in the class's own form (LSTM: (h, c),
    GRU: h) so torch's check_forward_args and permute_hidden apply unchanged.

    Keyword-only regularisers, all 0 / False by default (the module is then torch's exactly), applied in
    training mode only; one seed is drawn with fusenn.ops.draw_seed_tensor per forward when any is on (a
    tensor, so torch.compile traces the forward whole), and every mask kind, layer and direction derives its
    own Philox key from it (torch.manual_seed repeats a run, compiled or not):
      dropout: torch's, on each layer's output but the last;
      input_dropout: on the first layer's input; output_dropout: on the last layer's output (not on h_n);
      variational: those three masks are locked over time (one per (batch row, feature)), Gal & Ghahramani;
      weight_dropout: DropConnect on every weight_hh, one mask per forward (AWD-LSTM); the parameter is
        untouched, the layer gets mask * W / (1 - p);
      recurrent_dropout: a time-locked mask on h_{t-1} entering h W_hh^T, scaled 1/(1-p);
      zoneout (Krueger et al.): each step and unit keeps its previous h (and, in an LSTM, by a separate
        mask, c) with probability p; in eval mode the expectation h = p h_prev + (1-p) h_new, same for c.
    recurrent_dropout and zoneout run inside the recurrence (fusenn.reference.rnn's layers and the Triton
    kernels, which regenerate their masks in backward).
    """

    _config = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    _mode: str  # nn.RNNBase's mode: "LSTM" or "GRU"
    _regularisers = ("input_dropout", "output_dropout", "weight_dropout", "recurrent_dropout", "zoneout")

    def __init__(self, *args, input_dropout: float = 0.0, output_dropout: float = 0.0, variational: bool = False,
                 weight_dropout: float = 0.0, recurrent_dropout: float = 0.0, zoneout: float = 0.0, **kwargs):
        super().__init__(self._mode, *args, **kwargs)  # nn.RNNBase's, as nn.LSTM / nn.GRU call it
        for name, p in (("input_dropout", input_dropout), ("output_dropout", output_dropout),
                        ("weight_dropout", weight_dropout), ("recurrent_dropout", recurrent_dropout),
                        ("zoneout", zoneout)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} should be a number in range [0, 1], got {p!r}")
        if recurrent_dropout == 1.0:
            raise ValueError("recurrent_dropout must be below 1 (its mask is scaled by 1/(1-p))")
        self.input_dropout, self.output_dropout = float(input_dropout), float(output_dropout)
        self.variational = bool(variational)
        self.weight_dropout, self.recurrent_dropout, self.zoneout = (float(weight_dropout), float(recurrent_dropout),
                                                                     float(zoneout))

    def flatten_parameters(self) -> None:
        """torch's (it packs the weights into one buffer for cuDNN, on a GPU), except under torch.compile, where
        it does nothing: fusenn's kernels never read that buffer, and torch's version graph-breaks there."""
        if torch.compiler.is_compiling():
            return
        super().flatten_parameters()

    def extra_repr(self) -> str:
        extra = [f"{name}={getattr(self, name)}" for name in self._regularisers if getattr(self, name, 0.0)]
        if getattr(self, "variational", False):
            extra.append("variational=True")
        return ", ".join([super().extra_repr()] + extra)

    def _native(self, packed: bool) -> Optional[str]:
        """None when torch's kernels can run this forward (the "torch" backend): with no fusenn regulariser
        on, torch's own module forward; with only those outside the recurrence (input, output, between-layer,
        variational dropout, DropConnect) on padded input, torch's kernel layer by layer with fusenn's masks
        between. Else why not: recurrent dropout and zoneout live inside the recurrence."""
        inside = [n for n in ("recurrent_dropout", "zoneout") if getattr(self, n, 0.0)] if self.training else []
        if not self.training and self.zoneout:
            inside = ["zoneout (its expectation in eval mode)"]
        if inside:
            return f"fusenn-only regularisers inside the recurrence: {', '.join(inside)}"
        if packed and self._drawing():
            return "fusenn's dropout masks on a PackedSequence input"
        if self._drawing() and torch.compiler.is_compiling() and _TORCH_VERSION < (2, 13):
            return (f"torch {torch.__version__}'s Dynamo mis-traces torch's kernel layer by layer (a layer's final "
                    "state comes out one dimension too many); torch 2.13 on traces it")
        return None

    def _drawing(self) -> bool:
        """Whether this forward draws a seed for fusenn's own regularisers."""
        return self.training and any(getattr(self, n, 0.0) for n in self._regularisers)

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        backend = ops.module_backend(self.mode.lower(), input.data if packed else input, self._native(packed))
        if backend == "torch" and not self._drawing():  # torch's own forward on these parameters
            return self._torch_class.forward(self, input, hx)
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
        batch = _packed_batch(batch_sizes, sorted_indices) if batch_sizes is not None else \
            x.size(0 if self.batch_first else 1)
        if hx is None:
            hx = self._zero_hidden(batch, x)
        # torch's checks read only int(batch_sizes[0]) of a packed input: give them the batch as a shape
        self.check_forward_args(x, hx, (batch,) if batch_sizes is not None else None)
        _check_attributes(x, self._hidden_tuple(hx), [getattr(self, n) for n in self._flat_weights_names])
        # The user's hx rows follow their batch order; the packed rows are sorted by length.
        hx = self.permute_hidden(hx, sorted_indices)
        if self.mode == "LSTM" and len(hx) != 2:  # torch's kernel's check (its unbatched and permuted hx keep two)
            raise RuntimeError("lstm expects two hidden states")

        if batch_sizes is not None:
            steps, rows, lengths = _packed_layout(batch_sizes, batch, x.shape[0], x.device)
            x = x.new_zeros((batch_sizes.shape[0], batch, x.shape[-1])).index_put((steps, rows), x)
        else:
            lengths = None
            if self.batch_first:
                x = x.transpose(0, 1)
            if x.size(0) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        y, hidden = self._run_layers(x, hx, lengths, backend)

        if batch_sizes is not None:
            output = PackedSequence(y[steps, rows], batch_sizes, sorted_indices, unsorted_indices)
        else:
            output = y.transpose(0, 1) if self.batch_first else y
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                hidden = self._map_hidden(hidden, lambda t: t.squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _run_layers(self, x: Tensor, hx, lengths: Optional[Tensor], backend: Optional[str] = None):
        """x (T, B, I) time-major; returns the last layer's output (T, B, D*P) and the final states."""
        directions = 2 if self.bidirectional else 1
        states = self._hidden_tuple(hx)
        # Only with a regulariser on does forward draw a seed of its own, so the default module consumes
        # torch's generator exactly as before (dropout between layers draws its seeds itself).
        seed = draw_seed_tensor(device=x.device) if self._drawing() else None
        x = self._drop(x, self.input_dropout, seed, _INPUT)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = self._drop(x, self.dropout, seed, _BETWEEN, layer)
            ys, flat = [], []
            for direction in range(directions):
                k = layer * directions + direction
                weights = self._layer_weights(k)
                if seed is not None and self.weight_dropout:
                    w = weights["weight_hh"]  # one DropConnect mask per forward; autograd keeps it
                    mask = dropout_mask(w.shape, self.weight_dropout, _sub_seed(seed, _WEIGHT, k), 0, w.device)
                    weights["weight_hh"] = w * mask.to(w.dtype) * (1.0 / (1.0 - self.weight_dropout)) \
                        if self.weight_dropout < 1.0 else w * 0.0
                if backend == "torch":  # in torch's order: weight_ih, weight_hh, bias_ih, bias_hh, weight_hr
                    flat += [weights[name.split("_l")[0]] for name in self._all_weights[k]]
                    continue
                inside = {}
                if self.recurrent_dropout and seed is not None:
                    inside["recurrent_dropout"] = (self.recurrent_dropout, _sub_seed(seed, _RECURRENT, k))
                if self.zoneout:  # eval mode: the expectation (seed None)
                    inside["zoneout"] = (self.zoneout, _sub_seed(seed, _ZONEOUT, k) if seed is not None else None)
                y, final = self._layer(x, [s[k] for s in states], weights, lengths, reverse=direction == 1,
                                       backend=backend, **inside)
                ys.append(y)
                finals.append(final)
            if backend == "torch":  # every direction of the layer in one call of torch's kernel
                x, final = self._native_layer(x, [s[layer * directions:(layer + 1) * directions] for s in states],
                                              flat)
                finals += [tuple(f[d] for f in final) for d in range(directions)]
                continue
            x = torch.cat(ys, dim=-1) if directions == 2 else ys[0]
        x = self._drop(x, self.output_dropout, seed, _OUTPUT)
        # finals holds per (layer, direction) a tuple of states; stack each kind into (L*D, B, ·).
        return x, self._from_tuple(tuple(torch.stack(kind) for kind in zip(*finals)))

    def _drop(self, x: Tensor, p: float, seed: Optional[Tensor], kind: int, k: int = 0) -> Tensor:
        """Dropout of x (T, B, F), locked over time when `variational`. seed None means no fusenn regulariser
        is on, so only torch's between-layer dropout gets here: it runs as before, drawing its own seed."""
        if not self.training or not p:
            return x
        if seed is None:
            return dropout(x, p, True)
        if p == 1.0:
            return x * 0.0
        seed = _sub_seed(seed, kind, k)
        return _LockedDropout.apply(x, float(p), seed) if self.variational else dropout(x, p, True, seed=seed)

    def _layer_weights(self, k: int) -> dict[str, Tensor]:
        """Layer-direction k's parameters by role: weight_ih, weight_hh and, where present, bias_ih,
        bias_hh, weight_hr. Read at every call, so torch.func.functional_call's substitutes are used."""
        return {name.split("_l")[0]: getattr(self, name) for name in self._all_weights[k]}

    def _map_hidden(self, hx, fn):
        return self._from_tuple(tuple(fn(t) for t in self._hidden_tuple(hx)))


class LSTM(_Recurrent, nn.RNNBase):
    """torch.nn.LSTM with fusenn's recurrence: same arguments, parameters, inputs and outputs. An nn.RNNBase
    with mode "LSTM", not an nn.LSTM subclass, so torch.compile traces it with no setting (module docstring)."""

    _torch_class = nn.LSTM
    _mode = "LSTM"
    _config = _Recurrent._config + ("proj_size",)
    # torch's own LSTM methods (plain functions of self, no super()): c's size check, the pair's checks and
    # permutation.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

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
        return hx[0], hx[1]

    @staticmethod
    def _from_tuple(states):
        return states

    def _native_layer(self, x, state, flat):
        y, h, c = torch._VF.lstm(x, tuple(state), flat, self.bias, 1, 0.0, self.training, self.bidirectional, False)
        return y, (h, c)

    @staticmethod
    def _layer(x, state, w, lengths, reverse, recurrent_dropout=None, zoneout=None, backend=None):
        # Both biases fold into the one input GEMM; the recurrence then needs no bias.
        bias = w["bias_ih"] + w["bias_hh"] if "bias_ih" in w else None
        gx = ops.input_projection(x, w["weight_ih"], bias, backend)
        y, h, c = ops.lstm_layer(gx, state[0], state[1], w["weight_hh"], w.get("weight_hr"), lengths, reverse,
                                 recurrent_dropout=recurrent_dropout, zoneout=zoneout, backend=backend)
        return y, (h, c)


class GRU(_Recurrent, nn.RNNBase):
    """torch.nn.GRU with fusenn's recurrence: same arguments, parameters, inputs and outputs. An nn.RNNBase
    with mode "GRU", not an nn.GRU subclass (see LSTM)."""

    _torch_class = nn.GRU
    _mode = "GRU"

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:  # as nn.GRU
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__(*args, **kwargs)

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

    def _native_layer(self, x, state, flat):
        y, h = torch._VF.gru(x, state[0], flat, self.bias, 1, 0.0, self.training, self.bidirectional, False)
        return y, (h,)

    @staticmethod
    def _layer(x, state, w, lengths, reverse, recurrent_dropout=None, zoneout=None, backend=None):
        # b_hh stays inside the recurrence: the new-gate term is r * (W_hn h + b_hn).
        gx = ops.input_projection(x, w["weight_ih"], w.get("bias_ih"), backend)
        y, h = ops.gru_layer(gx, state[0], w["weight_hh"], w.get("bias_hh"), lengths, reverse,
                             recurrent_dropout=recurrent_dropout, zoneout=zoneout, backend=backend)
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


def _cell_gates(gx: Tensor, states) -> Tensor:
    """The one-step gx (1, B, G), in the type promoted from gx and the states: torch's cells combine their
    (autocast, half-precision) gate GEMMs with the fp32 state elementwise and return fp32, so under
    autocast the cell runs in the state's precision as torch's does. Without autocast a no-op."""
    dtype = gx.dtype
    for s in states:
        dtype = torch.promote_types(dtype, s.dtype)
    return gx.unsqueeze(0).to(dtype)


class LSTMCell(_Convertible, nn.LSTMCell):
    """torch.nn.LSTMCell run as a one-step fusenn LSTM layer."""

    _torch_class = nn.LSTMCell
    _config = ("input_size", "hidden_size", "bias")

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        backend = ops.module_backend("lstm", input, None)
        if backend == "torch":
            return super().forward(input, hx)
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
        elif not isinstance(hx, (tuple, list)):  # torch's kernel's checks (its unbatched hx keeps two, as ours)
            raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not "
                            f"{type(hx).__name__}")
        elif len(hx) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        _check_cell(self, input, hx)
        bias = self.bias_ih + self.bias_hh if self.bias else None
        gx = _cell_gates(F.linear(input, self.weight_ih, bias), hx)
        _, h, c = ops.lstm_layer(gx, hx[0], hx[1], self.weight_hh, backend=backend)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_Convertible, nn.GRUCell):
    """torch.nn.GRUCell run as a one-step fusenn GRU layer."""

    _torch_class = nn.GRUCell
    _config = ("input_size", "hidden_size", "bias")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        backend = ops.module_backend("gru", input, None)
        if backend == "torch":
            return super().forward(input, hx)
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
        gx = _cell_gates(F.linear(input, self.weight_ih, self.bias_ih), (hx,))
        _, h = ops.gru_layer(gx, hx, self.weight_hh, self.bias_hh, backend=backend)
        return h if batched else h.squeeze(0)
