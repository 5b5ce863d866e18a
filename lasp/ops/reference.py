"""Naive oracles on the whole sequence in one process. Slow, obviously right, float64-capable.

Layout everywhere: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H]``, g_gamma ``[H]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recurrence import log_gates, recurrent_update


def naive_recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Token-by-token gated linear attention (``naive_recurrent_simple_gla`` semantics).

    ``S_t = exp(g_t + g_gamma) * S_{t-1} + k_t^T v_t``; ``o_t = scale * q_t S_t``.

    Args:
        compute_dtype: dtype of the recurrence (default: float32, or float64 for float64 inputs).
        initial_state: ``[B, H, K, V]`` state before the first token.
    Returns:
        ``o [B, T, H, V]`` in the input dtype, and the final state ``[B, H, K, V]`` if asked.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    cd = compute_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = K**-0.5 if scale is None else scale
    q, k, v = (x.to(cd).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    a = log_gates(g, g_gamma, B, T, H, q.device, dtype=cd)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(cd)
    outs = []
    for t in range(T):
        o_t, S = recurrent_update(q[:, :, t], k[:, :, t], v[:, :, t], None if a is None else a[:, :, t], S, scale)
        outs.append(o_t)
    o = torch.stack(outs, dim=2).transpose(1, 2).to(dtype)
    return (o, S) if output_final_state else o


def naive_noncausal_linear_attention(q, k, v, scale: float | None = None, compute_dtype=None):
    """Bidirectional linear attention: ``O = scale * Q (K^T V)`` per (batch, head)."""
    dtype = q.dtype
    cd = compute_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = torch.einsum("bthk,bthv->bhkv", k.to(cd), v.to(cd))
    return (torch.einsum("bthk,bhkv->bthv", q.to(cd), S) * scale).to(dtype)


def linear_attention_reference(q, k, v, g=None, g_gamma=None, *, scale=None, causal=True, compute_dtype=None):
    """The oracle behind ``lasp.linear_attention`` on the whole sequence."""
    if causal:
        return naive_recurrent_linear_attention(q, k, v, g, g_gamma, scale, compute_dtype=compute_dtype)
    return naive_noncausal_linear_attention(q, k, v, scale, compute_dtype=compute_dtype)


def softmax_attention_reference(q, k, v, *, causal=True, scale=None, compute_dtype=None):
    """Full softmax attention (explicit matrix, GQA by head repetition). q ``[B,T,H,D]``, k/v ``[B,T,Hkv,D]``."""
    dtype = q.dtype
    cd = compute_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    H, Hkv = q.shape[2], k.shape[2]
    rep = H // Hkv
    q, k, v = (x.to(cd).transpose(1, 2) for x in (q, k, v))
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        T, S = s.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)
        s = s.masked_fill(~mask, float("-inf"))
    return (F.softmax(s, dim=-1) @ v).transpose(1, 2).to(dtype)
