"""The public operators: ``lasp.linear_attention`` and ``lasp.softmax_attention``.

Thin wrappers: validate (locally, on every rank, before any collective), resolve the backend,
and dispatch to one module per method under :mod:`lasp.ops`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .ops.checks import SOFTMAX_METHOD_NAMES, check_common, check_linear, check_states, resolve_backend
from .ops.documents import document_bounds, document_gate
from .ops.document_states import apply_with_document_states
from .ops.lasp1 import lasp1_linear_attention
from .ops.lasp2 import lasp2_linear_attention
from .ops.rank_check import check_same_on_ranks, token_field_ignored
from .ops.segment import segment_class
from .ops.ring import ring_softmax_attention
from .ops.single import full_sequence_linear
from .ops.softmax_allgather import allgather_softmax_attention
from .ops.softmax_documents import single_process_softmax
from .ops.ulysses import check_heads_divisible, ulysses_linear_attention, ulysses_softmax_attention
from .parallel import group_rank_size

#: Linear-attention methods: name -> ``f(q, k, v, g, g_gamma, *, scale, causal, group, layout, backend)``
#: on validated inputs (the public list: benchmarks and users read it).
LINEAR_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "lasp2": lasp2_linear_attention,
    "lasp1": lasp1_linear_attention,
    "ulysses": ulysses_linear_attention,
}
#: Softmax-attention methods: name -> ``f(q, k, v, *, causal, scale, group, layout, bounds=None)`` on
#: validated inputs (``bounds``: ``cu_seqlens`` as Python ints, or None).
SOFTMAX_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "allgather": allgather_softmax_attention,
    "ring": ring_softmax_attention,
    "ulysses": ulysses_softmax_attention,
}


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    group=None,
    method: str = "lasp2",
    layout: str = "contiguous",
    backend: str = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """(Sequence-parallel) gated linear attention on this rank's shard.

    ``S_t = exp(g_t + g_gamma) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` over the WHOLE
    sequence, of which this rank holds ``T_local`` tokens in ``layout`` order.

    Args:
        q, k: ``[B, T_local, H, K]``; v: ``[B, T_local, H, V]`` (same dtype).
        g: ``[B, T_local, H]`` log-gates (<= 0) or None. g_gamma: ``[H]`` log-decay or None.
        scale: default ``K ** -0.5``. causal: False = bidirectional (no gates allowed).
        group: the SP process group; None = the whole sequence is on this process.
        method: ``lasp2`` | ``lasp1`` | ``ulysses``. layout: ``contiguous`` | ``zigzag``.
        backend: ``torch`` | ``triton`` | ``auto`` (triton on CUDA for head dims the kernels take,
            else torch with a warning).
        initial_state: ``[B, H, K, V]`` state before the first token of the whole sequence (the
            same on every rank; float32 or q's dtype) or None (zeros). Causal only. Its gradient
            on each rank is that rank's contribution (sum over the SP group = the total). With
            ``cu_seqlens``: ``[N, H, K, V]``, one per document (fla's varlen form), or ``[1, H, K, V]``
            (the first document's; the others start from zeros).
        output_final_state: also return the float32 state after the last token of the whole
            sequence, on every rank (differentiable; its gradient is summed over the ranks).
        cu_seqlens: packed documents (causal only, B = 1): ``[N+1]`` integer global document
            starts ``0 = c_0 < ... < c_N = T_local * P``, the same on every rank; each document runs
            as if alone. Without states a document start is a hard reset (log-decay ``-inf``), so
            LASP-2's bytes are unchanged; validation adds one 24-byte all-gather per call
            (:mod:`lasp.ops.documents`). With states (fla's varlen): one initial and one final state
            per document, the final ones ``[N, H, K, V]`` on every rank (:mod:`lasp.ops.document_states`).
    Returns:
        ``o [B, T_local, H, V]`` in q's dtype (states are float32 internally), or
        ``(o, final_state [B, H, K, V])`` with ``output_final_state`` (``[N, H, K, V]`` with ``cu_seqlens``).
    """
    check_linear(q, k, v, g, g_gamma, scale=scale, causal=causal, group=group, layout=layout, method=method, backend=backend)
    check_states(q, v, initial_state, output_final_state, causal=causal, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None and not causal:
        raise ValueError("cu_seqlens needs causal=True (packed documents for non-causal linear attention are not supported)")
    if method == "ulysses":
        check_heads_divisible(group, H=q.shape[2])  # local, before the shape handshake (a collective)
    check_same_on_ranks("linear_attention", dict(
        B=q.shape[0], T_local=q.shape[1], H=q.shape[2], K=q.shape[3], V=v.shape[3], dtype=q.dtype, g=g is not None,
        g_gamma=g_gamma is not None, causal=causal, initial_state=-1 if initial_state is None else initial_state.shape[0],
        output_final_state=output_final_state, method=method, layout=layout, cu_seqlens=cu_seqlens is not None,
    ), group, q.device, ignore=token_field_ignored(method, layout))
    backend = resolve_backend(backend, q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        bounds = document_bounds(cu_seqlens, q.shape[1] * group_rank_size(group)[1], q.shape[0], group, device=q.device)
        return apply_with_document_states(segment_class(backend), [q, k, v, g], [g_gamma], bounds=bounds, scale=scale,
                                          initial_state=initial_state, output_final_state=output_final_state, group=group,
                                          method=method, layout=layout)
    if cu_seqlens is not None:
        g = document_gate(g, cu_seqlens, q, group, layout)
    states = dict(initial_state=initial_state, output_final_state=output_final_state) if causal else {}
    if group_rank_size(group)[1] == 1:
        return full_sequence_linear(q, k, v, g, g_gamma, scale=scale, causal=causal, backend=backend, **states)
    impl = LINEAR_METHODS[method]
    return impl(q, k, v, g, g_gamma, scale=scale, causal=causal, group=group, layout=layout, backend=backend, **states)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    group=None,
    method: str = "allgather",
    layout: str = "contiguous",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Sequence-parallel) softmax attention on this rank's shard.

    Args:
        q: ``[B, T_local, H, D]``; k, v: ``[B, T_local, H_kv, D]`` with H a multiple of H_kv (GQA).
        causal: causal mask over GLOBAL positions of the ``layout``.
        group: the SP process group; None = no sequence parallelism.
        method: ``allgather`` (LASP-2H) | ``ring`` | ``ulysses``.
        cu_seqlens: packed documents: a 1-D integer tensor ``[N+1]`` of document starts over the
            WHOLE sequence (``0 = c_0 < ... < c_N = T``, the same on every rank, B = 1); a token
            attends only within its document (as if each document ran alone). Read once on the
            host by the validation (one small all-gather when P > 1), never inside forward/backward;
            no method builds a mask.
    Returns:
        ``o [B, T_local, H, D]`` in q's dtype.
    """
    check_common(q, k, v, group=group, layout=layout, method=method, methods=SOFTMAX_METHOD_NAMES)
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q's heads H={q.shape[2]} must be a multiple of k/v's heads H_kv={k.shape[2]} (GQA)")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v's head dim must equal q's ({q.shape[-1]}) for softmax attention, got {v.shape[-1]}")
    if method == "ulysses":
        check_heads_divisible(group, H=q.shape[2], H_kv=k.shape[2])  # local, before the shape handshake
    check_same_on_ranks("softmax_attention", dict(
        B=q.shape[0], T_local=q.shape[1], H=q.shape[2], H_kv=k.shape[2], D=q.shape[3], dtype=q.dtype, causal=causal,
        method=method, layout=layout, cu_seqlens=cu_seqlens is not None,
    ), group, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    size = group_rank_size(group)[1]
    bounds = document_bounds(cu_seqlens, q.shape[1] * size, q.shape[0], group, device=q.device)
    if size == 1:
        return single_process_softmax(q, k, v, causal=causal, scale=scale, bounds=bounds)
    impl = SOFTMAX_METHODS[method]
    return impl(q, k, v, causal=causal, scale=scale, group=group, layout=layout, bounds=bounds)
