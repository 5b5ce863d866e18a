"""Gated DeltaNet / DeltaNet layers in the model: training step at SP=1, cached decoding."""
from __future__ import annotations

import pytest
import torch

from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.models.delta_mixer import GatedDeltaNet
from lasp.testing import assert_close, full_and_cached_logits

BASE = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=1, initializer_range=0.15)


def build(variant: str, pattern: str = "LS", conv_size: int = 4, seed: int = 0) -> LinearLlamaForCausalLM:
    cfg = ModelConfig(**BASE, num_layers=len(pattern), layer_pattern=pattern, linear_variant=variant, conv_size=conv_size)
    torch.manual_seed(seed)
    return LinearLlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("variant", ["gated_deltanet", "deltanet"])
def test_forward_backward_sp1(variant):
    model = build(variant, pattern="LLS")
    assert isinstance(model.layers[0].attn, GatedDeltaNet)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))  # > one chunk
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    mixer = model.layers[0].attn
    assert mixer.conv_weight.grad.abs().sum() > 0
    if variant == "gated_deltanet":
        assert mixer.A_log.grad.abs().sum() > 0 and mixer.dt_bias.grad.abs().sum() > 0
    else:
        assert mixer.A_log is None and mixer.a_proj is None


@pytest.mark.parametrize("prefill", [1, 7], ids=["token-by-token", "prefill7"])
@pytest.mark.parametrize("variant", ["gated_deltanet", "deltanet"])
def test_cached_decoding_equals_full_forward(variant, prefill):
    """Recurrent state + convolution state, one token per step, equal one full forward."""
    model = build(variant, conv_size=3)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    full, cached, cache = full_and_cached_logits(model, ids, prefill)
    assert_close(full, cached, name=f"{variant} cached logits")
    lin = cache[0]
    assert lin["state"].shape == (2, 2, 16, 16) and lin["state"].dtype == torch.float32
    assert lin["conv"].shape == (2, 2, 3 * 32)  # W-1 inputs of q, k, v


def test_greedy_generate_runs():
    model = build("gated_deltanet")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
    assert out.shape == (1, 8)
