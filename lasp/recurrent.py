"""The public delta-rule operators: ``lasp.gated_delta_rule`` and ``lasp.causal_conv1d``.

Thin wrappers as in :mod:`lasp.attention`: validate (locally, on every rank, before any
collective), resolve the backend, dispatch. One process (``group=None`` or a group of one): the
chunked WY form of :mod:`lasp.ops.delta_chunk`. A real group: the generic LASP-2 / LASP-1
drivers with :class:`~lasp.ops.delta_segment.DeltaTorchSegment` (``transition = "matrix"``), or
Ulysses (all-to-all to heads, the one-process operator on whole sequences, all-to-all back).
"""
from __future__ import annotations

import torch

from .ops.checks import check_gated_delta, resolve_backend
from .ops.conv import causal_conv1d
from .ops.delta_chunk import chunk_gated_delta_rule
from .ops.delta_segment import DeltaTorchSegment
from .ops.document_states import apply_with_document_states
from .ops.documents import document_bounds, document_gate
from .ops.lasp1 import lasp1_apply
from .ops.lasp2 import lasp2_apply
from .ops.rank_check import check_same_on_ranks, token_field_ignored
from .ops.ulysses import check_heads_divisible, ulysses_apply
from .parallel import group_rank_size

__all__ = ["gated_delta_rule", "causal_conv1d"]

# method -> driver (the same LASP-2 / LASP-1 / Ulysses drivers as linear attention's)
_DRIVERS = {"lasp2": lasp2_apply, "lasp1": lasp1_apply, "ulysses": ulysses_apply}


def _segment_class(backend: str, q: torch.Tensor, v: torch.Tensor) -> type:
    """The delta segment for ``backend``: ``triton`` (:class:`lasp.kernels.delta_segment.TritonDeltaSegment`),
    also for ``auto`` on CUDA with head dims the kernels take (not K = V = 256); the torch segment otherwise."""
    if resolve_backend(backend, q, v) == "triton":
        from .kernels.delta_segment import TritonDeltaSegment, unsupported_head_dims

        why = unsupported_head_dims(q.shape[-1], v.shape[-1], q.dtype)
        if why is None:
            return TritonDeltaSegment
        if backend == "triton":  # before any collective, on every rank (same shapes everywhere)
            raise ValueError(f"{why}; use backend='torch' or 'auto'")
    return DeltaTorchSegment


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    group=None,
    method: str = "lasp2",
    layout: str = "contiguous",
    backend: str = "auto",
):
    """(Sequence-parallel) gated delta rule on this rank's shard (fla's names, order and layout:
    ``chunk_gated_delta_rule(q, k, v, g, beta, ...)``, everything after beta keyword-only).

    Over the WHOLE sequence, per head: ``S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} +
    beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``, ``S_0 = initial_state`` (zeros if None).

    Args:
        q, k: ``[B, T_local, H, K]``; v: ``[B, T_local, HV, V]`` (same dtype), ``HV`` a multiple of
            ``H`` (GVA, fla's convention: value head j reads q/k head ``j // (HV // H)``, what
            transformers' ``repeat_interleave`` of q, k gives; nothing is repeated inside, and the
            gradients of q, k sum over their value heads). ``method="ulysses"`` needs H and HV
            divisible by P.
        g: ``[B, T_local, HV]`` log-decay (<= 0; -inf is a hard reset) or None (DeltaNet).
        beta: ``[B, T_local, HV]`` in (0, 1).
        scale: default ``K ** -0.5``. initial_state: ``[B, HV, K, V]`` or None.
        output_final_state: also return the fp32 state after the last token of the whole
            sequence (the same on every rank).
        use_qk_l2norm_in_kernel: L2-normalise q and k per head inside the operator.
        group: SP process group or None. method: ``lasp2`` | ``lasp1`` | ``ulysses``.
        layout: ``contiguous`` | ``zigzag``. backend: ``auto`` (Triton on CUDA for head dims it takes) | ``torch`` | ``triton``.
        cu_seqlens: packed documents (B = 1): ``[N+1]`` integer global document starts
            ``0 = c_0 < ... < c_N = T_local * P``, the same on every rank; each document runs as if
            alone (without states a start is a hard reset ``g = -inf``: ``S = beta k v^T`` there, and
            LASP-2's bytes are unchanged). States as fla's varlen: ``initial_state [N, HV, K, V]``, one
            per document (``[1, HV, K, V]``: the first document's, the others from zeros), and the
            final states ``[N, HV, K, V]``, one per document, the same on every rank; their
            gradients included (:mod:`lasp.ops.document_states`: one more all-reduce of ``N*HV*K*V*4``
            bytes each way with ``output_final_state``).
    Returns:
        ``o [B, T_local, HV, V]`` in q's dtype, or ``(o, final_state [B, HV, K, V] float32)`` (``[N,
        HV, K, V]`` with ``cu_seqlens``).
    """
    check_gated_delta(q, k, v, g, beta, initial_state, output_final_state, scale=scale, group=group, layout=layout, method=method,
                      backend=backend, cu_seqlens=cu_seqlens)
    if method == "ulysses":
        check_heads_divisible(group, H=q.shape[2], HV=v.shape[2])  # local, before the shape handshake (a collective)
    check_same_on_ranks("gated_delta_rule", dict(
        B=q.shape[0], T_local=q.shape[1], H=q.shape[2], HV=v.shape[2], K=q.shape[3], V=v.shape[3], dtype=q.dtype,
        g=g is not None, initial_state=-1 if initial_state is None else initial_state.shape[0],
        output_final_state=output_final_state, method=method, layout=layout, cu_seqlens=cu_seqlens is not None,
        use_qk_l2norm=use_qk_l2norm_in_kernel,
    ), group, q.device, ignore=token_field_ignored(method, layout))
    seg_class = _segment_class(backend, q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    size = group_rank_size(group)[1]
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        bounds = document_bounds(cu_seqlens, q.shape[1] * size, q.shape[0], group, device=q.device)
        return apply_with_document_states(seg_class, [q, k, v, g, beta], [], bounds=bounds, scale=scale,
                                          initial_state=initial_state, output_final_state=output_final_state, group=group,
                                          method=method, layout=layout, use_qk_l2norm=use_qk_l2norm_in_kernel)
    if cu_seqlens is not None:
        g = document_gate(g, cu_seqlens, v, group, layout)  # per value head (GVA)

    def one_process(tokens, s0, ofs):  # the whole sequence here: torch chunked, or one Triton segment
        if seg_class is DeltaTorchSegment:
            return chunk_gated_delta_rule(*tokens, scale, s0, ofs, use_qk_l2norm=use_qk_l2norm_in_kernel)
        return lasp2_apply(seg_class, tokens, [], scale=scale, group=None, initial_state=s0,
                           output_final_state=ofs, use_qk_l2norm=use_qk_l2norm_in_kernel)

    if size == 1:
        return one_process([q, k, v, g, beta], initial_state, output_final_state)
    apply = _DRIVERS[method]
    if method == "ulysses":  # all-to-all to heads, the one-process operator, all-to-all back
        def local_op(tokens, heads, s0, ofs):
            return one_process(tokens, s0, ofs)

        return apply(local_op, [q, k, v, g, beta], [], group=group, layout=layout,
                     initial_state=initial_state, output_final_state=output_final_state)
    return apply(
        seg_class, [q, k, v, g, beta], [], scale=scale, group=group, layout=layout,
        initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm_in_kernel,
    )
