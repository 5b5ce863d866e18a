"""LASP-1 (baseline): the linear-attention state passed rank to rank along a P2P chain.

The global sequence is a chain of segments (``P`` for the contiguous layout; ``2P`` for zigzag,
rank r holding segments r and 2P-1-r). Forward, segment by segment in global order: receive the
state entering it from the segment before (a P2P message when that segment is on another rank,
a local hand-off otherwise), add the inter part to the segment's output, and send
``S_out = A S_in + M`` on. Backward runs the chain in reverse with the state gradients:
``Gtot_p = dL/dS_in_p + A_p^T Gout_p`` goes to the segment before, and the segment's summary
gradient is ``dM_p = Gout_p``, ``dA_p = Gout_p S_in_p^T`` (scalar: ``dlogA_p = e^logA_p <Gout_p,
S_in_p>``; the same folds LASP-2 does after its all-gather, :mod:`lasp.ops.affine`). Each
segment's state-independent work (``compute_local``; in backward ``prepare_backward``, the
recomputed forward where the segment needs one, and ``backward_output``) runs between posting the
receive and waiting for it.

Entry point: :func:`lasp1_apply`, with exactly the arguments and conventions of
:func:`lasp.ops.lasp2.lasp2_apply` (any segment class of :mod:`lasp.ops.segment`, scalar or
matrix transition; ``initial_state`` / ``output_final_state``). The forward keeps no segment: it
saves its inputs and this rank's incoming states, and the backward rebuilds the segments.

Communication per call (float32 states, sends; each receive matches one send). The chain's
batches are one-sided (a rank receives alone, or sends alone), which NCCL defines only after a
collective of the whole group: the first call on a group runs one 4-byte all-reduce first
(:func:`lasp.comm.prepare_p2p`; once per group and process, not counted below).

- causal, ``contiguous``: ``P-1`` sequential hops forward and ``P-1`` backward, each a
  ``B*H*K*V*4``-byte state (state and gradient messages are the same for scalar and matrix
  transitions); every rank but the last (forward) / first (backward) sends one;
  2(P-1) dependent steps in all.
- causal, ``zigzag``: the chain 0..2P-1 crosses ranks ``2(P-1)`` times per direction (the
  hand-off between segments P-1 and P stays on rank P-1), each hop ``B*H*K*V*4`` bytes.
- ``output_final_state``: one all-reduce of ``B*H*K*V*4`` bytes forward (the final state, from
  the rank holding the last segment, to every rank) and one backward (the sum of the ranks'
  final-state gradients); tags ``lasp1.fwd.final`` / ``lasp1.bwd.final``.
- packed documents with per-document final states (:mod:`lasp.ops.document_states`): one
  all-reduce of ``N*H*K*V*4`` bytes forward and one backward (``lasp1.*.doc_finals``).
- non-causal: ``O = scale Q sum_r M_r``: every rank's ``M = K^T V`` circulates the ring,
  ``P-1`` sends of ``B*H*K*V*4`` bytes per rank forward, and the same for ``dS = scale Q^T dO``
  backward.

The latency is ``O(P)`` dependent messages, against LASP-2's one all-gather each way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..parallel import chunk_owners, group_rank_size
from . import affine
from .common import (
    SegmentCall, build_segments, document_finals, initial_state_grad, join_segments, rebuild_segments, run_driver,
    segment_input_grads, segment_order, set_document_final_grads, split_segments, wait_all,
)
from .noncausal import diagonal_method

_FWD_TAG = "lasp1.fwd"
_BWD_TAG = "lasp1.bwd"


class _Chain:
    """Who holds which global segment, and the P2P calls between consecutive segments.

    Its sends and receives are one-sided batches (a rank posts a receive alone, or a send alone);
    under NCCL these are defined only after a collective of the whole group, which
    :func:`lasp.comm.prepare_p2p` runs once per group here, where every rank of the group is."""

    def __init__(self, group, layout: str, device: torch.device):
        self.group = group
        self.rank, self.size = group_rank_size(group)
        order = segment_order(self.size, layout)
        self.mine = order[self.rank]  # global indices of this rank's segments, increasing
        self.n = self.size * len(self.mine)
        self.owner = [r for r, _ in chunk_owners(self.size, layout)]  # global segment -> rank
        if self.size > 1:
            comm.prepare_p2p(group, device)

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

    def all_reduce(self, t: torch.Tensor, tag: str) -> torch.Tensor:
        """Sum over the group in place (nothing to do for a group of one)."""
        if self.size > 1:
            comm.all_reduce(t, self.group, tag=tag)
        return t


class LASP1Causal(torch.autograd.Function):
    """Causal LASP-1 over ``call.group``: ``apply(call, initial_state, *inputs)``."""

    @staticmethod
    def forward(ctx, call: SegmentCall, initial_state, *inputs):
        kind = call.kind
        chain = _Chain(call.group, call.layout, inputs[0].device)
        segs = build_segments(call, inputs)
        zero = torch.zeros_like(segs[0].summary()[1])
        first = zero if initial_state is None else initial_state.float()

        outs, states_in, sends = [], [], []
        s_prev = first
        for seg, p in zip(segs, chain.mine):
            pending = chain.post_recv(p - 1, zero, _FWD_TAG) if chain.remote(p - 1) else None
            seg.compute_local()  # overlaps the wait for the incoming state
            if pending is not None:
                wait_all(pending[1])
                s_in = pending[0]
            else:
                s_in = s_prev if p > 0 else first
            A, M = seg.summary()
            outs.append(seg.output(s_in, state_is_zero=initial_state is None and p == 0))
            s_prev = affine.apply(kind, A, s_in) + M
            if chain.remote(p + 1):
                sends.append((s_prev, chain.send(s_prev, p + 1, _FWD_TAG)))
            states_in.append(s_in)
        for _, works in sends:
            wait_all(works)

        ctx.call, ctx.s0_dtype = call, None if initial_state is None else initial_state.dtype
        ctx.save_for_backward(*inputs, torch.stack(states_in))
        o = join_segments(outs, inputs[0].dtype)
        if call.document_finals:
            return o, document_finals(call, segs, zero, _FWD_TAG + ".doc_finals")
        if call.output_final_state:
            final = s_prev.clone() if chain.mine[-1] == chain.n - 1 else torch.zeros_like(zero)
            return o, chain.all_reduce(final, _FWD_TAG + ".final")
        return o

    @staticmethod
    def backward(ctx, do, dfinal=None):
        call, segs, states_in = rebuild_segments(ctx)
        kind, needs = call.kind, ctx.needs_input_grad[2:]
        chain = _Chain(call.group, call.layout, states_in.device)
        do_parts = split_segments(do, call.layout)
        zero = torch.zeros_like(states_in[0])
        G_N = chain.all_reduce(dfinal.float().clone(), _BWD_TAG + ".final") if call.output_final_state else None
        if call.document_finals:
            set_document_final_grads(call, segs, dfinal, _BWD_TAG + ".doc_finals")

        sends = []
        g_next = zero  # total gradient of the state entering the segment after the current one
        for j in reversed(range(len(segs))):
            p, seg, d, s_in = chain.mine[j], segs[j], do_parts[j], states_in[j]
            pending = chain.post_recv(p + 1, zero, _BWD_TAG) if chain.remote(p + 1) else None
            ds_in = seg.state_grad(d)
            # the recomputed forward (where the segment needs one) and the local backward overlap the wait
            seg.prepare_backward(s_in, state_is_zero=ctx.s0_dtype is None and p == 0)
            seg.backward_output(d)
            if pending is not None:
                wait_all(pending[1])
                g_out = pending[0]
            elif p < chain.n - 1:
                g_out = g_next
            else:
                g_out = zero if G_N is None else G_N
            A = seg.summary()[0]
            g_next = ds_in + affine.apply_t(kind, A, g_out)
            if chain.remote(p - 1):
                sends.append((g_next, chain.send(g_next, p - 1, _BWD_TAG)))
            if p < chain.n - 1 or G_N is not None:  # the last segment's summary feeds nothing
                seg.backward_summary(g_out, affine.grad_A(kind, A, g_out, s_in))
        for _, works in sends:
            wait_all(works)

        d_s0 = initial_state_grad(ctx, g_next if chain.mine[0] == 0 else None, zero)
        return (None, d_s0, *segment_input_grads(call, segs, needs))


def lasp1_apply(seg_class: type, token_inputs, shared_inputs=(), **kwargs):
    """Causal LASP-1; the same arguments and returns as :func:`lasp.ops.lasp2.lasp2_apply`."""
    return run_driver(LASP1Causal, seg_class, token_inputs, shared_inputs, **kwargs)


def lasp1_linear_attention(q, k, v, g=None, g_gamma=None, **kwargs):
    """LASP-1 on validated inputs (see :func:`lasp.linear_attention`)."""
    return diagonal_method(lasp1_apply, "lasp1", q, k, v, g, g_gamma, **kwargs)
