"""Linear-Llama3: a Llama-3 decoder whose token mixers are linear ("L") or softmax ("S")
attention, following ``ModelConfig.layer_pattern`` over the depth.

Sequence parallelism is transparent: ``model(input_ids, group=..., layout=...)`` takes this
rank's shard of the tokens, RoPE uses each token's global position, and every mixer calls the
sequence-parallel operators with the same group and layout. Packed documents
(``cu_seqlens=``, global document starts, B = 1) go to every operator, and RoPE positions
restart at each document start. Everything else (embeddings, norms,
MLPs, the LM head) is per-token, hence local.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops.cross_entropy import IGNORE_INDEX, REDUCTIONS, linear_cross_entropy
from ..parallel import LAYOUTS, global_positions, group_rank_size
from .config import DELTA_VARIANTS, QWEN_ARCHITECTURES, ModelConfig
from .delta_mixer import GatedDeltaNet
from .layers import RMSNorm, SwiGLU, positions_in_documents, rope_cos_sin
from .mixers import LinearAttention, SoftmaxAttention
from .moe import SparseMoeBlock
from .offload import HostOffload
from .qwen3_5 import OffsetRMSNorm, Qwen35Attention, Qwen35GatedDeltaNet


def _norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return OffsetRMSNorm(dim, cfg.rms_norm_eps) if cfg.architecture in QWEN_ARCHITECTURES else RMSNorm(dim, cfg.rms_norm_eps)


def _mixer_class(cfg: ModelConfig, kind: str) -> type:
    if cfg.architecture in QWEN_ARCHITECTURES:
        return Qwen35GatedDeltaNet if kind == "linear" else Qwen35Attention
    if kind == "softmax":
        return SoftmaxAttention
    return GatedDeltaNet if cfg.linear_variant in DELTA_VARIANTS else LinearAttention


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``. ``[B, T, hidden] -> (same,
    RouterStats of a sparse-MoE MLP or None)``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str, ep_group=None):
        super().__init__()
        self.kind = kind
        self.attn_norm = _norm(cfg, cfg.hidden_size)
        self.attn = _mixer_class(cfg, kind)(cfg, layer_idx)
        self.mlp_norm = _norm(cfg, cfg.hidden_size)
        moe = cfg.moe_layers[layer_idx]
        self.mlp = SparseMoeBlock(cfg, ep_group) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, group=None, layout: str = "contiguous", cu_seqlens=None, cache: dict | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, group=group, layout=layout, cu_seqlens=cu_seqlens, cache=cache)
        if isinstance(self.mlp, SparseMoeBlock):
            y, stats = self.mlp(self.mlp_norm(x))
            return x + y, stats
        return x + self.mlp(self.mlp_norm(x)), None


class LinearLlamaForCausalLM(nn.Module):
    """The Linear-Llama3 causal LM. Build on any device, including ``meta`` (no memory)::

        model = LinearLlamaForCausalLM(cfg)                  # or device="meta"
        logits = model(input_ids, group=sp_group, layout="zigzag")
        loss_sum = model(input_ids, group=sp_group, layout="zigzag", labels=labels)  # no logits built

    ``ep_group``: the expert-parallel group of an ``mlp: moe`` model (this rank then holds its
    ``E / ep_size`` experts of every MoE layer; :mod:`lasp.models.moe`).
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, ep_group=None):
        super().__init__()
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(DecoderLayer(config, i, kind, ep_group) for i, kind in enumerate(config.layer_types))
            self.norm = _norm(config, config.hidden_size)
            self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.activation_offload: HostOffload | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        """Llama init: N(0, initializer_range) for projections and embeddings, ones for norms,
        zeros for the simple_gla gate bias and for offset (Qwen3.5) norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):  # ones, or zeros for weights stored as offsets from 1
                nn.init.constant_(m.weight, 1.0 - m.OFFSET)
            elif isinstance(m, (GatedDeltaNet, Qwen35GatedDeltaNet)):
                m.reset_delta_parameters()
            elif isinstance(m, SparseMoeBlock):
                m.reset_moe_parameters(std)

    def set_activation_checkpointing(self, enabled: bool = True, offload: bool = False) -> None:
        """Recompute each decoder layer in backward (``torch.utils.checkpoint``, non-reentrant);
        ``offload``: also keep the layers' inputs in host memory until backward
        (:class:`lasp.models.offload.HostOffload`; implies checkpointing)."""
        self.activation_checkpointing = bool(enabled or offload)
        self.activation_offload = HostOffload() if offload else None

    def num_parameters(self) -> int:
        """Distinct parameters (a tied LM head counts once); works on the meta device."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        group=None,
        layout: str = "contiguous",
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        router_stats: list | None = None,
        *,
        labels: torch.Tensor | None = None,
        loss_reduction: str = "sum",
    ) -> torch.Tensor:
        """Logits of this rank's tokens, or with ``labels`` the training loss (no logits built).

        Args:
            input_ids: ``[B, T_local]`` int64, this rank's shard in ``layout`` order.
            group: SP process group, or None (whole sequence here).
            layout: ``contiguous`` | ``zigzag`` (token layout over the SP group).
            positions: ``[T_local]`` global positions; default: from the group's rank/size and
                the layout with ``T_global = T_local * sp_size``.
            cu_seqlens: ``[N+1]`` integer global document starts (``0 ... T_global``, the same on
                every rank), B must be 1; or None (one document). Every operator gets it, and RoPE
                uses each token's position within its document.
            router_stats: a list to which every MoE layer appends its
                :class:`~lasp.models.moe.RouterStats` (for :func:`lasp.models.moe.router_losses`).
            labels: ``[B, T_local]`` integer next-token ids of this rank's tokens, ``-100`` where a
                token has none; or None (return logits).
            loss_reduction: with labels: ``sum`` (default: the SUM of this rank's token losses,
                what the trainer scales to the global mean over SP x DP), ``mean`` (over this
                rank's labelled tokens) or ``none`` (``[B, T_local]``, 0 where unlabelled).
        Returns:
            without labels: ``[B, T_local, vocab_size]`` float32 logits. With labels: the float32
            loss from :func:`lasp.linear_cross_entropy` on the final normed hidden states, the LM
            head used inside this forward (so ZeRO-3 has gathered it): the cross-entropy only. An
            MoE model's router losses are the caller's to add, from ``router_stats`` through
            :func:`lasp.models.moe.router_losses` (their batch is a group's tokens, their scale
            the caller's: see the trainer).
        """
        if labels is not None:  # before any collective
            _check_labels(input_ids, labels, loss_reduction)
        cos, sin = self._rope(input_ids, group, layout, positions, cu_seqlens)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                with self.activation_offload or contextlib.nullcontext():
                    x, stats = checkpoint(layer, x, cos, sin, group, layout, cu_seqlens, use_reentrant=False)
            else:
                x, stats = layer(x, cos, sin, group, layout, cu_seqlens)
            if stats is not None and router_stats is not None:
                router_stats.append(stats)
        h = self.norm(x)
        return self.logits(h) if labels is None else self.loss(h, labels, loss_reduction)

    def lm_head_weight(self) -> torch.Tensor:
        """``[vocab, hidden]``: the LM head's weight, or the embedding matrix when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head (tied or not) on final hidden states ``[B, T, hidden]`` -> float32 logits."""
        return F.linear(h, self.lm_head_weight()).float()

    def loss(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Cross-entropy of final hidden states ``[B, T, hidden]`` against ``labels [B, T]``
        (``-100`` = none) through the fused :func:`lasp.linear_cross_entropy` -> float32."""
        loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head_weight(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction=reduction)
        return loss.view(labels.shape) if reduction == "none" else loss

    def _rope(self, input_ids, group, layout, positions, cu_seqlens=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor [B, T_local], got {got}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        T = input_ids.shape[1]
        if positions is None:
            rank, size = group_rank_size(group)
            if layout == "zigzag" and size > 1 and T % 2:
                raise ValueError(f"input_ids' T_local={T} must be even for layout='zigzag'")
            if size == 1:
                positions = torch.arange(T, device=input_ids.device)
            else:
                positions = global_positions(T * size, rank, size, layout, device=input_ids.device)
        elif positions.shape != (T,):
            raise ValueError(f"positions must have shape [T_local] = [{T}], got {list(positions.shape)}")
        if cu_seqlens is not None:
            _check_documents(input_ids, cu_seqlens)
            positions = positions_in_documents(positions.to(input_ids.device), cu_seqlens)
        return rope_cos_sin(positions.to(input_ids.device), self.config.rope_dim, self.config.rope_theta, self.config.rope_scaling)

    # ------------------------------------------------------------------ generation (no documents)
    def forward_cached(self, input_ids: torch.Tensor, cache: list[dict], start_pos: int) -> torch.Tensor:
        """Single-process incremental forward for generation.

        ``input_ids [B, T_new]`` are the tokens at positions ``start_pos .. start_pos+T_new-1``;
        ``cache`` (one dict per layer, from :meth:`new_cache`) holds the linear layers' states and
        the softmax layers' KV caches and is updated in place. Returns ``[B, T_new, vocab]`` float32.
        """
        positions = torch.arange(start_pos, start_pos + input_ids.shape[1], device=input_ids.device)
        cos, sin = self._rope(input_ids, None, "contiguous", positions)
        x = self.embed_tokens(input_ids)
        for layer, layer_cache in zip(self.layers, cache):
            x, _ = layer(x, cos, sin, cache=layer_cache)
        return self.logits(self.norm(x))

    def new_cache(self) -> list[dict]:
        """Empty per-layer caches for :meth:`forward_cached`."""
        return [{"state": None, "conv": None} if layer.kind == "linear" else {"k": None, "v": None} for layer in self.layers]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, **sampling) -> torch.Tensor:
        """Sample a continuation (single process). See :func:`lasp.models.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **sampling)



def _check_labels(input_ids: torch.Tensor, labels, loss_reduction: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != input_ids.shape:
        got = f"{list(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor shaped like input_ids {list(input_ids.shape)}, got {got}")
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")


def _check_documents(input_ids: torch.Tensor, cu_seqlens) -> None:
    """The model's own checks of ``cu_seqlens`` (shape and B = 1; the operators check the values)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        got = f"{list(cu_seqlens.shape)} {cu_seqlens.dtype}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N+1] of global document starts, got {got}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size B = 1 (pack the documents into one row), got input_ids of B = {input_ids.shape[0]}")
