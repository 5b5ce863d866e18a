"""Pieces shared by the forward and backward kernels of chunked gated linear attention.

Memory layout (all contiguous): ``q, k [B, T, H, K]``, ``v, o [B, T, H, V]``, ``g [B, T, H]``,
``g_gamma [H]``. Per (batch, head) ``bh = b * H + h``; chunk ``n`` holds tokens
``n*BT .. n*BT+BT-1`` (the last one masked past ``T``). Gate summaries from
:func:`lasp.kernels.simple_gla.fwd.chunk_gates`, all float32:

* ``b  [B, H, T]``  inclusive cumsum of ``a = g + g_gamma`` inside each chunk;
* ``bt [B, H, N]``  the chunk's total log decay;
* ``gs [B, H, N]``  sum of the totals of the chunks before it (exclusive prefix);
* ``ge [B, H, N]``  sum of the totals of the chunks after it (exclusive suffix);
* ``logA [B, H]``   the segment's total log decay.

Decays are always formed as ``exp`` of a non-positive difference taken from these, so nothing
overflows and nothing loses precision far from the segment's start or end.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Gates(NamedTuple):
    """Chunk-level log-decay summaries of one segment (see the module docstring)."""

    b: torch.Tensor
    bt: torch.Tensor
    gs: torch.Tensor
    ge: torch.Tensor
    logA: torch.Tensor


@triton.jit
def mm(a, b, ref_ptr, LOWP: tl.constexpr):
    """``a @ b`` with fp32 accumulation; operands cast to ``ref_ptr``'s dtype when ``LOWP``."""
    if LOWP:
        out = tl.dot(a.to(ref_ptr.dtype.element_ty), b.to(ref_ptr.dtype.element_ty))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


def n_chunks(T: int, BT: int) -> int:
    return triton.cdiv(T, BT)
