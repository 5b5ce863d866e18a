"""Pieces shared by the gated delta rule kernels: the dot helper, tile sizes, the factor bundle.

Intermediate layout (all float32, contiguous, heads first, ``bh = b * H + h``): ``qn, kn
[B, H, T, K]`` (L2-normalised when asked), ``w [B, H, T, K]``, ``u [B, H, T, V]`` (the WY
factors W, U0 of each chunk), ``gc [B, H, T]`` (the inclusive cumulative log gate inside each
chunk; zeros without gates), ``gr [B, H, T]`` (the inclusive count of hard resets inside each
chunk) and ``gn [B, H, T]`` (the next token's log gate ``a_{t+1}`` inside the chunk: 0 at its last
token and at resets).

Decays over a span ``(j, i]`` are ``exp`` of the span's own sum (a scan of ``gn``), never of a
difference ``G_i - G_j`` of cumulative gates: with strong gates ``G`` reaches -1000s inside a chunk,
and the difference of two such fp32 numbers is off by ``ulp(G)`` ~ 1e-4 (a relative error of the
decay). Only decays from the chunk's start (``e^{G_i}``) use ``gc``. State snapshots ``[B, H, N, K, X]`` and states ``[B, H, K, X]``
with ``X = V`` (or ``K`` for the transition's trajectory from the identity).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..simple_gla.common import RESET, n_chunks
from ..simple_gla.common import mm_state as dot  # a @ b, fp32 accumulation, bf16 operands when LOWP

__all__ = [
    "Factors", "RESET", "dot", "chunk_gates", "span_sums", "pair_decay", "from_start", "to_end", "qk_decay", "state_tile", "col_block", "n_chunks",
]


class Factors(NamedTuple):
    """The state-independent per-chunk quantities of one segment (see the module docstring)."""

    qn: torch.Tensor
    kn: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    gc: torch.Tensor
    gr: torch.Tensor
    gn: torch.Tensor
    BT: int
    lowp: bool


@triton.jit
def state_tile(iv, K: tl.constexpr, BV: tl.constexpr, NCOL):
    """Column tile ``iv`` of a ``[K, NCOL]`` state: ``(row ids, column ids, column mask, offsets)``."""
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    return ck, cv, cv < NCOL, ck[:, None] * NCOL + cv[None, :]


@triton.jit
def chunk_gates(g_ptr, row, t, T, H: tl.constexpr, USE_G: tl.constexpr, BT: tl.constexpr):
    """``(gc, gr, gn)`` of a chunk (module docstring) from the log gates at token-major ``row``
    (tokens ``t``; the next token's row is ``row + H``)."""
    m = t < T
    if USE_G:
        a = tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32)
        reset = a < RESET
        gc = tl.cumsum(tl.where(reset, 0.0, a), axis=0)
        gr = tl.cumsum(reset.to(tl.float32), axis=0)
        nxt = (tl.arange(0, BT) + 1 < BT) & (t + 1 < T)
        an = tl.load(g_ptr + row + H, mask=nxt, other=0.0).to(tl.float32)
        gn = tl.where(an < RESET, 0.0, an)
    else:
        gc = tl.zeros([BT], dtype=tl.float32)
        gr = tl.zeros([BT], dtype=tl.float32)
        gn = tl.zeros([BT], dtype=tl.float32)
    return gc, gr, gn


@triton.jit
def span_sums(gn, BT: tl.constexpr):
    """``[BT, BT]``: ``G_i - G_j`` for ``j < i`` as the sum of the gates of tokens ``j+1 .. i``
    (0 on and above the diagonal); exact to the span's own rounding (module docstring)."""
    o = tl.arange(0, BT)
    return tl.cumsum(tl.where(o[None, :] < o[:, None], gn[None, :], 0.0), axis=1, reverse=True)


@triton.jit
def pair_decay(gn, gr, m, keep, BT: tl.constexpr):
    """``[BT, BT]``: ``e^{G_i - G_j}`` where ``keep``, both tokens are real (``m``) and no reset lies
    between, else 0. Both masks matter for a padded last chunk (and the exponent is a span sum,
    finite and <= 0 everywhere: no overflow to inf and 0 * inf = NaN downstream)."""
    keep = keep & m[:, None] & m[None, :] & (gr[:, None] == gr[None, :])
    return tl.where(keep, tl.exp(span_sums(gn, BT)), 0.0)


@triton.jit
def from_start(gc, gr, m):
    """``[BT]``: ``e^{G_i}``, the decay from the chunk's start to token i (0 on padding)."""
    keep = m & (gr == 0)
    return tl.where(keep, tl.exp(tl.where(keep, gc, 0.0)), 0.0)


@triton.jit
def to_end(gc, gr, gn, m, n, T, BT: tl.constexpr):
    """``([BT] e^{G_C - G_j}, e^{G_C})``: decays to chunk n's last real token, and over the chunk
    (``G_C - G_j`` as the reverse scan of the next tokens' gates)."""
    last = tl.minimum(BT, T - n * BT) - 1
    o = tl.arange(0, BT)
    gl = tl.sum(tl.where(o == last, gc, 0.0), axis=0)
    rl = tl.sum(tl.where(o == last, gr, 0.0), axis=0)
    keep = m & (gr == rl)
    return tl.where(keep, tl.exp(tl.cumsum(gn, axis=0, reverse=True)), 0.0), tl.where(rl == 0, tl.exp(gl), 0.0)


@triton.jit
def qk_decay(qn, kn, gn, gr, m, LOWP: tl.constexpr, BT: tl.constexpr):
    """``(Q K^T) o e^Gam`` on and below the diagonal, ``[BT, BT]`` (query i, key j)."""
    o = tl.arange(0, BT)
    return dot(qn, tl.trans(kn), LOWP) * pair_decay(gn, gr, m, o[:, None] >= o[None, :], BT)


def col_block(K: int, ncol: int) -> int:
    """Columns of a ``[K, BV]`` state tile: at most 64, and ``K * BV <= 8192`` floats."""
    return max(16, min(ncol, 64, 8192 // K))
