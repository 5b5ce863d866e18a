"""LASP-2: sequence-parallel linear recurrences with ONE all-gather of states per direction.

The driver works for any segment of the protocol in :mod:`lasp.ops.segment`: diagonal decay
(``transition = "scalar"``: linear attention, lightning, retention, simple GLA) and the delta
rule (``transition = "matrix"``), with the algebra of :mod:`lasp.ops.affine`.

Entry point (callable by any operator built on segments)::

    lasp2_apply(seg_class, token_inputs, shared_inputs=(), *, scale, group, layout="contiguous",
                initial_state=None, output_final_state=False, **seg_kwargs)
        -> o [B, T_local, H, V] (dtype of token_inputs[0]), or (o, final_state [B, H, K, V] fp32)

- ``token_inputs``: this rank's per-token tensors ``[B, T_local, H, ...]`` (or None), split along
  T into the rank's segments; ``shared_inputs``: tensors every segment gets whole (``g_gamma``);
  a segment is built as ``seg_class(*token_parts, *shared_inputs, scale, **seg_kwargs)`` and its
  ``grads()`` are in that order. Diagonal: ``token_inputs=[q, k, v, g]``, ``shared_inputs=[g_gamma]``;
  delta: ``token_inputs=[q, k, v, g, beta]``, ``shared_inputs=[]``, ``use_qk_l2norm=...``.
- ``initial_state [B, H, K, V]`` (any float dtype; the same on every rank) is the state before
  the first token of the WHOLE sequence; ``final_state`` the state after its last token, returned
  on every rank (float32).
- Gradient conventions (the loss is the sum of the ranks' losses, as for every replicated
  tensor): ``final_state``'s gradient is the SUM over ranks of each rank's upstream gradient; each
  rank returns its contribution to the gradient of a shared input (``g_gamma``,
  ``initial_state``: the full gradient on rank 0, which holds the first segment in both
  layouts, zeros elsewhere); summing over the SP group gives the total.

Each rank holds one segment (contiguous layout) or two (zigzag: global segments ``r`` and
``2P-1-r``). Forward, per rank:

1. each segment's summary ``(A, M)`` (float32, independent of the incoming state);
2. ONE asynchronous all-gather of the rank's summaries packed in one buffer
   ``[n_seg, B, H, a + K*V]`` (``a`` = 1 scalar, ``K*K`` matrix), overlapped with
3. the segment-local work (``compute_local``);
4. a prefix fold over the gathered summaries in global order gives each own segment's incoming
   state ``S_in`` (and the final state); then the inter part (``output``).

Backward (recompute: the forward keeps no segment; it saves only its inputs and this rank's
``n_seg`` incoming states): rebuild the segments, take each one's ``dL/dS_in`` and pack it with
its transition ``A`` (and, with ``output_final_state``, this rank's final-state gradient) into
ONE asynchronous all-gather, overlapped with ``prepare_backward`` (the recomputed forward where
the segment needs one) and the local backward from ``dO``; a suffix fold
``Gtot_p = dS_in_p + A_p^T Gtot_{p+1}`` (``Gtot_N`` = the summed final-state gradient) gives each
own segment's summary gradient ``dM_p = Gtot_{p+1}``,
``dA_p = Gtot_{p+1} S_p^T`` (scalar: ``dlogA_p = e^logA_p <Gtot_{p+1}, S_p>``); rank 0 also
gets ``dS_0 = Gtot_0``.

Communication per rank and layer (float32 bytes sent, ``a`` = 1 scalar / ``K*K`` matrix,
``n_seg`` = 1 contiguous / 2 zigzag), independent of the sequence length:

- forward: ``n_seg * B * H * (a + K*V) * 4``;
- backward: ``n_seg * B * H * (a + K*V) * 4``, plus ``B * H * K * V * 4`` with
  ``output_final_state``.
- packed documents with per-document final states (:mod:`lasp.ops.document_states`): one
  all-reduce of ``N * H * K * V * 4`` bytes forward (the final states) and one backward (their
  gradients), tags ``lasp2.fwd.doc_finals`` / ``lasp2.bwd.doc_finals``.

Non-causal (:mod:`lasp.ops.noncausal`): forward gathers ``M = K^T V`` (``B*H*K*V*4`` bytes),
backward gathers ``dS = scale Q^T dO`` (same), one collective each.

Memory: nothing saved for backward grows with P (inputs + ``n_seg`` states); the scalar folds
are O(1) kernels (:func:`lasp.ops.affine.transfer_weights`), the matrix folds a loop of ``2P``
(at most) small matmuls.
"""
from __future__ import annotations

import torch

from ..parallel import group_rank_size
from . import affine
from .common import (
    SegmentCall,
    all_gather_async,
    build_segments,
    document_finals,
    global_order_index,
    initial_state_grad,
    initial_state_grad_wanted,
    join_segments,
    rebuild_segments,
    run_driver,
    segment_input_grads,
    segment_order,
    set_document_final_grads,
    split_segments,
)
from .noncausal import diagonal_method

_FWD_TAG = "lasp2.fwd"
_BWD_TAG = "lasp2.bwd"


def to_global_order(gathered: torch.Tensor, layout: str) -> torch.Tensor:
    """``gathered [P, n_seg, ...]`` (rank-major) -> ``[P * n_seg, ...]`` in global segment order."""
    flat = gathered.flatten(0, 1)
    idx = global_order_index(gathered.shape[0], layout, flat.device)
    return flat if idx is None else flat.index_select(0, idx)


def own_summary(seg, n_segments: int, zero_start: bool):
    """``seg.summary()``; a lone segment with no incoming state applies its transition to zeros
    only, so a segment that can skip it (``lazy_transition``) is asked not to compute it."""
    if n_segments == 1 and zero_start and getattr(seg, "lazy_transition", False):
        return seg.summary(transition=False)
    return seg.summary()


def summary_grad_A(seg, kind: str, A, G, S_in):
    """The ``dA`` argument of ``backward_summary``: None for a segment that derives it from its
    incoming state itself (``dA_from_state``: ``dA = G S_in^T``), else :func:`affine.grad_A`."""
    return None if getattr(seg, "dA_from_state", False) else affine.grad_A(kind, A, G, S_in)


class LASP2Causal(torch.autograd.Function):
    """Causal LASP-2 over ``call.group``: ``apply(call, initial_state, *inputs)``."""

    @staticmethod
    def forward(ctx, call: SegmentCall, initial_state, *inputs):
        rank, size = group_rank_size(call.group)
        kind = call.kind
        segs = build_segments(call, inputs)
        n_seg = len(segs)
        summaries = [own_summary(s, size * n_seg, initial_state is None) for s in segs]
        K, V = summaries[0][1].shape[-2:]
        packed = torch.stack([affine.pack(kind, A, M) for A, M in summaries])
        gathered, work = all_gather_async(packed, call.group, _FWD_TAG)
        for s in segs:
            s.compute_local()  # overlaps the all-gather
        work.wait()

        A_all, M_all = affine.unpack(kind, to_global_order(gathered, call.layout), K, V)
        mine = segment_order(size, call.layout)[rank]
        rows = mine + ([size * n_seg] if call.output_final_state else [])
        states = affine.prefix_states(kind, A_all, M_all, initial_state, rows)
        zero_first = initial_state is None
        outs = [s.output(states[j], state_is_zero=zero_first and p == 0) for j, (s, p) in enumerate(zip(segs, mine))]

        ctx.call, ctx.s0_dtype = call, None if initial_state is None else initial_state.dtype
        ctx.save_for_backward(*inputs, states[:n_seg])
        o = join_segments(outs, inputs[0].dtype)
        if call.document_finals:
            return o, document_finals(call, segs, states[0], _FWD_TAG + ".doc_finals")
        if call.output_final_state:
            return o, states[n_seg].clone()
        return o

    @staticmethod
    def backward(ctx, do, dfinal=None):
        call, segs, own_states = rebuild_segments(ctx)
        kind, needs = call.kind, ctx.needs_input_grad[2:]
        rank, size = group_rank_size(call.group)
        n_seg, N = len(segs), size * len(segs)
        mine = segment_order(size, call.layout)[rank]
        do_parts = split_segments(do, call.layout)
        if call.document_finals:
            set_document_final_grads(call, segs, dfinal, _BWD_TAG + ".doc_finals")

        own_A = [own_summary(s, size * n_seg, ctx.s0_dtype is None)[0] for s in segs]
        dS_local = [s.state_grad(d) for s, d in zip(segs, do_parts)]
        B, H, K, V = dS_local[0].shape
        packed = torch.stack([affine.pack(kind, A, dS) for A, dS in zip(own_A, dS_local)]).reshape(-1)
        if call.output_final_state:
            packed = torch.cat([packed, dfinal.float().reshape(-1)])
        gathered, work = all_gather_async(packed, call.group, _BWD_TAG)
        zero_first = ctx.s0_dtype is None
        for s, p, S_in, d in zip(segs, mine, own_states, do_parts):  # overlaps the all-gather
            s.prepare_backward(S_in, state_is_zero=zero_first and p == 0)
            s.backward_output(d)
        work.wait()

        width = affine.numel(kind, K) + K * V
        body = gathered[:, : n_seg * B * H * width].reshape(size, n_seg, B, H, width)
        A_all, dS_all = affine.unpack(kind, to_global_order(body, call.layout), K, V)
        G_N = gathered[:, n_seg * B * H * width :].reshape(size, B, H, K, V).sum(0) if call.output_final_state else None
        want_s0 = initial_state_grad_wanted(ctx) and rank == 0
        rows = [p + 1 for p in mine] + ([0] if want_s0 else [])
        G = affine.suffix_grads(kind, A_all, dS_all, G_N, rows)
        for j, (s, p) in enumerate(zip(segs, mine)):
            if p == N - 1 and G_N is None:
                continue  # the last segment's summary feeds nothing
            s.backward_summary(G[j], summary_grad_A(s, kind, own_A[j], G[j], own_states[j]))

        d_s0 = initial_state_grad(ctx, G[-1] if want_s0 else None, own_states[0])
        return (None, d_s0, *segment_input_grads(call, segs, needs))


def lasp2_apply(seg_class: type, token_inputs, shared_inputs=(), **kwargs):
    """Causal LASP-2 driving ``seg_class`` segments (see the module docstring for the contract).

    Args:
        seg_class: a segment class of the protocol (``transition`` = ``"scalar"`` | ``"matrix"``).
        token_inputs: per-token ``[B, T_local, H, ...]`` tensors or None (split along T).
        shared_inputs: tensors passed whole to every segment, after the token parts.
        kwargs: ``scale`` (float, required), ``group`` (SP group; None = one process, required),
            ``layout="contiguous"`` | ``"zigzag"``, ``initial_state=None`` (``[B, H, K, V]``),
            ``output_final_state=False``; any other keyword goes to the segment constructor.
    Returns:
        ``o [B, T_local, H, V]``, or ``(o, final_state [B, H, K, V] float32)``.
    """
    return run_driver(LASP2Causal, seg_class, token_inputs, shared_inputs, **kwargs)


def lasp2_linear_attention(q, k, v, g=None, g_gamma=None, **kwargs):
    """LASP-2 on validated inputs (see :func:`lasp.linear_attention`)."""
    return diagonal_method(lasp2_apply, "lasp2", q, k, v, g, g_gamma, **kwargs)
