"""The one thin layer every operator communicates through, with optional accounting.

Every collective and point-to-point call the attention operators make goes through the
functions here. With :func:`record` active, each call appends a :class:`CommEvent`
(kind, bytes this rank sends, group size, tag); when no recorder is active the cost is one
``if`` per call.

One-sided P2P batches (a rank that only sends or only receives, as in LASP-1's chain) are well
defined under NCCL only once the group has run a collective in which every rank took part
(:func:`prepare_p2p`); a batch in which every rank sends and receives (a ring shift) needs nothing.

Byte convention: ``bytes`` is what THIS rank contributes to the call: the input tensor's size
for all-gather / all-reduce / reduce-scatter / all-to-all, the sent tensor for ``send``, the
received tensor for ``recv`` (recorded separately as kind ``recv``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommEvent",
    "CommLog",
    "record",
    "all_gather",
    "all_reduce",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_v",
    "batch_send_recv",
    "prepare_p2p",
]


@dataclass(frozen=True)
class CommEvent:
    kind: str  # all_gather | all_reduce | reduce_scatter | all_to_all | send | recv
    bytes: int
    group_size: int
    tag: str = ""


@dataclass
class CommLog:
    """Events recorded inside a :func:`record` block: ``events`` the operators' communication,
    ``checks`` the shape handshakes that only a rank's first call with new shapes makes
    (:data:`CHECK_TAGS`), kept apart so that the accounting of a call does not depend on what ran
    before it in the process."""

    events: list[CommEvent] = field(default_factory=list)
    checks: list[CommEvent] = field(default_factory=list)

    def of(self, tag_prefix: str = "", kinds: tuple[str, ...] | None = None) -> list[CommEvent]:
        return [e for e in self.events if e.tag.startswith(tag_prefix) and (kinds is None or e.kind in kinds)]

    def count(self, tag_prefix: str = "", kinds: tuple[str, ...] | None = None) -> int:
        return len(self.of(tag_prefix, kinds))

    def total_bytes(self, tag_prefix: str = "", kinds: tuple[str, ...] | None = None) -> int:
        return sum(e.bytes for e in self.of(tag_prefix, kinds))

    @property
    def collectives(self) -> int:
        """Calls other than recv (a send/recv pair counts once, as its send)."""
        return sum(1 for e in self.events if e.kind != "recv")

    def clear(self) -> None:
        self.events.clear()
        self.checks.clear()


_active: list[CommLog] = []
#: Tags of the once-per-shape handshakes (:mod:`lasp.ops.rank_check`), recorded in ``CommLog.checks``.
CHECK_TAGS = ("rank_check",)


@contextlib.contextmanager
def record():
    """Record every communication call made inside the block: ``with record() as log: ...``."""
    log = CommLog()
    _active.append(log)
    try:
        yield log
    finally:
        _active.remove(log)


def _note(kind: str, t: torch.Tensor, group, tag: str) -> None:
    if _active:
        ev = CommEvent(kind, t.numel() * t.element_size(), dist.get_world_size(group), tag)
        for log in _active:
            (log.checks if tag in CHECK_TAGS else log.events).append(ev)


_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(inp: torch.Tensor, group, *, async_op: bool = False, tag: str = ""):
    """All-gather ``inp`` (any shape) along a new leading dim: returns ``(out [P, *inp.shape], work)``.

    ``work`` is ``None`` unless ``async_op``; call ``work.wait()`` before reading ``out``.
    """
    inp = inp.contiguous()
    size = dist.get_world_size(group)
    flat = inp.reshape(-1)
    out = torch.empty(size * flat.numel(), dtype=inp.dtype, device=inp.device)
    _note("all_gather", inp, group, tag)
    work = _gather_single(out, flat, group=group, async_op=async_op)
    return out.view(size, *inp.shape), (work if async_op else None)


def all_reduce(t: torch.Tensor, group, *, async_op: bool = False, tag: str = ""):
    """Sum-all-reduce ``t`` in place; returns the work handle when ``async_op``."""
    _note("all_reduce", t, group, tag)
    return dist.all_reduce(t, group=group, async_op=async_op)


def reduce_scatter(inp: torch.Tensor, group, *, tag: str = "") -> torch.Tensor:
    """Sum-reduce ``inp [P, *shape]`` over the group; rank r receives slot r (``[*shape]``)."""
    inp = inp.contiguous()
    out = torch.empty(inp[0].numel(), dtype=inp.dtype, device=inp.device)
    _note("reduce_scatter", inp, group, tag)
    _reduce_scatter_single(out, inp.reshape(-1), group=group)
    return out.view(inp.shape[1:])


def all_to_all(inp: torch.Tensor, group, *, tag: str = "") -> torch.Tensor:
    """All-to-all over the leading dim: ``inp [P, ...]``, slot j goes to rank j; returns ``[P, ...]``."""
    inp = inp.contiguous()
    out = torch.empty_like(inp)
    _note("all_to_all", inp, group, tag)
    dist.all_to_all_single(out, inp, group=group)
    return out


def all_to_all_v(inp: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, *, tag: str = "") -> torch.Tensor:
    """All-to-all of rows with uneven splits: the first ``send_splits[0]`` rows of ``inp [sum(send), ...]``
    go to rank 0, the next ``send_splits[1]`` to rank 1, ...; returns ``[sum(recv_splits), ...]``, rank
    j's rows (``recv_splits[j]`` of them) in rank order. The splits are host ints (the caller has
    exchanged the counts first)."""
    inp = inp.contiguous()
    out = inp.new_empty((sum(recv_splits), *inp.shape[1:]))
    _note("all_to_all", inp, group, tag)
    dist.all_to_all_single(out, inp, recv_splits, send_splits, group=group)
    return out


def batch_send_recv(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group, *, tag: str = ""):
    """Post isend/irecv pairs (peers are GLOBAL ranks) in one batch; returns the work handles.

    The caller waits on the handles (``for w in works: w.wait()``); compute placed between the
    call and the wait overlaps the transfer.
    """
    ops = []
    for t, peer in sends:
        _note("send", t, group, tag)
        ops.append(dist.P2POp(dist.isend, t.contiguous(), peer, group))
    for t, peer in recvs:
        _note("recv", t, group, tag)
        ops.append(dist.P2POp(dist.irecv, t, peer, group))
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)


_p2p_ready: set = set()  # groups a full-group collective has set up (kept alive here: a few per process)


def prepare_p2p(group, device: torch.device) -> None:
    """Make later ONE-SIDED ``batch_isend_irecv`` batches on ``group`` well defined; call it where
    every rank of the group is (an operator's forward entry), before the first of them.

    NCCL creates a group's communicator in the group's first collective, and a batched P2P call
    that is the group's first collective must include every rank of the group, else the behaviour
    is undefined (``torch.distributed.batch_isend_irecv``'s documentation); after any collective of
    the whole group, batches among a subset of its ranks are allowed. The first call per group (per
    process) runs a one-element all-reduce on ``device``, on every backend (so that gloo runs test
    the same code); later calls do nothing. Not recorded by :func:`record`: it is one-time setup,
    not traffic of an operator."""
    key = dist.group.WORLD if group is None else group
    if key in _p2p_ready:
        return
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    _p2p_ready.add(key)
