"""Pieces shared by the gated delta rule kernels: the dot helper, tile sizes, the factor bundle, the
gate decays and the blocked triangular inverse.

Intermediate layout (float32, contiguous, heads first, ``bh = b * H + h`` over the VALUE heads H):
``qn, kn [B, HK, T, K]`` (L2-normalised when asked; one per q/k head: with GVA, ``H = G * HK``, value
head ``bh`` reads row ``bh // G``, nothing is repeated), ``w [B, H, T, K]``, ``u [B, H, T, V]`` (the WY factors W, U0 of each
chunk), ``x [B, H, T, BT]`` (each chunk's ``(I + L)^-1``, its rows), ``gc [B, H, T]`` (the
inclusive cumulative log gate inside each chunk; zeros without gates), ``gr [B, H, T]`` (the
inclusive count of hard resets inside each chunk), ``gn [B, H, T]`` (the next token's log gate
``a_{t+1}`` inside the chunk: 0 at its last token and at resets) and, with the in-kernel L2 norm,
``rq, rk [B, HK, T]`` (the inverse norms of the raw q, k rows).

Decays over a span ``(j, i]`` are ``exp`` of the span's own sum (a scan of ``gn``), never of a
difference ``G_i - G_j`` of cumulative gates: with strong gates ``G`` reaches -1000s inside a chunk,
and the difference of two such fp32 numbers is off by ``ulp(G)`` ~ 1e-4 (a relative error of the
decay). Only decays from the chunk's start (``e^{G_i}``) use ``gc``. State snapshots
``[B, H, N, K, X]`` (:func:`snapshot_dtype`) and states ``[B, H, K, X]`` (float32) with ``X = V`` (or ``K``
for the transition's trajectory from the identity).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..simple_gla.common import RESET, n_chunks
from ..simple_gla.common import mm_state as dot  # a @ b, fp32 accumulation, bf16 operands when LOWP

__all__ = [
    "Factors", "RESET", "dot", "chunk_gates", "span_sums", "pair_decay", "from_start", "to_end", "state_tile",
    "col_block", "n_chunks", "snapshot_dtype", "invert_unit_lower",
]


class Factors(NamedTuple):
    """The state-independent per-chunk quantities of one segment (see the module docstring)."""

    qn: torch.Tensor
    kn: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    x: torch.Tensor
    gc: torch.Tensor
    gr: torch.Tensor
    gn: torch.Tensor
    rq: torch.Tensor | None
    rk: torch.Tensor | None
    BT: int
    lowp: bool
    snap: torch.dtype  # of the trajectories' snapshots: h, vn, dh
    tile: int  # the largest tile along a head dim (``utils.tile_cap`` of the inputs' dtype)
    G: int = 1  # value heads per q/k head (GVA): qn, kn, rq, rk are per q/k head, ``bh // G``


def snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the trajectories' snapshots (``h``, ``vn``, ``dh``): bf16 for 16-bit inputs (their
    dots take bf16 operands on a GPU anyway; fp16 could overflow on long sequences), else float32.
    The factors stay float32: stored in bf16, W and U0 (and the normalised q, k) cost fla's test_gdn
    tolerances (dk 9.5e-3 > 8e-3 at fp16 inputs, measured under the interpreter)."""
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


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


def col_block(K: int, ncol: int, floats: int = 8192) -> int:
    """Columns of a ``[K, BV]`` state tile: at most 64, and ``K * BV <= floats``."""
    return max(16, min(ncol, 64, floats // K))


@triton.jit
def _block16(base, a: tl.constexpr, b: tl.constexpr, BT: tl.constexpr):
    """Pointers of the ``[16, 16]`` block (a, b) of a row-major ``[BT, BT]`` tile at ``base``."""
    r = tl.arange(0, 16)
    return base + (a * 16 + r)[:, None] * BT + (b * 16 + r)[None, :]


@triton.jit
def _inv16(base, a: tl.constexpr, BT: tl.constexpr):
    """``(I + L_aa)^-1`` of the strictly lower diagonal block a, by forward substitution (15 steps
    on a ``[16, 16]`` tile): ``X_i = e_i - sum_{j<i} L_ij X_j``."""
    La = tl.load(_block16(base, a, a, BT))
    o = tl.arange(0, 16)
    X = (o[:, None] == o[None, :]).to(tl.float32)
    for i in tl.static_range(1, 16):
        li = tl.sum(tl.where(o[:, None] == i, La, 0.0), axis=0)
        xi = tl.sum(li[:, None] * X, axis=0)
        X = tl.where(o[:, None] == i, X - xi[None, :], X)
    return X


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def invert_unit_lower(base, BT: tl.constexpr):
    """In place: the strictly lower ``[BT, BT]`` float32 ``L`` at ``base`` (row-major, this
    program's own scratch) becomes ``(I + L)^-1``, blockwise: the ``[16, 16]`` diagonal blocks by
    forward substitution, the blocks below by ``X_ab = -X_aa sum_{b <= c < a} L_ac X_cb`` with
    fp32 ``tl.dot`` (BT = 16, 32 or 64). The caller puts a barrier between its store of ``L`` and
    this call, and after it."""
    X00 = _inv16(base, 0, BT)
    if BT >= 32:
        X11 = _inv16(base, 1, BT)
        L10 = tl.load(_block16(base, 1, 0, BT))
    if BT == 64:
        X22 = _inv16(base, 2, BT)
        X33 = _inv16(base, 3, BT)
        L20 = tl.load(_block16(base, 2, 0, BT))
        L21 = tl.load(_block16(base, 2, 1, BT))
        L30 = tl.load(_block16(base, 3, 0, BT))
        L31 = tl.load(_block16(base, 3, 1, BT))
        L32 = tl.load(_block16(base, 3, 2, BT))
    tl.debug_barrier()  # every block of L is read before X overwrites it
    tl.store(_block16(base, 0, 0, BT), X00)
    if BT >= 32:
        X10 = -_mm(X11, _mm(L10, X00))
        tl.store(_block16(base, 1, 0, BT), X10)
        tl.store(_block16(base, 1, 1, BT), X11)
    if BT == 64:
        X21 = -_mm(X22, _mm(L21, X11))
        X20 = -_mm(X22, _mm(L20, X00) + _mm(L21, X10))
        X32 = -_mm(X33, _mm(L32, X22))
        X31 = -_mm(X33, _mm(L31, X11) + _mm(L32, X21))
        X30 = -_mm(X33, _mm(L30, X00) + _mm(L31, X10) + _mm(L32, X20))
        tl.store(_block16(base, 2, 0, BT), X20)
        tl.store(_block16(base, 2, 1, BT), X21)
        tl.store(_block16(base, 2, 2, BT), X22)
        tl.store(_block16(base, 3, 0, BT), X30)
        tl.store(_block16(base, 3, 1, BT), X31)
        tl.store(_block16(base, 3, 2, BT), X32)
        tl.store(_block16(base, 3, 3, BT), X33)
