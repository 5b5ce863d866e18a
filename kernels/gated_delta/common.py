"""Pieces shared by the gated delta rule kernels: the dot helper, tile sizes, the factor bundle.

Intermediate layout (all float32, contiguous, heads first, ``bh = b * H + h``): ``qn, kn
[B, H, T, K]`` (L2-normalised when asked), ``w [B, H, T, K]``, ``u [B, H, T, V]`` (the WY
factors W, U0 of each chunk), ``gc [B, H, T]`` (the inclusive cumulative log gate inside each
chunk; zeros without gates). State snapshots ``[B, H, N, K, X]`` and states ``[B, H, K, X]``
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
    "Factors", "RESET", "dot", "chunk_gates", "pair_decay", "from_start", "to_end", "qk_decay", "state_tile", "col_block", "n_chunks",
]


class Factors(NamedTuple):
    """The state-independent per-chunk quantities of one segment (see the module docstring)."""

    qn: torch.Tensor
    kn: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    gc: torch.Tensor
    gr: torch.Tensor
    BT: int
    lowp: bool


@triton.jit
def state_tile(iv, K: tl.constexpr, BV: tl.constexpr, NCOL):
    """Column tile ``iv`` of a ``[K, NCOL]`` state: ``(row ids, column ids, column mask, offsets)``."""
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    return ck, cv, cv < NCOL, ck[:, None] * NCOL + cv[None, :]


@triton.jit
def chunk_gates(g_ptr, row, m, USE_G: tl.constexpr, BT: tl.constexpr):
    """``(gc, gr)`` of a chunk (module docstring) from the log gates at token-major ``row``."""
    if USE_G:
        a = tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32)
        reset = a < RESET
        gc = tl.cumsum(tl.where(reset, 0.0, a), axis=0)
        gr = tl.cumsum(reset.to(tl.float32), axis=0)
    else:
        gc = tl.zeros([BT], dtype=tl.float32)
        gr = tl.zeros([BT], dtype=tl.float32)
    return gc, gr


@triton.jit
def pair_decay(gc, gr, keep):
    """``[BT, BT]``: ``e^{G_i - G_j}`` where ``keep`` (and no reset between), else 0."""
    keep = keep & (gr[:, None] == gr[None, :])
    return tl.where(keep, tl.exp(tl.where(keep, gc[:, None] - gc[None, :], 0.0)), 0.0)


@triton.jit
def from_start(gc, gr, m):
    """``[BT]``: ``e^{G_i}``, the decay from the chunk's start to token i (0 on padding)."""
    keep = m & (gr == 0)
    return tl.where(keep, tl.exp(tl.where(keep, gc, 0.0)), 0.0)


@triton.jit
def to_end(gc, gr, m, n, T, BT: tl.constexpr):
    """``([BT] e^{G_C - G_j}, e^{G_C})``: decays to chunk n's last real token, and over the chunk."""
    last = tl.minimum(BT, T - n * BT) - 1
    o = tl.arange(0, BT)
    gl = tl.sum(tl.where(o == last, gc, 0.0), axis=0)
    rl = tl.sum(tl.where(o == last, gr, 0.0), axis=0)
    keep = m & (gr == rl)
    return tl.where(keep, tl.exp(tl.where(keep, gl - gc, 0.0)), 0.0), tl.where(rl == 0, tl.exp(gl), 0.0)


@triton.jit
def qk_decay(qn, kn, gc, gr, m, LOWP: tl.constexpr, BT: tl.constexpr):
    """``(Q K^T) o e^Gam`` on and below the diagonal, ``[BT, BT]`` (query i, key j)."""
    o = tl.arange(0, BT)
    return dot(qn, tl.trans(kn), LOWP) * pair_decay(gc, gr, (o[:, None] >= o[None, :]) & m[None, :])


def col_block(K: int, ncol: int) -> int:
    """Columns of a ``[K, BV]`` state tile: at most 64, and ``K * BV <= 8192`` floats."""
    return max(16, min(ncol, 64, 8192 // K))
