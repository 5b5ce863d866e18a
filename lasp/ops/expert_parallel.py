"""Expert parallelism: every token's k routed copies go to the ranks holding their experts, and back.

The EP group's P ranks hold ``E / P`` experts each, rank p the experts ``[p * E/P, (p+1) * E/P)``
(:mod:`lasp.parallel`). No token is dropped: a rank receives however many rows its experts were
chosen for. ``group=None`` (or P = 1) is the same computation without communication.

Dispatch (rank r, N tokens, top-k routing, ``H`` values per token):

1. sort the ``N*k`` (token, expert) assignments by expert (stable) and count them per expert
   (``[E]``, on the device);
2. all-to-all of the counts ``[P, E/P]`` (int64): every rank learns how many rows each peer sends
   to each of its experts (the counts first);
3. one host copy of the per-peer row counts: an all-to-all with uneven splits takes them as host
   integers. This is the dropless dispatch's one host synchronisation per layer (P = 1 has none);
4. all-to-all of the rows with those splits (``_AllToAll``, whose backward is the all-to-all with
   the splits swapped);
5. reorder the received rows (grouped by source rank, then expert) by local expert.

Combine is the inverse: reorder back, all-to-all back (splits swapped), undo the sort, weight each
copy by its routing weight and sum the k copies of each token.

Bytes one rank contributes per MoE layer (``lasp.comm`` convention: the input of each call,
including the rows it keeps for its own experts), with ``e`` bytes per element:
``8 * E`` (counts) ``+ N*k*H*e`` (dispatch) ``+ N*k*H*e`` (combine) forward, and the same two
row all-to-alls again in backward: ``4 * N*k*H*e + 8 * E`` per layer and training step
(:func:`ep_bytes_per_layer`). Tags: ``moe.counts``, ``moe.dispatch``, ``moe.combine``
(``.bwd`` in backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import comm
from ..parallel import group_rank_size


def ep_bytes_per_layer(tokens: int, top_k: int, hidden: int, num_experts: int, elem_bytes: int, ep_size: int) -> int:
    """Bytes one rank contributes to the all-to-alls of one MoE layer in a training step (fwd + bwd)."""
    return 0 if ep_size == 1 else 4 * tokens * top_k * hidden * elem_bytes + 8 * num_experts


class _AllToAll(torch.autograd.Function):
    """Rows to peers with uneven splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group, tag: str) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.tag = send, recv, group, tag
        return comm.all_to_all_v(x, send, recv, group, tag=tag)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return comm.all_to_all_v(g, ctx.recv, ctx.send, ctx.group, tag=ctx.tag + ".bwd"), None, None, None, None


@dataclass
class DispatchPlan:
    """What :func:`combine` needs to bring a dispatch's rows back (opaque to callers)."""

    tokens: int
    top_k: int
    order: torch.Tensor  # [N*k]: sorted position -> flat (token, slot) assignment index
    group: dist.ProcessGroup | None = None
    send: list[int] | None = None  # rows to each peer (host)
    recv: list[int] | None = None  # rows from each peer (host)
    perm: torch.Tensor | None = None  # [M]: expert-sorted position -> received row
    tag: str = "moe"


def check_routing(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, group) -> None:
    """ValueError (before any collective) unless ``x [N, H]``, ``topk_idx [N, k]`` int64 and the EP
    group's size divides ``num_experts``."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got {list(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_idx.dtype != torch.int64:
        raise ValueError(f"topk_idx must be int64 [N, k] with N = {x.shape[0]}, got {list(topk_idx.shape)} {topk_idx.dtype}")
    _, P = group_rank_size(group)
    if num_experts % P:
        raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel group size {P}")


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, group=None, *, tag: str = "moe"):
    """Send every token's k copies to its experts' ranks.

    Args:
        x: ``[N, H]`` this rank's tokens.
        topk_idx: ``[N, k]`` int64 global expert ids.
        num_experts: E (all ranks); ``group``: the EP group (None: every expert is local).
    Returns:
        ``(rows [M, H], counts [E/P] int64, counts_host list or None, plan)``: the rows this rank's
        experts must process, sorted by local expert, ``counts[j]`` of them for local expert j
        (``counts_host``: the same on the host when the dispatch already has them).
    """
    check_routing(x, topk_idx, num_experts, group)
    N, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    sorted_rows = x.index_select(0, order // k)
    _, P = group_rank_size(group)
    if P == 1:
        return sorted_rows, counts, None, DispatchPlan(N, k, order, tag=tag)
    E_loc = num_experts // P
    send_counts = counts.view(P, E_loc)
    recv_counts = comm.all_to_all(send_counts, group, tag=f"{tag}.counts")  # [P, E_loc]: from peer s for local expert j
    host = torch.cat([send_counts.sum(1), recv_counts.reshape(-1)]).tolist()  # the one host copy
    send, recv_flat = host[:P], host[P:]
    recv = [sum(recv_flat[s * E_loc:(s + 1) * E_loc]) for s in range(P)]
    received = _AllToAll.apply(sorted_rows, send, recv, group, f"{tag}.dispatch")
    expert_of_row = torch.arange(E_loc, device=x.device).repeat(P).repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv))
    perm = torch.argsort(expert_of_row, stable=True)
    local_host = [sum(recv_flat[s * E_loc + j] for s in range(P)) for j in range(E_loc)]
    return received.index_select(0, perm), recv_counts.sum(0), local_host, DispatchPlan(N, k, order, group, send, recv, perm, tag)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def combine(rows: torch.Tensor, topk_weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Bring the experts' outputs ``rows [M, H]`` (in :func:`dispatch`'s order) back to their tokens:
    ``[N, H]``, each token the sum of its k copies times ``topk_weights [N, k]`` (in ``rows``' dtype)."""
    if plan.perm is not None:
        rows = _AllToAll.apply(rows.index_select(0, _inverse(plan.perm)), plan.recv, plan.send, plan.group, f"{plan.tag}.combine")
    copies = rows.index_select(0, _inverse(plan.order)).view(plan.tokens, plan.top_k, -1)
    return (copies * topk_weights.to(rows.dtype).unsqueeze(-1)).sum(1)
