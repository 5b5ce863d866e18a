"""All-to-all sequence parallelism (DeepSpeed-Ulysses style), for softmax and linear attention.

One all-to-all turns the sequence-sharded inputs ``[B, T_local, H, .]`` into head-sharded
full-sequence ones ``[B, T, H/P, .]`` (rank r gets head group r of every rank's tokens; for the
zigzag layout the pieces are put back in natural token order); the attention then runs as on
one process on ``H/P`` heads, and a second all-to-all brings the output back to
``[B, T_local, H, .]``. Everything that travels together is packed in one buffer: q, k and v
(and the gate g, for linear attention) go in ONE all-to-all. The backward of an all-to-all is
the same all-to-all of the gradients, so a call makes exactly 2 all-to-alls forward and 2
backward; their order is fixed by the data dependencies (no swap hazard).

Requires ``H % P == 0`` and ``H_kv % P == 0`` (a ValueError before any collective otherwise);
with GQA, query head group r uses exactly KV head group r. Likewise the delta rule's grouped value
heads (GVA, ``HV`` a multiple of ``H``, value head j reading q/k head ``j // (HV/H)``): value head
group r reads exactly q/k head group r, so ``H`` and ``HV`` must both divide by ``P``.

Communication per rank and call (``e`` = bytes per element; the recorded bytes are the
all-to-all input, of which ``(P-1)/P`` leaves the rank):

- softmax: forward ``B*T_local*(H + 2*H_kv)*D*e`` (q, k, v) + ``B*T_local*H*D*e`` (o);
  backward the same two sizes (``do`` then ``dq, dk, dv``);
- linear: forward ``B*T_local*H*(2K + V + [g])*e`` (q, k, v and, if given, g; packed in the
  promoted dtype of q and g) + ``B*T_local*H*V*e`` (o); backward the same two sizes. With
  ``output_final_state``: one all-gather of this rank's heads' final state forward
  (``B*(H/P)*K*V*4``) and one reduce-scatter of its gradient backward (``B*H*K*V*4`` input).

The linear half is generic (:func:`ulysses_apply`): any per-token inputs, any single-process
operator on ``H/P`` heads (the chunked linear attention; the delta rule plugs in its own).
"""
from __future__ import annotations

import torch

from .. import comm
from ..parallel import group_rank_size, shard_sequence, unshard_sequence
from .single import full_sequence_linear
from .softmax_documents import single_process_softmax


class AllToAll(torch.autograd.Function):
    """``comm.all_to_all`` with autograd: ``x [P, ...]`` slot j goes to rank j; backward = same op."""

    @staticmethod
    def forward(ctx, x, group, tag: str):
        ctx.group, ctx.tag = group, tag
        return comm.all_to_all(x, group, tag=f"ulysses.fwd.{tag}")

    @staticmethod
    def backward(ctx, grad):
        return comm.all_to_all(grad, ctx.group, tag=f"ulysses.bwd.{ctx.tag}"), None, None


def check_heads_divisible(group, **heads: int) -> None:
    """ValueError unless every head count is divisible by the group size (local check, no collective)."""
    _, size = group_rank_size(group)
    for name, h in heads.items():
        if h % size != 0:
            raise ValueError(
                f"method='ulysses' needs {name}={h} divisible by the sequence-parallel size P={size} "
                "(heads are split over the ranks)"
            )


def seq_to_heads(x: torch.Tensor, group, layout: str, tag: str) -> torch.Tensor:
    """``[B, T_local, P, h, C]`` (heads already split in P groups) -> ``[B, T, h, C]``, natural order."""
    _, size = group_rank_size(group)
    out = AllToAll.apply(x.movedim(2, 0), group, tag)  # [P (source rank), B, T_local, h, C]
    return unshard_sequence(list(out.unbind(0)), layout, dim=1)


def heads_to_seq(y: torch.Tensor, group, layout: str, tag: str) -> torch.Tensor:
    """``[B, T, h, C]`` in natural order -> ``[B, T_local, P*h, C]`` (this rank's tokens, all heads)."""
    _, size = group_rank_size(group)
    pieces = torch.stack([shard_sequence(y, r, size, layout) for r in range(size)])  # [P, B, T_local, h, C]
    out = AllToAll.apply(pieces, group, tag)  # [P (head group), B, T_local, h, C]
    B, T_local = out.shape[1:3]
    return out.movedim(0, 2).reshape(B, T_local, -1, out.shape[-1])


def _split_heads(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, T_local, H, C]`` -> ``[B, T_local, P, H/P, C]``."""
    B, T, H, C = x.shape
    return x.reshape(B, T, size, H // size, C)


def ulysses_softmax_attention(q, k, v, *, causal: bool, scale: float, group, layout: str, bounds=None) -> torch.Tensor:
    """Ulysses softmax attention on validated inputs (see :func:`lasp.softmax_attention`);
    ``bounds``: the documents' ``cu_seqlens`` as ints or None. After the all-to-all a rank holds
    the whole sequence in natural order on ``H/P`` heads: the single-process document attention."""
    check_heads_divisible(group, H=q.shape[2], H_kv=k.shape[2])
    rank, size = group_rank_size(group)
    if size == 1:
        return single_process_softmax(q, k, v, causal=causal, scale=scale, bounds=bounds)
    h, h_kv = q.shape[2] // size, k.shape[2] // size
    packed = torch.cat([_split_heads(x, size) for x in (q, k, v)], dim=3)  # [B, T_local, P, h+2h_kv, D]
    full = seq_to_heads(packed, group, layout, "qkv")
    qf, kf, vf = full.split([h, h_kv, h_kv], dim=2)
    o = single_process_softmax(qf, kf, vf, causal=causal, scale=scale, bounds=bounds)  # natural order
    return heads_to_seq(o, group, layout, "o")


class GatherHeads(torch.autograd.Function):
    """``[B, H/P, K, V]`` per rank -> ``[B, H, K, V]`` on every rank (one all-gather); backward sums
    every rank's gradient and returns this rank's head group (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        gathered, _ = comm.all_gather(x.contiguous(), group, tag="ulysses.fwd.final")  # [P, B, h, K, V]
        return gathered.movedim(0, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, grad):
        B, H = grad.shape[:2]
        size = group_rank_size(ctx.group)[1]
        pieces = grad.reshape(B, size, H // size, *grad.shape[2:]).movedim(1, 0)
        return comm.reduce_scatter(pieces, ctx.group, tag="ulysses.bwd.final"), None


def ulysses_apply(local_op, token_inputs, head_inputs=(), *, group, layout: str, initial_state=None, output_final_state: bool = False):
    """All-to-all to head sharding, a single-process operator on ``H/P`` heads, all-to-all back.

    Args:
        local_op: ``local_op(tokens, heads, initial_state, output_final_state)`` on the WHOLE
            sequence in natural order: ``tokens`` = ``token_inputs`` as ``[B, T, H/P, ...]`` (None
            kept), ``heads`` = ``head_inputs`` sliced to this rank's head group along dim 0,
            ``initial_state [B, H/P, K, V]`` or None; returns ``o [B, T, H/P, V]`` or
            ``(o, final_state [B, H/P, K, V])`` with ``output_final_state``. E.g. the chunked
            linear attention, or ``chunk_gated_delta_rule`` for the delta rule.
        token_inputs: this rank's ``[B, T_local, H_x, C]`` or ``[B, T_local, H_x]`` tensors (or None),
            sent in ONE all-to-all in their promoted dtype and cast back; each tensor's head count
            ``H_x`` (divisible by P) may differ (GVA): rank r gets head group r of each.
        head_inputs: per-head tensors ``[H, ...]`` (``g_gamma``) or None.
        initial_state: ``[B, H_s, K, V]`` or None (sliced to the head group ``r`` of its own ``H_s``
            heads: its gradient on each rank is that rank's contribution).
    Returns:
        ``o [B, T_local, H, V]`` in the dtype of ``token_inputs[0]``, or ``(o, final_state [B, H, K, V])``
        with the final state on every rank (one all-gather forward, one reduce-scatter backward).
    """
    rank, size = group_rank_size(group)
    if size == 1:
        return local_op(list(token_inputs), list(head_inputs), initial_state, output_final_state)
    present = [x for x in token_inputs if x is not None]
    dtype = present[0].dtype
    for x in present[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    # each tensor's heads split in P groups, flattened with its channels: tensors with different head
    # counts (GVA: q, k on H heads, v, g, beta on HV) travel in the same buffer
    cols = [_split_heads(x if x.dim() == 4 else x[..., None], size).flatten(3) for x in present]  # [B, T_local, P, h*C]
    full = seq_to_heads(torch.cat([c.to(dtype) for c in cols], dim=-1)[:, :, :, None], group, layout, "qkv")[:, :, 0]
    pieces = iter(full.split([c.shape[-1] for c in cols], dim=-1))
    tokens = []
    for x in token_inputs:
        if x is None:
            tokens.append(None)
            continue
        y = next(pieces).to(x.dtype).unflatten(-1, (x.shape[2] // size, -1))  # [B, T, h, C]
        tokens.append(y if x.dim() == 4 else y[..., 0])
    h = token_inputs[0].shape[2] // size
    heads = [None if x is None else x[rank * h : (rank + 1) * h] for x in head_inputs]
    hs = None if initial_state is None else initial_state.shape[1] // size
    s0 = None if initial_state is None else initial_state[:, rank * hs : (rank + 1) * hs]
    res = local_op(tokens, heads, s0, output_final_state)
    o, final = res if output_final_state else (res, None)
    o = heads_to_seq(o.to(token_inputs[0].dtype), group, layout, "o")
    return (o, GatherHeads.apply(final, group)) if output_final_state else o


def ulysses_linear_attention(
    q, k, v, g=None, g_gamma=None, *, scale: float, causal: bool, group, layout: str, backend: str,
    initial_state=None, output_final_state=False,
):
    """Ulysses linear attention on validated inputs (see :func:`lasp.linear_attention`).

    Runs the full-sequence chunked operator on this rank's ``H/P`` heads; ``g_gamma``'s gradient
    is this rank's contribution (its head group), summed over the SP group like any replicated
    parameter's.
    """
    check_heads_divisible(group, H=q.shape[2])

    def local(tokens, heads, s0, ofs):
        return full_sequence_linear(
            *tokens, *heads, scale=scale, causal=causal, backend=backend, initial_state=s0, output_final_state=ofs
        )

    return ulysses_apply(
        local, [q, k, v, g], [g_gamma], group=group, layout=layout,
        initial_state=initial_state, output_final_state=output_final_state,
    )
