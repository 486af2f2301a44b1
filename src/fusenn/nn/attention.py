"""fusenn.MultiheadAttention: nn.MultiheadAttention with its attention core in fusenn's SDPA."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusenn import dispatch
from fusenn.ops.attention import scaled_dot_product_attention


def _additive(mask: Optional[Tensor], dtype: torch.dtype, name: str = "masks") -> Optional[Tensor]:
    """MultiheadAttention's masks say True = masked out; as an additive float mask, as torch converts them."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _check(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
           attn_mask: Optional[Tensor]) -> None:
    """torch.nn.functional.multi_head_attention_forward's checks, in its words and exception types (AssertionError
    for the shapes it asserts, RuntimeError for attn_mask's), before any projection or kernel."""
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query "
                             "tensor")
    batched = query.dim() == 3
    kind = "batched (3-D)" if batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                             f"{key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise AssertionError(f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D "
                             f"but found {key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise AssertionError(f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                             f"{attn_mask.dim()}-D tensor instead")
    if query.size(-1) != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {query.size(-1)}")
    if mha._qkv_same_embed_dim and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if not mha._qkv_same_embed_dim and key.shape[:-1] != value.shape[:-1]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's "
                             f"{value.shape[:-1]}")
    seq, bat = (1, 0) if batched and mha.batch_first else (0, 1)
    L, S, N = query.size(seq), key.size(seq), query.size(bat) if batched else 1
    if batched and key.size(bat) != N:
        raise RuntimeError(f"Expected key and value to have the batch size {N} of query, got {key.size(bat)}")
    if attn_mask is not None:
        want = (L, S) if attn_mask.dim() == 2 else (N * mha.num_heads, L, S)
        if attn_mask.shape != want and not batched and attn_mask.dim() == 3:
            raise AssertionError(f"Expected `attn_mask` shape to be {want} but got {attn_mask.shape}")
        if attn_mask.shape != want:
            raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be "
                               f"{want}.")
    if key_padding_mask is not None and batched and key_padding_mask.shape != (N, S):
        axis = 0 if key_padding_mask.size(0) != N else 1
        raise AssertionError(f"Expected key_padded_mask.shape[{axis}] to be {(N, S)[axis]}, but got "
                             f"{key_padding_mask.shape[axis]}")
    if key_padding_mask is not None and not batched and key_padding_mask.shape != (S,):
        raise AssertionError(f"Expected key_padded_mask.shape[0] to be {S}, but got {key_padding_mask.shape[0]}")


def _runs_torch(query: Tensor) -> bool:
    """Whether the "torch" backend takes this forward: chosen (or auto's for query's device; the kernel paths'
    own reasons are given by the SDPA call they make)."""
    if dispatch.get_backend() not in ("auto", "torch"):
        return False
    return dispatch.choose("attention", query.device, {"reference": None, "triton": None, "torch": None}) == "torch"


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in nn.MultiheadAttention: the same constructor, parameters (state_dicts move both ways) and forward.

    With need_weights=False the attention runs through fusenn.functional.scaled_dot_product_attention
    (the flash-attention kernel on a GPU): q, k and v enter as head-strided views, and a key_padding_mask
    alone enters as an (N, 1, 1, S) mask broadcast inside the kernel. Its dropout uses fusenn's Philox
    masks, so it draws different masks than torch's. need_weights=True, torch's default, must return the
    L x S weights and takes torch's own (slower, materialising) path; so do nested-tensor inputs and every call
    the "torch" backend takes (auto's choice for CPU tensors): torch's whole forward, its inference fast path
    included, so the results are torch's exactly (a row whose keys are all masked gives NaN on that fast path
    and zeros on torch's other paths).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights or query.is_nested or _runs_torch(query):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        _check(self, query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        key_padding_mask = _additive(key_padding_mask, query.dtype, "key_padding_mask")
        # As torch: the causal hint replaces attn_mask unless a padding mask has to be merged with it.
        attn_mask = None if is_causal and key_padding_mask is None else _additive(attn_mask, query.dtype, "attn_mask")
        is_causal = is_causal and attn_mask is None

        batched = query.dim() == 3
        self_attention = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, N, E = query.shape
        H, hd = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value, self_attention)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
        q = q.view(L, N, H, hd).permute(1, 2, 0, 3)  # (N, H, L, hd) views: the kernel takes any strides
        k = k.view(k.size(0), N, H, hd).permute(1, 2, 0, 3)
        v = v.view(v.size(0), N, H, hd).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        S = k.size(2)
        extra = S - key.size(0)  # bias_kv and zero-attention columns, never masked

        mask = None
        if attn_mask is not None:  # shapes checked by _check
            mask = F.pad(attn_mask, (0, extra)) if extra else attn_mask
            mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        if key_padding_mask is not None:
            padding = (F.pad(key_padding_mask, (0, extra)) if extra else key_padding_mask).view(N, 1, 1, S)
            mask = padding if mask is None else mask + padding

        out = scaled_dot_product_attention(q, k, v, mask, self.dropout if self.training else 0.0, is_causal)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(L, N, E), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if self_attention:  # one GEMM
            return F.linear(query, w, b).chunk(3, dim=-1)
        return F.linear(query, w[:E], bq), F.linear(key, w[E:2 * E], bk), F.linear(value, w[2 * E:], bv)
