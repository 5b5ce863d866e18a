"""Ring attention (baseline): K/V blocks travel around a P2P ring, merged by log-sum-exp.

Forward, on rank r, for steps ``s = 0 .. P-1``: the K/V block of rank ``(r - s) mod P`` (packed
``[2, B, T_local, H_kv, D]``, input dtype) is here. The exchange that brings the next block
(isend to ``r+1``, irecv from ``r-1``) is posted BEFORE this block's compute and waited after
it, so the transfer overlaps the work. The causal mask is over GLOBAL positions of the layout
and is never built: a rank's queries and a block's keys are equal chunks of the global sequence
(``C = T_local`` contiguous, ``T_local / 2`` zigzag), and a (query chunk, key chunk) pair is
either fully visible (the key chunk comes first), the square causal diagonal (the same chunk)
or hidden (skipped) (:func:`step_blocks`). Each visible pair is one flash-kernel call that
returns its normalised output and row log-sum-exp (:func:`lasp.ops.softmax_local.attend`),
merged stably (:func:`~lasp.ops.softmax_local.merge_partial`):

- ``contiguous``: blocks from later ranks are skipped, so rank r does r+1 blocks of work
  (unbalanced, as causal softmax is on that layout);
- ``zigzag``: for ``j < r`` only the first half of block j's keys is visible (to all local
  queries), for ``j > r`` only the local second half of the queries sees block j: every
  off-diagonal step is half a block of work on every rank (balanced).

Packed documents (``cu_seqlens``, as ints ``bounds``): each visible (query chunk, key chunk) pair
is split at document boundaries (:func:`step_pieces`): a query reads only the keys of its own
document in the block; a block that holds none of the local queries' documents costs no compute
(the K/V still travel: same collectives and bytes as without documents).

Backward: the K/V ring runs again; every visible pair goes through the flash backward with the
final output and log-sum-exp (no scores in memory); a ``dK/dV`` accumulator (float32) travels
with each block, each rank adds its contribution, and after P hops every accumulator is back
at its owner.

Communication per rank and call (``e`` = bytes per element of the input dtype), as recorded
by :mod:`lasp.comm` (sends; the matching receives are the same sizes):

- forward: ``P-1`` sends of ``2 * B * T_local * H_kv * D * e`` bytes (the K/V block);
- backward: ``P-1`` K/V sends of that size, and ``P`` sends of ``2 * B * T_local * H_kv * D * 4``
  bytes (the float32 dK/dV accumulator).

All grow linearly with the sequence length; ``P-1`` (resp. ``2P-1``) dependent steps. Memory
per step is ``O(B * T_local * H * D)``: the kernels keep no scores.

Every P2P batch here is a ring shift (:func:`~lasp.ops.common.ring_shift`) in which every rank of
the group sends and receives, the same number of times on every rank: well defined under NCCL even
as the group's first collective (unlike LASP-1's one-sided chain, :func:`lasp.comm.prepare_p2p`).
"""
from __future__ import annotations

import torch

from ..parallel import group_rank_size, layout_chunks
from .common import ring_shift, wait_all
from .softmax_documents import doc_pieces, single_process_softmax
from .softmax_local import Piece, pieces_backward, pieces_forward

_FWD_TAG = "ring.fwd"
_BWD_KV_TAG = "ring.bwd.kv"
_BWD_DKV_TAG = "ring.bwd.dkv"


def step_blocks(rank: int, src: int, size: int, layout: str, t_local: int, causal: bool) -> list[tuple[slice, slice, bool]]:
    """The work of ``rank``'s local queries against the K/V block of rank ``src``.

    Returns ``(rows, cols, diagonal)`` per visible (query chunk, key chunk) pair: local query
    rows, block key columns, and whether it is the square causal diagonal (else fully visible);
    two fully visible pairs that form one rectangle are one block (a zigzag off-diagonal step
    is a single call). ``[]`` when the causal mask hides the whole block.
    """
    if not causal:
        return [(slice(0, t_local), slice(0, t_local), False)]
    q_chunks, k_chunks = layout_chunks(rank, size, layout), layout_chunks(src, size, layout)
    C = t_local // len(q_chunks)
    blocks: list[tuple[slice, slice, bool]] = []
    for i, a in enumerate(q_chunks):
        for j, b in enumerate(k_chunks):
            if b > a:
                continue
            rows, cols, diag = slice(i * C, (i + 1) * C), slice(j * C, (j + 1) * C), b == a
            if blocks and not diag and not blocks[-1][2]:
                r, c, _ = blocks[-1]
                if c == cols and r.stop == rows.start:
                    blocks[-1] = (slice(r.start, rows.stop), cols, False)
                    continue
                if r == rows and c.stop == cols.start:
                    blocks[-1] = (rows, slice(c.start, cols.stop), False)
                    continue
            blocks.append((rows, cols, diag))
    return blocks


def step_pieces(rank: int, src: int, size: int, layout: str, t_local: int, causal: bool, bounds) -> list[Piece]:
    """:func:`step_blocks`, split at document boundaries when ``bounds`` (``cu_seqlens`` as ints)
    is given: every (query chunk, key chunk) pair that the causal mask leaves visible becomes the
    pieces of :func:`~lasp.ops.softmax_documents.doc_pieces`; a block holding none of the local
    queries' documents is skipped."""
    if bounds is None:
        return step_blocks(rank, src, size, layout, t_local, causal)
    q_chunks, k_chunks = layout_chunks(rank, size, layout), layout_chunks(src, size, layout)
    C = t_local // len(q_chunks)
    return [
        p
        for i, a in enumerate(q_chunks)
        for j, b in enumerate(k_chunks)
        if not (causal and b > a)
        for p in doc_pieces(a * C, i * C, C, b * C, j * C, C, bounds, causal)
    ]


class RingSoftmax(torch.autograd.Function):
    """Ring attention over ``group``: q ``[B, T_local, H, D]``, k/v ``[B, T_local, H_kv, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout, bounds):
        rank, size = group_rank_size(group)
        qh = q.transpose(1, 2)  # [B, H, T_local, D]
        o = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        cur = torch.stack([k, v])
        for s in range(size):
            if s < size - 1:
                nxt, works = ring_shift(cur, group, _FWD_TAG)  # overlaps this block's compute
            kh, vh = cur[0].transpose(1, 2), cur[1].transpose(1, 2)  # the block of rank (rank - s) mod P
            pieces_forward(qh, kh, vh, scale, step_pieces(rank, (rank - s) % size, size, layout, q.shape[1], causal, bounds), o, lse)
            if s < size - 1:
                wait_all(works)
                cur = nxt
        out = o.to(q.dtype).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.group, ctx.layout, ctx.bounds = scale, causal, group, layout, bounds
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        rank, size = group_rank_size(ctx.group)
        B, t_local, _, D = k.shape
        qh, oh, doh = (x.transpose(1, 2) for x in (q, out, do))
        dq = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        cur = torch.stack([k, v])
        dkv_in, dkv_works, dkv_sent = None, [], None
        for s in range(size):
            if s < size - 1:
                nxt, works = ring_shift(cur, ctx.group, _BWD_KV_TAG)
            acc = torch.zeros(2, B, k.shape[2], t_local, D, dtype=torch.float32, device=q.device)
            kh, vh = cur[0].transpose(1, 2), cur[1].transpose(1, 2)
            pieces = step_pieces(rank, (rank - s) % size, size, ctx.layout, t_local, ctx.causal, ctx.bounds)
            pieces_backward(doh, qh, kh, vh, oh, lse, ctx.scale, pieces, dq, acc[0], acc[1])
            if s > 0:  # the accumulator of the block we hold now, sent by the previous rank
                wait_all(dkv_works)
                acc += dkv_in
            dkv_sent = acc  # keep the sent tensor alive until its send completes
            dkv_in, dkv_works = ring_shift(dkv_sent, ctx.group, _BWD_DKV_TAG)
            if s < size - 1:
                wait_all(works)
                cur = nxt
        wait_all(dkv_works)  # after P hops our own block's accumulator is back
        dk, dv = (x.transpose(1, 2).to(k.dtype) for x in dkv_in)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, None, None, None, None, None


def ring_softmax_attention(q, k, v, *, causal: bool, scale: float, group, layout: str, bounds=None) -> torch.Tensor:
    """Ring attention on validated inputs (see :func:`lasp.softmax_attention`); ``bounds``: the
    documents' ``cu_seqlens`` as ints or None."""
    if group_rank_size(group)[1] == 1:
        return single_process_softmax(q, k, v, causal=causal, scale=scale, bounds=bounds)
    return RingSoftmax.apply(q, k, v, scale, causal, group, layout, bounds)
