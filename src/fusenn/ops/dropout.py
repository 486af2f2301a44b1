"""Philox dropout masks and dropout: the op that carries every backend path.

`fusenn::dropout_mask` returns a flat bool mask (True = kept); element i comes from Philox counter
offset + i, so any slice can be regenerated alone and backward never needs a stored mask. Its seed is a
0-d int64 tensor on the mask's device (fusenn.ops.seed_tensor / draw_seed_tensor) that the kernels read
from memory: torch.compile traces a call whose seed is drawn from torch's generator without a graph
break, and a CUDA graph replays it with a fresh seed each time.
"""

from __future__ import annotations

import torch

from fusenn import dispatch
from fusenn.ops import draw_seed_tensor, new_output, seed_tensor
from fusenn.reference import philox as reference

# cpp: fusenn._C's host loop (CPU tensors), the mask the C++ RNN layers' CPU path draws.
SUPPORTED = {"reference": None, "triton": None, "cuda": None, "cpp": None}


@torch.library.custom_op("fusenn::dropout_mask", mutates_args=())
def dropout_mask_flat(numel: int, p: float, seed: torch.Tensor, offset: int, device: torch.device) -> torch.Tensor:
    threshold = reference.dropout_threshold(p)
    seed = seed.to(device)
    if offset < 0:
        raise ValueError(f"fusenn: offset must be non-negative, got {offset}")
    if dispatch.get_backend() == "torch":  # torch has no Philox: its kernels with fusenn's masks take auto's mask
        with dispatch.set_backend("auto"):
            name = dispatch.choose("dropout_mask", device, SUPPORTED)
    else:
        name = dispatch.choose("dropout_mask", device, SUPPORTED)
    if name == "reference":
        return reference.dropout_mask(numel, p, seed, offset, device)
    out = new_output((numel,), torch.bool, device)
    if name == "triton":
        from fusenn.kernels import philox

        return philox.dropout_mask(out, offset, seed, threshold)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    torch.ops.fusenn_cuda.dropout_mask_out(out, seed, offset, threshold, stream)
    return out


@dropout_mask_flat.register_fake
def _(numel, p, seed, offset, device):
    return torch.empty((numel,), dtype=torch.bool, device=device)


def dropout_mask(shape, p: float, seed, offset: int = 0, device=None) -> torch.Tensor:
    """Bool mask of `shape` (True = kept) for `seed`: a Python int or a 0-d integer tensor."""
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    if any(d < 0 for d in shape):  # as torch.empty(shape) says
        raise RuntimeError(f"Trying to create tensor with negative dimension {min(shape)}: {list(shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return dropout_mask_flat(shape.numel(), float(p), seed_tensor(seed, device), int(offset), device).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        keep = dropout_mask(x.shape, p, seed, 0, x.device)
        ctx.p = p
        ctx.save_for_backward(seed)
        return x * keep / (1.0 - p)

    @staticmethod
    def backward(ctx, grad):
        seed, = ctx.saved_tensors
        keep = dropout_mask(grad.shape, ctx.p, seed, 0, grad.device)  # regenerated, not stored
        return grad * keep / (1.0 - ctx.p), None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            seed=None) -> torch.Tensor:
    """torch.nn.functional.dropout (same arguments, `inplace` included) with a Philox mask from `seed` (keyword
    only: a Python int or a 0-d integer tensor), drawn from torch's generator for input's device when None, so
    torch.manual_seed repeats a run, compiled or not. In place, the kept elements are scaled in input itself
    (autograd records it as torch's in-place dropout)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:  # input's dtype, as torch's; NaN and inf give NaN
        return input.mul_(0) if inplace else input * 0
    if not input.is_floating_point():  # the scaled result cannot be stored in input's type, as torch says
        scalar = {torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                  torch.uint8: "Byte", torch.bool: "Bool"}.get(input.dtype, str(input.dtype))
        raise RuntimeError(f"result type Float can't be cast to the desired output type {scalar}")
    seed = draw_seed_tensor(device=input.device) if seed is None else seed_tensor(seed, input.device)
    if inplace:
        return input.mul_(dropout_mask(input.shape, p, seed, 0, input.device)).div_(1.0 - p)  # _Dropout's rounding
    return _Dropout.apply(input, float(p), seed)
