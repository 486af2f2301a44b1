"""Scaled dot-product attention: torch's semantics, the torch.library ops and the choice of backend.

`scaled_dot_product_attention` checks and normalises the inputs as torch does, then runs either the
reference (fusenn.reference.attention, plain autograd) or the Triton kernels through the ops
`fusenn::attention_forward` / `fusenn::attention_backward` (custom_op + register_fake + register_autograd,
so torch.compile traces them; eagerly through a setup_context-style autograd.Function, so torch.func's grad and
vmap transform them too, and a double backward raises). The dropout seed reaches the ops as a 0-d int64 tensor on
the inputs' device (drawn with fusenn.ops.draw_seed_tensor, or the caller's int converted) and the kernels read it
from memory, so a call with dropout traces whole too and a CUDA-graph replay draws a fresh mask. The kernels see
4-D views: the broadcast batch dims are flattened to N, and the mask is expanded with stride 0 (never copied) to
(N, Hq, L, S).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusenn import dispatch
from fusenn.ops import (draw_seed_tensor, lower_precision_under_autocast, new_output, once_differentiable,
                        seed_tensor, type_name)
from fusenn.reference import attention as reference

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_reason(query: Tensor, value: Tensor, attn_mask: Optional[Tensor]) -> Optional[str]:
    if query.dtype not in KERNEL_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 and float32, got {query.dtype}"
    if max(query.size(-1), value.size(-1)) > MAX_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_HEAD_DIM}, got {query.size(-1)} / {value.size(-1)}"
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return "the Triton kernel gives no gradient for attn_mask, which requires grad"
    return None


def _check(query, key, value, attn_mask, dropout_p, is_causal):
    """The checks every backend's call passes, before any kernel, as torch's math path makes them (RuntimeError,
    its wording); shapes and head counts follow in reference.attention_shapes. A negative dropout_p means no
    dropout, as in torch."""
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got query.dtype: "
                           f"{type_name(query.dtype)} key.dtype: {type_name(key.dtype)} and value.dtype: "
                           f"{type_name(value.dtype)} instead.")
    if not query.is_floating_point():
        raise RuntimeError(f"expected query, key and value of a floating point type, but found "
                           f"{type_name(query.dtype)}")
    if not (query.device == key.device == value.device):
        raise RuntimeError(f"Expected query, key, and value to have the same device type, but got query.device: "
                           f"{query.device} key.device: {key.device} and value.device: {value.device} instead.")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:  # two spaces before query: torch's
            raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, but got "
                               f"attn_mask.dtype: {type_name(attn_mask.dtype)} and  query.dtype: "
                               f"{type_name(query.dtype)} instead.")
        if attn_mask.device != query.device:
            raise RuntimeError(f"Tensor on device {attn_mask.device} is not on the expected device {query.device}!")
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if dropout_p > 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")


@lower_precision_under_autocast
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, seed=None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, with a Triton flash-attention kernel.

    Shapes (..., L, E), (..., S, E), (..., S, Ev) with broadcastable batch dims; attn_mask bool (True =
    may attend) or additive, broadcastable to (..., L, S); is_causal aligns top-left (key s visible to
    query l iff s <= l); enable_gqa lets Hq be a multiple of Hkv (dim -3). Dropout uses a Philox mask from
    `seed` (a Python int or a 0-d integer tensor; drawn from torch's generator when None, so
    torch.manual_seed repeats a run, compiled or not): element
    (..., l, s) of the (*batch, Hq, L, S) weights is kept as fusenn.reference.attention.dropout_keep says,
    on every backend but `torch` (auto's choice for CPU tensors unless a seed is given), which is torch's own
    function, dropout included. The Triton kernel takes fp16, bf16 and fp32 (products as torch's SDPA computes
    fp32 ones: fp32-accurate, from three TF32 products) with head dims up to 256.
    """
    _check(query, key, value, attn_mask, dropout_p, is_causal)
    batch, hq, hk, hv = reference.attention_shapes(query, key, value, enable_gqa)
    dropout_p = max(float(dropout_p), 0.0)
    name = dispatch.choose("attention", query.device, {
        "reference": None, "triton": _triton_reason(query, value, attn_mask),
        "torch": "a seed asks for fusenn's Philox dropout mask" if dropout_p > 0.0 and seed is not None else None})
    if name == "torch":  # torch's own kernels, after fusenn's checks (torch's CPU fast path skips some of them)
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    seed = (draw_seed_tensor(device=query.device) if seed is None else seed_tensor(seed, query.device)) \
        if dropout_p > 0.0 else None
    scale = reference.default_scale(query, scale)
    if name == "reference":
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa, seed)
    L, S, E, Ev = query.size(-2), key.size(-2), query.size(-1), value.size(-1)
    if hk != hv:  # the kernel shares one head index between key and value: give both Hq heads
        key, value = key.repeat_interleave(hq // hk, dim=-3), value.repeat_interleave(hq // hv, dim=-3)
    hkv = hq if hk != hv else hk
    N = math.prod(batch)
    q = query.expand(batch + (hq, L, E)).reshape(N, hq, L, E)
    k = key.expand(batch + (hkv, S, E)).reshape(N, hkv, S, E)
    v = value.expand(batch + (hkv, S, Ev)).reshape(N, hkv, S, Ev)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(batch + (hq, L, S)).reshape(N, hq, L, S)  # a view unless batch has 2+ dims
    out = attention(q, k, v, mask, dropout_p, is_causal, scale, seed)
    out_batch = batch + (hq,) if query.dim() > 2 or key.dim() > 2 or value.dim() > 2 else ()
    return out.view(out_batch + (L, Ev))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, is_causal: bool,
              scale: float, seed: Optional[Tensor]) -> Tensor:
    """The kernel path on 4-D inputs: q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev), mask None or
    (N, Hq, L, S) (any strides, 0 on broadcast dims); seed a 0-d int64 tensor, or None without dropout."""
    forward = attention_forward if torch.compiler.is_compiling() else _Attention.apply
    return forward(q, k, v, mask, dropout_p, is_causal, scale, seed)[0]


def _on(seed: Optional[Tensor], device) -> Optional[Tensor]:
    """The seed on the kernels' device, where they read it (None without dropout)."""
    return seed.to(device) if seed is not None else None


@torch.library.custom_op("fusenn::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                      scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(out (N, Hq, L, Ev), log2-domain log-sum-exp of each row (N, Hq, L) float32)."""
    from fusenn.kernels import attention as kernels

    seed = _on(seed, q.device)
    N, H, L, _ = q.shape
    out = new_output((N, H, L, v.size(-1)), q.dtype, q.device)
    lse = new_output((N, H, L), torch.float32, q.device)
    return kernels.attention_forward(q, k, v, mask, dropout_p, is_causal, scale, seed, out, lse)


@attention_forward.register_fake
def _(q, k, v, mask, dropout_p, is_causal, scale, seed):
    N, H, L, _ = q.shape
    return q.new_empty((N, H, L, v.size(-1))), q.new_empty((N, H, L), dtype=torch.float32)


@torch.library.custom_op("fusenn::attention_backward", mutates_args=())
def attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
                       seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    from fusenn.kernels import attention as kernels

    seed = _on(seed, q.device)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    delta = new_output(lse.shape, torch.float32, q.device)
    return kernels.attention_backward(grad, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed,
                                      dq, dk, dv, delta)


@attention_backward.register_fake
def _(grad, q, k, v, out, lse, mask, dropout_p, is_causal, scale, seed):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_p, is_causal, scale, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, seed)
    ctx.args = (dropout_p, is_causal, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dq, dk, dv = _AttentionBackward.apply(grad_out, q, k, v, out, lse, mask, *ctx.args, seed)
    return dq, dk, dv, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
_AttentionBackward = once_differentiable(attention_backward, "attention")


class _Attention(torch.autograd.Function):
    """The op with the same backward, as an autograd.Function in the setup_context style: what `attention` calls
    eagerly, because torch.func (grad, vjp, vmap) cannot transform a custom op's registered autograd but can
    transform this. Under torch.compile `attention` calls the op itself."""

    generate_vmap_rule = True
    forward = staticmethod(lambda *args: attention_forward(*args))
    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
