"""LASP-1 (baseline): the linear-attention state passed rank to rank along a P2P chain.

The global sequence is a chain of segments (``P`` for the contiguous layout; ``2P`` for zigzag,
rank r holding segments r and 2P-1-r). Forward, segment by segment in global order: receive the
state entering it from the segment before (a P2P message when that segment is on another rank,
a local hand-off otherwise), add the inter part to the segment's output, and send
``S_out = e^logA S_in + M`` on. Backward runs the chain in reverse with the state gradients:
``Gtot_p = dL/dS_in_p + e^logA_p Gout_p`` goes to the segment before, and the segment's summary
gradient is ``dM_p = Gout_p``, ``dlogA_p = e^logA_p <Gout_p, S_in_p>`` (the same folds LASP-2
does after its all-gather). Each segment's state-independent work (``compute_local``,
``backward_output``) runs between posting the receive and waiting for it.

The per-segment math is the segment protocol of :mod:`lasp.ops.segment` (torch or Triton).

Communication per call (float32 states, sends; each receive matches one send):

- causal, ``contiguous``: ``P-1`` sequential hops forward and ``P-1`` backward, each a
  ``B*H*K*V*4``-byte state; every rank but the last (forward) / first (backward) sends one;
  2(P-1) dependent steps in all.
- causal, ``zigzag``: the chain 0..2P-1 crosses ranks ``2(P-1)`` times per direction (the
  hand-off between segments P-1 and P stays on rank P-1), each hop ``B*H*K*V*4`` bytes.
- non-causal: ``O = scale Q sum_r M_r``: every rank's ``M = K^T V`` circulates the ring,
  ``P-1`` sends of ``B*H*K*V*4`` bytes per rank forward, and the same for ``dS = scale Q^T dO``
  backward.

The latency is ``O(P)`` dependent messages, against LASP-2's one all-gather each way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..parallel import group_rank_size
from .lasp2 import _cat_or_none, _sum_or_none, global_segment_order, split_segments
from .ring import ring_shift
from .segment import segment_class

_FWD_TAG = "lasp1.fwd"
_BWD_TAG = "lasp1.bwd"


def _wait(works) -> None:
    for w in works:
        w.wait()


class _Chain:
    """Who holds which global segment, and the P2P calls between consecutive segments."""

    def __init__(self, group, layout: str):
        self.group = group
        self.rank, size = group_rank_size(group)
        order = global_segment_order(size, layout)
        self.mine = order[self.rank]  # global indices of this rank's segments, increasing
        self.n = size * len(self.mine)
        self.owner = {p: r for r, ps in enumerate(order) for p in ps}

    def remote(self, p: int) -> bool:
        """Whether global segment ``p`` exists and lives on another rank."""
        return 0 <= p < self.n and self.owner[p] != self.rank

    def post_recv(self, p: int, like: torch.Tensor, tag: str):
        buf = torch.empty_like(like)
        peer = dist.get_global_rank(self.group, self.owner[p])
        return buf, comm.batch_send_recv([], [(buf, peer)], self.group, tag=tag)

    def send(self, t: torch.Tensor, p: int, tag: str):
        peer = dist.get_global_rank(self.group, self.owner[p])
        return comm.batch_send_recv([(t, peer)], [], self.group, tag=tag)


class LASP1Causal(torch.autograd.Function):
    """Causal LASP-1 over ``group``; tensors are this rank's shard ``[B, T_local, H, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, g, g_gamma, scale, group, layout, backend):
        B, _, H, K = q.shape
        V = v.shape[-1]
        chain = _Chain(group, layout)
        Seg = segment_class(backend)
        parts = zip(*(split_segments(x, layout) for x in (q, k, v, g)))
        segs = [Seg(qs, ks, vs, gs, g_gamma, scale) for qs, ks, vs, gs in parts]
        zero = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)

        outs, states_in, log_as, sends = [], [], [], []
        s_prev = zero
        for seg, p in zip(segs, chain.mine):
            pending = chain.post_recv(p - 1, zero, _FWD_TAG) if chain.remote(p - 1) else None
            seg.compute_local()  # overlaps the wait for the incoming state
            if pending is not None:
                _wait(pending[1])
                s_in = pending[0]
            else:
                s_in = s_prev if p > 0 else zero
            log_a, m = seg.summary()
            outs.append(seg.output(s_in))
            s_prev = log_a.exp()[..., None, None] * s_in + m
            if chain.remote(p + 1):
                sends.append((s_prev, chain.send(s_prev, p + 1, _FWD_TAG)))
            states_in.append(s_in)
            log_as.append(log_a)
        for _, works in sends:
            _wait(works)

        ctx.segs, ctx.chain, ctx.layout = segs, chain, layout
        ctx.states_in, ctx.log_as = states_in, log_as
        ctx.has = (g is not None, g_gamma is not None)
        return torch.cat(outs, dim=1).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        segs, chain = ctx.segs, ctx.chain
        do_parts = split_segments(do, ctx.layout)
        zero = torch.zeros_like(ctx.states_in[0])
        sends = []
        g_next = zero  # total gradient of the state entering the segment after the current one
        for j in reversed(range(len(segs))):
            p, seg, d = chain.mine[j], segs[j], do_parts[j]
            pending = chain.post_recv(p + 1, zero, _BWD_TAG) if chain.remote(p + 1) else None
            ds_in = seg.state_grad(d)
            seg.backward_output(d)  # overlaps the wait for the downstream gradient
            if pending is not None:
                _wait(pending[1])
                g_out = pending[0]
            else:
                g_out = g_next if p < chain.n - 1 else zero
            decay = ctx.log_as[j].exp()
            g_next = ds_in + decay[..., None, None] * g_out
            if chain.remote(p - 1):
                sends.append((g_next, chain.send(g_next, p - 1, _BWD_TAG)))
            dlog_a = decay * (g_out * ctx.states_in[j]).sum((-1, -2))
            seg.backward_summary(g_out, dlog_a)
        for _, works in sends:
            _wait(works)

        per_seg = [s.grads() for s in segs]
        dq, dk, dv, dg = (_cat_or_none([gr[i] for gr in per_seg]) for i in range(4))
        dgg = _sum_or_none([gr[4] for gr in per_seg])
        has_g, has_gg = ctx.has
        ctx.segs = ctx.states_in = None
        return dq, dk, dv, (dg if has_g else None), (dgg if has_gg else None), None, None, None, None


def ring_sum(t: torch.Tensor, group, tag: str) -> torch.Tensor:
    """Sum of ``t`` over the group by circulating every rank's copy around the P2P ring (P-1 hops)."""
    _, size = group_rank_size(group)
    total, cur = t.clone(), t
    for _ in range(size - 1):
        nxt, works = ring_shift(cur, group, tag)
        _wait(works)
        total += nxt
        cur = nxt
    return total


class LASP1NonCausal(torch.autograd.Function):
    """Bidirectional LASP-1: ``O = scale * Q (sum over ranks of K_r^T V_r)``, summed along the ring."""

    @staticmethod
    def forward(ctx, q, k, v, scale, group):
        S = ring_sum(torch.einsum("bthk,bthv->bhkv", k.float(), v.float()), group, _FWD_TAG)
        ctx.save_for_backward(q, k, v, S)
        ctx.scale, ctx.group = scale, group
        return (torch.einsum("bthk,bhkv->bthv", q.float(), S) * scale).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, S = ctx.saved_tensors
        dof = do.float()
        dS = ring_sum(torch.einsum("bthk,bthv->bhkv", q.float(), dof) * ctx.scale, ctx.group, _BWD_TAG)
        dq = torch.einsum("bthv,bhkv->bthk", dof, S) * ctx.scale
        dk = torch.einsum("bthv,bhkv->bthk", v.float(), dS)
        dv = torch.einsum("bthk,bhkv->bthv", k.float(), dS)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, *, scale, causal, group, layout, backend):
    """LASP-1 on validated inputs (see :func:`lasp.linear_attention`)."""
    if not causal:
        return LASP1NonCausal.apply(q, k, v, scale, group)
    return LASP1Causal.apply(q, k, v, g, g_gamma, scale, group, layout, backend)
