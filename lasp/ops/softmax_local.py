"""Local (single-process) softmax attention pieces the sequence-parallel methods are built from.

- :func:`sdpa_attention`: ``scaled_dot_product_attention`` (fused kernels on GPU) in the
  ``[B, T, H, D]`` layout, GQA included. Used by ``group=None``, LASP-2H and Ulysses.
- :func:`causal_block_plan`: which rows/columns of a (query block, key block) pair can see
  each other under a causal mask over GLOBAL positions, so fully masked work is skipped.
- :func:`row_tile_plans`: the same plan split into row tiles of at most ``tile_rows`` queries
  (each tile's key columns narrowed to the ones it can see), so a block's scores are never
  materialised whole: ``[tile_rows, T_k]`` per head instead of ``[T_q, T_k]``.
- :func:`block_forward` / :func:`block_backward` / :func:`merge_partial`: blockwise attention
  that returns the log-sum-exp of each query row, the flash-attention recurrence ring
  attention needs (``scaled_dot_product_attention`` does not expose the LSE). Float32,
  heads-first, GQA by broadcasting (the KV heads are never expanded in memory):
  ``q [B, H_kv, R, Tq, D]`` (R = H / H_kv query heads per KV head), ``k, v [B, H_kv, Tk, D]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sdpa_attention(q, k, v, *, causal: bool, scale: float, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, H, D]`` q against ``[B, S, H_kv, D]`` k/v (GQA when H_kv < H) -> ``[B, T, H, D]``.

    ``causal`` masks key j for query i when j > i (T == S). ``attn_mask`` (bool, True = keep)
    replaces it for offset layouts.
    """
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    o = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=attn_mask, is_causal=causal and attn_mask is None, scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- masking plans


@dataclass(frozen=True)
class BlockPlan:
    """The part of a (queries, keys) block pair that is not fully masked.

    ``rows``/``cols``: slices of the query / key block to compute; ``mask``: bool
    ``[rows, cols]`` (True = keep) or ``None`` when every pair in that box is visible.
    """

    rows: slice
    cols: slice
    mask: torch.Tensor | None


def causal_block_plan(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, device=None) -> BlockPlan | None:
    """Plan for queries at global positions ``q_pos [Tq]`` against keys at ``k_pos [Tk]``.

    Returns ``None`` when the causal mask hides the whole block; otherwise the bounding box of
    the visible pairs and, if it is not fully visible, its mask. Positions are small CPU
    tensors (no device synchronisation); the mask is moved to ``device``.
    """
    if not causal:
        return BlockPlan(slice(None), slice(None), None)
    visible = k_pos[None, :] <= q_pos[:, None]
    rows = visible.any(1).nonzero()
    if rows.numel() == 0:
        return None
    cols = visible.any(0).nonzero()
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    box = visible[r0:r1, c0:c1]
    mask = None if bool(box.all()) else box.to(device)
    return BlockPlan(slice(r0, r1), slice(c0, c1), mask)


def row_tile_plans(
    q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, tile_rows: int, device=None
) -> list[BlockPlan]:
    """:func:`causal_block_plan` per tile of at most ``tile_rows`` consecutive queries.

    Returns the plans of the tiles that see at least one key (``[]`` when the mask hides the
    whole block), with ``rows`` as slices of the whole query block, ``cols`` the bounding box
    of the keys that tile sees and ``mask`` ``[rows, cols]`` or None. The tiles partition the
    visible rows, so per-row results (output, log-sum-exp, dq) are written once per tile and
    per-key results (dk, dv) are summed over tiles. Host work is ``O(tile_rows * T_k)`` per tile.
    """
    if tile_rows < 1:
        raise ValueError(f"tile_rows must be a positive integer, got {tile_rows}")
    Tq = q_pos.shape[0]
    plans = []
    for t0 in range(0, Tq, tile_rows):
        t1 = min(t0 + tile_rows, Tq)
        plan = causal_block_plan(q_pos[t0:t1], k_pos, causal, device)
        if plan is None:
            continue
        r0, r1, _ = plan.rows.indices(t1 - t0)
        plans.append(BlockPlan(slice(t0 + r0, t0 + r1), plan.cols, plan.mask))
    return plans


def causal_key_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, device=None) -> torch.Tensor:
    """Bool ``[Tq, Tk]``: query i may see key j iff ``k_pos[j] <= q_pos[i]``."""
    return (k_pos[None, :] <= q_pos[:, None]).to(device)


# ----------------------------------------------------------------------------- blockwise math


def group_queries(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[B, T, H, D]`` (any dtype) -> float32 ``[B, H_kv, H/H_kv, T, D]`` (query head h uses KV head h // R)."""
    B, T, H, D = q.shape
    return q.float().permute(0, 2, 1, 3).reshape(B, h_kv, H // h_kv, T, D)


def ungroup_queries(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`group_queries` (stays float32): ``[B, H_kv, R, T, D]`` -> ``[B, T, H, D]``."""
    B, G, R, T, D = x.shape
    return x.reshape(B, G * R, T, D).permute(0, 2, 1, 3)


def _scores(q, k, scale, mask):
    """Scaled (and masked, ``-inf``) scores ``[B, H_kv, R, Tq, Tk]``, a fresh tensor (edited in place)."""
    s = torch.einsum("bgrqd,bgkd->bgrqk", q, k).mul_(scale)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """-inf (a row that saw no key yet) -> 0, so ``exp(-inf - 0) = 0`` instead of NaN."""
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def block_forward(q, k, v, scale: float, mask: torch.Tensor | None = None):
    """One block of attention with its log-sum-exp.

    Args:
        q: ``[B, H_kv, R, Tq, D]`` float32; k, v: ``[B, H_kv, Tk, D]`` float32.
        mask: bool ``[Tq, Tk]`` (True = keep) or None.
    Returns:
        ``o [B, H_kv, R, Tq, D]`` (normalised within the block) and ``lse [B, H_kv, R, Tq]``
        (``-inf`` for a row that sees no key in this block, whose ``o`` is 0).
    """
    s = _scores(q, k, scale, mask)
    lse = s.logsumexp(-1)
    p = s.sub_(_finite_or_zero(lse)[..., None]).exp_()  # in place: one score-sized tensor live
    return torch.einsum("bgrqk,bgkd->bgrqd", p, v), lse


def merge_partial(o, lse, o_blk, lse_blk):
    """Log-sum-exp merge of two normalised partial results over disjoint key sets.

    ``o, o_blk [..., T, D]``, ``lse, lse_blk [..., T]`` -> merged ``(o, lse)``; rows where both
    are ``-inf`` stay ``(0, -inf)``.
    """
    new = torch.logaddexp(lse, lse_blk)
    ref = _finite_or_zero(new)
    wa, wb = (lse - ref).exp(), (lse_blk - ref).exp()
    return o * wa[..., None] + o_blk * wb[..., None], new


def block_backward(q, k, v, do, lse, delta, scale: float, mask: torch.Tensor | None = None):
    """Gradients of one block given the FINAL ``lse`` and ``delta = rowsum(dO * O)`` of its rows.

    Shapes as in :func:`block_forward`; ``do [B, H_kv, R, Tq, D]``, ``lse, delta [B, H_kv, R, Tq]``.
    Returns float32 ``dq [B, H_kv, R, Tq, D]``, ``dk, dv [B, H_kv, Tk, D]`` (summed over the R
    query heads sharing each KV head).
    """
    p = _scores(q, k, scale, mask).sub_(_finite_or_zero(lse)[..., None]).exp_()
    dv = torch.einsum("bgrqk,bgrqd->bgkd", p, do)
    ds = torch.einsum("bgrqd,bgkd->bgrqk", do, v).sub_(delta[..., None]).mul_(p)  # dS = P * (dP - delta)
    del p  # two score-sized tensors live at most
    dq = torch.einsum("bgrqk,bgkd->bgrqd", ds, k) * scale
    dk = torch.einsum("bgrqk,bgrqd->bgkd", ds, q) * scale
    return dq, dk, dv
