"""The Qwen3.5 text decoder's pieces (``ModelConfig.architecture = "qwen3_5"``).

Same layout, parameter names and numerics as ``transformers.models.qwen3_5`` (the oracle), with
every token mixer going through the sequence-parallel operators:

- :class:`OffsetRMSNorm`: ``x / rms(x) * (1 + w)`` (weights stored as offsets from 1, zeros at init);
- :class:`Qwen35GatedDeltaNet`: ``in_proj_qkv`` -> depthwise causal conv + SiLU over the
  concatenated ``[q | k | v]`` channels (:func:`lasp.causal_conv1d`), ``beta = sigmoid(in_proj_b x)``,
  ``g = -exp(A_log) softplus(in_proj_a x + dt_bias)``, the delta rule with in-kernel q/k L2 norm and
  grouped value heads (:func:`lasp.gated_delta_rule` takes GVA natively: value head j reads q/k head
  ``j // (nv // nk)``, as transformers' ``repeat_interleave``; q, k are never repeated),
  a gated RMSNorm ``norm(o) * silu(in_proj_z x)`` per value head, ``out_proj``;
- :class:`Qwen35Attention`: ``q_proj`` gives per head ``[query | gate]``; per-head q/k
  :class:`OffsetRMSNorm`, partial RoPE on the first ``rope_dim`` dims (half-split), GQA softmax
  attention (:func:`lasp.softmax_attention`), output times ``sigmoid(gate)``, ``o_proj``.

Generation caches are those of the family: ``{"state", "conv"}`` for GDN, ``{"k", "v"}`` for
softmax layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .delta_mixer import delta_conv, delta_gate, delta_rule, init_conv_
from .layers import RMSNorm, apply_rope
from .mixers import softmax_attend


class OffsetRMSNorm(RMSNorm):
    """``x / rms(x) * (1 + weight)`` over the last dim, in float32 (Qwen3.5's RMSNorm; zeros at init)."""

    OFFSET = 1.0

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``2 * cos.shape[-1]`` dims of ``x [B, T, H, D]``; the rest pass through."""
    rd = 2 * cos.shape[-1]
    if rd == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)


class Qwen35GatedDeltaNet(nn.Module):
    """Qwen3.5's Gated DeltaNet layer. ``x [B, T_local, hidden] -> [B, T_local, hidden]``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.nk, self.nv, self.dk, self.dv = cfg.linear_dims
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        self.in_proj_qkv = nn.Linear(h, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = nn.Linear(h, value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.nv, bias=False)
        self.in_proj_a = nn.Linear(h, self.nv, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2 * key_dim + value_dim, cfg.conv_size))  # HF conv1d.weight[:, 0]
        self.A_log = nn.Parameter(torch.empty(self.nv))
        self.dt_bias = nn.Parameter(torch.empty(self.nv))
        self.norm = RMSNorm(self.dv, cfg.rms_norm_eps)  # the gated norm's plain weight (ones at init)
        self.out_proj = nn.Linear(value_dim, h, bias=False)
        self.reset_delta_parameters()

    @torch.no_grad()
    def reset_delta_parameters(self) -> None:
        """Conv like ``nn.Conv1d``'s default; ``A`` uniform in [0.01, 16]; ``dt_bias`` ones (transformers' init)."""
        if self.conv_weight.is_meta:
            return
        init_conv_(self.conv_weight, self.cfg.conv_size)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16.0).log())
        self.dt_bias.fill_(1.0)

    def forward(self, x, cos=None, sin=None, *, group=None, layout: str = "contiguous", cache: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T_local, hidden]``; ``cos, sin`` unused. ``cache``: ``{"state", "conv"}`` (generation).
        ``cu_seqlens``: global document starts (packed documents), passed to the operators."""
        B, T, _ = x.shape
        qkv = delta_conv(self.in_proj_qkv(x), self.conv_weight, cache, group=group, layout=layout, cu_seqlens=cu_seqlens)
        q, k, v = qkv.split([self.nk * self.dk, self.nk * self.dk, self.nv * self.dv], dim=-1)
        # GVA: q, k keep their nk heads; the operator maps value head j to q/k head j // (nv // nk), what
        # transformers' repeat_interleave gives, without the copies (nor their saved activations)
        q = q.reshape(B, T, self.nk, self.dk)
        k = k.reshape(B, T, self.nk, self.dk)
        v = v.reshape(B, T, self.nv, self.dv)
        beta = torch.sigmoid(self.in_proj_b(x)).float()
        g = delta_gate(self.A_log, self.in_proj_a(x), self.dt_bias)
        o = delta_rule(self.cfg, q, k, v, g, beta, cache, group=group, layout=layout, cu_seqlens=cu_seqlens)
        z = self.in_proj_z(x).view(B, T, self.nv, self.dv)
        o = (self.norm(o.to(x.dtype)).float() * F.silu(z.float())).to(x.dtype)
        return self.out_proj(o.reshape(B, T, -1))


class Qwen35Attention(nn.Module):
    """Qwen3.5's gated GQA softmax attention. ``[B, T_local, hidden] -> same``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        h, H, Hkv, D = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.num_heads, self.kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(h, 2 * H * D, bias=False)  # per head: [query | gate]
        self.k_proj = nn.Linear(h, Hkv * D, bias=False)
        self.v_proj = nn.Linear(h, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, h, bias=False)
        self.q_norm = OffsetRMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, *, group=None, layout: str = "contiguous", cache: dict | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, T_local, hidden]``; ``cos, sin [T_local, rope_dim/2]`` at global positions.
        ``cu_seqlens``: global document starts (packed documents), passed to the operator."""
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = partial_rope(self.q_norm(q), cos, sin)
        k = partial_rope(self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        o = softmax_attend(self.cfg, q, k, v, cache, group=group, layout=layout, cu_seqlens=cu_seqlens)
        o = o.reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(o)


def qwen35_param_counts(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """``(matrix weights, other weights)`` of one qwen3_5 token mixer (for ``lasp model-info``)."""
    h, H, Hkv, D = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    if kind == "softmax":
        return 2 * h * H * D + 2 * h * Hkv * D + H * D * h, 2 * D  # q (+gate), k, v, o; q/k norms
    nk, nv, dk, dv = cfg.linear_dims
    conv = 2 * nk * dk + nv * dv
    return h * conv + 2 * h * nv * dv + 2 * h * nv, conv * cfg.conv_size + 2 * nv + dv  # qkv, z, out, b, a; conv, A_log, dt_bias, norm
