"""Convolution, activation and pooling in plain PyTorch: the ground truth for fusenn.ops.conv_pool and its
CPU fallback. Also the shape rules and activation derivatives the op's other paths share."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Non-decreasing activations: for them max(act(z)) = act(max(z)), so max pooling may run before them.
MONOTONE = ("none", "relu", "leaky_relu", "sigmoid", "tanh")
ACTIVATIONS = MONOTONE + ("gelu", "gelu_tanh", "silu")
POOLS = ("max", "avg")


def is_monotone(activation: str, negative_slope: float) -> bool:
    return activation in MONOTONE and not (activation == "leaky_relu" and negative_slope < 0)


def activation(z: Tensor, name: str, negative_slope: float = 0.01) -> Tensor:
    if name == "none":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"fusenn: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def activation_backward(grad: Tensor, z: Tensor, name: str, negative_slope: float = 0.01) -> Tensor:
    """grad * act'(z), with torch's own backward formulas (so ties at 0 go the way torch sends them)."""
    aten = torch.ops.aten
    if name == "none":
        return grad
    if name == "relu":
        return aten.threshold_backward(grad, z, 0)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, z, negative_slope, False)
    if name in ("gelu", "gelu_tanh"):
        return aten.gelu_backward(grad, z, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "silu":
        return aten.silu_backward(grad, z)
    if name == "sigmoid":
        return aten.sigmoid_backward(grad, torch.sigmoid(z))
    if name == "tanh":
        return aten.tanh_backward(grad, torch.tanh(z))
    raise ValueError(f"fusenn: unknown activation {name!r}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape: with ceil_mode the last window must start inside the input or the
    left padding."""
    out = (size + 2 * padding - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_pool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, activation_name: str, negative_slope: float, pool: str,
                pool_kernel: Sequence[int], pool_stride: Sequence[int], pool_padding: Sequence[int],
                ceil_mode: bool, count_include_pad: bool = True) -> Tensor:
    """pool(act(conv2d(x, weight) + bias)), zero padding (pad other modes before calling)."""
    z = F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    a = activation(z, activation_name, negative_slope)
    if pool == "max":
        return F.max_pool2d(a, tuple(pool_kernel), tuple(pool_stride), tuple(pool_padding), ceil_mode=ceil_mode)
    if pool == "avg":
        return F.avg_pool2d(a, tuple(pool_kernel), tuple(pool_stride), tuple(pool_padding), ceil_mode=ceil_mode,
                            count_include_pad=count_include_pad)
    raise ValueError(f"fusenn: unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
