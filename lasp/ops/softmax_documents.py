"""Softmax attention over packed documents (``cu_seqlens``) without a mask.

With documents a query at global position t sees the keys ``[doc_start(t), t]`` (causal) or its
whole document (non-causal), never another document's. Every method cuts its work into PIECES:
``(rows, cols, diagonal)``, local query rows against key columns of the key tensor at hand,
either fully visible or the square causal diagonal: exactly the two block kinds a flash kernel
computes without a mask (:mod:`lasp.ops.softmax_local`). A (query run, key range) pair is split
at document boundaries (:func:`doc_pieces`): each document's queries against the part of their
document inside the key range, a bottom-right aligned causal span (a fully visible prefix plus the
diagonal) or, when the key range ends before them, one fully visible block. Nothing of size
``T_local x T`` (or document x document beyond one piece) is built.

Pieces of one query row are merged by log-sum-exp (:func:`pieces_forward`), and go through the
flash backward with the final output and log-sum-exp (:func:`pieces_backward`).

- :func:`document_bounds`: a validated ``cu_seqlens`` as Python ints (the one host copy, made by
  the public wrapper, outside forward/backward).
- :func:`doc_pieces`: the pieces of a query run against a key range.
- :func:`document_attention`: single-process attention over documents (``group=None``, and
  Ulysses after its all-to-all, which holds the whole sequence on ``H/P`` heads).

Cost: one kernel call per (document, key range) pair, so many tiny documents make many small
calls (256 documents of 32 tokens: 256 calls on one process); each call's work is its document's
size, so the total work falls with the number of documents.
"""
from __future__ import annotations

from bisect import bisect_right

import torch

from .softmax_local import attend, attend_backward, merge_partial, sdpa_attention

Piece = tuple[slice, slice, "bool | torch.Tensor"]
"""``(rows, cols, kind)``: local query rows, key columns; ``kind`` True = the square causal
diagonal, False = fully visible, or a small bool mask ``[rows, cols]`` (a group of tiny documents)."""


def document_bounds(cu_seqlens: torch.Tensor | None) -> tuple[int, ...] | None:
    """A validated ``cu_seqlens [N+1]`` as a tuple of Python ints, or None (no documents)."""
    if cu_seqlens is None:
        return None
    return tuple(int(x) for x in cu_seqlens.detach().to("cpu", torch.int64).tolist())


SMALL_DOCUMENT = 32
"""Documents of at most this many tokens, whole inside a query run and its key range, are grouped."""
GROUP_ROWS = 128
"""Tokens per group of small documents: one masked block of ``GROUP_ROWS x GROUP_ROWS`` at most."""


def doc_pieces(q_start: int, row0: int, n_q: int, k_start: int, col0: int, n_k: int, bounds: tuple[int, ...], causal: bool) -> list[Piece]:
    """The pieces of queries at global positions ``[q_start, q_start + n_q)`` (local rows from
    ``row0``) against keys at global ``[k_start, k_start + n_k)`` (key columns from ``col0``).

    Causal: the key range either ends at or before the queries' start, or contains all of them
    (true of every chunk pair the methods form), or starts after them (nothing visible).
    Consecutive small documents that lie whole inside both ranges (at most
    :data:`SMALL_DOCUMENT` tokens each) share one block of at most :data:`GROUP_ROWS` tokens with
    its own small block-diagonal mask (:func:`group_mask`): one kernel call instead of one per
    document.
    """
    q_end, k_end = q_start + n_q, k_start + n_k
    pieces: list[Piece] = []
    group: list[int] = []  # lengths of the pending small documents
    g0 = 0  # global start of the pending group

    def flush() -> None:
        if group:
            n = sum(group)
            rows, cols = slice(row0 + g0 - q_start, row0 + g0 - q_start + n), slice(col0 + g0 - k_start, col0 + g0 - k_start + n)
            pieces.append((rows, cols, group_mask(group, causal) if len(group) > 1 else causal))
            group.clear()

    d = bisect_right(bounds, q_start) - 1  # the document of the first query
    while d < len(bounds) - 1 and bounds[d] < q_end:
        s, f = bounds[d], bounds[d + 1]
        a, b = max(s, q_start), min(f, q_end)  # this document's queries
        d += 1
        if a == s and b == f and k_start <= s and f <= k_end and f - s <= SMALL_DOCUMENT:  # whole, small
            if sum(group) + f - s > GROUP_ROWS:
                flush()
            if not group:
                g0 = s
            group.append(f - s)
            continue
        flush()
        rows = slice(row0 + a - q_start, row0 + b - q_start)
        lo = max(s, k_start)
        if not causal:
            hi = min(f, k_end)
            if lo < hi:
                pieces.append((rows, slice(col0 + lo - k_start, col0 + hi - k_start), False))
        elif k_end <= a:  # keys all before these queries: fully visible from the document start
            if lo < k_end:
                pieces.append((rows, slice(col0 + lo - k_start, col0 + n_k), False))
        elif k_start <= a and b <= k_end:  # bottom-right aligned: prefix [lo, a) + diagonal [a, b)
            if lo < a:
                pieces.append((rows, slice(col0 + lo - k_start, col0 + a - k_start), False))
            pieces.append((rows, slice(col0 + a - k_start, col0 + b - k_start), True))
        elif k_start < b:
            raise AssertionError(f"keys [{k_start}, {k_end}) cut the queries [{a}, {b}) of one document")
    flush()
    return pieces


def group_mask(lengths: list[int], causal: bool) -> torch.Tensor:
    """The block-diagonal (causal: and lower-triangular) bool mask ``[n, n]`` of consecutive
    documents of ``lengths`` (``n = sum(lengths)`` <= :data:`GROUP_ROWS`): True = visible."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = doc[:, None] == doc[None, :]
    return mask.tril_() if causal else mask


def _causal_mask(kind) -> tuple[bool, torch.Tensor | None]:
    """A piece's ``kind`` as :func:`~lasp.ops.softmax_local.attend`'s ``(causal, mask)``."""
    return (False, kind) if isinstance(kind, torch.Tensor) else (kind, None)


def pieces_forward(qh, kh, vh, scale: float, pieces: list[Piece], o: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the ``pieces`` of ``qh [B, H, Tq, D]`` against ``kh, vh [B, H_kv, Tk, D]`` into the
    running float32 ``o [B, H, Tq, D]`` and ``lse [B, H, Tq]`` (in place; start from 0 and -inf)."""
    for r, c, kind in pieces:
        ob, lb = attend(qh[:, :, r], kh[:, :, c], vh[:, :, c], scale, *_causal_mask(kind))
        o[:, :, r], lse[:, :, r] = merge_partial(o[:, :, r], lse[:, :, r], ob, lb)


def piece_backward(doh, qh, kh, vh, oh, lse, scale: float, piece: Piece):
    """One piece's ``(dq, dk, dv)`` (its rows / columns, input dtype) given the FINAL ``oh``, ``lse``."""
    r, c, kind = piece
    return attend_backward(doh[:, :, r], qh[:, :, r], kh[:, :, c], vh[:, :, c], oh[:, :, r], lse[:, :, r], scale, *_causal_mask(kind))


def pieces_backward(doh, qh, kh, vh, oh, lse, scale: float, pieces: list[Piece], dq, dk, dv) -> None:
    """Add the ``pieces``' gradients (given the FINAL ``oh`` and ``lse``) into the float32
    accumulators ``dq [B, H, Tq, D]``, ``dk, dv [B, H_kv, Tk, D]`` (in place)."""
    for piece in pieces:
        r, c, _ = piece
        dq_b, dk_b, dv_b = piece_backward(doh, qh, kh, vh, oh, lse, scale, piece)
        dq[:, :, r] += dq_b
        dk[:, :, c] += dk_b
        dv[:, :, c] += dv_b


class DocumentAttention(torch.autograd.Function):
    """Softmax attention over the documents of one whole sequence: q ``[B, T, H, D]``, k/v
    ``[B, T, H_kv, D]`` -> o like q (one causal diagonal, or one full block, per document)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, bounds):
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        o = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        pieces_forward(qh, kh, vh, scale, doc_pieces(0, 0, q.shape[1], 0, 0, k.shape[1], bounds, causal), o, lse)
        out = o.to(q.dtype).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.bounds = scale, causal, bounds
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        qh, kh, vh, oh, doh = (x.transpose(1, 2) for x in (q, k, v, out, do))
        dq = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        dk, dv = (torch.zeros(kh.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        pieces = doc_pieces(0, 0, q.shape[1], 0, 0, k.shape[1], ctx.bounds, ctx.causal)
        pieces_backward(doh, qh, kh, vh, oh, lse, ctx.scale, pieces, dq, dk, dv)
        return tuple(x.transpose(1, 2).to(q.dtype) for x in (dq, dk, dv)) + (None, None, None)


def document_attention(q, k, v, bounds: tuple[int, ...], *, causal: bool, scale: float) -> torch.Tensor:
    """``[B=1, T, H, D]`` q against ``[1, T, H_kv, D]`` k/v over the documents ``bounds``
    (``cu_seqlens`` as ints) -> ``[1, T, H, D]``; no mask, no score matrix."""
    return DocumentAttention.apply(q, k, v, scale, causal, bounds)


def single_process_softmax(q, k, v, *, causal: bool, scale: float, bounds: tuple[int, ...] | None) -> torch.Tensor:
    """The whole sequence on one process: :func:`~lasp.ops.softmax_local.sdpa_attention` without
    documents, :func:`document_attention` with them."""
    if bounds is None:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    return document_attention(q, k, v, bounds, causal=causal, scale=scale)
