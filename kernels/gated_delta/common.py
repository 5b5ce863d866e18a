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


class Factors(NamedTuple):
    """The state-independent per-chunk quantities of one segment (see the module docstring)."""

    qn: torch.Tensor
    kn: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    gc: torch.Tensor
    BT: int
    lowp: bool


@triton.jit
def dot(a, b, LOWP: tl.constexpr):
    """``a @ b`` with fp32 accumulation; bf16 operands when ``LOWP`` (16-bit inputs on a GPU),
    exact fp32 products otherwise (and always under the interpreter, whose bf16 dot is wrong)."""
    if LOWP:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def chunk_last_gate(gc, n, T, BT: tl.constexpr):
    """The cumulative gate at chunk n's last real token (a scalar)."""
    last = tl.minimum(BT, T - n * BT) - 1
    return tl.sum(tl.where(tl.arange(0, BT) == last, gc, 0.0), axis=0)


@triton.jit
def qk_decay(qn, kn, gc, m, LOWP: tl.constexpr, BT: tl.constexpr):
    """``(Q K^T) o e^Gam`` on and below the diagonal, ``[BT, BT]`` (query i, key j)."""
    o = tl.arange(0, BT)
    keep = (o[:, None] >= o[None, :]) & m[None, :]
    dec = tl.where(keep, tl.exp(tl.where(keep, gc[:, None] - gc[None, :], 0.0)), 0.0)
    return dot(qn, tl.trans(kn), LOWP) * dec


def col_block(K: int, ncol: int) -> int:
    """Columns of a ``[K, BV]`` state tile: at most 64, and ``K * BV <= 8192`` floats."""
    return max(16, min(ncol, 64, 8192 // K))


def n_chunks(T: int, BT: int) -> int:
    return triton.cdiv(T, BT)
