"""Building blocks of the Llama-3 decoder: RMSNorm, SwiGLU MLP, RoPE at global positions,
q/k feature maps and the fixed per-head decays of the linear-attention variants.

Tensors are ``[B, T, H, D]`` (heads after time) as in the attention operators.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.documents import offsets_in_documents
from .rope import rope_frequencies


class RMSNorm(nn.Module):
    """``x / rms(x) * (OFFSET + weight)`` over the last dim (computed in float32, returned in x's
    dtype). ``OFFSET`` is 0 here; Qwen3.5's variant stores the weight as an offset from 1."""

    OFFSET = 0.0

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - self.OFFSET))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() if self.OFFSET == 0 else self.weight.float() + self.OFFSET
        return (xf * w).to(x.dtype)


class SwiGLU(nn.Module):
    """Llama MLP: ``down(silu(gate(x)) * up(x))``, no biases. ``[B, T, hidden] -> [B, T, hidden]``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, head_dim // 2]`` (float32) for integer ``positions [T]`` (global token indices);
    ``scaling``: ``ModelConfig.rope_scaling`` (None, linear or YaRN: :mod:`lasp.models.rope`, whose
    attention factor multiplies both)."""
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, device=positions.device)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    if attention_factor == 1.0:
        return angles.cos().float(), angles.sin().float()
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def positions_in_documents(positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Global token positions ``[T]`` -> positions within each token's document ``[T]`` int64.

    ``cu_seqlens [N+1]`` are the global document starts (``0 = c_0 < ... < c_N = T_global``).
    Tensor ops only (``searchsorted``), no host synchronisation.
    """
    return offsets_in_documents(cu_seqlens.to(device=positions.device, dtype=torch.int64), positions)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` (half-split convention of Llama/HF) by ``cos, sin [T, D/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------- linear attention pieces


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """The q/k feature map of linear attention: ``identity`` | ``elu+1`` | ``silu`` | ``relu``."""
    if name == "identity":
        return x
    if name == "elu+1":
        return F.elu(x) + 1.0
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"feature_map must be identity, elu+1, silu or relu, got {name!r}")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (geometric, ``2^(-8/n)`` ratio), as Lightning Attention / TransNormerLLM use.

    For a non-power-of-two ``num_heads``: the slopes of the closest smaller power of two,
    then every other slope of the next one (the ALiBi reference recipe).
    """

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def fixed_log_decay(variant: str, num_heads: int, layer_idx: int, num_layers: int) -> list[float] | None:
    """Per-head constant log-decay ``g_gamma`` (values < 0) of a linear-attention variant, or None.

    - ``lightning``: ``-slope_h * (1 - l / (L - 1) + 1e-5)`` (TransNormerLLM / Lightning Attention:
      ALiBi slopes, decaying less in deeper layers);
    - ``retention``: ``log(1 - 2^(-5 - h))`` (RetNet's multi-scale decays);
    - ``basic``, ``simple_gla``: None (no fixed decay).
    """
    if variant == "lightning":
        depth = 1.0 - layer_idx / (num_layers - 1) if num_layers > 1 else 1.0
        return [-s * (depth + 1e-5) for s in alibi_slopes(num_heads)]
    if variant == "retention":
        return [math.log(1.0 - 2.0 ** (-5.0 - h)) for h in range(num_heads)]
    return None
