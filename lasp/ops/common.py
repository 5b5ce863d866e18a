"""Small helpers shared by the sequence-parallel operators (no operator logic here)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import comm
from ..parallel import chunk_owners, group_rank_size, layout_chunks, num_chunks

__all__ = [
    "cat_or_none",
    "sum_or_none",
    "join_segments",
    "all_gather_async",
    "wait_all",
    "ring_neighbours",
    "ring_shift",
    "split_segments",
    "segment_order",
    "global_order_index",
    "SegmentCall",
    "build_segments",
    "segment_input_grads",
    "initial_state_grad_wanted",
    "initial_state_grad",
    "run_driver",
    "document_finals",
    "set_document_final_grads",
]


def cat_or_none(xs: list[torch.Tensor | None], dim: int = 1) -> torch.Tensor | None:
    """Concatenate per-segment tensors along ``dim`` (T); None if any is None; no copy for one."""
    if any(x is None for x in xs):
        return None
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)


def join_segments(outs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-segment outputs ``[B, T_seg, H, V]`` (float32) -> ``[B, T_local, H, V]`` in ``dtype``:
    one copy (the cast writes straight into the joined tensor)."""
    if len(outs) == 1:
        return outs[0].to(dtype)
    B, _, H, V = outs[0].shape
    out = torch.empty(B, sum(o.shape[1] for o in outs), H, V, dtype=dtype, device=outs[0].device)
    start = 0
    for o in outs:
        out[:, start : start + o.shape[1]].copy_(o)
        start += o.shape[1]
    return out


def sum_or_none(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Sum of the tensors that are not None (None if all are)."""
    xs = [x for x in xs if x is not None]
    return None if not xs else sum(xs[1:], xs[0])


class _Done:
    """The handle of a collective that did not need to run."""

    @staticmethod
    def wait() -> None:
        return None


def all_gather_async(t: torch.Tensor, group, tag: str):
    """``comm.all_gather`` issued asynchronously -> ``(out [P, *t.shape], work)``.

    A group of one (or ``group=None``) communicates nothing: ``out = t[None]``.
    """
    if group_rank_size(group)[1] == 1:
        return t[None], _Done
    return comm.all_gather(t, group, async_op=True, tag=tag)


def wait_all(works) -> None:
    """Wait on every handle of a list (as returned by :func:`lasp.comm.batch_send_recv`)."""
    for w in works:
        w.wait()


def ring_neighbours(group) -> tuple[int, int]:
    """GLOBAL ranks of the next (``r+1``) and previous (``r-1``) member of ``group``'s ring."""
    rank, size = group_rank_size(group)
    return dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)


def ring_shift(t: torch.Tensor, group, tag: str):
    """Post ``t`` -> next rank and a receive from the previous one; returns ``(buffer, works)``.

    Every rank of the group calls it together and takes part (sends and receives), so the batch is
    well defined under NCCL even as the group's first collective."""
    nxt, prv = ring_neighbours(group)
    buf = torch.empty_like(t)
    return buf, comm.batch_send_recv([(t, nxt)], [(buf, prv)], group, tag=tag)


def split_segments(x: torch.Tensor | None, layout: str) -> list[torch.Tensor | None]:
    """A rank's local tensor split into its segments along T (dim 1): one (contiguous) or two (zigzag)."""
    if layout == "contiguous":
        return [x]
    if x is None:
        return [None, None]
    return list(x.chunk(2, dim=1))


def segment_order(group_size: int, layout: str) -> list[list[int]]:
    """``order[r][j]``: global index of rank r's j-th segment."""
    return [layout_chunks(r, group_size, layout) for r in range(group_size)]


def global_order_index(group_size: int, layout: str, device=None) -> torch.Tensor | None:
    """Index ``idx`` with ``global = gathered.flatten(0, 1).index_select(0, idx)``, where
    ``gathered [P, n_seg, ...]`` is rank-major; None when the orders agree (contiguous).
    Cached per (P, layout, device): built and copied to the device once."""
    if layout == "contiguous":
        return None
    return _order_index(group_size, layout, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _order_index(group_size: int, layout: str, device: torch.device) -> torch.Tensor:
    n_seg = num_chunks(group_size, layout) // group_size
    return torch.tensor([r * n_seg + j for r, j in chunk_owners(group_size, layout)], dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- segment drivers


@dataclass
class SegmentCall:
    """The non-tensor arguments of a segment driver (LASP-2, LASP-1) call.

    ``seg_class(*token_parts, *shared_inputs, scale, **seg_kwargs)`` builds one segment, where
    the first ``n_token`` inputs are per-token ``[B, T_local, H, ...]`` tensors (or None), split
    along T into the rank's segments, and the rest are shared by every segment (e.g. ``g_gamma``).
    """

    seg_class: type
    n_token: int
    scale: float
    group: Any
    layout: str
    output_final_state: bool
    seg_kwargs: dict = field(default_factory=dict)
    document_finals: bool = False  # return the per-document final states (DocumentSegment s)

    @property
    def kind(self) -> str:
        """The transition family of the segment class: ``"scalar"`` or ``"matrix"``."""
        return self.seg_class.transition


def build_segments(call: SegmentCall, inputs, needs_grad=None) -> list:
    """The rank's segments (one or two) from its inputs; ``needs_grad[i]`` sets whether input i's
    gradient is wanted (the segment then tracks it). Inputs are detached first."""
    needs_grad = needs_grad or [False] * len(inputs)
    ins = [None if x is None else x.detach().requires_grad_(bool(n) and x.is_floating_point()) for x, n in zip(inputs, needs_grad)]
    tok, shared = ins[: call.n_token], ins[call.n_token :]
    parts = zip(*(split_segments(x, call.layout) for x in tok))
    if not getattr(call.seg_class, "takes_segment_index", False):
        return [call.seg_class(*p, *shared, call.scale, **call.seg_kwargs) for p in parts]
    rank, size = group_rank_size(call.group)  # a segment that needs its global index (DocumentSegment)
    order = segment_order(size, call.layout)[rank]
    return [call.seg_class(*p, *shared, call.scale, segment_index=i, **call.seg_kwargs) for p, i in zip(parts, order)]


def document_finals(call: SegmentCall, segs: list, like: torch.Tensor, tag: str) -> torch.Tensor:
    """Forward, with ``call.document_finals``: the per-document final states ``[N, H, K, V]`` float32
    on every rank: each segment's documents ending in it (``seg.doc_finals()``), summed over the
    group in ONE all-reduce (``like``: a ``[1, H, K, V]`` state)."""
    out = like.new_zeros(len(segs[0].bounds) - 1, *like.shape[1:], dtype=torch.float32)
    for s in segs:
        for doc, S in s.doc_finals().items():
            out[doc] += S[0]
    if group_rank_size(call.group)[1] > 1:
        comm.all_reduce(out, call.group, tag=tag)
    return out


def set_document_final_grads(call: SegmentCall, segs: list, dfinal: torch.Tensor | None, tag: str) -> None:
    """Backward, with ``call.document_finals``: the per-document final states' gradient, summed over
    the group in ONE all-reduce, handed to every segment before ``state_grad``."""
    G = None if dfinal is None else dfinal.float().clone()
    if G is not None and group_rank_size(call.group)[1] > 1:
        comm.all_reduce(G, call.group, tag=tag)
    for s in segs:
        s.set_doc_final_grads(G)


def rebuild_segments(ctx) -> tuple[SegmentCall, list, torch.Tensor]:
    """In a driver's backward: ``(call, segments rebuilt from the saved inputs (recompute), this
    rank's saved incoming states)``; the Function's forward took ``(call, initial_state, *inputs)``
    and saved ``(*inputs, states)``."""
    *inputs, states = ctx.saved_tensors
    return ctx.call, build_segments(ctx.call, inputs, ctx.needs_input_grad[2:]), states


def segment_input_grads(call: SegmentCall, segs: list, needs_grad) -> list[torch.Tensor | None]:
    """Input gradients from the segments' ``grads()``: per-token ones concatenated along T,
    shared ones summed; None where not wanted."""
    per_seg = [s.grads() for s in segs]
    out = []
    for i, need in enumerate(needs_grad):
        parts = [gr[i] for gr in per_seg]
        g = cat_or_none(parts) if i < call.n_token else sum_or_none(parts)
        out.append(g if need else None)
    return out


def initial_state_grad_wanted(ctx) -> bool:
    """In a driver's backward: whether the forward got an initial state (input 1 of the Function;
    its forward sets ``ctx.s0_dtype``, None without one) and its gradient is wanted."""
    return ctx.s0_dtype is not None and ctx.needs_input_grad[1]


def initial_state_grad(ctx, grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """What a driver's backward returns for the initial state: None when not wanted
    (:func:`initial_state_grad_wanted`); else ``grad``, the total gradient of the state entering
    global segment 0 (given on the rank that holds it, None elsewhere), or zeros shaped like the
    float32 ``like`` ``[B, H, K, V]``, cast to the initial state's dtype."""
    if not initial_state_grad_wanted(ctx):
        return None
    return (like.new_zeros(like.shape) if grad is None else grad).to(ctx.s0_dtype)


def run_driver(
    function,
    seg_class: type,
    token_inputs,
    shared_inputs=(),
    *,
    scale: float,
    group,
    layout: str = "contiguous",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    document_finals: bool = False,
    **seg_kwargs,
):
    """Call a segment driver's autograd Function (``LASP2Causal``, ``LASP1Causal``) as
    ``function.apply(call, initial_state, *token_inputs, *shared_inputs)``; see
    :func:`lasp.ops.lasp2.lasp2_apply` for the arguments (``document_finals``: return the
    per-document final states of :class:`lasp.ops.document_states.DocumentSegment` s instead)."""
    token_inputs, shared_inputs = list(token_inputs), list(shared_inputs)
    call = SegmentCall(seg_class, len(token_inputs), float(scale), group, layout, bool(output_final_state), dict(seg_kwargs),
                       bool(document_finals))
    return function.apply(call, initial_state, *token_inputs, *shared_inputs)
