"""Model configs: every YAML under configs/models loads and builds; bad configs name the key and file;
parameter and FLOP counts (``lasp model-info``)."""
from __future__ import annotations

import glob
import os

import pytest
import torch

from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.models.info import count_flops, count_params, flop_breakdown
from lasp.models.info import main as info_main

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "models", "*.yaml")))
NAMES = [os.path.basename(p)[: -len(".yaml")] for p in CONFIGS]
SMALL_PARAMS = 5_000_000  # configs below this run a real forward on the CPU


def test_expected_configs_exist():
    expected = {
        "tiny-linear", "tiny-hybrid", "tiny-softmax", "linear-llama3-1b", "linear-llama3-1b-hybrid-1of4",
        "linear-llama3-1b-hybrid-1of8", "linear-llama3-8b-hybrid",
    }
    assert expected <= set(NAMES)
    patterns = {n: ModelConfig.from_yaml(p).layer_pattern for n, p in zip(NAMES, CONFIGS)}
    assert (patterns["tiny-linear"], patterns["tiny-hybrid"], patterns["tiny-softmax"]) == ("L", "LLLS", "S")
    fractions = {ModelConfig.from_yaml(p).softmax_fraction for n, p in zip(NAMES, CONFIGS) if n.startswith("linear-llama3-1b")}
    assert {0.0, 1 / 8, 1 / 4} <= fractions  # the hybrid ratios the LASP-2 paper studies


@pytest.mark.parametrize("path", CONFIGS, ids=NAMES)
def test_config_loads_builds_and_runs(path, tmp_path):
    cfg = ModelConfig.from_yaml(path)
    # round trip through YAML
    cfg.to_yaml(tmp_path / "again.yaml")
    assert ModelConfig.from_yaml(tmp_path / "again.yaml") == cfg
    n = count_params(cfg)
    meta = LinearLlamaForCausalLM(cfg, device="meta")
    assert meta.num_parameters() == n
    if n > SMALL_PARAMS:  # large: parameters counted on the meta device only
        return
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    logits = model(ids)
    assert logits.shape == (1, 16, cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_1b_parameter_count_closed_form(capsys):
    """Linear-Llama3-1B: tied embedding V*h, final norm h, and per layer two norms (2h), q/k/v/o
    (4 h^2, linear attention uses all 16 heads for k and v), SwiGLU (3 h I) and the per-head
    output norm (D)."""
    cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "linear-llama3-1b.yaml"))
    V, h, I, L, D = 128256, 2048, 8192, 16, 128
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.head_dim) == (V, h, I, L, D)
    formula = V * h + h + L * (2 * h + 4 * h * h + 3 * h * I + D)
    built = LinearLlamaForCausalLM(cfg, device="meta").num_parameters()
    print(f"linear-llama3-1b parameters: {built:,} (formula {formula:,})")
    assert built == formula == count_params(cfg) == 1_336_479_744
    # the 1/4 hybrid: 4 softmax layers with GQA (8 kv heads): q,o = h^2 each, k,v = h * 8 * 128 each
    hyb = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "linear-llama3-1b-hybrid-1of4.yaml"))
    softmax_layer = 2 * h + 2 * h * h + 2 * h * 8 * D + 3 * h * I
    linear_layer = 2 * h + 4 * h * h + 3 * h * I + D
    assert count_params(hyb) == V * h + h + 12 * linear_layer + 4 * softmax_layer
    assert LinearLlamaForCausalLM(hyb, device="meta").num_parameters() == count_params(hyb)


@pytest.mark.parametrize("variant", ["basic", "lightning", "retention", "simple_gla", "deltanet", "gated_deltanet"])
def test_count_params_matches_built_model(variant):
    """The closed form (what the trainer reports) equals the meta-built model's count for every
    linear variant, with and without the output norm, tied or not, GQA softmax layers included."""
    for output_norm in (True, False):
        for tie in (True, False):
            cfg = ModelConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_heads=4, num_kv_heads=2,
                              num_layers=4, layer_pattern="LLLS", linear_variant=variant, output_norm=output_norm,
                              tie_embeddings=tie, gate_low_rank_dim=5, conv_size=3)
            assert count_params(cfg) == LinearLlamaForCausalLM(cfg, device="meta").num_parameters(), cfg


def test_flop_counts():
    cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "linear-llama3-1b-hybrid-1of4.yaml"))
    T = 4096
    parts = flop_breakdown(cfg, T)
    assert parts["total"] == count_flops(cfg, T) == parts["matmul"] + parts["softmax_attention"] + parts["linear_attention"]
    # the 6N rule, N = weights in matmuls (norm weights and embedding lookups excluded, LM head included)
    norms = 16 * 2 * 2048 + 2048 + 12 * 128  # layer norms, final norm, 12 linear layers' output norms
    matrices = count_params(cfg, include_embedding=False) - norms + cfg.vocab_size * cfg.hidden_size
    assert parts["matmul"] == 6 * matrices
    assert parts["softmax_attention"] == 6 * 4 * 2048 * T  # 4 causal softmax layers, 6 * hidden * T each
    assert parts["linear_attention"] == 12 * 12 * 2048 * 128  # 12 linear layers, 12 * hidden * head_dim
    # linear layers' cost does not grow with T; softmax layers' does, linearly
    pure = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "linear-llama3-1b.yaml"))
    assert count_flops(pure, 1024) == count_flops(pure, 65536)
    assert flop_breakdown(cfg, 2 * T)["softmax_attention"] == 2 * parts["softmax_attention"]
    with pytest.raises(ValueError, match="seq_len"):
        count_flops(cfg, 0)


def test_model_info_cli(capsys):
    path = os.path.join(ROOT, "configs", "models", "linear-llama3-1b.yaml")
    assert info_main([path, "--seq-len", "2048,16384", "--check"]) == 0
    out = capsys.readouterr().out
    assert "1,336,479,744" in out and "16384" in out
    assert info_main([path, "--json"]) == 0
    assert '"parameters": 1336479744' in capsys.readouterr().out


BAD = {  # id: (yaml text, key the error must name)
    "unknown-key": ("hidden_size: 64\nnum_heads: 4\nhiden_layers: 3\n", "hiden_layers"),
    "pattern-letter": ("layer_pattern: LLXS\n", "layer_pattern"),
    "pattern-depth": ("layer_pattern: LLS\nnum_layers: 4\n", "layer_pattern"),
    "heads-divide-hidden": ("hidden_size: 100\nnum_heads: 3\n", "num_heads"),
    "kv-heads-divide-heads": ("num_heads: 4\nnum_kv_heads: 3\n", "num_kv_heads"),
    "variant": ("linear_variant: mamba\n", "linear_variant"),
    "feature-map": ("feature_map: tanh\n", "feature_map"),
    "wrong-type": ("num_layers: four\n", "num_layers"),
    "bool-as-int": ("hidden_size: true\n", "hidden_size"),
    "softmax-method": ("softmax_method: flash\n", "softmax_method"),
    "not-a-mapping": ("- a\n- b\n", "mapping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_names_key_and_file(tmp_path, case):
    text, key = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        ModelConfig.from_yaml(path)
    assert key in str(err.value) and str(path) in str(err.value), str(err.value)


def test_from_dict_source_and_yaml_floats():
    with pytest.raises(ValueError, match=r"run.yaml:model: unknown key 'nope'"):
        ModelConfig.from_dict({"nope": 1}, source="run.yaml:model")
    cfg = ModelConfig.from_dict({"rms_norm_eps": "1e-6", "rope_theta": 10000}, source="x")
    assert cfg.rms_norm_eps == 1e-6 and isinstance(cfg.rope_theta, float)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig(num_layers=8, layer_pattern="LLLLLLLS").layer_types.count("softmax") == 1
