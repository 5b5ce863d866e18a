"""The Gated DeltaNet / DeltaNet token mixer (Qwen3-Next / Qwen3.5 style linear layer).

``x [B, T_local, hidden] -> [B, T_local, hidden]``, with ``H = num_heads`` heads of
``D = head_dim`` for q, k and v:

1. ``qkv = W_qkv x`` then a depthwise causal convolution (width ``conv_size``) with SiLU, across
   ranks through :func:`lasp.causal_conv1d`;
2. ``beta = sigmoid(W_b x)``; ``g = -exp(A_log) * softplus(W_a x + dt_bias)`` (gated_deltanet;
   DeltaNet has no gate);
3. the delta rule with q and k L2-normalised inside the operator (:func:`lasp.gated_delta_rule`);
4. a per-head gated RMSNorm ``rmsnorm(o) * silu(W_z x)``, then ``o_proj``.

The recurrence math lives in :mod:`lasp.ops`; this file only wires projections. Generation
(single process) keeps ``{"state": [B, H, D, D] float32, "conv": [B, W-1, 3 H D]}`` per layer.
``feature_map`` and ``linear_rope`` do not apply to these layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import recurrent as ops
from ..ops.conv import causal_conv1d_with_state
from ..ops.delta_chunk import gated_delta_rule_decode
from .config import ModelConfig
from .layers import RMSNorm


def delta_rule(cfg: ModelConfig, q, k, v, g, beta, cache: dict | None, *, group, layout: str, cu_seqlens=None) -> torch.Tensor:
    """A GDN layer's recurrence (q, k L2-normalised inside): the sequence-parallel operator when
    training (``cache`` None), the cached recurrent state when decoding."""
    if cache is not None:
        return gated_delta_rule_decode(q, k, v, g, beta, cache, use_qk_l2norm=True)
    return ops.gated_delta_rule(
        q, k, v, g, beta, use_qk_l2norm_in_kernel=True, group=group, layout=layout,
        method=cfg.linear_method, backend=cfg.linear_backend, cu_seqlens=cu_seqlens,
    )


def delta_conv(x: torch.Tensor, weight: torch.Tensor, cache: dict | None, *, group, layout: str, cu_seqlens=None) -> torch.Tensor:
    """A GDN layer's depthwise causal convolution + SiLU over the projected ``[q | k | v]``
    channels: across ranks when training (``cache`` None), carrying ``cache["conv"]`` when decoding."""
    if cache is None:
        return ops.causal_conv1d(x, weight, activation="silu", group=group, layout=layout, cu_seqlens=cu_seqlens)
    out, cache["conv"] = causal_conv1d_with_state(x, weight, activation="silu", state=cache.get("conv"))
    return out


def delta_gate(A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The GDN log-decay ``g = -exp(A_log) * softplus(a + dt_bias)`` in float32 (``a = W_a x``)."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


@torch.no_grad()
def init_conv_(weight: torch.Tensor, width: int) -> None:
    """A ``[channels, width]`` depthwise conv weight initialised like ``nn.Conv1d``'s default
    (``width`` given: under ZeRO-3's ``zero.Init`` the local ``weight`` is an empty partition)."""
    bound = 1.0 / math.sqrt(width)
    weight.uniform_(-bound, bound)


def delta_param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """``(matrix weights, other weights)`` of one delta-rule mixer (for ``lasp model-info``)."""
    h, HD, H = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_heads
    gated = cfg.linear_variant == "gated_deltanet"
    matrices = 5 * h * HD + h * H * (2 if gated else 1)  # qkv, z, o; beta (and a)
    others = 3 * HD * cfg.conv_size + cfg.head_dim + (2 * H if gated else 0)  # conv, norm, A_log, dt_bias
    return matrices, others


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (``linear_variant="gated_deltanet"``) or DeltaNet (``"deltanet"``) mixer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        h, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.num_heads, self.head_dim = H, D
        self.gated = cfg.linear_variant == "gated_deltanet"
        self.qkv_proj = nn.Linear(h, 3 * H * D, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * H * D, cfg.conv_size))
        self.b_proj = nn.Linear(h, H, bias=False)
        self.a_proj = nn.Linear(h, H, bias=False) if self.gated else None
        self.A_log = nn.Parameter(torch.empty(H)) if self.gated else None
        self.dt_bias = nn.Parameter(torch.empty(H)) if self.gated else None
        self.z_proj = nn.Linear(h, H * D, bias=False)
        self.o_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(H * D, h, bias=False)
        self.reset_delta_parameters()

    @torch.no_grad()
    def reset_delta_parameters(self) -> None:
        """Conv like ``nn.Conv1d``'s default; ``A`` uniform in [1, 16]; ``dt`` log-uniform in
        [1e-3, 0.1] stored as ``dt_bias = softplus^-1(dt)`` (the Mamba / GDN recipe)."""
        if self.conv_weight.is_meta:
            return
        init_conv_(self.conv_weight, self.cfg.conv_size)
        if self.gated:
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(0.1)).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self, x, cos=None, sin=None, *, group=None, layout: str = "contiguous", cu_seqlens=None, cache: dict | None = None
    ) -> torch.Tensor:
        """``x [B, T_local, hidden]``; ``cos, sin`` unused (no RoPE in delta layers); ``cu_seqlens
        [N+1]`` global document starts (B = 1) or None: the convolution and the state reset there.

        ``cache`` (generation, single process): ``{"state": ..., "conv": ...}`` or None entries,
        updated in place with the states after these tokens.
        """
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        qkv = delta_conv(self.qkv_proj(x), self.conv_weight, cache, group=group, layout=layout, cu_seqlens=cu_seqlens)
        q, k, v = (t.reshape(B, T, H, D) for t in qkv.split(H * D, dim=-1))
        beta = torch.sigmoid(self.b_proj(x).float())
        g = delta_gate(self.A_log, self.a_proj(x), self.dt_bias) if self.gated else None
        o = delta_rule(self.cfg, q, k, v, g, beta, cache, group=group, layout=layout, cu_seqlens=cu_seqlens)
        z = self.z_proj(x).view(B, T, H, D)
        o = (self.o_norm(o).float() * F.silu(z.float())).to(x.dtype)
        return self.o_proj(o.reshape(B, T, -1))
