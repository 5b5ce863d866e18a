"""The sparse mixture-of-experts MLP (``mlp: moe``) and its router losses.

The math is transformers' Qwen3.5-MoE / Qwen3-Next / Qwen2-MoE block: router logits
``x W_r^T`` (in x's dtype), softmax over the E experts in float32, the top-k of those
probabilities (renormalised to sum 1 with ``norm_topk_prob``, then cast to x's dtype), each
chosen expert's SwiGLU output times its weight, summed; plus, when
``shared_expert_intermediate_size > 0``, a shared SwiGLU expert gated per token by
``sigmoid(x w_g^T)``. No token is dropped.

Parameter names and layouts are transformers' (so both checkpoint layouts map onto them by
slicing experts, never by reshaping a model): ``gate.weight [E, H]`` (the router),
``experts.gate_up_proj [E, 2I, H]`` (gate rows then up rows, the fused layout; the per-expert
layout's ``experts.N.gate_proj / up_proj`` are ``[N, :I]`` / ``[N, I:]``), ``experts.down_proj
[E, H, I]``, ``shared_expert.{gate,up,down}_proj.weight``, ``shared_expert_gate.weight [1, H]``.
With expert parallelism (``ep_group``) a rank holds the experts ``[r*E/P, (r+1)*E/P)`` of the
first dim of ``gate_up_proj`` / ``down_proj`` (:mod:`lasp.ops.expert_parallel`).

Router losses (:func:`router_losses`), over all the tokens of a batch and all MoE layers, as
transformers' ``load_balancing_loss_func``: ``aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction
of the (layer, token) top-k assignments that chose expert e and ``P_e`` the mean router
probability of e; z-loss (ST-MoE): the mean over (layer, token) of ``logsumexp(logits)^2``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import comm
from ..ops.expert_parallel import combine, dispatch
from ..ops.grouped_mm import grouped_linear
from ..parallel import group_rank_size
from .layers import SwiGLU


class RouterStats(NamedTuple):
    """One MoE layer's router statistics over this rank's tokens (:func:`router_losses` sums them)."""

    counts: torch.Tensor  # [E] float32: top-k assignments per expert (no gradient)
    prob_sum: torch.Tensor  # [E] float32: sum over tokens of the router probabilities
    lse_sq_sum: torch.Tensor | None  # sum over tokens of logsumexp(logits)^2 (None: z-loss off)
    tokens: int


class RouterLosses(NamedTuple):
    """``aux`` / ``z``: the batch's load-balancing and z losses (detached, the same on every rank
    of the group); ``aux_share`` / ``z_share``: this rank's differentiable shares, which sum over
    the group's ranks to ``aux`` / ``z`` (what a rank back-propagates)."""

    aux: torch.Tensor
    z: torch.Tensor
    aux_share: torch.Tensor
    z_share: torch.Tensor


class TopKRouter(nn.Module):
    """``weight [E, H]``; ``x [N, H] -> (logits [N, E] x.dtype, probs [N, E] fp32, weights [N, k] x.dtype, experts [N, k])``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor):
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights.to(logits.dtype), experts


class Experts(nn.Module):
    """This rank's routed SwiGLU experts as 3-D tensors: ``gate_up_proj [E_local, 2I, H]``,
    ``down_proj [E_local, H, I]``; computed as grouped matmuls over rows sorted by expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.num_experts, self.ep_rank, self.num_local = num_experts, ep_rank, num_experts // ep_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_local, hidden_size, intermediate_size))

    def reset_parameters(self, std: float) -> None:
        """N(0, std), drawn for ALL E experts (the same random stream whatever the EP size), then
        this rank's slice kept."""
        first = self.ep_rank * self.num_local
        for p in (self.gate_up_proj, self.down_proj):
            if p.is_meta:
                continue
            if self.num_local == self.num_experts:
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                with torch.no_grad():
                    full = torch.empty((self.num_experts, *p.shape[1:]), dtype=p.dtype, device=p.device).normal_(0.0, std)
                    p.copy_(full[first:first + self.num_local])

    def forward(self, rows: torch.Tensor, counts: torch.Tensor, counts_host: list[int] | None = None) -> torch.Tensor:
        """``rows [M, H]`` sorted by local expert, ``counts [E_local]`` -> ``[M, H]``."""
        gate, up = grouped_linear(rows, self.gate_up_proj, counts, counts_host).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down_proj, counts, counts_host)


class SparseMoeBlock(nn.Module):
    """``x [B, T, H] -> (y [B, T, H], RouterStats)``: the routed experts (over ``ep_group``) plus the
    gated shared expert. Every rank of ``ep_group`` must call it (it communicates when P > 1)."""

    def __init__(self, cfg, ep_group=None):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_experts
        ep_rank, ep_size = group_rank_size(ep_group)
        if E % ep_size:
            raise ValueError(f"num_experts={E} must be divisible by the expert-parallel size {ep_size}")
        self.ep_group = ep_group if ep_size > 1 else None
        self.z_loss = cfg.router_z_loss_coef > 0
        self.gate = TopKRouter(H, E, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        self.experts = Experts(H, cfg.expert_intermediate_size, E, ep_rank, ep_size)
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = SwiGLU(H, shared) if shared else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False) if shared else None

    def reset_moe_parameters(self, std: float) -> None:
        """The router and the routed experts (the shared expert's Linears are the model's to init)."""
        if not self.gate.weight.is_meta:
            nn.init.normal_(self.gate.weight, mean=0.0, std=std)
        self.experts.reset_parameters(std)

    def forward(self, x: torch.Tensor):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, weights, experts = self.gate(x)
        rows, counts, counts_host, plan = dispatch(x, experts, self.experts.num_experts, self.ep_group)
        y = combine(self.experts(rows, counts, counts_host), weights, plan)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        flat = experts.reshape(-1)
        stats = RouterStats(
            counts=torch.zeros(probs.shape[-1], dtype=torch.float32, device=x.device).index_add_(
                0, flat, torch.ones(flat.shape, dtype=torch.float32, device=x.device)),
            prob_sum=probs.sum(0),
            lse_sq_sum=torch.logsumexp(logits.float(), dim=-1).square().sum() if self.z_loss else None,
            tokens=x.shape[0],
        )
        return y.view(shape), stats


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The routed experts' parameters of every MoE layer (sharded over the EP group), by name."""
    return [(f"{n}.{pn}", p) for n, m in model.named_modules() if isinstance(m, Experts) for pn, p in m.named_parameters()]


def router_losses(stats: list[RouterStats], group=None) -> RouterLosses:
    """The load-balancing and z losses of the MoE layers' ``stats`` (one forward's) over the tokens
    of every rank of ``group`` (None: this process's tokens only): ONE all-reduce of ``2E + 2``
    float64 values (tag ``moe.router_stats``).

    ``aux = E * sum_e f_e P_e``, ``f_e = (sum over layers and tokens of the top-k hits of e) / (L N)``,
    ``P_e = (sum over layers and tokens of the probability of e) / (L N)`` (transformers'
    ``load_balancing_loss_func``, N = the group's tokens, L = MoE layers); ``z = sum of
    logsumexp(logits)^2 / (L N)`` (0 when the z-loss is off). Only ``P`` carries a gradient, so
    this rank's share ``E * sum_e f_e (its own probability sums)_e / (L N)`` sums over the ranks to
    ``aux`` exactly, gradient included.
    """
    if not stats:
        raise ValueError("router_losses: stats is empty (the model has no MoE layer, or no forward recorded them)")
    E, L = stats[0].counts.numel(), len(stats)
    counts = torch.stack([s.counts for s in stats]).sum(0)
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(0)
    lse = sum(s.lse_sq_sum for s in stats) if stats[0].lse_sq_sum is not None else None
    zero = prob_sum.new_zeros(())
    buf = torch.cat([counts.double(), prob_sum.detach().double(), (zero if lse is None else lse.detach()).double().view(1),
                     torch.full((1,), float(stats[0].tokens), dtype=torch.float64, device=counts.device)])
    if group_rank_size(group)[1] > 1:
        comm.all_reduce(buf, group, tag="moe.router_stats")
    denom = L * buf[-1]
    f, P = buf[:E] / denom, buf[E:2 * E] / denom
    aux_share = E * (f.float() * prob_sum).sum() / denom.float()
    z_share = zero if lse is None else lse / denom.float()
    return RouterLosses(aux=E * (f * P).sum(), z=buf[2 * E] / denom, aux_share=aux_share, z_share=z_share)
