"""The fused kernels behind :func:`lasp.ops.softmax_local.attend`: one block of attention with its
row log-sum-exp, and the block's gradients given the FINAL output and log-sum-exp of its rows.

A block is fully visible or the square causal diagonal (``Tq == Tk``, query i sees keys 0..i), so
the causal flag means the same in every kernel: flash attention's bottom-right and the efficient
kernel's top-left alignment agree on a square block. Heads-first layout: ``q [B, H, Tq, D]``,
``k, v [B, H_kv, Tk, D]`` (any strides with a unit last one), query head h uses KV head
``h // (H / H_kv)``.

Each kernel returns ``lse [B, H, Tq]`` float32 in natural-log units (what the merge of
:func:`lasp.ops.softmax_local.merge_partial` and every backward below take), converted from what
its op gives:

| kernel | runs on | its op returns | GQA |
|---|---|---|---|
| ``cpu_flash`` | CPU, any float dtype, a small bool mask allowed | ``[B, H, Tq]`` (a transposed view of ``[B, Tq, H]``), ln | native |
| ``cuda_flash`` | CUDA sm80..sm121, fp16/bf16, ``D_qk == D_v <= 256``, ``D % 8 == 0`` | ``[B, H, Tq]`` contiguous, ln | native (``H % H_kv == 0``) |
| ``cuda_efficient`` | CUDA sm50+ (bf16 from sm80), fp32/fp16/bf16, ``D % 8`` (16-bit) / ``% 4`` (fp32) | ``[B, H, ceil(Tq/32)*32]``: rows past Tq are padding, ln | K/V repeated per block, dK/dV summed back |

``cuda_flash`` is ``aten._scaled_dot_product_flash_attention`` and its backward (FlashAttention-2 in
torch's build; FA3/FA4 when the user activates them with ``torch.nn.attention.activate_flash_attention_impl``,
which re-registers these same ops); ``cuda_efficient`` is ``aten._scaled_dot_product_efficient_attention``
and its backward. Neither takes a mask here, so a masked block (a group of tiny packed documents,
at most ``GROUP_ROWS`` tokens) runs the float32 reference on CUDA. :func:`cuda_kernel_name` is the
dispatch rule (a pure function, tested on the CPU); it honours torch's SDPA switches
(``torch.backends.cuda.enable_flash_sdp`` / ``enable_mem_efficient_sdp``, or the
``torch.nn.attention.sdpa_kernel`` context), so a check can force the efficient kernel or the
reference. Forward and backward may pick different kernels (the switches changed in between): each
backward needs only the final ``o`` and ``lse``, which every kernel defines the same way.

The wrappers take the raw op as an argument (``op=`` / ``op_bwd=``), so that a CPU test can drive
them with stand-ins that keep the CUDA ops' contracts (layouts, padding, argument lists).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

aten = torch.ops.aten


@dataclass(frozen=True)
class BlockKernel:
    """One fused kernel: ``forward(q, k, v, scale, causal, mask) -> (o, lse)`` (o in q's dtype,
    ``lse [B, H, Tq]`` float32, natural log) and ``backward(do, q, k, v, o, lse, scale, causal, mask)
    -> (dq, dk, dv)`` (dk, dv like k: summed over the query heads of each KV head)."""

    name: str
    forward: Callable
    backward: Callable


# ----------------------------------------------------------------------------- CPU


def additive_mask(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """A small bool mask (True = visible) as the additive ``0 / -inf`` mask in q's dtype."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask.to(q.device), float("-inf"))


def cpu_flash_forward(q, k, v, scale: float, causal: bool, mask=None):
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=additive_mask(mask, q), scale=scale)


def cpu_flash_backward(do, q, k, v, o, lse, scale: float, causal: bool, mask=None):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, causal, attn_mask=additive_mask(mask, q), scale=scale
    )


CPU_FLASH = BlockKernel("cpu_flash", cpu_flash_forward, cpu_flash_backward)


# ----------------------------------------------------------------------------- CUDA wrappers

ALIGN_BYTES = 16
"""The fused CUDA kernels load 16 bytes at a time: every tensor's start must be 16-byte aligned."""


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy when its start is not :data:`ALIGN_BYTES`-aligned (a view at an odd offset)."""
    return x if (x.storage_offset() * x.element_size()) % ALIGN_BYTES == 0 else x.clone()


def _no_mask(mask) -> None:
    if mask is not None:
        raise ValueError("mask: the CUDA kernels take no mask (masked blocks run the float32 reference)")


def flash_forward(q, k, v, scale: float, causal: bool, mask=None, *, op=None):
    """``aten._scaled_dot_product_flash_attention``: 9 outputs, of which ``o`` and ``lse [B, H, Tq]``."""
    _no_mask(mask)
    op = op or aten._scaled_dot_product_flash_attention
    out = op(_aligned(q), _aligned(k), _aligned(v), 0.0, causal, False, scale=scale)
    return out[0], out[1]


def flash_backward(do, q, k, v, o, lse, scale: float, causal: bool, mask=None, *, op=None):
    """``aten._scaled_dot_product_flash_attention_backward`` with the final ``o, lse``: dense blocks
    (``cum_seq_q/k`` None), no dropout (the RNG state is unused: zeros, as torch's varlen
    attention passes), ``lse`` contiguous (the kernel reads it densely)."""
    _no_mask(mask)
    op = op or aten._scaled_dot_product_flash_attention_backward
    rng, unused = torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, device=q.device)
    Tq, Tk = q.shape[2], k.shape[2]
    return op(_aligned(do), _aligned(q), _aligned(k), _aligned(v), _aligned(o), lse.float().contiguous(), None, None,
              Tq, Tk, 0.0, causal, rng, unused, scale=scale)


def lse_rows(Tq: int) -> int:
    """The efficient kernel's LSE length for ``Tq`` queries: padded to a multiple of 32 on CUDA
    builds (ROCm: unpadded), as torch's meta function for the op says."""
    return Tq if torch.version.hip else -(-Tq // 32) * 32


def _repeat_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """``[B, H_kv, T, D]`` -> ``[B, H, T, D]`` (each KV head for its ``H / H_kv`` query heads; a copy
    unless ``H_kv == H``)."""
    B, h_kv, T, D = x.shape
    return x if h_kv == H else x[:, :, None].expand(B, h_kv, H // h_kv, T, D).reshape(B, H, T, D)


def _sum_groups(g: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[B, H, T, D]`` gradients of repeated KV heads -> ``[B, H_kv, T, D]`` (summed per group)."""
    return g if g.shape[1] == h_kv else g.unflatten(1, (h_kv, -1)).sum(2)


def efficient_forward(q, k, v, scale: float, causal: bool, mask=None, *, op=None):
    """``aten._scaled_dot_product_efficient_attention`` (equal heads: K/V repeated for GQA); its
    padded LSE cut to ``[B, H, Tq]``."""
    _no_mask(mask)
    op = op or aten._scaled_dot_product_efficient_attention
    H, Tq = q.shape[1], q.shape[2]
    out = op(_aligned(q), _aligned(_repeat_kv(k, H)), _aligned(_repeat_kv(v, H)), None, True, 0.0, causal, scale=scale)
    return out[0], out[1][..., :Tq]


def efficient_backward(do, q, k, v, o, lse, scale: float, causal: bool, mask=None, *, op=None):
    """``aten._scaled_dot_product_efficient_attention_backward`` with the final ``o`` and ``lse``
    (padded back to :func:`lse_rows` with +inf: padding rows weigh nothing), no bias, no dropout;
    dK/dV of the repeated heads summed per KV head."""
    _no_mask(mask)
    op = op or aten._scaled_dot_product_efficient_attention_backward
    H, Tq, h_kv = q.shape[1], q.shape[2], k.shape[1]
    lse_p = torch.full((*lse.shape[:-1], lse_rows(Tq)), float("inf"), dtype=torch.float32, device=q.device)
    lse_p[..., :Tq] = lse
    seed = offset = torch.zeros((), dtype=torch.long, device=q.device)
    dq, dk, dv, _ = op(_aligned(do), _aligned(q), _aligned(_repeat_kv(k, H)), _aligned(_repeat_kv(v, H)), None, _aligned(o),
                       lse_p, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _sum_groups(dk, h_kv), _sum_groups(dv, h_kv)


CUDA_KERNELS: dict[str, BlockKernel] = {
    "flash": BlockKernel("cuda_flash", flash_forward, flash_backward),
    "efficient": BlockKernel("cuda_efficient", efficient_forward, efficient_backward),
}
"""The CUDA kernels by :func:`cuda_kernel_name`'s answer (tests swap in kernels with stand-in ops)."""


# ----------------------------------------------------------------------------- dispatch

_HALF = (torch.float16, torch.bfloat16)


def cuda_kernel_name(dtype: torch.dtype, d_qk: int, d_v: int, capability: tuple[int, int], *,
                     flash_enabled: bool = True, efficient_enabled: bool = True, masked: bool = False) -> str | None:
    """``"flash"``, ``"efficient"`` or None (the float32 reference) for a block on a CUDA device of
    compute ``capability``; torch's own SDPA constraints (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``)
    for a block that needs its backward, tightened where the raw op is stricter than the SDPA front
    end (which pads head dims to a multiple of 8 for flash)."""
    if masked:
        return None
    major, minor = capability
    if flash_enabled and dtype in _HALF and (8, 0) <= capability <= (12, 1) and d_qk == d_v and d_qk <= 256 and d_qk % 8 == 0:
        # FlashAttention-2's backward has no head dim in (192, 224] on sm86..sm89 and sm120/121
        if not (192 < d_qk <= 224 and ((major == 8 and minor >= 6) or major == 12)):
            return "flash"
    align = 8 if dtype in _HALF else 4
    if (efficient_enabled and dtype in (torch.float32, *_HALF) and (5, 0) <= capability <= (12, 1)
            and (dtype != torch.bfloat16 or major >= 8) and d_qk % align == 0 and d_v % align == 0):
        return "efficient"
    return None


@functools.cache
def device_capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability (asked once per device: host-side, no sync)."""
    return torch.cuda.get_device_capability(device)


def cuda_kernel(q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, capability: tuple[int, int], *,
                flash_enabled: bool = True, efficient_enabled: bool = True) -> BlockKernel | None:
    """The CUDA kernel (from :data:`CUDA_KERNELS`) for a block on a device of ``capability``, or None."""
    name = cuda_kernel_name(q.dtype, q.shape[-1], v.shape[-1], capability, flash_enabled=flash_enabled,
                            efficient_enabled=efficient_enabled, masked=mask is not None)
    return None if name is None else CUDA_KERNELS[name]


def select_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> BlockKernel | None:
    """The fused kernel for a block on q's device, or None for the float32 reference."""
    if q.device.type == "cpu":
        return CPU_FLASH
    if q.device.type != "cuda":
        return None
    return cuda_kernel(q, v, mask, device_capability(q.device), flash_enabled=torch.backends.cuda.flash_sdp_enabled(),
                       efficient_enabled=torch.backends.cuda.mem_efficient_sdp_enabled())
