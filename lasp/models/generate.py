"""Autoregressive generation for Linear-Llama3 (single process).

The prompt goes through one cached forward (chunked linear attention that also returns each
linear layer's final state; softmax layers fill their KV cache); then each new token is one
step: linear layers update their recurrent state ``S [B, H, K, V]`` (constant memory per
token), softmax layers append to their KV cache.

Sampling: ``temperature`` (0 = greedy), then ``top_k`` and ``top_p`` (nucleus) filtering.
"""
from __future__ import annotations

from typing import Callable

import torch


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits [B, V]`` with everything outside the top-k / the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept).
    """
    logits = logits.clone()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ``[B]`` (int64) from the last position's ``logits [B, V]``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``input_ids [B, T]`` by up to ``max_new_tokens`` sampled tokens.

    Args:
        model: a :class:`~lasp.models.LinearLlamaForCausalLM` (any device, single process).
        temperature: 0 = greedy; top_k / top_p: optional filtering before sampling.
        eos_token_id: stop once every sequence has produced it.
        on_token: called with each step's new tokens ``[B]`` (int64) as soon as they exist
            (streaming).
        generator: a ``torch.Generator`` for reproducible sampling.
    Returns:
        ``[B, T + n_new]`` int64: the prompt followed by the generated tokens.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache()
        logits = model.forward_cached(input_ids, cache, start_pos=0)[:, -1]
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        pos = input_ids.shape[1]
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if on_token is not None:
                on_token(token)
            if (eos_token_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            logits = model.forward_cached(token[:, None], cache, start_pos=pos)[:, -1]
            pos += 1
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
