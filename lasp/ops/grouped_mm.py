"""Grouped matmuls: one weight per contiguous segment of rows (the local experts of an MoE layer).

Rows arrive sorted by group: segment ``g`` is the next ``counts[g]`` rows. Two paths:

- ``grouped_mm``: ``torch._grouped_mm`` (one call for every group, offsets on the device, no host
  synchronisation); used where it is known to work: the CPU in float32 / bfloat16, CUDA in
  bfloat16 on sm90+, both with rows of whole 16-byte units (its alignment rule);
- ``loop``: one ``F.linear`` per segment (any dtype and device, float64 references included); the
  segment lengths must be on the host (``counts_host``, else one copy of ``counts``).

Measured on the CPU (``scripts/bench_grouped_mm.py``; README, "Mixture of experts").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("auto", "grouped_mm", "loop")


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes ``x [M, K]`` against ``weight [G, N, K]`` here."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if any(d * x.element_size() % 16 for d in weight.shape[1:]):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (``torch._grouped_mm``'s backward
    rejects the stride-0 gradients of e.g. ``.sum()``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None = None,
                   method: str = "auto") -> torch.Tensor:
    """``x [M, K]`` (rows sorted by group), ``weight [G, N, K]`` (``nn.Linear`` layout per group),
    ``counts [G]`` integer rows per group (summing to M) -> ``[M, N]``: the rows of group ``g`` times
    ``weight[g].T``. ``method``: ``auto`` (``grouped_mm`` where supported, else ``loop``) |
    ``grouped_mm`` | ``loop``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "grouped_mm" or (method == "auto" and grouped_mm_supported(x, weight)):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(_ContiguousGrad.apply(x), weight.transpose(1, 2), offs=offsets)
    sizes = counts.tolist() if counts_host is None else counts_host
    pieces = [F.linear(rows, weight[g]) for g, rows in enumerate(x.split(sizes))]
    return torch.cat(pieces) if pieces else x.new_empty((0, weight.shape[1]))
