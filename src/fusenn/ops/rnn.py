"""LSTM and GRU layers: one layer, one direction, over a padded batch; the choice of backend.

`lstm_layer` / `gru_layer` take the signature of fusenn.reference.rnn's functions (see there for the
equations and the meaning of `lengths` and `reverse`) and return the same results. The modules in
fusenn.nn.rnn call them once per layer and direction after projecting the input with one GEMM.

The Triton path (fusenn.kernels.lstm / .gru) runs the recurrence forward in one launch and backward in
one launch; the weight gradients are then one GEMM each over all T*B rows here. It runs in gx's dtype:
h0, c0 and the weights are cast to it first (differentiably), so a module under torch.autocast, whose
gx comes out of the input GEMM in half precision, gets a half-precision recurrence with fp32 state and
fp32 gradients for its fp32 weights.

The Triton path is the torch.library ops fusenn::lstm_layer_forward / _backward and gru_layer_forward /
_backward (register_fake, register_autograd), so torch.compile(fullgraph=True) traces it; eagerly the
layers call them through setup_context-style autograd.Functions so torch.func.grad / vmap work too. The
backward ops are not differentiable: a double backward raises.

`lstm_layer` also takes the reference's recurrent_dropout=(p, seed) and zoneout=(p, seed or None), each
seed a Python int or a 0-d integer tensor; the Triton kernels regenerate those masks from Philox in forward
and backward, so nothing extra is saved. The seeds reach the ops as 0-d int64 tensors on gx's device and the
kernels read them from memory, so a module whose seeds are drawn per forward (fusenn.nn.rnn) traces without
a graph break and a CUDA-graph replay draws fresh masks.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fusenn import dispatch
from fusenn.ops import no_double_backward, once_differentiable, seed_tensor, setup_nothing
from fusenn.ops.dropout import dropout_mask
from fusenn.reference import rnn as reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    from torch.fx.experimental.symbolic_shapes import guard_or_false
except ImportError:  # older torch: shapes are concrete where the layers are traced
    def guard_or_false(condition):
        return bool(condition)


def _kernel_reason(kind: str):
    def reason(gx: Tensor, *_) -> Optional[str]:
        if gx.dtype not in _KERNEL_DTYPES:
            return f"the {kind} RNN kernels take float16, bfloat16 or float32 inputs, got {gx.dtype}"
        return None
    return reason


# The persistent C++ layers (csrc/rnn_persist.cuh) keep W_hh on chip; past this batch every CTA stages all of h_{t-1}
# and multiplies its slice in rounds of up to 4 batch tiles each step, on one SM's tensor cores, while the per-step
# GEMM scheme spreads B x gates H over the GPU: that should win (until GPU timings say otherwise).
PERSIST_MAX_BATCH = 128
_PERSIST_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc's Dtype


_PERSIST_REASONS: dict[tuple, str] = {}


@torch.compiler.assume_constant_result  # torch.compile bakes the answer in, as for dispatch.choose
def _persist_plan_reason(device: int, dtype: int, gates: int, H: int, P: int, training: bool) -> str:
    """The launcher's reason (csrc/rnn_persist.cu) it cannot take hidden_size H (and proj_size P, 0: none), or '';
    '' when fusenn_cuda's ops are not loaded (then the backend itself is unusable and says so). Cached per
    argument tuple."""
    key = (device, dtype, gates, H, P, training)
    if key not in _PERSIST_REASONS:
        try:
            reason = torch.ops.fusenn_cuda.persist_reason
        except (AttributeError, RuntimeError):
            return ""
        _PERSIST_REASONS[key] = reason(device, dtype, gates, False, H, 0, P) or (
            reason(device, dtype, gates, True, H, 0, P) if training else "")
    return _PERSIST_REASONS[key]


def _persist_reason(gates: int):
    def reason(gx: Tensor, h0: Tensor, w_hh: Tensor, extra) -> Optional[str]:
        why = _kernel_reason("persistent C++")(gx)
        if why:
            return why
        if torch.jit.is_tracing():  # sizes are traced tensors, and the plan's op returns a str the tracer cannot record
            return "its launch plan is not traceable by torch.jit.trace"
        if guard_or_false(gx.shape[1] > PERSIST_MAX_BATCH):  # packed input traced: a data-dependent batch
            return f"batch {gx.shape[1]} > {PERSIST_MAX_BATCH}, where the per-step GEMM scheme is expected to win"
        device = -1 if gx.device.type != "cuda" else torch.cuda.current_device() if gx.device.index is None \
            else gx.device.index
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gx, h0, w_hh, extra))
        H = int(gx.shape[-1]) // gates
        P = int(extra.shape[0]) if gates == 4 and extra is not None else 0  # the LSTM's w_hr: (proj_size, H)
        return _persist_plan_reason(device, _PERSIST_DTYPES[gx.dtype], gates, H, P, training) or None
    return reason


# Backends that implement the layers, each mapped to a function giving the reason it cannot take
# particular inputs (None when it can).
LSTM_SUPPORT = {"reference": lambda *args: None, "triton": _kernel_reason("Triton"), "cuda": _kernel_reason("C++"),
                "persistent": _persist_reason(4), "cpp": _kernel_reason("C++")}
GRU_SUPPORT = dict(LSTM_SUPPORT, persistent=_persist_reason(3))
# On a GPU under `auto`: the persistent C++ layers (W_hh on chip, one launch) wherever they take the inputs,
# then the Triton kernels (one persistent launch per layer, W_hh through L2 each step), then the C++ layers
# (a launch and a cuBLAS GEMM per step), until GPU timings say where each wins.
GPU_ORDER = ("persistent", "triton", "cuda")


def _rnn_tf32() -> bool:
    """Whether torch lets its cuDNN RNNs compute fp32 products in TF32: torch.backends.cudnn.allow_tf32 (its
    default True), as the RNN-specific precision reads it where torch has one (reading allow_tf32 itself
    raises once the legacy and the per-operator flags disagree)."""
    precision = getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(torch.backends.cudnn.allow_tf32)


def _persist_grid() -> int:
    """FUSENN_PERSIST_GRID=N: the persistent kernels on N CTAs (ceil(H / N) hidden units each) instead of the
    launcher's plan, for the benchmarks' sweep of grids (bench_rnn.py); unset or 0: the plan's."""
    value = os.environ.get("FUSENN_PERSIST_GRID", "0")
    if not value.isdigit():
        raise ValueError(f"FUSENN_PERSIST_GRID must be a non-negative integer, got {value!r}")
    return int(value)


def _persist_tiles() -> int:
    """FUSENN_PERSIST_TILES=N: at most N batch tiles of 16 rows a staging round in the persistent kernels, the
    plan's grid and chunk otherwise (what the tiles buy, for bench_rnn.py); unset or 0: the plan's."""
    value = os.environ.get("FUSENN_PERSIST_TILES", "0")
    if not value.isdigit():
        raise ValueError(f"FUSENN_PERSIST_TILES must be a non-negative integer, got {value!r}")
    return int(value)


def _cpp(impl: str, name: str):
    """The C++ op `name` of torch.ops.fusenn_cuda, or for impl "persistent" its persistent twin (the same
    arguments, the grid the launcher plans (or _persist_grid's), TF32 for fp32 products where torch allows it for
    cuDNN's RNNs, read at each call as cuDNN's nn.LSTM and the Triton kernels do: _rnn_tf32, and the batch tiles a
    round the plan takes, or at most _persist_tiles')."""
    if impl == "persistent":
        op = getattr(torch.ops.fusenn_cuda, name.replace("_", "_persist_", 1))
        return lambda *args: op(*args, _persist_grid(), _rnn_tf32(), _persist_tiles())
    return getattr(torch.ops.fusenn_cuda, name)


def module_backend(op: str, x: Tensor, native: Optional[str]) -> Optional[str]:
    """The backend for one forward of a whole module (op "lstm" or "gru": fusenn.LSTM / GRU / their cells)
    with input x. `native` is None when torch's own module computes what this one does (no fusenn-only
    regulariser), else why not: the "torch" backend (auto's first choice for CPU tensors) then runs torch's
    module forward; any other backend runs fusenn's layers, which the module then tells which one."""
    # An explicit kernel backend is left to each layer, which chooses after the module's input checks (bad input
    # gets torch's error, not a BackendError). The persistent kernels' reasons need the weights and state, per
    # layer: a GPU kernel backend chosen here returns None, and each layer then chooses among them itself.
    if dispatch.get_backend() not in ("auto", "torch"):
        return None
    reasons = {name: None if name == "persistent" else why(x)
               for name, why in (LSTM_SUPPORT if op == "lstm" else GRU_SUPPORT).items()}
    reasons["torch"] = native
    name = dispatch.choose(op, x.device, reasons, GPU_ORDER)
    return None if name in GPU_ORDER else name


def _impl(name: str) -> str:
    """The ops' `impl` for a backend: "cpp" (CPU tensors) and "cuda" are the same C++ ops (torch.ops.fusenn_cuda)."""
    return "cuda" if name == "cpp" else name


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _lengths(lengths: Optional[Tensor], device) -> Optional[Tensor]:
    return lengths.to(device=device, dtype=torch.int64).contiguous() if lengths is not None else None


def _grad_matmul(grad_rows: Tensor, inputs: Tensor, dtype) -> Tensor:
    """sum over all T*B rows of grad_row^T input_row, in fp32: the weight gradient of a per-step GEMM.
    Autocast is off here: backward may run inside the caller's autocast region."""
    with torch.autocast(grad_rows.device.type, enabled=False):
        a, b = grad_rows.reshape(-1, grad_rows.shape[-1]).t(), inputs.reshape(-1, inputs.shape[-1])
        # oneDNN's linear, 2-3x MKL's sgemm on some CPUs (AMD); its input is made contiguous, so the narrower
        # of the two is the one transposed: (b^T a)^T or a b. Its weight (the other) must be dense in one order
        # or the other: any other strides (a column slice) take oneDNN's reference kernel, ~100x slower.
        if _onednn_fp32(a, b, a.shape[0] * a.shape[1] * b.shape[1]):
            if b.shape[1] <= a.shape[0]:
                return _onednn_linear(b.t().contiguous(), _dense(a)).t().contiguous().to(dtype)
            return _onednn_linear(a.contiguous(), _dense(b).t()).to(dtype)
        return (a @ b).to(dtype)


def _dense(t: Tensor) -> Tensor:
    """A 2-D t laid out row- or column-major (as it is, or a contiguous copy)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def input_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> Tensor:
    """F.linear(x, weight, bias): a layer's input GEMM over all steps. For the C++ layers on CPU tensors (backend
    "cpp", fp32, no autocast, not traced) forward and backward run through oneDNN, as the layers' own GEMMs do."""
    if (backend != "cpp" or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or not _onednn_fp32(x, weight, x.numel() * weight.shape[0])
            or (bias is not None and bias.dtype != torch.float32)):
        return torch.nn.functional.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def _onednn_linear(a: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a (rows, in) @ weight (out, in)^T + bias through oneDNN: torch.ops.mkldnn._linear_pointwise."""
    return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """F.linear through oneDNN on CPU fp32: 2-3x MKL's sgemm at RNN shapes on some CPUs (AMD), so the input
    projection of the C++ layers is not the slow half of a step."""

    @staticmethod
    def forward(x, weight, bias):
        return _onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        rows = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_linear(rows, weight.t()).reshape(x.shape) if rows.numel() else torch.zeros_like(x)
        if ctx.needs_input_grad[1]:
            dw = _grad_matmul(grad, x, weight.dtype) if rows.numel() else torch.zeros_like(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = rows.sum(0)
        return dx, dw, db


_ONEDNN_MIN_MACS = 1 << 19  # below this a GEMM is faster through at::mm (oneDNN's call costs ~10 us; csrc's too)


def _onednn_fp32(a: Tensor, b: Tensor, macs: int) -> bool:
    return (a.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and macs >= _ONEDNN_MIN_MACS
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _empty(device) -> Tensor:
    """The placeholder a registered op returns where a tensor is absent (ops cannot return None)."""
    return torch.empty(0, dtype=torch.float32, device=device)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _grads_or_zeros(like: Tensor, *pairs) -> list:
    """Each (gradient, shape) pair's gradient, zeros in like's dtype where autograd passed None (an output not
    used; the layers' setup turns off zero-filled gradients so the large buffers they return get none)."""
    return [g if g is not None else like.new_zeros(shape) for g, shape in pairs]


# The kernel paths are four torch.library ops, so torch.compile traces them (their fakes give the shapes)
# and autograd goes through register_autograd; `impl` names the kernels: "triton" (fusenn.kernels) or
# "cuda" (the C++ layers of csrc/rnn_host.cpp, torch.ops.fusenn_cuda). The regularisers travel as scalars
# and seed tensors (0-d int64, read by the kernels from device memory): recurrent dropout as (rd_p or
# None, rd_seed or None), zoneout as (zo_p or None, zo_seed or None: None = the expectation).


def _recurrent_scale(B: int, P: int, recurrent_dropout, device) -> Tensor:
    """(B, P) fp32 r/(1-p) of recurrent dropout's time-locked mask (regenerated wherever needed)."""
    p, seed = recurrent_dropout
    return dropout_mask((B, P), p, seed, 0, device).to(torch.float32) * (1.0 / (1.0 - p))


def _entering_product(h_prev: Tensor, recurrent_dropout) -> Tensor:
    """The states entering each step (T, B, P) as they entered the recurrent product: times r/(1-p)
    under recurrent dropout."""
    if recurrent_dropout is None:
        return h_prev
    return h_prev * _recurrent_scale(*h_prev.shape[1:], recurrent_dropout, h_prev.device)


def _cpp_regularisers(rd_p, rd_seed, zo_p, zo_seed, B: int, P: int, device) -> tuple:
    """The C++ layers' trailing arguments (csrc/rnn_host.cpp): rscale, zoneout's seed, mode, threshold and
    expectation, and the CUDA stream."""
    from fusenn.reference.philox import dropout_threshold

    rscale = _recurrent_scale(B, P, (rd_p, rd_seed.to(device)), device) if rd_p is not None else None
    mode = 0 if zo_p is None else 1 if zo_seed is not None else 2
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return (rscale, zo_seed.to(device) if mode == 1 else None, mode, dropout_threshold(zo_p) if mode == 1 else 0,
            1.0 - zo_p if mode == 2 else 1.0, stream)


def _regularisers(rd_p, rd_seed, zo_p, zo_seed, device):
    """The kernels' (p, seed on `device`) pairs, or None each."""
    return ((rd_p, rd_seed.to(device)) if rd_p is not None else None,
            (zo_p, zo_seed.to(device) if zo_seed is not None else None) if zo_p is not None else None)


@torch.library.custom_op("fusenn::lstm_layer_forward", mutates_args=())
def lstm_layer_forward(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                       lengths: Optional[Tensor], reverse: bool, save: bool, rd_p: Optional[float],
                       rd_seed: Optional[Tensor], zo_p: Optional[float], zo_seed: Optional[Tensor], impl: str
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, h_n, c_n, hs, cs, ms, gates, zo_keep): the outputs and, when `save`, the fp32 buffers backward needs
    (fusenn.kernels.lstm.lstm_forward); gates and zo_keep: every step's activated gates and sampled zoneout's
    masks, kept by the C++ layers on CPU tensors (_kept) so that backward neither recomputes the gates with a
    GEMM nor draws the masks again. Empty tensors stand for the buffers not kept."""
    gx, h0, c0, w_hh, w_hr = _contiguous(gx, h0, c0, w_hh, w_hr)
    gates, zo_keep = _kept(gx, h0, save, zo_p, zo_seed, impl)
    if impl in ("cuda", "persistent"):
        extra = (gates, zo_keep if zo_keep.numel() else None) if gates.numel() else ()
        return tuple(_cpp(impl, "lstm_forward")(
            gx, h0, c0, w_hh, w_hr, lengths, reverse, save,
            *_cpp_regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.shape[1], h0.shape[-1], gx.device),
            *extra)) + (gates, zo_keep)
    from fusenn.kernels import lstm as kernels

    y, h_n, c_n, states = kernels.lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, save,
                                               *_regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.device))
    hs, cs, ms = states if save else (None, None, None)
    return (y, h_n, c_n) + tuple(t if t is not None else _empty(gx.device) for t in (hs, cs, ms)) + (gates, zo_keep)


def _keeps_gates(gx: Tensor, save: bool, impl: str) -> bool:
    return save and impl == "cuda" and gx.device.type == "cpu"


def _kept(gx: Tensor, h0: Tensor, save: bool, zo_p, zo_seed, impl: str, new=None) -> tuple[Tensor, Tensor]:
    """The buffers the LSTM's forward fills for its backward: (gates (T, B, 4H) fp32, sampled zoneout's masks
    (T * B * (P + H),) uint8), empty where not kept. The C++ stepwise layers keep them on CPU tensors when saving
    (a GPU recomputes the gates in one GEMM and draws the masks in its kernels rather than hold them)."""
    new = new or torch.empty
    if not _keeps_gates(gx, save, impl):
        return _empty(gx.device), _empty(gx.device)
    T, B, G = gx.shape
    counters = T * B * (h0.shape[-1] + G // 4) if zo_p is not None and zo_seed is not None else 0
    return _kept_gates(gx, save, impl, new), new(counters, dtype=torch.uint8 if counters else torch.float32,
                                                 device=gx.device)


def _kept_gates(gx: Tensor, save: bool, impl: str, new=None) -> Tensor:
    """The (T, B, gates H) fp32 buffer of every step's activated gates that the forward of the C++ stepwise layers
    fills on CPU tensors when saving, for backward to take instead of recomputing them; else empty."""
    if not _keeps_gates(gx, save, impl):
        return _empty(gx.device)
    return (new or torch.empty)(gx.shape, dtype=torch.float32, device=gx.device)


@lstm_layer_forward.register_fake
def _(gx, h0, c0, w_hh, w_hr, lengths, reverse, save, rd_p, rd_seed, zo_p, zo_seed, impl):
    T, B, G = gx.shape
    H, P = G // 4, h0.shape[-1]
    f32 = dict(dtype=torch.float32)
    kept = (gx.new_empty((T + 1, B, P), **f32), gx.new_empty((T + 1, B, H), **f32),
            gx.new_empty((T, B, H), **f32) if w_hr is not None else gx.new_empty(0, **f32))
    gates, zo_keep = _kept(gx, h0, save, zo_p, zo_seed, impl, new=lambda *shape, **kw: gx.new_empty(*shape, **kw))
    return ((gx.new_empty((T, B, P)), gx.new_empty((B, P)), gx.new_empty((B, H)))
            + (kept if save else tuple(gx.new_empty(0, **f32) for _ in range(3))) + (gates, zo_keep))


@torch.library.custom_op("fusenn::lstm_layer_backward", mutates_args=())
def lstm_layer_backward(dy: Tensor, dh_n: Tensor, dc_n: Tensor, gx: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                        lengths: Optional[Tensor], reverse: bool, hs: Tensor, cs: Tensor, ms: Tensor, gates: Tensor,
                        zo_keep: Tensor, rd_p: Optional[float], rd_seed: Optional[Tensor], zo_p: Optional[float],
                        zo_seed: Optional[Tensor], grad_w_hh: bool, grad_w_hr: bool, impl: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d gx, d h0, d c0 in gx's dtype, d w_hh, d w_hr in theirs); a weight gradient not asked for (or w_hr
    absent) is an empty tensor."""
    dy, dh_n, dc_n = _contiguous(dy, dh_n, dc_n)
    recurrent_dropout, zoneout = _regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.device)
    if impl in ("cuda", "persistent"):
        dg, dh0, dc0, dhs = _cpp(impl, "lstm_backward")(
            dy, dh_n, dc_n, gx, w_hh, w_hr, lengths, reverse, hs, cs,
            *_cpp_regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.shape[1], hs.shape[-1], gx.device),
            *((gates, zo_keep if zo_keep.numel() else None) if gates.numel() else ()))
    else:
        from fusenn.kernels import lstm as kernels

        dg, dh0, dc0, dhs = kernels.lstm_backward(dy, dh_n, dc_n, gx, w_hh, w_hr, lengths, reverse, hs, cs,
                                                  recurrent_dropout, zoneout)
    T, rev = gx.shape[0], int(reverse)
    d_w_hh, d_w_hr = _empty(gx.device), _empty(gx.device)
    if grad_w_hh:
        h_prev = _entering_product(hs[rev:T + rev], recurrent_dropout)
        d_w_hh = _grad_matmul(dg, h_prev, w_hh.dtype)
    if w_hr is not None and grad_w_hr:
        d_w_hr = _grad_matmul(dhs, ms, w_hr.dtype)
    return dg.to(gx.dtype), dh0.to(gx.dtype), dc0.to(gx.dtype), d_w_hh, d_w_hr


@lstm_layer_backward.register_fake
def _(dy, dh_n, dc_n, gx, w_hh, w_hr, lengths, reverse, hs, cs, ms, gates, zo_keep, rd_p, rd_seed, zo_p, zo_seed,
      grad_w_hh, grad_w_hr, impl):
    B, H, P = gx.shape[1], gx.shape[2] // 4, w_hh.shape[-1]
    empty = gx.new_empty(0, dtype=torch.float32)
    return (gx.new_empty(gx.shape), gx.new_empty((B, P)), gx.new_empty((B, H)),
            w_hh.new_empty(w_hh.shape) if grad_w_hh else empty,
            w_hr.new_empty(w_hr.shape) if w_hr is not None and grad_w_hr else empty.clone())


def _lstm_setup(ctx, inputs, output):
    gx, h0, c0, w_hh, w_hr, lengths, reverse, save, rd_p, rd_seed, zo_p, zo_seed, impl = inputs
    _, _, _, hs, cs, ms, gates, zo_keep = output
    ctx.mark_non_differentiable(hs, cs, ms, gates, zo_keep)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the buffers (_grads_or_zeros for the rest)
    # With the gates kept, backward reads gx only for its shape and dtype: fp32 gates stand in for an fp32 gx,
    # which is then freed after the forward (its memory serves the next layer: fewer fresh pages a step on CPU)
    stand_in = gates if _keeps_gates(gx, save, impl) and gx.dtype == torch.float32 else gx
    ctx.save_for_backward(stand_in, w_hh, w_hr, lengths, hs, cs, ms, gates, zo_keep, rd_seed, zo_seed)
    ctx.args = (reverse, rd_p, zo_p, impl)
    ctx.saved = save


def _lstm_backward(ctx, dy, dh_n, dc_n, _hs, _cs, _ms, _gates, _zo_keep):
    if not ctx.saved:
        raise RuntimeError("fusenn: lstm_layer_forward ran with save=False, so it cannot be differentiated")
    gx, w_hh, w_hr, lengths, hs, cs, ms, gates, zo_keep, rd_seed, zo_seed = ctx.saved_tensors
    reverse, rd_p, zo_p, impl = ctx.args
    T, B, P, H = gx.shape[0], gx.shape[1], hs.shape[-1], cs.shape[-1]
    dy, dh_n, dc_n = _grads_or_zeros(gx, (dy, (T, B, P)), (dh_n, (B, P)), (dc_n, (B, H)))
    needs = ctx.needs_input_grad
    dg, dh0, dc0, d_w_hh, d_w_hr = _LSTMBackward.apply(dy, dh_n, dc_n, gx, w_hh, w_hr, lengths, reverse, hs, cs, ms,
                                                       gates, zo_keep, rd_p, rd_seed, zo_p, zo_seed, needs[3],
                                                       w_hr is not None and needs[4], impl)
    return (dg if needs[0] else None, dh0 if needs[1] else None, dc0 if needs[2] else None,
            d_w_hh if needs[3] else None, d_w_hr if w_hr is not None and needs[4] else None) + (None,) * 8


lstm_layer_forward.register_autograd(_lstm_backward, setup_context=_lstm_setup)
lstm_layer_backward.register_autograd(no_double_backward("LSTM layer"), setup_context=setup_nothing)
_LSTMBackward = once_differentiable(lstm_layer_backward, "LSTM layer")


class _LSTMLayer(torch.autograd.Function):
    """The op with the same backward, as an autograd.Function in the setup_context style: what lstm_layer
    calls, because torch.func (grad, vjp, vmap) cannot transform a custom op's registered autograd but can
    transform this. Under torch.compile lstm_layer calls the op itself (Dynamo does not trace this
    Function's nested backward Function), whose registered autograd is the same backward."""

    generate_vmap_rule = True
    forward = staticmethod(lambda *args: lstm_layer_forward(*args))
    setup_context = staticmethod(_lstm_setup)
    backward = staticmethod(_lstm_backward)


@torch.library.custom_op("fusenn::gru_layer_forward", mutates_args=())
def gru_layer_forward(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], lengths: Optional[Tensor],
                      reverse: bool, save: bool, rd_p: Optional[float], rd_seed: Optional[Tensor],
                      zo_p: Optional[float], zo_seed: Optional[Tensor], impl: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h_n, hs, gates): the outputs and, when `save`, the fp32 state buffer backward needs (else empty);
    gates: every step's activated gates, kept by the C++ layers on CPU tensors (_kept_gates) so that backward does
    not recompute them with a GEMM (else empty)."""
    gx, h0, w_hh, b_hh = _contiguous(gx, h0, w_hh, b_hh)
    gates = _kept_gates(gx, save, impl)
    if impl in ("cuda", "persistent"):
        return tuple(_cpp(impl, "gru_forward")(
            gx, h0, w_hh, b_hh, lengths, reverse, save,
            *_cpp_regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.shape[1], h0.shape[-1], gx.device),
            *((gates,) if gates.numel() else ()))) + (gates,)
    from fusenn.kernels import gru as kernels

    y, h_n, hs = kernels.gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, save,
                                     *_regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.device))
    return y, h_n, hs if save else _empty(gx.device), gates


@gru_layer_forward.register_fake
def _(gx, h0, w_hh, b_hh, lengths, reverse, save, rd_p, rd_seed, zo_p, zo_seed, impl):
    T, B, _ = gx.shape
    H = h0.shape[-1]
    hs = gx.new_empty((T + 1, B, H) if save else 0, dtype=torch.float32)
    gates = _kept_gates(gx, save, impl, new=lambda *shape, **kw: gx.new_empty(*shape, **kw))
    return gx.new_empty((T, B, H)), gx.new_empty((B, H)), hs, gates


@torch.library.custom_op("fusenn::gru_layer_backward", mutates_args=())
def gru_layer_backward(dy: Tensor, dh_n: Tensor, gx: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
                       lengths: Optional[Tensor], reverse: bool, hs: Tensor, gates: Tensor, rd_p: Optional[float],
                       rd_seed: Optional[Tensor], zo_p: Optional[float], zo_seed: Optional[Tensor], grad_w_hh: bool,
                       grad_b_hh: bool, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d gx, d h0 in gx's dtype, d w_hh, d b_hh in theirs); a gradient not asked for is an empty tensor."""
    dy, dh_n = _contiguous(dy, dh_n)
    recurrent_dropout, zoneout = _regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.device)
    if impl in ("cuda", "persistent"):
        dg, dghn, dh0 = _cpp(impl, "gru_backward")(
            dy, dh_n, gx, w_hh, b_hh, lengths, reverse, hs,
            *_cpp_regularisers(rd_p, rd_seed, zo_p, zo_seed, gx.shape[1], hs.shape[-1], gx.device),
            *((gates,) if gates.numel() else ()))
    else:
        from fusenn.kernels import gru as kernels

        dg, dghn, dh0 = kernels.gru_backward(dy, dh_n, gx, w_hh, b_hh, lengths, reverse, hs, recurrent_dropout,
                                             zoneout)
    T, H, rev = gx.shape[0], w_hh.shape[-1], int(reverse)
    d_w_hh, d_b_hh = _empty(gx.device), _empty(gx.device)
    if grad_w_hh or (b_hh is not None and grad_b_hh):
        # gh = h W_hh^T + b_hh gets [dr, dz] from gx's gradient and dn * r for its n part: one GEMM for W_hh
        dgh = torch.cat([dg[..., :2 * H], dghn], -1)
        if grad_w_hh:
            d_w_hh = _grad_matmul(dgh, _entering_product(hs[rev:T + rev], recurrent_dropout), w_hh.dtype)
        if b_hh is not None and grad_b_hh:
            d_b_hh = dgh.sum((0, 1)).to(b_hh.dtype)
    return dg.to(gx.dtype), dh0.to(gx.dtype), d_w_hh, d_b_hh


@gru_layer_backward.register_fake
def _(dy, dh_n, gx, w_hh, b_hh, lengths, reverse, hs, gates, rd_p, rd_seed, zo_p, zo_seed, grad_w_hh, grad_b_hh,
      impl):
    empty = gx.new_empty(0, dtype=torch.float32)
    return (gx.new_empty(gx.shape), gx.new_empty((gx.shape[1], w_hh.shape[-1])),
            w_hh.new_empty(w_hh.shape) if grad_w_hh else empty,
            b_hh.new_empty(b_hh.shape) if b_hh is not None and grad_b_hh else empty.clone())


def _gru_setup(ctx, inputs, output):
    gx, h0, w_hh, b_hh, lengths, reverse, save, rd_p, rd_seed, zo_p, zo_seed, impl = inputs
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gx, w_hh, b_hh, lengths, output[2], output[3], rd_seed, zo_seed)
    ctx.args = (reverse, rd_p, zo_p, impl)
    ctx.saved = save


def _gru_backward(ctx, dy, dh_n, _hs, _gates):
    if not ctx.saved:
        raise RuntimeError("fusenn: gru_layer_forward ran with save=False, so it cannot be differentiated")
    gx, w_hh, b_hh, lengths, hs, gates, rd_seed, zo_seed = ctx.saved_tensors
    reverse, rd_p, zo_p, impl = ctx.args
    T, B, H = gx.shape[0], gx.shape[1], hs.shape[-1]
    dy, dh_n = _grads_or_zeros(gx, (dy, (T, B, H)), (dh_n, (B, H)))
    needs = ctx.needs_input_grad
    has_b = b_hh is not None and needs[3]
    dg, dh0, d_w_hh, d_b_hh = _GRUBackward.apply(dy, dh_n, gx, w_hh, b_hh, lengths, reverse, hs, gates, rd_p, rd_seed,
                                                 zo_p, zo_seed, needs[2], has_b, impl)
    return (dg if needs[0] else None, dh0 if needs[1] else None, d_w_hh if needs[2] else None,
            d_b_hh if has_b else None) + (None,) * 8


gru_layer_forward.register_autograd(_gru_backward, setup_context=_gru_setup)
gru_layer_backward.register_autograd(no_double_backward("GRU layer"), setup_context=setup_nothing)
_GRUBackward = once_differentiable(gru_layer_backward, "GRU layer")


class _GRULayer(torch.autograd.Function):
    """gru_layer_forward as an autograd.Function, for torch.func (see _LSTMLayer)."""

    generate_vmap_rule = True
    forward = staticmethod(lambda *args: gru_layer_forward(*args))
    setup_context = staticmethod(_gru_setup)
    backward = staticmethod(_gru_backward)


def _op_regularisers(recurrent_dropout, zoneout, device) -> tuple:
    """The ops' (rd_p, rd_seed, zo_p, zo_seed) from the layers' (p, seed) pairs: Nones where absent."""
    rd = (float(recurrent_dropout[0]), seed_tensor(recurrent_dropout[1], device)) if recurrent_dropout else (None,) * 2
    zo = (float(zoneout[0]), seed_tensor(zoneout[1], device) if zoneout[1] is not None else None) if zoneout \
        else (None,) * 2
    return rd + zo


def _check_regularisers(recurrent_dropout, zoneout):
    # recurrent dropout scales by 1/(1-p), so p = 1 is out; zoneout p = 1 just freezes the state
    if recurrent_dropout is not None and not 0.0 <= recurrent_dropout[0] < 1.0:
        raise ValueError(f"recurrent_dropout probability must be in [0, 1), got {recurrent_dropout[0]}")
    if zoneout is not None and not 0.0 <= zoneout[0] <= 1.0:
        raise ValueError(f"zoneout probability must be in [0, 1], got {zoneout[0]}")


def _check_layer(op: str, gates: int, gx: Tensor, states: dict, weights: dict, lengths: Optional[Tensor]) -> None:
    """Shapes, dtypes and devices of one layer call, for every backend before any kernel (the modules check their
    own inputs in torch's words first; this guards direct callers): gx (T, B, gates * H) floating; each entry of
    `states` / `weights` maps a name to (tensor or None, the size it must have); lengths (B,) integers, any
    device (their values are not read here: that would synchronise)."""
    if gx.dim() != 3 or gx.size(-1) % gates:
        raise RuntimeError(f"{op}: expected gx of size (T, B, {gates} * hidden_size), got {list(gx.shape)}")
    if not gx.is_floating_point():
        raise RuntimeError(f"{op}: expected a floating point gx, got {gx.dtype}")
    for kind, named in (("hidden", states), ("parameter", weights)):
        for name, (t, size) in named.items():
            if t is None:
                continue
            if t.device != gx.device:
                raise RuntimeError(f"Input and {kind} tensors are not at the same device, found input tensor at "
                                   f"{gx.device} and {kind} tensor at {t.device}")
            if not t.is_floating_point():
                raise RuntimeError(f"{op}: expected a floating point {name}, got {t.dtype}")
            if tuple(t.shape) != size:
                raise RuntimeError(f"{op}: expected {name} of size {list(size)}, got {list(t.shape)}")
    if lengths is not None and (lengths.shape != (gx.size(1),) or lengths.is_floating_point()):
        raise RuntimeError(f"{op}: expected integer lengths of size [{gx.size(1)}], got {lengths.dtype} of size "
                           f"{list(lengths.shape)}")


def lstm_layer(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor] = None,
               lengths: Optional[Tensor] = None, reverse: bool = False,
               recurrent_dropout: Optional[tuple[float, int]] = None,
               zoneout: Optional[tuple[float, Optional[int]]] = None, backend: Optional[str] = None):
    """`backend`: the one the calling module chose (module_backend) for its whole forward; else chosen here."""
    _check_regularisers(recurrent_dropout, zoneout)
    B, H = gx.size(1) if gx.dim() == 3 else 0, gx.size(-1) // 4 if gx.dim() else 0
    P = w_hr.size(0) if w_hr is not None and w_hr.dim() == 2 else H
    _check_layer("lstm_layer", 4, gx, dict(h0=(h0, (B, P)), c0=(c0, (B, H))),
                 dict(w_hh=(w_hh, (4 * H, P)), w_hr=(w_hr, (P, H))), lengths)
    reasons = None if backend else {n: why(gx, h0, w_hh, w_hr) for n, why in LSTM_SUPPORT.items()}
    name = backend or dispatch.choose("lstm", gx.device, reasons, GPU_ORDER)
    if name == "reference":
        return reference.lstm_layer(gx, h0, c0, w_hh, w_hr, lengths, reverse, recurrent_dropout, zoneout)
    if name in ("triton", "cuda", "persistent", "cpp"):
        dtype = gx.dtype
        h0, c0, w_hh = h0.to(dtype), c0.to(dtype), w_hh.to(dtype)
        w_hr = w_hr.to(dtype) if w_hr is not None else None
        layer = lstm_layer_forward if torch.compiler.is_compiling() else _LSTMLayer.apply
        out = layer(gx, h0, c0, w_hh, w_hr, _lengths(lengths, gx.device), bool(reverse),
                    _needs_grad(gx, h0, c0, w_hh, w_hr), *_op_regularisers(recurrent_dropout, zoneout, gx.device),
                    _impl(name))
        return out[:3]
    raise AssertionError(name)


def gru_layer(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, reverse: bool = False,
              recurrent_dropout: Optional[tuple[float, int]] = None,
              zoneout: Optional[tuple[float, Optional[int]]] = None, backend: Optional[str] = None):
    _check_regularisers(recurrent_dropout, zoneout)
    B, H = gx.size(1) if gx.dim() == 3 else 0, gx.size(-1) // 3 if gx.dim() else 0
    _check_layer("gru_layer", 3, gx, dict(h0=(h0, (B, H))), dict(w_hh=(w_hh, (3 * H, H)), b_hh=(b_hh, (3 * H,))),
                 lengths)
    reasons = None if backend else {n: why(gx, h0, w_hh, b_hh) for n, why in GRU_SUPPORT.items()}
    name = backend or dispatch.choose("gru", gx.device, reasons, GPU_ORDER)
    if name == "reference":
        return reference.gru_layer(gx, h0, w_hh, b_hh, lengths, reverse, recurrent_dropout, zoneout)
    if name in ("triton", "cuda", "persistent", "cpp"):
        dtype = gx.dtype
        h0, w_hh = h0.to(dtype), w_hh.to(dtype)
        b_hh = b_hh.to(dtype) if b_hh is not None else None
        layer = gru_layer_forward if torch.compiler.is_compiling() else _GRULayer.apply
        out = layer(gx, h0, w_hh, b_hh, _lengths(lengths, gx.device), bool(reverse), _needs_grad(gx, h0, w_hh, b_hh),
                    *_op_regularisers(recurrent_dropout, zoneout, gx.device), _impl(name))
        return out[:2]
    raise AssertionError(name)
