"""Generation: recurrent-state / KV-cache decoding equals one full forward; sampling; save/load; CLI."""
from __future__ import annotations

import pytest
import torch

from lasp.models import LINEAR_VARIANTS, LinearLlamaForCausalLM, ModelConfig, load_pretrained, save_pretrained
from lasp.models.generate import filter_logits, sample_next
from lasp.models.generate_cli import decode_bytes, encode_bytes
from lasp.models.generate_cli import main as generate_main
from lasp.testing import assert_close, full_and_cached_logits

BASE = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_heads=2, initializer_range=0.15, gate_low_rank_dim=4)
# every linear variant, each in a hybrid with a GQA softmax layer ("LS"); feature maps vary too
VARIANTS = {
    "basic": dict(linear_variant="basic", feature_map="identity"),
    "lightning": dict(linear_variant="lightning", feature_map="elu+1", linear_rope=True),
    "retention": dict(linear_variant="retention", feature_map="relu", output_norm=False),
    "simple_gla": dict(linear_variant="simple_gla", feature_map="silu", linear_rope=True),
}
assert set(VARIANTS) == set(LINEAR_VARIANTS)


def build(variant: str, pattern: str = "LS", seed: int = 0, **extra) -> LinearLlamaForCausalLM:
    cfg = ModelConfig(**BASE, num_layers=len(pattern), layer_pattern=pattern, num_kv_heads=1, **VARIANTS[variant], **extra)
    torch.manual_seed(seed)
    return LinearLlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("prefill", [1, 7], ids=["token-by-token", "prefill7"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_full_forward(variant, prefill):
    """Prompt through one cached forward (chunked, returns states), then one token per step."""
    model = build(variant)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    full, cached, cache = full_and_cached_logits(model, ids, prefill)
    assert_close(full, cached, name=f"{variant} cached logits")
    # linear layers keep one fixed-size state; softmax layers a KV cache of every token
    lin, soft = cache
    assert lin["state"].shape == (2, 2, 16, 16) and lin["state"].dtype == torch.float32
    assert soft["k"].shape == (2, 40, 1, 16)


def test_pure_softmax_and_pure_linear_decode():
    for pattern in ("S", "LL"):
        model = build("lightning", pattern=pattern)
        ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            cache = model.new_cache()
            steps = [model.forward_cached(ids[:, t : t + 1], cache, start_pos=t) for t in range(24)]
            assert_close(model(ids), torch.cat(steps, 1), name=f"{pattern} cached logits")


def test_greedy_generate_matches_argmax_of_full_forward():
    model = build("simple_gla")
    prompt = torch.tensor([encode_bytes("hello")])
    streamed = []
    out = model.generate(prompt, max_new_tokens=12, temperature=0, on_token=lambda t: streamed.append(int(t[0])))
    assert out.shape == (1, 5 + 12) and torch.equal(out[:, :5], prompt)
    assert streamed == out[0, 5:].tolist()
    with torch.no_grad():  # each greedy token is the argmax of a full forward over what came before
        for t in range(5, out.shape[1]):
            assert int(model(out[:, :t])[0, -1].argmax()) == int(out[0, t])


def test_sampling_is_reproducible_and_stops_at_eos():
    model = build("retention")
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(0), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)
    eos = int(a[0, 3])  # the first sampled token of sequence 0: it stops right there
    c = model.generate(prompt[:1], generator=torch.Generator().manual_seed(0), eos_token_id=eos, **kw)
    assert c.shape == (1, 4)


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
    for _ in range(20):  # top_k=1 sampling is greedy
        assert int(sample_next(torch.randn(1, 9) * 0 + torch.arange(9.0), top_k=1)[0]) == 8


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-2)])
def test_bad_sampling_arguments(bad):
    model = build("basic")
    kwargs = dict(max_new_tokens=2) | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        model.generate(torch.tensor([[1, 2]]), **kwargs)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_load_roundtrip(tmp_path, tied):
    model = build("simple_gla", tie_embeddings=tied)
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "model.yaml"]
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    with pytest.raises(ValueError, match="path"):
        load_pretrained(tmp_path / "nothing-here")


def test_generate_cli_streams_text(tmp_path, capsys):
    save_pretrained(build("lightning"), tmp_path / "ckpt")
    rc = generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "héllo", "--max-new-tokens", "8", "--temperature", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("héllo") and out.endswith("\n")
    assert decode_bytes(encode_bytes("héllo ✓")) == "héllo ✓"
    rc = generate_main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"])
    assert rc == 2 and "not a save_pretrained directory" in capsys.readouterr().err
