"""Scaled dot-product attention in plain PyTorch: the ground truth for the kernels and the CPU fallback.

Materialises the L x S scores. Semantics are torch.nn.functional.scaled_dot_product_attention's, plus a
`seed` for dropout: the mask is Philox's (fusenn.reference.philox) with element (..., l, s) of the
(*batch, Hq, L, S) attention matrix using the counter of its flat row-major index, so the Triton kernel
draws the same mask for the same seed. Rows whose keys are all masked out give zeros, as torch's do.
Half-precision inputs are computed in float32 and the result cast back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fusenn.reference import philox


def attention_shapes(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """(batch, Hq, Hk, Hv): the broadcast batch dims (without heads) and the head counts, checked as torch's
    math path checks them (RuntimeError). With enable_gqa, Hk and Hv must each divide Hq (they may differ)."""
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise RuntimeError(f"Expected query, key, and value to all be at least 2 dimensional, but got query.dim: "
                           f"{query.dim()} key.dim: {key.dim()} and value.dim: {value.dim()} instead.")
    if query.size(-1) != key.size(-1):
        raise RuntimeError(f"Expected query and key to have the same embedding size, but got query.size(-1): "
                           f"{query.size(-1)} and key.size(-1): {key.size(-1)} instead.")
    if key.size(-2) != value.size(-2):
        raise RuntimeError(f"Expected key and value to have the same sequence length, but got key.size(-2): "
                           f"{key.size(-2)} and value.size(-2): {value.size(-2)} instead.")
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and value.dim() >= 3:
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hq % hk or hq % hv:
            raise RuntimeError(f"Number of heads in key and value must divide the number of heads in query, got "
                               f"{hk} and {hv} key / value heads for {hq} query heads")
        batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        return tuple(batch), hq, hk, hv
    lead = _broadcast(_broadcast(query.shape[:-2], key.shape[:-2]), value.shape[:-2])  # as the math path's matmuls
    heads = lead[-1] if len(lead) else 1
    return tuple(lead[:-1]), heads, heads, heads


# From torch 2.14 on the math path views 3-D inputs as 4-D, so its errors count batch dims from two
_MIN_BATCH_DIMS = 2 if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14) else 0


def _broadcast(a, b) -> tuple:
    """The broadcast of shapes a and b, refused in the words of torch's broadcasting (its rightmost mismatch)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    for i in reversed(range(n)):
        if a[i] != b[i] and a[i] != 1 and b[i] != 1:
            raise RuntimeError(f"The size of tensor a ({a[i]}) must match the size of tensor b ({b[i]}) at "
                               f"non-singleton dimension {i + max(0, _MIN_BATCH_DIMS - n)}")
    return tuple(x if y == 1 else y for x, y in zip(a, b))


def default_scale(query: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(query.size(-1)) if scale is None else float(scale)


def dropout_keep(shape, p: float, seed: int, device) -> Tensor:
    """The bool keep-mask over the (*batch, Hq, L, S) attention matrix."""
    return philox.dropout_mask(math.prod(shape), p, seed, 0, device).view(shape)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                  dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                  enable_gqa: bool = False, seed: Optional[int] = None) -> Tensor:
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: explicit attn_mask should not be set when is_causal=True")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("the reference attention needs a seed for dropout")
    _, hq, hk, hv = attention_shapes(query, key, value, enable_gqa)
    if hq != hk:  # GQA: query head h reads key head h // (hq // hk), value head h // (hq // hv)
        key = key.repeat_interleave(hq // hk, dim=-3)
    if hq != hv:
        value = value.repeat_interleave(hq // hv, dim=-3)
    dtype = query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = query.to(compute), key.to(compute), value.to(compute)
    scores = (q @ k.transpose(-2, -1)) * default_scale(query, scale)
    L, S = scores.shape[-2:]
    allowed = None
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(compute)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows whose keys are all masked: zeros, and zero gradients (a softmax over -inf alone would pass NaN back
    # to q, k and a float mask, where torch's math path passes zeros)
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        keep = dropout_keep(weights.shape, dropout_p, seed, weights.device)
        weights = weights * keep / (1.0 - dropout_p) if dropout_p < 1.0 else weights * 0.0
    return (weights @ v).to(dtype)
