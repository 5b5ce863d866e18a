"""Bidirectional (non-causal) linear attention over a sequence-parallel group, for LASP-2 and LASP-1.

``O = scale * Q (sum over ranks of K_r^T V_r)``; no decay. The two methods differ only in how the
``[B, H, K, V]`` float32 sum over the group is formed:

- ``lasp2``: ONE all-gather (``B*H*K*V*4`` bytes per rank) and a local sum;
- ``lasp1``: every rank's copy circulates the P2P ring (``P-1`` sends of ``B*H*K*V*4`` bytes).

Forward sums ``M = K^T V``; backward sums ``dS = scale Q^T dO``, overlapped (LASP-2) with ``dQ``.
"""
from __future__ import annotations

import torch

from ..parallel import group_rank_size
from .common import all_gather_async, ring_shift, wait_all
from .segment import segment_class


def ring_sum(t: torch.Tensor, group, tag: str) -> torch.Tensor:
    """Sum of ``t`` over the group by circulating every rank's copy around the P2P ring (P-1 hops)."""
    _, size = group_rank_size(group)
    total, cur = t.clone(), t
    for _ in range(size - 1):
        nxt, works = ring_shift(cur, group, tag)
        wait_all(works)
        total += nxt
        cur = nxt
    return total


def start_group_sum(t: torch.Tensor, group, method: str, tag: str):
    """Start summing ``t`` over the group; returns a function that finishes and returns the sum."""
    if method == "lasp1":
        return lambda: ring_sum(t, group, tag)
    gathered, work = all_gather_async(t, group, tag)

    def finish() -> torch.Tensor:
        work.wait()
        return gathered.sum(0)

    return finish


class NonCausalLinear(torch.autograd.Function):
    """``apply(q, k, v, scale, group, method)``, method ``lasp2`` | ``lasp1``; tensors ``[B, T_local, H, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, group, method: str):
        M = torch.einsum("bthk,bthv->bhkv", k.float(), v.float())
        S = start_group_sum(M, group, method, f"{method}.fwd")()
        ctx.save_for_backward(q, k, v, S)
        ctx.scale, ctx.group, ctx.method = scale, group, method
        return (torch.einsum("bthk,bhkv->bthv", q.float(), S) * scale).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, S = ctx.saved_tensors
        scale = ctx.scale
        dof = do.float()
        local = torch.einsum("bthk,bthv->bhkv", q.float(), dof) * scale
        finish = start_group_sum(local, ctx.group, ctx.method, f"{ctx.method}.bwd")
        dq = torch.einsum("bthv,bhkv->bthk", dof, S) * scale  # overlaps the all-gather (lasp2)
        dS = finish()
        dk = torch.einsum("bthv,bhkv->bthk", v.float(), dS)
        dv = torch.einsum("bthk,bhkv->bthv", k.float(), dS)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def diagonal_method(apply, method: str, q, k, v, g=None, g_gamma=None, *, scale, causal, group, layout, backend,
                    initial_state=None, output_final_state=False):
    """``lasp.linear_attention``'s ``method`` (``lasp2`` | ``lasp1``) on validated inputs: the
    non-causal sum of this module, or the causal driver ``apply`` on the diagonal segments of
    ``backend``."""
    if not causal:
        return NonCausalLinear.apply(q, k, v, scale, group, method)
    return apply(
        segment_class(backend), [q, k, v, g], [g_gamma], scale=scale, group=group, layout=layout,
        initial_state=initial_state, output_final_state=output_final_state,
    )
