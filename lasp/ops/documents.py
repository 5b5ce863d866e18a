"""Packed documents (``cu_seqlens``): validation and the per-token tensors the operators need.

``cu_seqlens`` is a 1-D integer tensor ``[N+1]``, ``0 = c_0 < c_1 < ... < c_N = T``: the document
starts over the WHOLE (unsharded) sequence of ``T = T_local * P`` tokens, identical on every rank,
with ``B = 1`` (the flash-attn / fla varlen convention). Semantics: exactly as if each document ran
alone.

- :func:`check_cu_seqlens`: the validation every operator runs first, before any collective of the
  op. The value checks read ``cu_seqlens`` on the host (validation before the op, not inside its
  forward/backward). "The same on every rank" is checked with ONE small all-gather of
  ``(verdict, N, crc32 of the values)`` (24 bytes per rank, tag ``documents.check``): the one collective a
  call adds, and only when ``cu_seqlens`` is given; every rank sees the gathered values, so every
  rank raises the same ValueError.
- The linear recurrences (both families) turn a document start into a hard reset: a log-decay of
  ``-inf`` at every document start except token 0 (the first document keeps ``initial_state``), so
  LASP-2's summaries, folds and bytes are unchanged (:func:`reset_gate`).
- The short convolution masks the taps that reach before the token's document start
  (:func:`document_offsets`).

The per-token tensors are built from this rank's global positions with tensor ops on the device
(``torch.searchsorted``): no host-device synchronisation.
"""
from __future__ import annotations

import zlib

import torch

from .. import comm
from ..parallel import group_rank_size, layout_chunks

__all__ = ["check_cu_seqlens", "document_bounds", "document_gate", "reset_mask", "reset_gate", "document_offsets"]


def _local_problem(cu_seqlens, T_total: int, B: int) -> tuple[str | None, torch.Tensor | None]:
    """(the ValueError message or None, the values as a CPU int64 tensor or None)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        return f"cu_seqlens must be a 1-D integer torch.Tensor [N+1] or None, got {type(cu_seqlens).__name__}", None
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return f"cu_seqlens must be a 1-D tensor [N+1] with N >= 1 documents, got shape {list(cu_seqlens.shape)}", None
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        return f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}", None
    if B != 1:
        return f"cu_seqlens needs batch size B = 1 (documents packed along T), got B = {B}", None
    vals = cu_seqlens.detach().to("cpu", torch.int64)  # validation reads the values on the host (before the op)
    first, last = int(vals[0]), int(vals[-1])
    if first != 0:
        return f"cu_seqlens must start at 0 (c_0 = 0), got c_0 = {first}", vals
    if last != T_total:
        return f"cu_seqlens must end at the whole sequence's length T = T_local * P = {T_total}, got c_N = {last}", vals
    bad = ((vals[1:] - vals[:-1]) <= 0).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        return f"cu_seqlens must be strictly increasing, got c_{i} = {int(vals[i])} >= c_{i + 1} = {int(vals[i + 1])}", vals
    return None, vals


def check_cu_seqlens(cu_seqlens, T_total: int, B: int, group, *, device=None) -> torch.Tensor:
    """Validate ``cu_seqlens`` on every rank (:func:`validated_values`); returns it as int64 on
    ``device`` (default: its own)."""
    validated_values(cu_seqlens, T_total, B, group, device=device)
    return cu_seqlens.to(device or cu_seqlens.device, torch.int64)


def document_bounds(cu_seqlens, T_total: int, B: int, group, *, device=None) -> tuple[int, ...] | None:
    """Validate ``cu_seqlens`` (:func:`validated_values`) and return it as a tuple of Python ints
    (the host copy the validation made), or None without documents: what the softmax methods take."""
    return None if cu_seqlens is None else tuple(validated_values(cu_seqlens, T_total, B, group, device=device).tolist())


def document_gate(g: torch.Tensor | None, cu_seqlens, x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """Validate ``cu_seqlens`` for a linear recurrence and return its log-decay ``[B, T_local, H]``
    with a hard reset at every document start but the first (:func:`reset_gate`). ``x [B, T_local,
    H, ...]``: a tensor with the gate's heads (v for the delta rule, whose gate is per value head
    under GVA; q = v's heads for linear attention), its dtype for a gate made from zeros."""
    B, T_local, H = x.shape[:3]
    cu = check_cu_seqlens(cu_seqlens, T_local * group_rank_size(group)[1], B, group, device=x.device)
    return reset_gate(g, cu, (B, T_local, H), group, layout, dtype=x.dtype)


def validated_values(cu_seqlens, T_total: int, B: int, group, *, device=None) -> torch.Tensor:
    """Validate ``cu_seqlens`` on every rank; returns its values as a CPU int64 tensor.

    Args:
        cu_seqlens: 1-D integer tensor ``[N+1]`` of global document starts.
        T_total: tokens of the whole sequence (``T_local * P``). B: the batch size (must be 1).
        group: the SP process group (None or one rank: no collective).
        device: the operator's device (of the one small all-gather; default: ``cu_seqlens``'s own).
    Raises:
        ValueError naming ``cu_seqlens`` and what was expected: not a 1-D integer tensor,
        ``c_0 != 0``, ``c_N != T_total``, not strictly increasing, ``B != 1``, or different on
        different ranks of ``group``. Raised on EVERY rank, before any collective of the operator:
        over a group, each rank's verdict and ``(N, crc32)`` travel in one small all-gather (the
        one collective ``cu_seqlens`` adds, tag ``documents.check``), so a rank whose copy is
        bad never leaves the others waiting in the operator's collectives.
    """
    problem, vals = _local_problem(cu_seqlens, T_total, B)
    _, size = group_rank_size(group)
    if size == 1:
        if problem:
            raise ValueError(problem)
        return vals
    dev = device or (cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else "cpu")
    crc = -1 if vals is None else zlib.crc32(vals.numpy().tobytes())
    n = -1 if vals is None else vals.numel()
    mine = torch.tensor([int(problem is not None), n, crc], dtype=torch.int64, device=dev)
    gathered, _ = comm.all_gather(mine, group, tag="documents.check")
    rows = gathered.cpu().tolist()
    if problem:
        raise ValueError(problem)
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"cu_seqlens is invalid on rank(s) {failed} of the group (every rank must pass the same valid document starts)")
    if any(row[1:] != rows[0][1:] for row in rows):
        got = ", ".join(f"rank {r}: N={row[1] - 1}" for r, row in enumerate(rows))
        raise ValueError(f"cu_seqlens must be identical on every rank of the group (the same global document starts); they differ ({got})")
    return vals


def _positions(T_local: int, rank: int, size: int, layout: str, device) -> torch.Tensor:
    """Global positions ``[T_local]`` of this rank's tokens (:func:`lasp.parallel.global_positions`
    without building the whole sequence's positions)."""
    if size == 1:  # the whole sequence, in natural order
        return torch.arange(T_local, device=device)
    chunks = layout_chunks(rank, size, layout)
    n = T_local // len(chunks)
    return torch.cat([torch.arange(c * n, (c + 1) * n, device=device) for c in chunks])


def reset_mask(cu_seqlens: torch.Tensor, T_local: int, group, layout: str) -> torch.Tensor:
    """``[T_local]`` bool: True where this rank's token starts a document other than the first."""
    rank, size = group_rank_size(group)
    pos = _positions(T_local, rank, size, layout, cu_seqlens.device)
    return (offsets_in_documents(cu_seqlens, pos) == 0) & (pos > 0)


def reset_gate(g: torch.Tensor | None, cu_seqlens: torch.Tensor, shape: tuple[int, int, int], group, layout: str,
               dtype: torch.dtype) -> torch.Tensor:
    """The log-decay ``[B, T_local, H]`` with a hard reset (``-inf``) at every document start but the first.

    ``g`` ``[B, T_local, H]`` or None (zeros, in ``dtype``): elsewhere it is kept (``torch.where``, so
    ``g`` at a document start gets a zero gradient, as when each document runs alone).
    """
    B, T_local, H = shape
    reset = reset_mask(cu_seqlens, T_local, group, layout)[None, :, None]
    base = torch.zeros(B, T_local, H, dtype=dtype, device=cu_seqlens.device) if g is None else g
    return torch.where(reset.to(base.device), torch.full((), float("-inf"), dtype=base.dtype, device=base.device), base)


def document_offsets(cu_seqlens: torch.Tensor, T_local: int, group, layout: str) -> torch.Tensor:
    """``[T_local]`` int64: each of this rank's tokens' distance to its document's first token."""
    rank, size = group_rank_size(group)
    return offsets_in_documents(cu_seqlens, _positions(T_local, rank, size, layout, cu_seqlens.device))


def offsets_in_documents(cu_seqlens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Global positions ``pos`` -> each one's distance to the start of its document (int64; O(T
    log N) tensor ops, no mask, no host sync). ``cu_seqlens`` as validated (int64, same device)."""
    pos = pos.to(torch.int64)
    doc = torch.searchsorted(cu_seqlens, pos, right=True) - 1
    return pos - cu_seqlens[doc]
