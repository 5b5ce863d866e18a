"""LASP-2H: softmax attention with ONE all-gather of K/V forward and ONE reduce-scatter backward.

Each rank holds ``T_local`` tokens of the sequence (``contiguous`` or ``zigzag`` layout).
Forward: K and V (the ``H_kv`` KV heads, never the GQA-expanded ones) are packed in one buffer
``[2, B, T_local, H_kv, D]`` and all-gathered; the gathered pieces are put back in natural
token order and the local queries attend to them through ``scaled_dot_product_attention``,
with the causal mask over GLOBAL positions (keys after this rank's last query are cropped
away, so a contiguous rank r attends to ``(r+1) T_local`` keys and a zigzag rank to
``(2P-r) T/(2P)``). Backward: the local ``dK, dV`` over the whole sequence are cut back into
each rank's slot, packed ``[P, 2, B, T_local, H_kv, D]`` and reduce-scattered, one collective.

The all-gather and its backward live in one custom ``autograd.Function``: two separate
differentiable all-gathers (K and V) could run their backward collectives in different
orders on different ranks and silently swap data (DESIGN.md §5).

Communication per rank and call (``e`` = bytes per element of the input dtype), as recorded
by :mod:`lasp.comm`:

- forward: 1 ``all_gather`` of ``2 * B * T_local * H_kv * D * e`` bytes (its input);
- backward: 1 ``reduce_scatter`` of ``P * 2 * B * T_local * H_kv * D * e`` bytes (its input,
  one slot per rank; on a ring each rank sends ``(P-1)/P`` of it).

Both grow linearly with the sequence length; gradients are reduced in the input dtype.
"""
from __future__ import annotations

import torch

from .. import comm
from ..parallel import global_positions, group_rank_size, shard_sequence, unshard_sequence
from .softmax_local import causal_block_plan, sdpa_attention

_FWD_TAG = "allgather.fwd"
_BWD_TAG = "allgather.bwd"


class AllGatherSoftmax(torch.autograd.Function):
    """LASP-2H over ``group``: q ``[B, T_local, H, D]``, k/v ``[B, T_local, H_kv, D]`` -> o like q."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout):
        rank, size = group_rank_size(group)
        T = q.shape[1] * size
        kv = torch.stack([k, v])  # [2, B, T_local, H_kv, D]: one buffer, one collective
        gathered, _ = comm.all_gather(kv, group, tag=_FWD_TAG)  # [P, 2, B, T_local, H_kv, D]
        kv_full = unshard_sequence(list(gathered.unbind(0)), layout, dim=2)  # natural token order

        q_pos = global_positions(T, rank, size, layout)
        plan = causal_block_plan(q_pos, torch.arange(T), causal, device=q.device)
        # every query sees at least itself, so the plan keeps all rows; crop the keys
        grad = any(ctx.needs_input_grad[:3])
        with torch.set_grad_enabled(grad):
            q_in = q.detach().requires_grad_(grad)
            kv_in = kv_full[:, :, plan.cols].detach().requires_grad_(grad)
            o = sdpa_attention(q_in, kv_in[0], kv_in[1], causal=False, scale=scale, attn_mask=plan.mask)
        ctx.graph = (q_in, kv_in, o)
        ctx.cols, ctx.T, ctx.group, ctx.layout = plan.cols, T, group, layout
        return o.detach()

    @staticmethod
    def backward(ctx, do):
        q_in, kv_in, o = ctx.graph
        ctx.graph = None
        dq, dkv_box = torch.autograd.grad(o, (q_in, kv_in), do)
        _, size = group_rank_size(ctx.group)
        dkv_full = dkv_box.new_zeros((*dkv_box.shape[:2], ctx.T, *dkv_box.shape[3:]))
        dkv_full[:, :, ctx.cols] = dkv_box
        slots = torch.stack([shard_sequence(dkv_full, r, size, ctx.layout, dim=2) for r in range(size)])
        mine = comm.reduce_scatter(slots, ctx.group, tag=_BWD_TAG)  # [2, B, T_local, H_kv, D]
        return dq, mine[0], mine[1], None, None, None, None


def allgather_softmax_attention(q, k, v, *, causal: bool, scale: float, group, layout: str) -> torch.Tensor:
    """LASP-2H on validated inputs (see :func:`lasp.softmax_attention`)."""
    if group_rank_size(group)[1] == 1:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    return AllGatherSoftmax.apply(q, k, v, scale, causal, group, layout)
