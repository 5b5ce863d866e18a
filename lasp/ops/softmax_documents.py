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

Pieces of one query row are merged by log-sum-exp, and go through the flash backward with the
final output and log-sum-exp (:func:`~lasp.ops.softmax_local.pieces_forward`,
:func:`~lasp.ops.softmax_local.pieces_backward`).

- The documents arrive as ``bounds``: a validated ``cu_seqlens`` as Python ints
  (:func:`lasp.ops.documents.document_bounds`: the one host copy, made by the public wrapper,
  outside forward/backward).
- :func:`doc_pieces`: the pieces of a query run against a key range.
- :func:`document_attention`: single-process attention over documents (``group=None``, and
  Ulysses after its all-to-all, which holds the whole sequence on ``H/P`` heads).

Cost: one kernel call per (document, key range) pair, except that consecutive small documents
(at most :data:`SMALL_DOCUMENT` tokens, whole inside the query run and the key range) share one
call of at most :data:`GROUP_ROWS` tokens with a block-diagonal mask of that small size (the CPU
flash kernel takes an additive mask). Each call's work is its document's size, so the total work
falls with the number of documents. (``torch.nn.attention.flex_attention`` was the alternative:
in torch 2.13 it has no CPU backward in eager mode.)
"""
from __future__ import annotations

import functools
from bisect import bisect_right

import torch

from .softmax_local import Piece, PiecesAttention, sdpa_attention


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


def document_attention(q, k, v, bounds: tuple[int, ...], *, causal: bool, scale: float) -> torch.Tensor:
    """``[B=1, T, H, D]`` q against ``[1, T, H_kv, D]`` k/v over the documents ``bounds``
    (``cu_seqlens`` as ints) -> ``[1, T, H, D]``; no mask, no score matrix."""
    T = q.shape[1]
    return PiecesAttention.apply(q, k, v, scale, functools.partial(doc_pieces, 0, 0, T, 0, 0, T, bounds, causal))


def single_process_softmax(q, k, v, *, causal: bool, scale: float, bounds: tuple[int, ...] | None) -> torch.Tensor:
    """The whole sequence on one process: :func:`~lasp.ops.softmax_local.sdpa_attention` without
    documents, :func:`document_attention` with them."""
    if bounds is None:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    return document_attention(q, k, v, bounds, causal=causal, scale=scale)
