"""Shared launch helpers for the Triton kernels: interpreter detection, block sizes, checks.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) every kernel runs on CPU tensors
through Triton's numpy interpreter. Two facts of that interpreter shape this file:

* ``tl.dot`` on bf16 operands is wrong there, so the kernels take a ``LOWP`` flag that is
  False when interpreting (operands stay fp32) and True on a GPU for fp16/bf16 inputs (operands
  cast to the input dtype, fp32 accumulation);
* ``triton.autotune`` would time configs with a CUDA ``do_bench``, so when interpreting every
  kernel uses one fixed config (:func:`maybe_autotune` returns the kernel unchanged).
"""
from __future__ import annotations

import os

import torch
import triton

#: True when Triton runs kernels through its CPU interpreter.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

#: Head dims the kernels accept (powers of two; tl.dot needs >= 16).
HEAD_DIMS = (16, 32, 64, 128, 256)
#: Chunk sizes the kernels accept.
CHUNK_SIZES = (16, 32, 64)
DEFAULT_CHUNK = 64


def check_device(x: torch.Tensor, name: str = "q") -> None:
    """A clear ValueError when the kernels cannot run on ``x``'s device."""
    if x.is_cuda:
        return
    if not INTERPRET:
        raise ValueError(
            f"the Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; {name} is on {x.device}"
        )


def check_head_dim(d: int, name: str) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(f"{name} must be a power of two in {HEAD_DIMS} for the Triton kernels, got {d}")


def check_chunk_size(c: int) -> None:
    if c not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} for the Triton kernels, got {c}")


def low_precision_dots(dtype: torch.dtype) -> bool:
    """``LOWP``: cast dot operands to the (16-bit) input dtype; never in the interpreter."""
    return (not INTERPRET) and dtype in (torch.float16, torch.bfloat16)


def tile_cap(dtype: torch.dtype) -> int:
    """Largest tile along a head dim: 64 for 16-bit inputs, 32 for fp32 (fp32 operands take twice the
    registers: at 64 the fp32 kernels spill on sm_80, see ``python -m lasp.kernels.compile_check``)."""
    return 32 if dtype == torch.float32 else 64


def block(d: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Tile size along a head dim (d is a power of two >= 16) for inputs of ``dtype``."""
    return min(d, tile_cap(dtype))


#: Launch configs tried on a GPU: warps x pipeline stages (tile sizes are fixed by the launcher).
#: Few on purpose: each config is one more compile per kernel variant on first use.
GPU_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (4, 2), (8, 2))]


def maybe_autotune(key: list[str]):
    """``triton.autotune`` over :data:`GPU_CONFIGS` on a GPU; the identity when interpreting.

    Only for kernels that write their outputs (autotuning re-runs a kernel, so kernels that
    accumulate into existing buffers are launched with fixed settings instead).
    """

    def wrap(fn):
        if INTERPRET:
            return fn
        return triton.autotune(configs=GPU_CONFIGS, key=key)(fn)

    return wrap
