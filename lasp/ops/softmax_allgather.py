"""LASP-2H: softmax attention with ONE all-gather of K/V forward and ONE reduce-scatter backward.

Each rank holds ``T_local`` tokens of the sequence (``contiguous`` or ``zigzag`` layout), cut
into equal chunks of ``C`` tokens (``C = T_local`` contiguous, ``T_local / 2`` zigzag).

Forward:

1. K and V (the ``H_kv`` KV heads, never the GQA-expanded ones) are packed in one buffer
   ``[2, B, T_local, H_kv, D]`` and all-gathered;
2. the gathered chunks are put in natural token order, only as far as this rank's last query
   (causal): keys ``[0, end)`` with ``end = (r+1) T_local`` (contiguous) or ``(2P-r) C`` (zigzag);
3. each local query chunk attends to the keys up to its own end, bottom-right aligned, with NO
   mask: contiguous, one span (queries ``[0, T_local)`` vs keys ``[0, (r+1) T_local)``); zigzag,
   two spans (chunk r vs keys ``[0, (r+1) C)``, chunk 2P-1-r vs ``[0, (2P-r) C)``). A span is the
   fully visible key prefix plus the causal diagonal block, two flash-kernel calls merged by
   log-sum-exp (:mod:`lasp.ops.softmax_local`). Non-causal: one call against all ``T`` keys.

Packed documents (``cu_seqlens``, as ints ``bounds``): the same gathered keys; each local chunk
is split at document boundaries (:func:`rank_pieces`, :func:`lasp.ops.softmax_documents.doc_pieces`),
so a query's pieces read only its own document's key range (a fully visible prefix from the
document start plus the diagonal; small documents grouped in one call with a small mask). No mask
over the keys, same collectives and bytes as without documents.

Backward: the same blocks (pieces) through the flash backward with the final output and log-sum-exp
(no scores in memory); each block's ``dK, dV`` is added straight into this rank's float32
send buffer ``[P, 2, B, T_local, H_kv, D]`` (slot j = rank j's tokens, in j's local order),
which is reduce-scattered: one collective, summed in float32 whatever the input dtype (P
partial gradients summed in bf16 would lose ~1e-2 at P=64).

Saved for backward (``save_for_backward`` only, so activation checkpointing can drop them):
the local q, the natural-order keys/values ``[2, B, end, H_kv, D]`` (input dtype), the output
and the float32 log-sum-exp ``[B, H, T_local]``. Nothing of size ``T_local x T`` exists.

The all-gather and its backward live in one custom ``autograd.Function``: two separate
differentiable all-gathers (K and V) could run their backward collectives in different
orders on different ranks and silently swap data (DESIGN.md §5).

Communication per rank and call (``e`` = bytes per element of the input dtype), as recorded
by :mod:`lasp.comm`:

- forward: 1 ``all_gather`` of ``2 * B * T_local * H_kv * D * e`` bytes (its input);
- backward: 1 ``reduce_scatter`` of ``P * 2 * B * T_local * H_kv * D * 4`` bytes (its input,
  float32, one slot per rank; on a ring each rank sends ``(P-1)/P`` of it).

Both grow linearly with the sequence length.
"""
from __future__ import annotations

import torch

from .. import comm
from ..parallel import chunk_owners, group_rank_size, layout_chunks, num_chunks
from .softmax_documents import doc_pieces, single_process_softmax
from .softmax_local import Piece, lower_right_blocks, piece_backward, pieces_forward

_FWD_TAG = "allgather.fwd"
_BWD_TAG = "allgather.bwd"


def query_spans(rank: int, size: int, layout: str, t_local: int, causal: bool) -> list[tuple[int, int, int]]:
    """``(q0, q1, end)``: local queries ``[q0, q1)`` attend to global keys ``[0, end)``
    (bottom-right aligned when causal; all ``T`` keys when not)."""
    if not causal:
        return [(0, t_local, t_local * size)]
    chunks = layout_chunks(rank, size, layout)
    C = t_local // len(chunks)
    return [(i * C, (i + 1) * C, (c + 1) * C) for i, c in enumerate(chunks)]


def rank_pieces(rank: int, size: int, layout: str, t_local: int, causal: bool, bounds) -> list[Piece]:
    """This rank's work as pieces: local query rows against columns of the natural-order keys
    ``[0, end)``. Without documents (``bounds`` None) each span of :func:`query_spans` is its
    bottom-right aligned blocks; with documents each local chunk is split at document boundaries
    (:func:`lasp.ops.softmax_documents.doc_pieces`), so a query reads only its document's keys."""
    if bounds is None:
        return [
            (slice(q0, q1), slice(k0, k1), diag)
            for q0, q1, e in query_spans(rank, size, layout, t_local, causal)
            for k0, k1, diag in lower_right_blocks(q1 - q0, e, causal)
        ]
    chunks = layout_chunks(rank, size, layout)
    C, T = t_local // len(chunks), t_local * size
    return [p for i, c in enumerate(chunks) for p in doc_pieces(c * C, i * C, C, 0, 0, (c + 1) * C if causal else T, bounds, causal)]


def add_to_slots(slots: torch.Tensor, which: int, grad: torch.Tensor, cols: slice, C: int, owners) -> None:
    """Add ``grad [B, H_kv, n, D]`` (natural-order key columns ``cols``) into the send buffer
    ``slots [P, 2, B, T_local, H_kv, D]`` (``which`` 0 = dK, 1 = dV), chunk by chunk."""
    k0, k1 = cols.start, cols.stop
    for c in range(k0 // C, (k1 - 1) // C + 1):
        j, i = owners[c]
        a, b = max(k0, c * C), min(k1, (c + 1) * C)
        slots[j, which, :, i * C + a - c * C : i * C + b - c * C] += grad[:, :, a - k0 : b - k0].transpose(1, 2)


class AllGatherSoftmax(torch.autograd.Function):
    """LASP-2H over ``group``: q ``[B, T_local, H, D]``, k/v ``[B, T_local, H_kv, D]`` -> o like q
    (``bounds``: ``cu_seqlens`` as ints, or None)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout, bounds):
        rank, size = group_rank_size(group)
        t_local = q.shape[1]
        gathered, _ = comm.all_gather(torch.stack([k, v]), group, tag=_FWD_TAG)  # [P, 2, B, T_local, H_kv, D]
        end = max(s[2] for s in query_spans(rank, size, layout, t_local, causal))
        C = t_local * size // num_chunks(size, layout)
        owners = chunk_owners(size, layout)
        kv = torch.cat([gathered[j, :, :, i * C : (i + 1) * C] for j, i in owners[: end // C]], dim=2)  # [2, B, end, H_kv, D]
        del gathered
        qh, kh, vh = q.transpose(1, 2), kv[0].transpose(1, 2), kv[1].transpose(1, 2)
        o = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)  # [B, H, T_local]
        pieces_forward(qh, kh, vh, scale, rank_pieces(rank, size, layout, t_local, causal, bounds), o, lse)
        out = o.to(q.dtype).transpose(1, 2)
        del o
        ctx.save_for_backward(q, kv, out, lse)
        ctx.scale, ctx.causal, ctx.group, ctx.layout, ctx.bounds = scale, causal, group, layout, bounds
        return out

    @staticmethod
    def backward(ctx, do):
        q, kv, out, lse = ctx.saved_tensors
        rank, size = group_rank_size(ctx.group)
        B, t_local, _, D = q.shape
        h_kv = kv.shape[3]
        C = t_local * size // num_chunks(size, ctx.layout)
        owners = chunk_owners(size, ctx.layout)
        qh, kh, vh, oh, doh = (x.transpose(1, 2) for x in (q, kv[0], kv[1], out, do))
        dq = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        slots = torch.zeros(size, 2, B, t_local, h_kv, D, dtype=torch.float32, device=q.device)  # the send buffer
        for r, c, kind in rank_pieces(rank, size, ctx.layout, t_local, ctx.causal, ctx.bounds):
            dq_b, dk_b, dv_b = piece_backward(doh, qh, kh, vh, oh, lse, ctx.scale, (r, c, kind))
            dq[:, :, r] += dq_b
            add_to_slots(slots, 0, dk_b, c, C, owners)
            add_to_slots(slots, 1, dv_b, c, C, owners)
        mine = comm.reduce_scatter(slots, ctx.group, tag=_BWD_TAG)  # [2, B, T_local, H_kv, D] float32
        return dq.transpose(1, 2).to(q.dtype), mine[0].to(kv.dtype), mine[1].to(kv.dtype), None, None, None, None, None


def allgather_softmax_attention(q, k, v, *, causal: bool, scale: float, group, layout: str, bounds=None) -> torch.Tensor:
    """LASP-2H on validated inputs (see :func:`lasp.softmax_attention`); ``bounds``: the
    documents' ``cu_seqlens`` as ints (:func:`~lasp.ops.documents.document_bounds`) or None."""
    if group_rank_size(group)[1] == 1:
        return single_process_softmax(q, k, v, causal=causal, scale=scale, bounds=bounds)
    return AllGatherSoftmax.apply(q, k, v, scale, causal, group, layout, bounds)
