"""Per-document states with packed documents (``cu_seqlens``): fla's varlen ``initial_state [N, H, K,
V]`` and final states ``[N, H, K, V]``, one per document, for every segment driver and both families.

Without states, a document start is a hard reset (:mod:`lasp.ops.documents`). With them, the state
entering document ``i`` is its own ``initial_state[i]``: an affine term injected at the boundary,
``S_{c_i - 1} := s0_i``, then the document's own tokens (their real gates included) as usual. A
:class:`DocumentSegment` wraps a segment of the protocol (:mod:`lasp.ops.segment`, any backend,
scalar or matrix transition) and cuts it at the document starts inside it into *pieces*, each an
inner segment of the wrapped class:

- the first piece, when the segment does not begin a document, continues the document that came
  from earlier segments: its incoming state is the driver's ``S_in`` (LASP-2's fold or LASP-1's
  chain, which carry everything before, injections included);
- every other piece begins document ``i`` and starts from ``s0_i`` (``initial_state[i]``).

So the wrapped segment's summary is the first piece's ``(A, M)`` when it holds no document start,
else ``(0, A_last s0_last + M_last)`` (the transition is zero: the state leaving the segment no
longer depends on ``S_in``): a document whose start lies on another rank gets its state through the
unchanged fold. Each piece that ends a document (``hi = c_{i+1}``) gives that document's final state
``A_j S_j + M_j`` once its incoming state is known; every document ends in exactly one segment, so
the drivers sum each rank's ``[N, H, K, V]`` contributions in ONE all-reduce forward (tag
``*.fwd.doc_finals``, ``N*H*K*V*4`` bytes) and ONE backward for the gradients of the final states
(summed over ranks, as for ``final_state``), which the segments take before ``state_grad``.
The per-document initial states are a shared input: each rank returns its segments' share of their
gradient (summed over the SP group it is the total, like ``initial_state``'s).

The piece boundaries come from ``cu_seqlens`` as validated on the host before the operator (no host
sync inside); a segment with many document starts runs one inner segment per piece.
"""
from __future__ import annotations

import bisect

import torch

from . import affine

__all__ = ["DocumentSegment", "document_segment_class", "plan_pieces", "per_document_states", "documents_apply",
           "apply_with_document_states"]


def plan_pieces(bounds: tuple[int, ...], lo: int, hi: int) -> list[tuple[int, int, int, bool, bool]]:
    """The pieces of the global token range ``[lo, hi)``: ``(start, end, document, injected,
    ends_document)`` in global positions, cut at the document starts ``bounds`` (``cu_seqlens`` as
    ints); ``injected``: the piece begins its document (its state is that document's own)."""
    starts = [c for c in bounds[:-1] if lo <= c < hi]
    cuts = ([] if starts and starts[0] == lo else [lo]) + starts + [hi]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        doc = bisect.bisect_right(bounds, a) - 1
        out.append((a, b, doc, a == bounds[doc], b == bounds[doc + 1]))
    return out


def per_document_states(initial_state: torch.Tensor | None, n_docs: int, like: torch.Tensor) -> torch.Tensor:
    """``[N, H, K, V]`` per-document initial states: fla's form as given, zeros for None, and lasp's
    single-state form ``[1, H, K, V]`` (the first document's state; the others start from zeros, a
    reset) padded with zeros. ``like``: a ``[1, H, K, V]`` float32 tensor of the state's shape."""
    if initial_state is None:
        return like.new_zeros(n_docs, *like.shape[1:])
    if initial_state.shape[0] == n_docs:
        return initial_state
    return torch.cat([initial_state, initial_state.new_zeros(n_docs - 1, *initial_state.shape[1:])])


class DocumentSegment:
    """A segment of the protocol cut at its document starts (the module docstring).

    Built by :func:`document_segment_class` (the class carries the inner segment class and the
    document bounds); constructor ``(*token_parts, *shared, doc_states, scale, segment_index=p,
    **inner_kwargs)``, ``doc_states [N, H, K, V]`` (B = 1). ``grads()``: the token inputs' gradients
    (concatenated over the pieces), the shared ones (summed) and ``doc_states``' share.
    """

    inner: type = None
    bounds: tuple[int, ...] = ()
    n_token: int = 0
    seg_len: int = 0
    takes_segment_index = True
    documents = True

    def __init__(self, *args, segment_index: int, **kwargs):
        *inputs, scale = args
        tokens, shared, self.doc_states = inputs[: self.n_token], inputs[self.n_token : -1], inputs[-1]
        lo = segment_index * self.seg_len
        self.pieces = plan_pieces(self.bounds, lo, lo + self.seg_len)
        self.segs = []
        for a, b, *_ in self.pieces:
            part = [None if x is None else x[:, a - lo : b - lo] for x in tokens]
            self.segs.append(self.inner(*part, *shared, scale, **kwargs))
        self.n_shared = len(shared)
        self.kind = self.inner.transition
        self._finals: dict[int, torch.Tensor] = {}
        self._dfinal: torch.Tensor | None = None
        self._dM = None
        self._incoming: list[torch.Tensor | None] = [None] * len(self.segs)

    # ---- protocol
    def _s0(self, doc: int) -> torch.Tensor:
        return self.doc_states[doc : doc + 1].float()

    def _continues(self) -> bool:
        """Whether the segment's first piece continues a document from earlier segments (no injection)."""
        return not self.pieces[0][3]

    def summary(self):
        A0, M0 = self.segs[0].summary()
        if len(self.segs) == 1 and self._continues():
            return A0, M0
        A, M = self.segs[-1].summary()
        M_out = affine.apply(self.kind, A, self._s0(self.pieces[-1][2])) + M
        zero = torch.full_like(A0, float("-inf")) if self.kind == "scalar" else torch.zeros_like(A0)
        return zero, M_out

    def compute_local(self) -> None:
        for s in self.segs:
            s.compute_local()

    def _states_in(self, S_in: torch.Tensor, state_is_zero: bool):
        """(incoming state, known zero) per piece."""
        return [(S_in, state_is_zero) if not inj else (self._s0(doc), False) for (_, _, doc, inj, _) in self.pieces]

    def output(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        outs = []
        for j, (s, (S, zero), piece) in enumerate(zip(self.segs, self._states_in(S_in, state_is_zero), self.pieces)):
            outs.append(s.output(S, state_is_zero=zero))
            if piece[4]:  # this piece ends its document: that document's final state
                A, M = s.summary()
                self._finals[piece[2]] = affine.apply(self.kind, A, S.float()) + M
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def doc_finals(self) -> dict[int, torch.Tensor]:
        """``{document: final state [1, H, K, V]}`` of the documents ending in this segment (after ``output``)."""
        return self._finals

    def set_doc_final_grads(self, dfinal: torch.Tensor | None) -> None:
        """The gradients ``[N, H, K, V]`` of the per-document final states (summed over ranks), or None."""
        self._dfinal = dfinal

    def prepare_backward(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> None:
        for j, (s, (S, zero)) in enumerate(zip(self.segs, self._states_in(S_in, state_is_zero))):
            s.prepare_backward(S, state_is_zero=zero)
            self._incoming[j] = S.float()

    def _piece_dM(self, j: int) -> torch.Tensor | None:
        """The gradient of the state leaving piece j from its document's final state (None if none)."""
        a, b, doc, inj, ends = self.pieces[j]
        return self._dfinal[doc : doc + 1].float() if ends and self._dfinal is not None else None

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """``dL/dS_in`` through the first piece when it continues a document (zeros otherwise: every
        piece's state is its document's own)."""
        self._d0 = d0 = do[:, : self.pieces[0][1] - self.pieces[0][0]]
        g = self.segs[0].state_grad(d0)
        self._dS0 = g
        if not self._continues():
            return torch.zeros_like(g)
        dM = self._piece_dM(0)
        if dM is not None:
            g = g + affine.apply_t(self.kind, self.segs[0].summary()[0], dM)
        return g

    def backward_output(self, do: torch.Tensor) -> None:
        self._do = do

    def backward_summary(self, dM: torch.Tensor, dA) -> None:
        """The driver's gradient of ``S_out``: the last piece's (``dA`` of a zero transition is dropped;
        one piece continuing its document passes it on, it is ``dM S_in^T``)."""
        self._dM = dM

    def grads(self):
        n = len(self.segs)
        d_states = torch.zeros_like(self.doc_states, dtype=torch.float32)
        offs = [0]
        for a, b, *_ in self.pieces:
            offs.append(offs[-1] + b - a)
        per_piece = []
        for j, (s, piece) in enumerate(zip(self.segs, self.pieces)):
            d = self._d0 if j == 0 and hasattr(self, "_d0") else self._do[:, offs[j] : offs[j + 1]]
            S = self._incoming[j]
            if j > 0 or not self._continues():  # an injected piece: its state is s0_doc (an input)
                dS = self._dS0 if j == 0 else s.state_grad(d)
            else:
                dS = None
            s.backward_output(d)
            dM = self._piece_dM(j)
            if j == n - 1 and self._dM is not None:
                dM = self._dM.float() if dM is None else dM + self._dM.float()
            if dM is not None:
                A = s.summary()[0]
                dA = None if getattr(s, "dA_from_state", False) else affine.grad_A(self.kind, A, dM, S)
                s.backward_summary(dM, dA)
                if dS is not None:
                    dS = dS + affine.apply_t(self.kind, A, dM)
            if dS is not None:
                doc = piece[2]
                d_states[doc] += dS[0]
            per_piece.append(s.grads())
        out = []
        for i in range(self.n_token + self.n_shared):
            parts = [gr[i] for gr in per_piece]
            if i < self.n_token:
                out.append(None if any(p is None for p in parts) else torch.cat(parts, dim=1) if n > 1 else parts[0])
            else:
                parts = [p for p in parts if p is not None]
                out.append(sum(parts[1:], parts[0]) if parts else None)
        return (*out, d_states.to(self.doc_states.dtype))


def document_segment_class(inner: type, bounds: tuple[int, ...], n_token: int, seg_len: int) -> type:
    """A :class:`DocumentSegment` class over ``inner`` segments for the documents ``bounds``
    (``cu_seqlens`` as ints), ``n_token`` per-token inputs and segments of ``seg_len`` tokens."""
    return type(f"Document{inner.__name__}", (DocumentSegment,),
                dict(inner=inner, bounds=tuple(bounds), n_token=n_token, seg_len=seg_len, transition=inner.transition))


def documents_apply(apply, seg_class: type, token_inputs, shared_inputs, *, doc_states: torch.Tensor, bounds, scale: float,
                    group, layout: str = "contiguous", output_final_state: bool = False, **seg_kwargs):
    """A segment driver (``lasp2_apply`` / ``lasp1_apply``; ``group=None``: one process) over
    :class:`DocumentSegment` s of ``seg_class``: per-document initial states ``doc_states [N, H, K, V]``
    and, with ``output_final_state``, ``(o, final states [N, H, K, V] float32)`` on every rank."""
    from ..parallel import group_rank_size, num_chunks

    size = group_rank_size(group)[1]
    n_seg = 1 if size == 1 else num_chunks(size, layout) // size
    T_local = token_inputs[0].shape[1]
    cls = document_segment_class(seg_class, bounds, len(token_inputs), T_local // n_seg)
    return apply(cls, list(token_inputs), [*shared_inputs, doc_states], scale=scale, group=group,
                 layout=layout if size > 1 else "contiguous", document_finals=output_final_state, **seg_kwargs)


def apply_with_document_states(seg_class: type, token_inputs, shared_inputs, *, bounds, scale: float, initial_state,
                               output_final_state: bool, group, method: str, layout: str, **seg_kwargs):
    """Packed documents with per-document states for every method (``lasp.linear_attention``'s and
    ``lasp.gated_delta_rule``'s path): one process, LASP-2 / LASP-1 over :class:`DocumentSegment` s,
    or Ulysses (all-to-all to heads, the one-process path on the whole sequence, all-to-all back).
    ``token_inputs`` start with ``q, k, v``; ``initial_state``: as the operators take it (None,
    ``[1, HV, K, V]`` or ``[N, HV, K, V]``)."""
    from ..parallel import group_rank_size
    from .lasp1 import lasp1_apply
    from .lasp2 import lasp2_apply
    from .ulysses import ulysses_apply

    q, v = token_inputs[0], token_inputs[2]
    like = q.new_zeros(1, v.shape[2], q.shape[-1], v.shape[-1], dtype=torch.float32)
    doc_states = per_document_states(initial_state, len(bounds) - 1, like)
    kw = dict(scale=scale, bounds=bounds, output_final_state=output_final_state, **seg_kwargs)
    if group_rank_size(group)[1] == 1:
        return documents_apply(lasp2_apply, seg_class, token_inputs, shared_inputs, doc_states=doc_states, group=None, **kw)
    if method == "ulysses":  # the operators checked H (and HV) % P before their shape handshake
        def local_op(toks, heads, s0, ofs):
            return documents_apply(lasp2_apply, seg_class, toks, heads, doc_states=s0, group=None, **kw)

        return ulysses_apply(local_op, token_inputs, shared_inputs, group=group, layout=layout, initial_state=doc_states,
                             output_final_state=output_final_state)
    apply = lasp1_apply if method == "lasp1" else lasp2_apply
    return documents_apply(apply, seg_class, token_inputs, shared_inputs, doc_states=doc_states, group=group, layout=layout,
                           **kw)
