"""Single-process softmax attention through ``scaled_dot_product_attention`` (fused kernels on GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(q, k, v, *, causal: bool, scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, H, D]`` q against ``[B, S, H_kv, D]`` k/v (GQA when H_kv < H) -> ``[B, T, H, D]``.

    ``causal`` masks key j for query i when j > i (T == S). ``attn_mask`` (bool, True = keep)
    replaces it for offset layouts.
    """
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    o = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=attn_mask, is_causal=causal and attn_mask is None, scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return o.transpose(1, 2)
