"""The two token mixers of a Linear-Llama3 decoder layer: linear attention and GQA softmax
attention. Both call the public operators (``lasp.linear_attention`` / ``lasp.softmax_attention``)
on this rank's shard, so sequence parallelism is transparent to the model.

Each mixer also has a cached path for generation (single process, ``group=None``):

- linear: the recurrent state ``S [B, H, K, V]`` (float32, constant size per token);
- softmax: a KV cache ``[B, T_past, H_kv, D]`` (post-RoPE keys).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attention as ops
from ..ops.chunk import chunk_linear_attention
from ..ops.recurrence import recurrent_step
from ..ops.softmax_local import sdpa_attention
from .config import ModelConfig
from .layers import RMSNorm, apply_rope, feature_map, fixed_log_decay


class LinearAttention(nn.Module):
    """Gated linear attention: ``S_t = exp(g_t + g_gamma) S_{t-1} + phi(k_t)^T v_t``, ``o_t = phi(q_t) S_t / sqrt(D)``.

    ``x [B, T_local, hidden] -> [B, T_local, hidden]``. The variant fixes the gates:
    ``basic`` none, ``lightning``/``retention`` a constant per-head ``g_gamma``, ``simple_gla``
    a per-token ``g = logsigmoid(W2 W1 x) / gate_logit_normalizer``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        h, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.num_heads, self.head_dim = H, D
        self.q_proj = nn.Linear(h, H * D, bias=False)
        self.k_proj = nn.Linear(h, H * D, bias=False)
        self.v_proj = nn.Linear(h, H * D, bias=False)
        self.o_proj = nn.Linear(H * D, h, bias=False)
        self.gate_proj = (
            nn.Sequential(nn.Linear(h, cfg.gate_low_rank_dim, bias=False), nn.Linear(cfg.gate_low_rank_dim, H, bias=True))
            if cfg.linear_variant == "simple_gla"
            else None
        )
        self.o_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.output_norm else None
        self.log_decay = fixed_log_decay(cfg.linear_variant, H, layer_idx, cfg.num_layers)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim)
        q, k = feature_map(q, self.cfg.feature_map), feature_map(k, self.cfg.feature_map)
        if self.cfg.linear_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        g = None
        if self.gate_proj is not None:
            g = F.logsigmoid(self.gate_proj(x).float()) / self.cfg.gate_logit_normalizer  # [B, T, H]
        g_gamma = None if self.log_decay is None else torch.tensor(self.log_decay, dtype=torch.float32, device=x.device)
        return q, k, v, g, g_gamma

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        if self.o_norm is not None:
            o = self.o_norm(o)
        B, T = o.shape[:2]
        return self.o_proj(o.reshape(B, T, -1))

    def forward(
        self, x, cos, sin, *, group=None, layout: str = "contiguous", cu_seqlens=None, cache: dict | None = None
    ) -> torch.Tensor:
        """``x [B, T_local, hidden]``; ``cos, sin [T_local, D/2]`` at the tokens' positions;
        ``cu_seqlens [N+1]`` global document starts (B = 1) or None.

        ``cache`` (generation, single process): ``{"state": [B, H, K, V] float32 or None}``,
        updated in place with the state after these tokens.
        """
        q, k, v, g, g_gamma = self._project(x, cos, sin)
        if cache is None:
            o = ops.linear_attention(
                q, k, v, g, g_gamma, group=group, layout=layout,
                method=self.cfg.linear_method, backend=self.cfg.linear_backend, cu_seqlens=cu_seqlens,
            )
        elif x.shape[1] == 1 and cache.get("state") is not None:
            o, cache["state"] = recurrent_step(q, k, v, g, g_gamma, cache["state"])
        else:
            o, cache["state"] = chunk_linear_attention(q, k, v, g, g_gamma, initial_state=cache.get("state"), output_final_state=True)
        return self._out(o)


def softmax_attend(cfg: ModelConfig, q, k, v, cache: dict | None, *, group, layout: str, cu_seqlens=None) -> torch.Tensor:
    """A softmax layer's attention over post-RoPE ``q [B, T, H, D]``, ``k, v [B, T, H_kv, D]``: the
    sequence-parallel operator when training (``cache`` None), else the KV cache ``{"k", "v"}``
    extended in place by these tokens (bottom-right causal: the new tokens are last)."""
    if cache is None:
        return ops.softmax_attention(q, k, v, group=group, layout=layout, method=cfg.softmax_method, cu_seqlens=cu_seqlens)
    if cache.get("k") is not None:
        k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)
    cache["k"], cache["v"] = k, v
    return sdpa_attention(q, k, v, causal=True, scale=q.shape[-1] ** -0.5)


class SoftmaxAttention(nn.Module):
    """Llama-3 GQA softmax attention with RoPE at global positions. ``[B, T_local, hidden] -> same``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        h, H, Hkv, D = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.num_heads, self.kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(h, H * D, bias=False)
        self.k_proj = nn.Linear(h, Hkv * D, bias=False)
        self.v_proj = nn.Linear(h, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, h, bias=False)

    def forward(
        self, x, cos, sin, *, group=None, layout: str = "contiguous", cu_seqlens=None, cache: dict | None = None
    ) -> torch.Tensor:
        """``x [B, T_local, hidden]``; ``cos, sin [T_local, D/2]`` at the tokens' positions;
        ``cu_seqlens [N+1]`` global document starts (B = 1) or None.

        ``cache`` (generation, single process): ``{"k": [B, T_past, H_kv, D] or None, "v": ...}``,
        extended in place by these tokens' keys and values.
        """
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        o = softmax_attend(self.cfg, q, k, v, cache, group=group, layout=layout, cu_seqlens=cu_seqlens)
        return self.o_proj(o.reshape(B, T, -1))
