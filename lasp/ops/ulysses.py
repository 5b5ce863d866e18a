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
with GQA, query head group r uses exactly KV head group r.

Communication per rank and call (``e`` = bytes per element; the recorded bytes are the
all-to-all input, of which ``(P-1)/P`` leaves the rank):

- softmax: forward ``B*T_local*(H + 2*H_kv)*D*e`` (q, k, v) + ``B*T_local*H*D*e`` (o);
  backward the same two sizes (``do`` then ``dq, dk, dv``);
- linear: forward ``B*T_local*H*(2K + V + [g])*e`` (q, k, v and, if given, g; packed in the
  promoted dtype of q and g) + ``B*T_local*H*V*e`` (o); backward the same two sizes.
"""
from __future__ import annotations

import torch

from .. import comm
from ..parallel import group_rank_size, shard_sequence, unshard_sequence
from .single import full_sequence_linear
from .softmax_local import sdpa_attention


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


def ulysses_softmax_attention(q, k, v, *, causal: bool, scale: float, group, layout: str) -> torch.Tensor:
    """Ulysses softmax attention on validated inputs (see :func:`lasp.softmax_attention`)."""
    check_heads_divisible(group, H=q.shape[2], H_kv=k.shape[2])
    rank, size = group_rank_size(group)
    if size == 1:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    h, h_kv = q.shape[2] // size, k.shape[2] // size
    packed = torch.cat([_split_heads(x, size) for x in (q, k, v)], dim=3)  # [B, T_local, P, h+2h_kv, D]
    full = seq_to_heads(packed, group, layout, "qkv")
    qf, kf, vf = full.split([h, h_kv, h_kv], dim=2)
    o = sdpa_attention(qf, kf, vf, causal=causal, scale=scale)  # natural order: plain causal mask
    return heads_to_seq(o, group, layout, "o")


def ulysses_linear_attention(q, k, v, g=None, g_gamma=None, *, scale: float, causal: bool, group, layout: str, backend: str):
    """Ulysses linear attention on validated inputs (see :func:`lasp.linear_attention`).

    Runs the full-sequence chunked operator on this rank's ``H/P`` heads; ``g_gamma``'s gradient
    is this rank's contribution (its head group), summed over the SP group like any replicated
    parameter's.
    """
    check_heads_divisible(group, H=q.shape[2])
    rank, size = group_rank_size(group)
    K, V = q.shape[-1], v.shape[-1]
    if size == 1:
        return full_sequence_linear(q, k, v, g, g_gamma, scale=scale, causal=causal, backend=backend)
    h = q.shape[2] // size
    dtype = q.dtype if g is None else torch.promote_types(q.dtype, g.dtype)
    parts = [q, k, v] if g is None else [q, k, v, g[..., None]]
    packed = _split_heads(torch.cat([x.to(dtype) for x in parts], dim=-1), size)  # [B, T_local, P, h, C]
    full = seq_to_heads(packed, group, layout, "qkv")
    qf, kf, vf = (x.to(q.dtype) for x in full[..., : 2 * K + V].split([K, K, V], dim=-1))
    gf = None if g is None else full[..., -1].to(g.dtype)
    ggf = None if g_gamma is None else g_gamma[rank * h : (rank + 1) * h]
    o = full_sequence_linear(qf, kf, vf, gf, ggf, scale=scale, causal=causal, backend=backend)
    return heads_to_seq(o, group, layout, "o")
