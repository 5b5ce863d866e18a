"""Ring attention (baseline): K/V blocks travel around a P2P ring, merged by log-sum-exp.

Forward, on rank r, for steps ``s = 0 .. P-1``: the K/V block of rank ``(r - s) mod P`` (packed
``[2, B, T_local, H_kv, D]``, input dtype) is here. The exchange that brings the next block
(isend to ``r+1``, irecv from ``r-1``) is posted BEFORE this block's compute and waited after
it, so the transfer overlaps the work. Each block yields a normalised partial output and its
row log-sum-exp (:func:`lasp.ops.softmax_local.block_forward`), merged stably
(:func:`~lasp.ops.softmax_local.merge_partial`). The causal mask is over GLOBAL positions of
the layout; blocks the mask hides are skipped (the block still travels on):

- ``contiguous``: blocks from later ranks are skipped, so rank r does r+1 blocks of work
  (unbalanced, as causal softmax is on that layout);
- ``zigzag``: for ``j < r`` only the first half of block j's keys is visible (to all local
  queries), for ``j > r`` only the local second half of the queries sees block j: every
  off-diagonal step is half a block of work on every rank (balanced).

Backward: the K/V ring runs again; a ``dK/dV`` accumulator (float32) travels with each block,
each rank adds its contribution, and after P hops every accumulator is back at its owner.

Communication per rank and call (``e`` = bytes per element of the input dtype), as recorded
by :mod:`lasp.comm` (sends; the matching receives are the same sizes):

- forward: ``P-1`` sends of ``2 * B * T_local * H_kv * D * e`` bytes (the K/V block);
- backward: ``P-1`` K/V sends of that size, and ``P`` sends of ``2 * B * T_local * H_kv * D * 4``
  bytes (the float32 dK/dV accumulator).

All grow linearly with the sequence length; ``P-1`` (resp. ``2P-1``) dependent steps.

Memory: each block is processed in row tiles of at most ``tile_rows`` queries
(:data:`TILE_ROWS` by default; :func:`lasp.ops.softmax_local.row_tile_plans`), so the float32
scores live at once are ``[B, H, tile_rows, T_local]`` (two such tensors in backward), not
``[B, H, T_local, T_local]``: per-step memory is ``O(tile_rows * T_local)``. Tiling changes
neither the result (tiles partition the rows; the log-sum-exp merge is per row) nor the
communication (the same block sends, in the same order).
"""
from __future__ import annotations

import torch

from ..parallel import global_positions, group_rank_size
from .common import ring_shift
from .softmax_local import (
    BlockPlan,
    block_backward,
    block_forward,
    causal_block_plan,
    group_queries,
    merge_partial,
    row_tile_plans,
    sdpa_attention,
    ungroup_queries,
)

TILE_ROWS = 1024
"""Default query rows per tile: the scores of one tile are ``B * H * TILE_ROWS * T_local`` floats."""

_FWD_TAG = "ring.fwd"
_BWD_KV_TAG = "ring.bwd.kv"
_BWD_DKV_TAG = "ring.bwd.dkv"


def ring_schedule(rank: int, size: int, T: int, layout: str, causal: bool, device=None) -> list[BlockPlan | None]:
    """The block plan of every ring step on ``rank``: step s holds the K/V of rank ``(rank - s) mod P``.

    ``None`` marks a block the causal mask hides entirely (skipped; it still travels on).
    """
    q_pos = global_positions(T, rank, size, layout)
    return [
        causal_block_plan(q_pos, global_positions(T, (rank - s) % size, size, layout), causal, device)
        for s in range(size)
    ]


def ring_step_tiles(rank: int, step: int, size: int, T: int, layout: str, causal: bool, tile_rows: int, device=None) -> list[BlockPlan]:
    """Row-tile plans of ring step ``step`` on ``rank`` (the K/V block of rank ``(rank - step) mod P``).

    ``[]`` when the causal mask hides the whole block. Built per step (not ahead of time) so
    only one step's tile masks exist at once.
    """
    q_pos = global_positions(T, rank, size, layout)
    k_pos = global_positions(T, (rank - step) % size, size, layout)
    return row_tile_plans(q_pos, k_pos, causal, tile_rows, device)


def block_work(plan: BlockPlan | None, t_local: int) -> int:
    """Query-key pairs a plan computes (0 for a skipped block)."""
    if plan is None:
        return 0
    rows = len(range(t_local)[plan.rows])
    cols = len(range(t_local)[plan.cols])
    return rows * cols


def _wait(works) -> None:
    for w in works:
        w.wait()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H_kv, D]`` -> float32 ``[B, H_kv, T, D]``."""
    return x.float().transpose(1, 2)


class RingSoftmax(torch.autograd.Function):
    """Ring attention over ``group``: q ``[B, T_local, H, D]``, k/v ``[B, T_local, H_kv, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout, tile_rows):
        rank, size = group_rank_size(group)
        h_kv, T = k.shape[2], q.shape[1] * size
        qg = group_queries(q, h_kv)  # [B, H_kv, R, T_local, D] float32
        o = torch.zeros_like(qg)
        lse = torch.full(qg.shape[:-1], float("-inf"), dtype=qg.dtype, device=qg.device)
        cur = torch.stack([k, v])
        for s in range(size):
            if s < size - 1:
                nxt, works = ring_shift(cur, group, _FWD_TAG)  # overlaps this block's compute
            tiles = ring_step_tiles(rank, s, size, T, layout, causal, tile_rows, q.device)
            if tiles:
                kf, vf = _heads_first(cur[0]), _heads_first(cur[1])  # the block of rank (rank - s) mod P
                for t in tiles:
                    r, c = t.rows, t.cols
                    ob, lb = block_forward(qg[..., r, :], kf[:, :, c], vf[:, :, c], scale, t.mask)
                    o[..., r, :], lse[..., r] = merge_partial(o[..., r, :], lse[..., r], ob, lb)
                del kf, vf
            if s < size - 1:
                _wait(works)
                cur = nxt
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.group, ctx.layout, ctx.tile_rows = scale, causal, group, layout, tile_rows
        return ungroup_queries(o).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        scale, causal, group, layout, tile_rows = ctx.scale, ctx.causal, ctx.group, ctx.layout, ctx.tile_rows
        rank, size = group_rank_size(group)
        h_kv, T = k.shape[2], q.shape[1] * size
        qg, dog = group_queries(q, h_kv), group_queries(do, h_kv)
        delta = (dog * o).sum(-1)
        dq = torch.zeros_like(qg)
        B, T_local, _, D = k.shape
        cur = torch.stack([k, v])
        dkv_in, dkv_works, dkv_sent = None, [], None
        for s in range(size):
            if s < size - 1:
                nxt, works = ring_shift(cur, group, _BWD_KV_TAG)
            acc = torch.zeros(2, B, h_kv, T_local, D, dtype=torch.float32, device=q.device)
            tiles = ring_step_tiles(rank, s, size, T, layout, causal, tile_rows, q.device)
            if tiles:
                kf, vf = _heads_first(cur[0]), _heads_first(cur[1])
                for t in tiles:
                    r, c = t.rows, t.cols
                    dq_b, dk_b, dv_b = block_backward(
                        qg[..., r, :], kf[:, :, c], vf[:, :, c], dog[..., r, :], lse[..., r], delta[..., r], scale, t.mask
                    )
                    dq[..., r, :] += dq_b
                    acc[0][:, :, c] += dk_b
                    acc[1][:, :, c] += dv_b
                del kf, vf
            if s > 0:  # the accumulator of the block we hold now, sent by the previous rank
                _wait(dkv_works)
                acc += dkv_in
            dkv_sent = acc  # keep the sent tensor alive until its send completes
            dkv_in, dkv_works = ring_shift(dkv_sent, group, _BWD_DKV_TAG)
            if s < size - 1:
                _wait(works)
                cur = nxt
        _wait(dkv_works)  # after P hops our own block's accumulator is back
        dk, dv = (x.transpose(1, 2).to(k.dtype) for x in dkv_in)
        return ungroup_queries(dq).to(q.dtype), dk, dv, None, None, None, None, None


def ring_softmax_attention(
    q, k, v, *, causal: bool, scale: float, group, layout: str, tile_rows: int | None = None
) -> torch.Tensor:
    """Ring attention on validated inputs (see :func:`lasp.softmax_attention`).

    ``tile_rows``: query rows per score tile (default :data:`TILE_ROWS`); any value gives the
    same result up to float rounding, smaller ones use less memory per step.
    """
    tile_rows = TILE_ROWS if tile_rows is None else tile_rows
    if not isinstance(tile_rows, int) or isinstance(tile_rows, bool) or tile_rows < 1:
        raise ValueError(f"tile_rows must be a positive integer, got {tile_rows!r}")
    if group_rank_size(group)[1] == 1:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    return RingSoftmax.apply(q, k, v, scale, causal, group, layout, tile_rows)
