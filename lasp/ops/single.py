"""Single-process linear attention on the whole sequence: the one dispatch that
``lasp.linear_attention`` (no group, or a group of one) and Ulysses (after its all-to-all, on its
head group) both use.

- non-causal: ``scale * Q (K^T V)`` (:func:`lasp.ops.chunk.noncausal_linear_attention`);
- causal, ``backend="torch"``: the chunked torch path with plain autograd
  (:func:`lasp.ops.chunk.chunk_linear_attention`);
- causal, other backends (Triton): the LASP-2 driver over no group, i.e. the segment protocol on
  one segment, with no collective and no state exchange (the first segment's incoming state is
  zero, so the inter pass is skipped).
"""
from __future__ import annotations

import torch

from . import chunk
from .lasp2 import lasp2_apply
from .segment import segment_class


def full_sequence_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    *,
    scale: float,
    causal: bool,
    backend: str,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """Linear attention on ``[B, T, H, .]`` holding the whole sequence (autograd).

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]`` or None, g_gamma ``[H]`` or None;
    ``backend`` already resolved (``torch`` or ``triton``); ``initial_state [B, H, K, V]`` or None
    (causal only). Returns ``o [B, T, H, V]`` in q's dtype, or ``(o, final_state [B, H, K, V])``
    float32 with ``output_final_state``.
    """
    if not causal:
        return chunk.noncausal_linear_attention(q, k, v, scale)
    if backend == "torch":
        return chunk.chunk_linear_attention(
            q, k, v, g, g_gamma, scale, initial_state=initial_state, output_final_state=output_final_state
        )
    return lasp2_apply(
        segment_class(backend), [q, k, v, g], [g_gamma], scale=scale, group=None,
        initial_state=initial_state, output_final_state=output_final_state,
    )
