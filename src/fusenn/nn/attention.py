"""fusenn.MultiheadAttention: nn.MultiheadAttention with its attention core in fusenn's SDPA."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusenn.ops.attention import scaled_dot_product_attention


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """MultiheadAttention's masks say True = masked out; as an additive float mask, as torch converts them."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError(f"only bool and floating types of masks are supported, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in nn.MultiheadAttention: the same constructor, parameters (state_dicts move both ways) and forward.

    With need_weights=False the attention runs through fusenn.functional.scaled_dot_product_attention
    (the flash-attention kernel on a GPU): q, k and v enter as head-strided views, and a key_padding_mask
    alone enters as an (N, 1, 1, S) mask broadcast inside the kernel. Its dropout uses fusenn's Philox
    masks, so it draws different masks than torch's. need_weights=True, torch's default, must return the
    L x S weights and takes torch's own (slower, materialising) path.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        key_padding_mask = _additive(key_padding_mask, query.dtype)
        # As torch: the causal hint replaces attn_mask unless a padding mask has to be merged with it.
        attn_mask = None if is_causal and key_padding_mask is None else _additive(attn_mask, query.dtype)
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
        if attn_mask is not None:
            if attn_mask.shape[-2:] != (L, S - extra) or attn_mask.dim() == 3 and attn_mask.size(0) != N * H:
                raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} should be {(L, S - extra)} or "
                                   f"{(N * H, L, S - extra)}")
            mask = F.pad(attn_mask, (0, extra)) if extra else attn_mask
            mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S - extra):
                raise RuntimeError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} should be "
                                   f"{(N, S - extra)}")
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
