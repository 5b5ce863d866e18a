"""Chunked causal linear attention in plain torch: the CPU compute path (differentiable).

Internal layout is head-first and float32: ``q, k [B, H, T, K]``, ``v [B, H, T, V]``,
per-token log-decay ``a [B, H, T]`` (``a = g + g_gamma``; ``None`` when there are no gates).

A segment of tokens (a chunk, or a rank's whole shard) maps the state entering it to the state
leaving it by ``S_out = exp(logA) * S_in + M`` with

    logA = sum_j a_j,        M = sum_j exp(G_T - G_j) k_j^T v_j,        G = cumsum(a)

and its output splits into a part that does not depend on ``S_in`` (computed here by the
chunked algorithm) and the inter part ``scale * (q * exp(G)) @ S_in``. The Triton kernels
under ``kernels/`` follow the same decomposition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .recurrence import RESET_LOG_DECAY, log_gates

DEFAULT_CHUNK_SIZE = 64


def to_heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` (any dtype) -> ``[B, H, T, D]`` float32."""
    return x.transpose(1, 2).float()


def masked_exp(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` where ``keep``, exactly 0 elsewhere (and no gradient reaches ``x`` there, even
    where ``x`` would overflow)."""
    return torch.where(keep, x, torch.full_like(x, float("-inf"))).exp()


def inter_output(q: torch.Tensor, a: torch.Tensor | None, state: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (q * exp(G)) @ state``: the part of a segment's output due to the state entering it."""
    if a is not None:
        q = q * a.cumsum(-1).exp()[..., None]
    return (q @ state) * scale


def inter_state_grad(q: torch.Tensor, a: torch.Tensor | None, do: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of the loss w.r.t. the state entering a segment: ``scale * (q * exp(G))^T @ dO``."""
    if a is not None:
        q = q * a.cumsum(-1).exp()[..., None]
    return (q.transpose(-1, -2) @ do) * scale


class ChunkedSegment:
    """A segment cut into chunks of ``C`` tokens, with the state scan done (float32, autograd).

    Built in two steps so LASP-2 can send the segment's summary before the O(T*C) intra-chunk
    work: ``__init__`` computes each chunk's own state and runs the cheap sequential scan over
    chunks (N steps of K x V), which gives the state entering every chunk and the state
    leaving the segment; :meth:`output` then computes the outputs.
    """

    def __init__(self, q, k, v, a, chunk_size: int = DEFAULT_CHUNK_SIZE, initial_state=None):
        B, H, T, K = q.shape
        V = v.shape[-1]
        C = max(1, min(chunk_size, T))
        N = -(-T // C)
        pad = N * C - T
        if pad:  # zero tokens with zero log-decay change neither earlier outputs nor the states
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            a = None if a is None else F.pad(a, (0, pad))
        self.T, self.C = T, C
        self.qc, self.kc, self.vc = (x.reshape(B, H, N, C, -1) for x in (q, k, v))
        if a is None:
            self.b = self.r = None
            k_dec, decays = self.kc, None
        else:
            # resets (see lasp.ops.recurrence.RESET_LOG_DECAY): the within-chunk cumsum b of the
            # other gates and the count r of resets so far; e^(a_{j+1} + .. + a_i) is
            # e^(b_i - b_j) when r_i == r_j, else 0
            reset = a < RESET_LOG_DECAY
            self.b = a.masked_fill(reset, 0.0).reshape(B, H, N, C).cumsum(-1)  # within-chunk inclusive cumsum
            self.r = reset.reshape(B, H, N, C).cumsum(-1)
            total, r_last = self.b[..., -1:], self.r[..., -1:]  # [B, H, N, 1]
            k_dec = self.kc * masked_exp(r_last == self.r, total - self.b)[..., None]
            decays = masked_exp(r_last[..., 0] == 0, total[..., 0]).unbind(2)
        chunk_states = k_dec.transpose(-1, -2) @ self.vc  # [B, H, N, K, V]
        S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
        entering = []
        # unbind, not chunk_states[:, :, n]: the backward of N indexings writes N full-size zero
        # tensors (quadratic in T: 50x slower backward at 16K tokens); unbind's backward stacks once
        for n, state in enumerate(chunk_states.unbind(2)):
            entering.append(S)
            S = S * decays[n][:, :, None, None] + state if decays is not None else S + state
        self.entering = torch.stack(entering, dim=2)  # state entering each chunk [B, H, N, K, V]
        self.final_state = S

    def output(self, scale: float) -> torch.Tensor:
        """``o [B, H, T, V]``: intra-chunk part plus each chunk's entering state."""
        qc, kc, vc, b = self.qc, self.kc, self.vc, self.b
        B, H, N, C, _ = qc.shape
        scores = qc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
        if b is None:
            scores = scores.masked_fill(~causal, 0.0)
            q_dec = qc
        else:
            r = self.r
            same = causal & (r[..., :, None] == r[..., None, :])
            scores = scores * masked_exp(same, b[..., :, None] - b[..., None, :])
            q_dec = qc * masked_exp(r == 0, b)[..., None]
        o = scores @ vc + q_dec @ self.entering
        return (o * scale).reshape(B, H, N * C, -1)[:, :, : self.T]


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """Single-process chunked causal linear attention, ``[B, T, H, D]`` in and out (autograd).

    Same semantics as :func:`lasp.ops.reference.naive_recurrent_linear_attention`.
    """
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    a = log_gates(g, g_gamma, B, T, H, q.device)
    seg = ChunkedSegment(to_heads_first(q), to_heads_first(k), to_heads_first(v), a, chunk_size, initial_state)
    o, S = seg.output(scale).transpose(1, 2).to(q.dtype), seg.final_state
    return (o, S) if output_final_state else o


def noncausal_linear_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Single-process bidirectional linear attention ``scale * Q (K^T V)``, float32 state."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = torch.einsum("bthk,bthv->bhkv", k.float(), v.float())
    return (torch.einsum("bthk,bhkv->bthv", q.float(), S) * scale).to(q.dtype)
