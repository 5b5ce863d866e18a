"""Pieces shared by the forward and backward kernels of chunked gated linear attention.

Memory layout (all contiguous): ``q, k [B, T, H, K]``, ``v, o [B, T, H, V]``, ``g [B, T, H]``,
``g_gamma [H]``. Per (batch, head) ``bh = b * H + h``; chunk ``n`` holds tokens
``n*BT .. n*BT+BT-1`` (the last one masked past ``T``). Gate summaries from
:func:`lasp.kernels.simple_gla.fwd.chunk_gates`, all float32, for ``a = g + g_gamma``:

* ``b  [B, H, T]``  inclusive cumsum inside each chunk of the gates that are not resets;
* ``r  [B, H, T]``  inclusive count inside each chunk of the resets (``a`` below
  :data:`RESET`, ``-inf`` included: see :mod:`lasp.ops.recurrence`);
* ``bt [B, H, N]``  the chunk's total log decay (``-inf`` if it holds a reset);
* ``gs [B, H, N]``  sum of the totals of the chunks before it (exclusive prefix);
* ``ge [B, H, N]``  sum of the totals of the chunks after it (exclusive suffix);
* ``logA [B, H]``   the segment's total log decay (the plain sum of ``a``).

Decays are always formed as ``exp`` of a non-positive value: either a sum of totals (which
may be ``-inf``; never a difference of them) or a difference ``b_i - b_j`` of finite cumsums,
masked to 0 where a reset lies between j and i (``r_i != r_j``). So nothing overflows, no
``-inf - (-inf)`` arises, and nothing loses precision far from the segment's start or end.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...ops.recurrence import RESET_LOG_DECAY

#: Log decays below this are hard resets (:data:`lasp.ops.recurrence.RESET_LOG_DECAY`).
RESET = tl.constexpr(RESET_LOG_DECAY)


class Gates(NamedTuple):
    """Chunk-level log-decay summaries of one segment (see the module docstring)."""

    b: torch.Tensor
    r: torch.Tensor
    bt: torch.Tensor
    gs: torch.Tensor
    ge: torch.Tensor
    logA: torch.Tensor


#: Precision of fp32 dots (fp32 inputs): 3xTF32 on tensor cores, fp32-like accuracy (the split
#: ``a = a_hi + a_lo`` keeps about 21 mantissa bits per product). "ieee" lowers to unrolled FMAs:
#: ptxas then gives 64x64 tiles 32 registers and 8-30 KB of spills per thread (compile_check, sm_80
#: and sm_90). The interpreter computes every dot in fp32 regardless.
FP32_DOT = tl.constexpr("tf32x3")


@triton.jit
def mm(a, b, ref_ptr, LOWP: tl.constexpr):
    """``a @ b`` with fp32 accumulation; operands cast to ``ref_ptr``'s dtype when ``LOWP``."""
    if LOWP:
        out = tl.dot(a.to(ref_ptr.dtype.element_ty), b.to(ref_ptr.dtype.element_ty))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32_DOT)
    return out


@triton.jit
def mm_state(a, b, LOWP: tl.constexpr):
    """``a @ b`` where one operand is a state (fp32 range): bf16 operands when ``LOWP`` (fp16 would
    overflow past 65504), fp32 accumulation."""
    if LOWP:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32_DOT)
    return out


@triton.jit
def masked_exp(keep, x):
    """``exp(x)`` where ``keep``, else 0."""
    return tl.where(keep, tl.exp(x), 0.0)


@triton.jit
def load_gates(b_ptr, r_ptr, bh, t, m, T):
    """This chunk's ``b`` and ``r`` at tokens ``t`` (0 where ``m`` is False)."""
    off = bh.to(tl.int64) * T + t
    return tl.load(b_ptr + off, mask=m, other=0.0), tl.load(r_ptr + off, mask=m, other=0.0)


@triton.jit
def to_chunk_end(bb, rr, n, T, BT: tl.constexpr):
    """Per token j of chunk n: the decay ``e^(a_{j+1} + ... + a_last)`` to the chunk's last token."""
    last = tl.minimum(BT, T - n * BT) - 1
    o = tl.arange(0, BT)
    b_last = tl.sum(tl.where(o == last, bb, 0.0), axis=0)
    r_last = tl.sum(tl.where(o == last, rr, 0.0), axis=0)
    return masked_exp(rr == r_last, b_last - bb)


def n_chunks(T: int, BT: int) -> int:
    return triton.cdiv(T, BT)
