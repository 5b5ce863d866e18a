"""Local (single-process) softmax attention pieces the sequence-parallel methods are built from.

Nothing here builds a mask or a score matrix over the whole key range: every piece of work is
either a FULLY VISIBLE block (every query sees every key) or a SQUARE CAUSAL DIAGONAL block
(query i sees keys 0..i of the block), and both are what a flash kernel computes without a mask.
Bottom-right aligned causal attention (the last ``Tq`` queries of a ``Tk``-token sequence
against keys ``[0, Tk)``) is the fully visible prefix ``[0, Tk - Tq)`` plus the diagonal block
``[Tk - Tq, Tk)``, merged by log-sum-exp (:func:`lower_right_blocks`, :func:`merge_partial`).

- :func:`sdpa_attention`: autograd softmax attention in the ``[B, T, H, D]`` layout, GQA
  included, causal bottom-right aligned when there are more keys than queries. Used by
  ``group=None``, Ulysses and the model's decoding cache.
- :func:`attend` / :func:`attend_backward`: one block (full or square diagonal) with its
  log-sum-exp, and its gradients given the FINAL output and log-sum-exp of its rows (the
  flash-attention recurrence; ``scaled_dot_product_attention`` does not return the LSE). They run
  the fused kernel :func:`lasp.ops.softmax_kernels.select_kernel` picks (torch's flash kernel on
  the CPU; on CUDA torch's flash attention, or its memory-efficient kernel for fp32 and head dims
  flash does not take: no scores in memory), else the float32 reference (:func:`block_forward` /
  :func:`block_backward` in row tiles: scores ``[B, H, REFERENCE_TILE_ROWS, Tk]`` at most), which
  is also the oracle the kernels are tested against.
- :func:`merge_partial`: the log-sum-exp merge of two partial results over disjoint keys.
- pieces ``(rows, cols, kind)`` (:data:`Piece`): the unit of work of every method (and of packed
  documents, :mod:`lasp.ops.softmax_documents`); :func:`pieces_forward` / :func:`pieces_backward`
  run a list of them, :class:`PiecesAttention` is the autograd Function over a list (the
  bottom-right aligned case of :func:`sdpa_attention`, the per-document attention).

Heads-first layout for the block functions: ``q [B, H, Tq, D]``, ``k, v [B, H_kv, Tk, D]``
(query head h uses KV head ``h // (H / H_kv)``), ``lse [B, H, Tq]`` float32.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import softmax_kernels

Block = tuple[int, int, bool]
"""``(k0, k1, causal)``: keys ``[k0, k1)`` of a key range, fully visible or (causal) the square diagonal."""


def sdpa_attention(q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
    """``[B, Tq, H, D]`` q against ``[B, Tk, H_kv, D]`` k/v (GQA when H_kv < H) -> ``[B, Tq, H, D]``.

    ``causal``: query i sits at position ``Tk - Tq + i`` of the keys (bottom-right aligned; the
    usual mask when ``Tq == Tk``) and sees the keys up to its own position. No mask is built.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs at least as many keys as queries, got Tq={Tq}, Tk={Tk}")
    if causal and Tq != Tk:
        return PiecesAttention.apply(q, k, v, scale, functools.partial(lower_right_pieces, Tq, Tk))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- one block


def attend(q, k, v, scale: float, causal: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention with its row log-sum-exp.

    Args:
        q: ``[B, H, Tq, D]``; k, v: ``[B, H_kv, Tk, D]`` (any strides with a unit last one).
        causal: the square diagonal block (``Tq == Tk``, query i sees keys 0..i).
        mask: for SMALL blocks only (a group of tiny packed documents, a few hundred tokens at
            most; never a sequence-sized mask): bool ``[Tq, Tk]``, True = visible, every row sees
            a key; ``causal`` must then be False.
    Returns:
        ``o [B, H, Tq, D]`` in q's dtype (normalised within the block), ``lse [B, H, Tq]`` float32.
    """
    kernel = softmax_kernels.select_kernel(q, k, v, mask)
    if kernel is not None:
        return kernel.forward(q, k, v, scale, causal, mask)
    qg, kf, vf = _grouped(q, k, v)
    if mask is not None:
        o, lse = block_forward(qg, kf, vf, scale, mask.to(q.device))
        return o.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:-1])
    o, lse = torch.empty_like(qg), torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)
    for rows, keys, mask in _row_tiles(q.shape[2], k.shape[2], causal, q.device):
        o[..., rows, :], lse[..., rows] = block_forward(qg[..., rows, :], kf[:, :, keys], vf[:, :, keys], scale, mask)
    return o.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:-1])


def attend_backward(do, q, k, v, o, lse, scale: float, causal: bool, mask: torch.Tensor | None = None):
    """Gradients of one block given the FINAL ``o`` (q's dtype) and ``lse`` of its rows.

    Shapes (and ``mask``) as in :func:`attend` (``do, o [B, H, Tq, D]``, ``lse [B, H, Tq]``).
    Returns ``dq`` like q and ``dk, dv`` like k (summed over the query heads sharing each KV
    head), in the input dtype.
    """
    kernel = softmax_kernels.select_kernel(q, k, v, mask)
    if kernel is not None:
        return kernel.backward(do, q, k, v, o, lse, scale, causal, mask)
    qg, kf, vf = _grouped(q, k, v)
    dog, og = (_grouped(x, k, v)[0] for x in (do, o))
    lse_g, delta = lse.reshape(qg.shape[:-1]), (dog * og).sum(-1)
    if mask is not None:
        dq, dk, dv = block_backward(qg, kf, vf, dog, lse_g, delta, scale, mask.to(q.device))
        return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    dq, dk, dv = torch.empty_like(qg), torch.zeros_like(kf), torch.zeros_like(vf)
    for rows, keys, mask in _row_tiles(q.shape[2], k.shape[2], causal, q.device):
        dq[..., rows, :], dk_t, dv_t = block_backward(
            qg[..., rows, :], kf[:, :, keys], vf[:, :, keys], dog[..., rows, :], lse_g[..., rows], delta[..., rows], scale, mask
        )
        dk[:, :, keys] += dk_t
        dv[:, :, keys] += dv_t
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def lower_right_blocks(Tq: int, Tk: int, causal: bool = True) -> list[Block]:
    """The blocks of ``Tq`` queries against keys ``[0, Tk)``, bottom-right aligned when causal.

    Causal: the fully visible prefix ``[0, Tk - Tq)`` (if any) and the diagonal ``[Tk - Tq, Tk)``;
    non-causal: one fully visible block.
    """
    if not causal:
        return [(0, Tk, False)]
    n = Tk - Tq
    return ([(0, n, False)] if n > 0 else []) + [(n, Tk, True)]


def merge_partial(o, lse, o_blk, lse_blk):
    """Log-sum-exp merge of two normalised partial results over disjoint key sets.

    ``o, o_blk [..., T, D]``, ``lse, lse_blk [..., T]`` -> merged ``(o, lse)`` float32; rows where
    both are ``-inf`` stay ``(0, -inf)``.
    """
    new = torch.logaddexp(lse, lse_blk)
    ref = _finite_or_zero(new)
    wa, wb = (lse - ref).exp(), (lse_blk - ref).exp()
    return o * wa[..., None] + o_blk.float() * wb[..., None], new


Piece = tuple[slice, slice, "bool | torch.Tensor"]
"""``(rows, cols, kind)``: local query rows against key columns; ``kind`` True = the square causal
diagonal, False = fully visible, or a small bool mask ``[rows, cols]`` (see :func:`attend`)."""


def _causal_mask(kind) -> tuple[bool, torch.Tensor | None]:
    """A piece's ``kind`` as :func:`attend`'s ``(causal, mask)``."""
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


class PiecesAttention(torch.autograd.Function):
    """``[B, Tq, H, D]`` q against ``[B, Tk, H_kv, D]`` k/v as the pieces ``make_pieces()`` lists
    (a callable, so that backward rebuilds them and ctx holds no tensor but the saved ones): the
    pieces merged by LSE forward, each through the flash backward with the final ``o, lse``."""

    @staticmethod
    def forward(ctx, q, k, v, scale, make_pieces):
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        o = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qh.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        pieces_forward(qh, kh, vh, scale, make_pieces(), o, lse)
        out = o.to(q.dtype).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.make_pieces = scale, make_pieces
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        qh, kh, vh, oh, doh = (x.transpose(1, 2) for x in (q, k, v, out, do))
        dq = torch.zeros(qh.shape, dtype=torch.float32, device=q.device)
        dk, dv = (torch.zeros(kh.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        pieces_backward(doh, qh, kh, vh, oh, lse, ctx.scale, ctx.make_pieces(), dq, dk, dv)
        return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype), None, None


def lower_right_pieces(Tq: int, Tk: int) -> list[Piece]:
    """Bottom-right aligned causal attention of ``Tq`` queries against ``Tk`` keys as pieces."""
    return [(slice(0, Tq), slice(k0, k1), diag) for k0, k1, diag in lower_right_blocks(Tq, Tk)]


# ----------------------------------------------------------------------------- float32 reference


def _grouped(q, k, v):
    """Heads-first ``q [B, H, T, D]`` -> float32 ``[B, H_kv, R, T, D]``; k, v -> float32."""
    B, H, T, D = q.shape
    h_kv = k.shape[1]
    return q.float().reshape(B, h_kv, H // h_kv, T, D), k.float(), v.float()


REFERENCE_TILE_ROWS = 256
"""Query rows per tile of the float32 reference: its scores are ``[B, H, tile, Tk]`` at most."""


def _row_tiles(Tq: int, Tk: int, causal: bool, device):
    """``(rows, keys, mask)`` per tile of at most :data:`REFERENCE_TILE_ROWS` queries of a full
    (``keys`` all) or square diagonal block (``keys`` up to the tile's last row, ``mask`` its
    ``[tile, keys]`` lower triangle)."""
    for t0 in range(0, Tq, REFERENCE_TILE_ROWS):
        t1 = min(t0 + REFERENCE_TILE_ROWS, Tq)
        if not causal:
            yield slice(t0, t1), slice(0, Tk), None
        else:
            yield slice(t0, t1), slice(0, t1), torch.ones(t1 - t0, t1, dtype=torch.bool, device=device).tril(t0)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """-inf (a row that saw no key yet) -> 0, so ``exp(-inf - 0) = 0`` instead of NaN."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def _scores(q, k, scale, mask):
    """Scaled (and masked, ``-inf``) scores ``[B, H_kv, R, Tq, Tk]``, a fresh tensor (edited in place)."""
    s = torch.einsum("bgrqd,bgkd->bgrqk", q, k).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def block_forward(q, k, v, scale: float, mask: torch.Tensor | None = None):
    """Float32 reference of :func:`attend` (one block, its scores in memory).

    ``q [B, H_kv, R, Tq, D]``, ``k, v [B, H_kv, Tk, D]``, mask bool ``[Tq, Tk]`` (True = keep) or
    None. Returns ``o [B, H_kv, R, Tq, D]`` and ``lse [B, H_kv, R, Tq]``.
    """
    s = _scores(q, k, scale, mask)
    lse = s.logsumexp(-1)
    p = s.sub_(_finite_or_zero(lse)[..., None]).exp_()  # in place: one score-sized tensor live
    return torch.einsum("bgrqk,bgkd->bgrqd", p, v), lse


def block_backward(q, k, v, do, lse, delta, scale: float, mask: torch.Tensor | None = None):
    """Float32 reference of :func:`attend_backward`, given ``delta = rowsum(dO * O)``.

    Shapes as in :func:`block_forward`; returns ``dq [B, H_kv, R, Tq, D]``, ``dk, dv [B, H_kv, Tk, D]``.
    """
    p = _scores(q, k, scale, mask).sub_(_finite_or_zero(lse)[..., None]).exp_()
    dv = torch.einsum("bgrqk,bgrqd->bgkd", p, do)
    ds = torch.einsum("bgrqd,bgkd->bgrqk", do, v).sub_(delta[..., None]).mul_(p)  # dS = P * (dP - delta)
    del p
    dq = torch.einsum("bgrqk,bgkd->bgrqd", ds, k) * scale
    dk = torch.einsum("bgrqk,bgrqd->bgkd", ds, q) * scale
    return dq, dk, dv
