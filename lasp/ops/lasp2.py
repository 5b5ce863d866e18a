"""LASP-2: sequence-parallel linear attention with ONE all-gather of states per direction.

Each rank holds one segment (contiguous layout) or two (zigzag: global chunks ``r`` and
``2P-1-r``). Forward, per rank:

1. each segment's summary ``(logA, M)`` (float32, independent of the incoming state);
2. ONE asynchronous all-gather of all its summaries packed in one buffer
   ``[n_seg, B, H, 1 + K*V]``, overlapped with
3. the segment-local output (intra-chunk and earlier chunks of the segment);
4. a prefix fold over the gathered summaries in global segment order gives each segment's
   incoming state ``S_in``; add the inter part ``scale * (q * e^G) @ S_in``.

Backward: each segment's ``dL/dS_in`` (a cheap matmul) goes into ONE asynchronous all-gather,
overlapped with the local backward from ``dO``; a suffix fold then gives each segment's
summary gradient ``dM_p = Gtot_{p+1}``, ``dlogA_p = e^logA_p <Gtot_{p+1}, S_in_p>``, where
``Gtot_p = dS_in_p + e^logA_p Gtot_{p+1}`` is the total gradient of the state entering
segment p.

Communication per rank and layer (fp32): forward ``n_seg * B * H * (K*V + 1) * 4`` bytes sent,
backward ``n_seg * B * H * K * V * 4`` bytes sent (``n_seg`` = 1 contiguous, 2 zigzag);
independent of the sequence length. Non-causal: forward gathers ``M = K^T V`` (``B*H*K*V*4``
bytes), backward gathers ``dS = scale Q^T dO`` (same), one collective each.

Gradients of ``g_gamma`` (a parameter shared by all ranks) are this rank's contribution; the
trainer's gradient all-reduce over the SP group sums them, as for every replicated weight.
"""
from __future__ import annotations

import torch

from .. import comm
from ..parallel import group_rank_size, layout_chunks
from .segment import segment_class

_FWD_TAG = "lasp2.fwd"
_BWD_TAG = "lasp2.bwd"


def split_segments(x: torch.Tensor | None, layout: str) -> list[torch.Tensor | None]:
    """A rank's local tensor split into its segments along T (dim 1)."""
    if layout == "contiguous":
        return [x]
    if x is None:
        return [None, None]
    return list(x.chunk(2, dim=1))


def global_segment_order(group_size: int, layout: str) -> list[list[int]]:
    """``order[r][j]``: global index of rank r's j-th segment."""
    return [layout_chunks(r, group_size, layout) for r in range(group_size)]


def prefix_states(logA: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """States entering each segment: ``S_0 = 0``, ``S_{p+1} = e^logA_p S_p + M_p``.

    ``logA [N, B, H]``, ``M [N, B, H, K, V]`` in global order -> ``[N, B, H, K, V]``.
    """
    states = [torch.zeros_like(M[0])]
    for p in range(M.shape[0] - 1):
        states.append(logA[p].exp()[..., None, None] * states[-1] + M[p])
    return torch.stack(states)


def suffix_state_grads(logA: torch.Tensor, dS_in: torch.Tensor) -> torch.Tensor:
    """``Gout_p`` = total gradient of the state LEAVING segment p (= entering p+1).

    ``Gtot_p = dS_in_p + e^logA_p Gtot_{p+1}`` with ``Gtot_N = 0``; returns ``Gtot_{p+1}`` per p.
    """
    n = dS_in.shape[0]
    out = [torch.zeros_like(dS_in[0])]  # leaving the last segment: nothing reads it
    for p in range(n - 1, 0, -1):
        out.append(dS_in[p] + logA[p].exp()[..., None, None] * out[-1])
    return torch.stack(out[::-1])


class LASP2Causal(torch.autograd.Function):
    """Causal LASP-2 over ``group``; tensors are this rank's shard ``[B, T_local, H, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, scale, group, layout, backend):
        rank, size = group_rank_size(group)
        B, _, H, K = q.shape
        V = v.shape[-1]
        Seg = segment_class(backend)
        parts = zip(*(split_segments(x, layout) for x in (q, k, v, g)))
        segs = [Seg(qs, ks, vs, gs, g_gamma, scale) for qs, ks, vs, gs in parts]
        n_seg = len(segs)

        summaries = [s.summary() for s in segs]
        packed = torch.stack([torch.cat([la[..., None], m.reshape(B, H, K * V)], -1) for la, m in summaries])
        gathered, work = _all_gather_async(packed, group, size, _FWD_TAG)
        for s in segs:
            s.compute_local()  # overlaps the all-gather
        work.wait()

        order = global_segment_order(size, layout)
        n_total = size * n_seg
        flat = torch.empty(n_total, B, H, 1 + K * V, dtype=torch.float32, device=q.device)
        for r in range(size):
            for j in range(n_seg):
                flat[order[r][j]] = gathered[r, j]
        logA_all, M_all = flat[..., 0], flat[..., 1:].reshape(n_total, B, H, K, V)
        states = prefix_states(logA_all, M_all)
        mine = order[rank]
        outs = [s.output(states[mine[j]]) for j, s in enumerate(segs)]

        ctx.segs, ctx.group, ctx.layout, ctx.order = segs, group, layout, order
        ctx.save_for_backward(logA_all, states)
        ctx.has = (g is not None, g_gamma is not None)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        logA_all, states = ctx.saved_tensors
        segs, group, order = ctx.segs, ctx.group, ctx.order
        rank, size = group_rank_size(group)
        n_seg = len(segs)
        do_parts = split_segments(do, ctx.layout)

        local = torch.stack([s.state_grad(d) for s, d in zip(segs, do_parts)])
        gathered, work = _all_gather_async(local, group, size, _BWD_TAG)
        for s, d in zip(segs, do_parts):
            s.backward_output(d)  # overlaps the all-gather
        work.wait()

        dS_in = torch.empty((size * n_seg, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for r in range(size):
            for j in range(n_seg):
                dS_in[order[r][j]] = gathered[r, j]
        g_out = suffix_state_grads(logA_all, dS_in)
        for j, s in enumerate(segs):
            p = order[rank][j]
            dlogA = logA_all[p].exp() * (g_out[p] * states[p]).sum((-1, -2))
            s.backward_summary(g_out[p], dlogA)

        per_seg = [s.grads() for s in segs]
        dq, dk, dv, dg = (_cat_or_none([gr[i] for gr in per_seg]) for i in range(4))
        dgg = _sum_or_none([gr[4] for gr in per_seg])
        has_g, has_gg = ctx.has
        ctx.segs = None
        return dq, dk, dv, (dg if has_g else None), (dgg if has_gg else None), None, None, None, None


class LASP2NonCausal(torch.autograd.Function):
    """Bidirectional LASP-2: ``O = scale * Q (sum over ranks of K_r^T V_r)``; no gates."""

    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        M = torch.einsum("bthk,bthv->bhkv", k.float(), v.float())
        gathered, work = _all_gather_async(M, group, group_rank_size(group)[1], _FWD_TAG)
        work.wait()
        S = gathered.sum(0)
        ctx.save_for_backward(q, k, v, S)
        ctx.scale, ctx.group = scale, group
        return (torch.einsum("bthk,bhkv->bthv", q.float(), S) * scale).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, S = ctx.saved_tensors
        scale = ctx.scale
        dof = do.float()
        local = torch.einsum("bthk,bthv->bhkv", q.float(), dof) * scale
        gathered, work = _all_gather_async(local, ctx.group, group_rank_size(ctx.group)[1], _BWD_TAG)
        dq = torch.einsum("bthv,bhkv->bthk", dof, S) * scale  # overlaps the all-gather
        work.wait()
        dS = gathered.sum(0)
        dk = torch.einsum("bthv,bhkv->bthk", v.float(), dS)
        dv = torch.einsum("bthk,bhkv->bthv", k.float(), dS)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


class _Done:
    @staticmethod
    def wait() -> None:
        return None


def _all_gather_async(t: torch.Tensor, group, size: int, tag: str):
    """``comm.all_gather`` issued asynchronously; no communication at all for a group of one."""
    if size == 1:
        return t[None], _Done
    return comm.all_gather(t, group, async_op=True, tag=tag)


def _cat_or_none(xs):
    if any(x is None for x in xs):
        return None
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def _sum_or_none(xs):
    xs = [x for x in xs if x is not None]
    return None if not xs else sum(xs[1:], xs[0])


def lasp2_linear_attention(q, k, v, g=None, g_gamma=None, *, scale, causal, group, layout, backend):
    """LASP-2 on validated inputs (see :func:`lasp.linear_attention`)."""
    if not causal:
        return LASP2NonCausal.apply(q, k, v, scale, group)
    return LASP2Causal.apply(q, k, v, g, g_gamma, scale, group, layout, backend)
