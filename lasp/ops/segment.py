"""Per-segment compute that LASP-2 and LASP-1 drive, independent of how it is computed (protocol v2).

A *segment* is a contiguous run of tokens on one rank (the whole shard for the contiguous
layout, each half for zigzag). A segment maps the state entering it affinely,
``S_out = A S_in + M``; the drivers (:mod:`lasp.ops.lasp2`, :mod:`lasp.ops.lasp1`) fold these
maps with :mod:`lasp.ops.affine` and only need, per segment:

=================================  =============================================================
``Seg.transition`` (class attr)    ``"scalar"`` (diagonal family) or ``"matrix"`` (delta family)
``summary()``                      ``(A, M)`` float32: ``M [B, H, K, V]`` the final state from a
                                   zero incoming state; ``A`` = ``logA [B, H]`` (scalar:
                                   ``S_out = e^logA S_in + M``; -inf = hard reset) or
                                   ``A [B, H, K, K]`` (matrix: ``S_out = A @ S_in + M``)
``compute_local()``                the work that does not depend on ``S_in`` (overlaps the gather)
``output(S_in, *, state_is_zero)`` ``o [B, T, H, V]`` float32; ``state_is_zero=True``: S_in is
                                   known to be zero (from its position), the inter part may be
                                   skipped
``prepare_backward(S_in, *,         backward only, on a rebuilt segment: whatever
state_is_zero)``                   ``backward_output`` needs of ``compute_local`` + ``output``
                                   with the same arguments as in forward, without computing
                                   the output where it is not needed
``state_grad(dO)``                 ``dL/dS_in [B, H, K, V]`` float32 from this segment's outputs
``backward_output(dO)``            gradients due to ``dO`` (``S_in`` as given to
                                   ``prepare_backward``)
``backward_summary(dM, dA)``       gradients due to the summary's own gradient (``dA`` is
                                   ``dlogA [B, H]`` or ``[B, H, K, K]``); not called when the
                                   driver knows both are zero
``grads()``                        input gradients in the constructor's input order (None where
                                   unused)
=================================  =============================================================

Optional (a segment that has them gets them from :mod:`lasp.ops.lasp2`): ``lazy_transition =
True`` (class attr) and ``summary(transition=False)``: the caller applies ``A`` to zero states only
(one segment, no incoming state), the segment may skip computing it (and return zeros) and treat
``dA`` as zero; ``dA_from_state = True``: ``backward_summary(dM, None)`` means ``dA = dM S_in^T``
(the gradient of ``S_out = A S_in + M`` with the ``S_in`` given to ``prepare_backward``), which the
segment derives itself.

Constructors: diagonal ``Seg(q, k, v, g, g_gamma, scale)`` (grads ``(dq, dk, dv, dg, dg_gamma)``);
delta ``Seg(q, k, v, g, beta, scale, use_qk_l2norm=False)`` (grads ``(dq, dk, dv, dg, dbeta)``; g at
the same place as the diagonal family's, the order of fla's ``chunk_gated_delta_rule``). A segment object lives for ONE
direction: the drivers build segments in forward and REBUILD them from the saved inputs in
backward (recompute), calling ``prepare_backward`` (not ``compute_local`` and ``output``) before
``backward_output``; a segment must not rely on another instance. Plain-torch segments recompute
their forward there (it records the autograd graph backward replays); the Triton ones keep only
the incoming state (diagonal) or run only the state pass (delta), launching no output kernel.

Backends: :class:`TorchSegment` (plain torch, autograd inside) here; the Triton one lives in
``kernels``. Both are selected by :func:`segment_class`.
"""
from __future__ import annotations

import torch

from . import chunk


class TorchSegment:
    """The plain-torch segment: builds a small autograd graph in forward, replays it in backward."""

    transition = "scalar"

    def __init__(self, q, k, v, g, g_gamma, scale: float, chunk_size: int = chunk.DEFAULT_CHUNK_SIZE):
        self.inputs = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (q, k, v, g, g_gamma)]
        self.scale = scale
        self._grads: list[torch.Tensor | None] = [None] * 5
        B, T, H, _ = q.shape
        qi, ki, vi, gi, ggi = self.inputs
        with torch.enable_grad():
            self.q, self.k, self.v = (chunk.to_heads_first(x) for x in (qi, ki, vi))
            self.a = chunk.log_gates(gi, ggi, B, T, H, q.device)
            # the summary comes from the chunk scan (within-chunk cumsums composed chunk by
            # chunk), not from differences of one running sum over the whole segment, which
            # loses fp32 precision on long segments
            self.chunked = chunk.ChunkedSegment(self.q, self.k, self.v, self.a, chunk_size)
            self.M = self.chunked.final_state
            self.logA = self.q.new_zeros(B, H) if self.a is None else self.a.sum(-1)

    def summary(self):
        return self.logA.detach(), self.M.detach()

    def compute_local(self) -> None:
        with torch.enable_grad():
            self.o_local = self.chunked.output(self.scale)

    def output(self, state: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        with torch.enable_grad():
            self.o = self.o_local if state_is_zero else self.o_local + chunk.inter_output(self.q, self.a, state, self.scale)
        return self.o.detach().transpose(1, 2)

    def prepare_backward(self, state: torch.Tensor, *, state_is_zero: bool = False) -> None:
        """Backward: records the forward's graph again (``compute_local`` + ``output``)."""
        self.compute_local()
        self.output(state, state_is_zero=state_is_zero)

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return chunk.inter_state_grad(self.q, self.a, chunk.to_heads_first(do), self.scale)

    def _accumulate(self, outputs, grad_outputs, retain: bool) -> None:
        wanted = [i for i, x in enumerate(self.inputs) if x is not None and x.requires_grad]
        pairs = [(o, go) for o, go in zip(outputs, grad_outputs) if o.requires_grad]
        if not wanted or not pairs:
            return
        outputs, grad_outputs = zip(*pairs)
        grads = torch.autograd.grad(
            outputs, [self.inputs[i] for i in wanted], grad_outputs, retain_graph=retain, allow_unused=True
        )
        for i, gr in zip(wanted, grads):
            if gr is not None:
                self._grads[i] = gr if self._grads[i] is None else self._grads[i] + gr

    def backward_output(self, do: torch.Tensor) -> None:
        self._accumulate([self.o], [chunk.to_heads_first(do)], retain=True)

    def backward_summary(self, dM: torch.Tensor, dlogA: torch.Tensor) -> None:
        if self.a is None:
            self._accumulate([self.M], [dM], retain=False)
        else:
            self._accumulate([self.M, self.logA], [dM, dlogA], retain=False)

    def grads(self):
        return tuple(self._grads)


def segment_class(backend: str):
    """The segment implementation for a resolved backend name (``torch`` or ``triton``)."""
    if backend == "torch":
        return TorchSegment
    if backend == "triton":
        try:
            from ..kernels.segment import TritonSegment
        except ImportError as e:  # pragma: no cover - depends on the kernels package state
            raise NotImplementedError(f"backend='triton' is not available: {e}") from e
        return TritonSegment
    raise ValueError(f"backend must be 'torch' or 'triton' here, got {backend!r}")
