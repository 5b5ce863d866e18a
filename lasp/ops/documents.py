"""Packed documents (``cu_seqlens``): validation shared by every operator.

MINIMAL COPY written by the softdocs engineer so that ``lasp.softmax_attention`` can validate
before the merge; the lindocs engineer owns this file (the lead keeps one of the two versions,
with this name and signature).

``cu_seqlens``: a 1-D integer tensor ``[N+1]``, ``0 = c_0 < c_1 < ... < c_N = T``, the document
starts over the WHOLE (unsharded) sequence, identical on every rank, with B = 1.
"""
from __future__ import annotations

import torch

from .. import comm
from ..parallel import group_rank_size

_TAG = "documents.check"


def _local_problem(cu_seqlens, T_total: int, B: int) -> str | None:
    """The local reason ``cu_seqlens`` is invalid, or None (reads its values: one host copy)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        return f"cu_seqlens must be a torch.Tensor [N+1] of document starts, got {type(cu_seqlens).__name__}"
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return f"cu_seqlens must be a 1-D tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}"
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        return f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}"
    if B != 1:
        return f"cu_seqlens needs batch size B=1 (documents packed along T), got B={B}"
    c = cu_seqlens.detach().to("cpu", torch.int64)
    if int(c[0]) != 0:
        return f"cu_seqlens must start at 0, got {int(c[0])}"
    if int(c[-1]) != T_total:
        return f"cu_seqlens must end at the whole sequence length T={T_total}, got {int(c[-1])}"
    if not bool((c[1:] > c[:-1]).all()):
        return "cu_seqlens must be strictly increasing (every document at least one token)"
    return None


def _fingerprint(cu_seqlens) -> torch.Tensor:
    """Three int64 numbers that differ, in practice, when two ``cu_seqlens`` differ."""
    c = cu_seqlens.detach().to("cpu", torch.int64)
    w = torch.arange(1, c.numel() + 1, dtype=torch.int64)
    return torch.stack([torch.tensor(c.numel()), c.sum(), (c * w % 1_000_003 * w).sum()])


def check_cu_seqlens(cu_seqlens, T_total: int, B: int, group) -> None:
    """Raise ValueError (on every rank, before the operator's collectives) unless ``cu_seqlens`` is
    valid: a 1-D integer tensor ``[N+1]`` with ``c_0 = 0``, ``c_N = T_total``, strictly increasing,
    ``B == 1``, and the same on every rank of ``group``.

    With a group of P > 1 ranks every rank makes ONE small all-gather (3 int64 numbers and an ok
    flag, tag ``documents.check``), whatever its local verdict, so a rank with a bad argument
    never leaves the others waiting in a collective.
    """
    problem = _local_problem(cu_seqlens, T_total, B)
    _, size = group_rank_size(group)
    if size == 1:
        if problem:
            raise ValueError(problem)
        return
    mine = torch.zeros(4, dtype=torch.int64)
    if problem is None:
        mine[0], mine[1:] = 1, _fingerprint(cu_seqlens)
    everyone, _ = comm.all_gather(mine, group, tag=_TAG)  # [P, 4]
    if problem:
        raise ValueError(problem)
    if not bool((everyone[:, 0] == 1).all()):
        raise ValueError("cu_seqlens is invalid on another rank of the group (see that rank's error)")
    if not bool((everyone[:, 1:] == mine[1:]).all()):
        raise ValueError("cu_seqlens must be the same on every rank of the group, got different values")

