"""conv_pool2d: convolution + bias + activation + max/avg pooling as one op; the choice of backend.

The Triton path is the torch.library op `fusenn::conv_pool2d` (traceable by torch.compile through its
fake) with a backward registered beside it; eagerly it runs through a setup_context-style autograd.Function with
the same backward, so torch.func's grad and vmap transform it. The reference path is plain PyTorch and differentiates
through torch's autograd.

Backward of the Triton path, and what it keeps from forward:
- max pooling: the kernel stores, per pooled output, the index of the max within its window (int8) and
  the pre-activation value there (x's dtype). The pooled gradient is multiplied by act'(pre) at pooled
  resolution, scattered through the indices to a full-resolution gradient of the pre-activation (summing
  where overlapping windows share a max), then torch's convolution backward gives the input, weight and
  bias gradients. Kept: x, weight, and two pooled-size tensors; no convolution is recomputed.
- avg pooling: the pooled gradient is spread uniformly over each window (avg_pool2d_backward); unless the
  activation is 'none' its derivative needs the full-resolution pre-activation, which the backward
  recomputes with one torch convolution rather than keeping it from forward. Kept: x, weight, bias.

Ties in max pooling go to the first maximum in window scan order, as in torch, and a NaN in a window
propagates (with the index of the window's last NaN), as in torch. One difference in backward: with a
smooth activation (gelu, silu, ...) torch's input gradient is also NaN wherever a pre-activation that no
window picked is NaN (it multiplies 0 by act'(NaN)); the Triton path applies act' at the window maxima
only, so those zeros stay zero.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusenn import dispatch
from fusenn.ops import lower_precision_under_autocast, new_output, type_name
from fusenn.reference import conv_pool as reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(v, name: str) -> list[int]:
    pair = [v, v] if isinstance(v, int) else list(v)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise ValueError(f"fusenn: conv_pool2d {name} must be an int or a pair of ints, got {v!r}")
    return pair


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _pooled_shape(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding, ceil_mode):
    conv = [reference.conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d])
            for d in range(2)]
    pooled = [reference.pool_output_size(conv[d], pool_kernel[d], pool_stride[d], pool_padding[d], ceil_mode)
              for d in range(2)]
    return conv, pooled


def _empty_like_torch(shape, dtype, device, channels_last: bool) -> Tensor:
    """An output laid out as torch's conv + pool would lay it out: channels_last if an operand was."""
    if channels_last:
        n, c, h, w = shape
        return new_output((n, h, w, c), dtype, device).permute(0, 3, 1, 2)
    return new_output(shape, dtype, device)


def _outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding, ceil_mode, keep_argmax):
    _, (ph, pw) = _pooled_shape(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding,
                                ceil_mode)
    shape = (x.shape[0], weight.shape[0], ph, pw) if keep_argmax else (0,)
    cl = _channels_last(x) or _channels_last(weight)
    out = _empty_like_torch((x.shape[0], weight.shape[0], ph, pw), x.dtype, x.device, cl)
    index_dtype = torch.int8 if pool_kernel[0] * pool_kernel[1] <= 128 else torch.int32
    argmax = _empty_like_torch(shape, index_dtype, x.device, cl and keep_argmax)
    pre = _empty_like_torch(shape, x.dtype, x.device, cl and keep_argmax)
    return out, argmax, pre


@torch.library.custom_op("fusenn::conv_pool2d", mutates_args=())
def _conv_pool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, activation: str, negative_slope: float, pool: str,
                 pool_kernel: list[int], pool_stride: list[int], pool_padding: list[int], ceil_mode: bool,
                 count_include_pad: bool, keep_argmax: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(pooled output, argmax within the window, pre-activation at the argmax); the last two are empty
    unless keep_argmax (max pooling, gradients wanted)."""
    from fusenn.kernels import conv_pool as kernels

    out, argmax, pre = _outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding,
                                ceil_mode, keep_argmax)
    if out.numel():
        bias = bias.contiguous() if bias is not None else None  # the kernel reads bias with unit stride
        kernels.conv_pool2d(x, weight, bias, out, argmax if keep_argmax else None, pre, stride, padding, dilation,
                            groups, activation, negative_slope, reference.is_monotone(activation, negative_slope),
                            pool, pool_kernel, pool_stride, pool_padding, count_include_pad,
                            channels_inner=_channels_last(x))
    return out, argmax, pre


@_conv_pool2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, activation, negative_slope, pool, pool_kernel,
      pool_stride, pool_padding, ceil_mode, count_include_pad, keep_argmax):
    return _outputs(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding, ceil_mode,
                    keep_argmax)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, activation, negative_slope, pool, pool_kernel, pool_stride,
     pool_padding, ceil_mode, count_include_pad, keep_argmax) = inputs
    _, argmax, pre = output
    ctx.options = (stride, padding, dilation, groups, activation, negative_slope, pool, pool_kernel, pool_stride,
                   pool_padding, ceil_mode, count_include_pad)
    ctx.has_bias = bias is not None
    ctx.keep_argmax = keep_argmax
    if pool == "max":
        ctx.save_for_backward(x, weight, argmax, pre)
    else:
        ctx.save_for_backward(x, weight, bias)
    ctx.mark_non_differentiable(argmax, pre)


def _backward(ctx, grad, _grad_argmax, _grad_pre):
    (stride, padding, dilation, groups, activation, negative_slope, pool, pool_kernel, pool_stride, pool_padding,
     ceil_mode, count_include_pad) = ctx.options
    if pool == "max":
        x, weight, argmax, pre = ctx.saved_tensors
        if not ctx.keep_argmax:
            raise RuntimeError("fusenn: conv_pool2d ran with keep_argmax=False, so it cannot be differentiated")
    else:
        x, weight, bias = ctx.saved_tensors
    (oh, ow), (ph, pw) = _pooled_shape(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding,
                                       ceil_mode)
    n, c = grad.shape[:2]
    if pool == "max":
        grad = reference.activation_backward(grad, pre, activation, negative_slope)
        # The conv-output position of each window's max: window start + offset within the window.
        idx = argmax.long()
        rows = torch.arange(ph, device=x.device).view(ph, 1) * pool_stride[0] - pool_padding[0] + idx // pool_kernel[1]
        cols = torch.arange(pw, device=x.device).view(1, pw) * pool_stride[1] - pool_padding[1] + idx % pool_kernel[1]
        grad_pre = grad.new_zeros(n, c, oh * ow)
        grad_pre.scatter_add_(2, (rows * ow + cols).reshape(n, c, ph * pw), grad.reshape(n, c, ph * pw))
        grad_pre = grad_pre.view(n, c, oh, ow)
    else:
        shape = (n, c, oh, ow)
        grad_act = torch.ops.aten.avg_pool2d_backward(grad, grad.new_empty(()).expand(shape), pool_kernel,
                                                      pool_stride, pool_padding, ceil_mode, count_include_pad, None)
        if activation == "none":
            grad_pre = grad_act
        else:
            pre = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
            grad_pre = reference.activation_backward(grad_act, pre, activation, negative_slope)
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_pre, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0],
        groups, [needs[0], needs[1], ctx.has_bias and needs[2]])
    return (grad_x, grad_w, grad_b) + (None,) * 13


_conv_pool2d.register_autograd(_backward, setup_context=_setup_context)


class _ConvPool2d(torch.autograd.Function):
    """The op with the same backward, as an autograd.Function in the setup_context style: what conv_pool2d calls
    eagerly, because torch.func (grad, vjp, vmap) cannot transform a custom op's registered autograd but can
    transform this. Under torch.compile conv_pool2d calls the op itself."""

    generate_vmap_rule = True
    forward = staticmethod(lambda *args: _conv_pool2d(*args))
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _triton_reason(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    if x.dtype not in KERNEL_DTYPES:
        return f"the kernel takes float32, float16 and bfloat16 inputs, got {x.dtype}"
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return "input, weight and bias must share one dtype"
    return None


def _check(x, weight, bias, stride, padding, dilation, groups, pool, pool_kernel, pool_stride, pool_padding,
           ceil_mode) -> None:
    """What nn.Conv2d and the pooling module would refuse, in their words and exception type (RuntimeError), checked
    for every backend before any kernel: x (N, C, H, W) after explicit padding, the rest as normalised pairs."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{x.device} and {t.device}! (input and {name})")
    for name, t in (("bias", bias), ("weight", weight)):  # torch's convolution checks the bias's type first
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"Input type ({type_name(x.dtype)}) and {name} type ({type_name(t.dtype)}) should be "
                               "the same")
    if not x.is_floating_point():
        raise RuntimeError(f"conv2d: expected a floating point input, got {type_name(x.dtype)}")
    if weight.dim() != 4:
        raise RuntimeError(f"Expected 4-dimensional weight for 4-dimensional input {list(x.shape)}, but got "
                           f"{weight.dim()}-dimensional weight of size {list(weight.shape)} instead")
    if any(s <= 0 for s in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(p < 0 for p in padding):
        raise RuntimeError("negative padding is not supported")
    if any(d <= 0 for d in dilation):
        raise RuntimeError("non-positive dilation is not supported")
    if groups <= 0 or weight.size(0) % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, but "
                           f"got weight of size {list(weight.shape)} instead")
    if x.size(1) != weight.size(1) * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(weight.shape)}, expected input"
                           f"{list(x.shape)} to have {weight.size(1) * groups} channels, but got {x.size(1)} "
                           "channels instead")
    if bias is not None and (bias.dim() != 1 or bias.numel() != weight.size(0)):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                           f"{weight.size(0)} elements, but got bias of size {list(bias.shape)} instead")
    padded = [x.size(2 + d) + 2 * padding[d] for d in range(2)]
    kernel = [dilation[d] * (weight.size(2 + d) - 1) + 1 for d in range(2)]
    if any(k > p for k, p in zip(kernel, padded)):
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
                           f"({kernel[0]} x {kernel[1]}). Kernel size can't be greater than actual input size")
    name = f"{pool}_pool2d"
    if any(k <= 0 for k in pool_kernel):
        raise RuntimeError(f"{name}: kernel_size must be greater than zero, but got {pool_kernel}")
    if any(s <= 0 for s in pool_stride):
        raise RuntimeError("stride should not be zero" if 0 in pool_stride else
                           f"{name}: stride must be greater than zero, but got {pool_stride}")
    for p, k in zip(pool_padding, pool_kernel):
        if 2 * p > k:
            raise RuntimeError(f"pad should be at most half of effective kernel size, but got pad={p}, kernel_size={k} "
                               "and dilation=1")
    conv, pooled = _pooled_shape(x, weight, stride, padding, dilation, pool_kernel, pool_stride, pool_padding,
                                 ceil_mode)
    if min(pooled) < 1:
        raise RuntimeError(f"Given input size: ({weight.size(0)}x{conv[0]}x{conv[1]}). Calculated output size: "
                           f"({weight.size(0)}x{pooled[0]}x{pooled[1]}). Output size is too small")


@lower_precision_under_autocast
def conv_pool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                groups: int = 1, padding_mode: str = "zeros", activation: str = "relu", negative_slope: float = 0.01,
                pool: str = "max", pool_kernel_size=2, pool_stride=None, pool_padding=0, ceil_mode: bool = False,
                count_include_pad: bool = True) -> Tensor:
    """pool(act(conv2d(x, weight, bias))) as nn.Sequential(nn.Conv2d, activation, nn.MaxPool2d / nn.AvgPool2d)
    computes it, without writing the full-resolution activation on the Triton path.

    `padding` may be an int, a pair, or a list of four (left, right, top, bottom) explicit pads as
    nn.Conv2d keeps them for padding_mode != 'zeros' and padding='same'; those are applied with F.pad
    before the kernel, which then pads nothing.
    """
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"fusenn: unknown activation {activation!r}; expected one of "
                         f"{', '.join(reference.ACTIVATIONS)}")
    if pool not in reference.POOLS:
        raise ValueError(f"fusenn: unknown pool {pool!r}; expected one of {', '.join(reference.POOLS)}")
    if x.dim() == 3:  # unbatched, as nn.Conv2d takes it
        return conv_pool2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, padding_mode, activation,
                           negative_slope, pool, pool_kernel_size, pool_stride, pool_padding, ceil_mode,
                           count_include_pad).squeeze(0)
    if x.dim() != 4:
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: "
                           f"{list(x.shape)}")
    if padding_mode != "zeros" or (not isinstance(padding, int) and len(padding) == 4):
        pads = [padding] * 4 if isinstance(padding, int) else (
            list(padding) if len(padding) == 4 else [padding[1], padding[1], padding[0], padding[0]])
        x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        padding = 0
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    pool_kernel = _pair(pool_kernel_size, "pool_kernel_size")
    pool_stride = _pair(pool_stride if pool_stride is not None else pool_kernel_size, "pool_stride")
    pool_padding = _pair(pool_padding, "pool_padding")
    _check(x, weight, bias, stride, padding, dilation, groups, pool, pool_kernel, pool_stride, pool_padding, ceil_mode)
    options = (stride, padding, dilation, groups, activation, float(negative_slope), pool, pool_kernel, pool_stride,
               pool_padding, bool(ceil_mode), bool(count_include_pad))

    name = dispatch.choose("conv_pool2d", x.device, {"reference": None, "torch": None,
                                                     "triton": _triton_reason(x, weight, bias)})
    if name in ("reference", "torch"):  # the reference is torch's own conv, activation and pool, in that order
        return reference.conv_pool2d(x, weight, bias, *options)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    op = _conv_pool2d if torch.compiler.is_compiling() else _ConvPool2d.apply
    return op(x, weight, bias, *options, grads and pool == "max")[0]
