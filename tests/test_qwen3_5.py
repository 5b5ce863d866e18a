"""Qwen3.5 text models: lasp (``architecture: qwen3_5``) against transformers (the oracle).

Tiny random fp32 configs with both layer kinds, ``linear_num_value_heads = 2 * linear_num_key_heads``,
GQA 2:1 and 4:1, partial RoPE, random (non-zero) norm offsets. Skipped without transformers.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "gqa2-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, partial_rotary_factor=0.5),
    "gqa4-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, partial_rotary_factor=0.25),
}
VOCAB = 97


def text_kwargs(variant: str) -> dict:
    """The keyword arguments of a tiny ``Qwen3_5TextConfig`` of ``variant`` (4 layers, both kinds)."""
    kw = dict(CONFIGS[variant])
    prf = kw.pop("partial_rotary_factor")
    return dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, head_dim=16,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": prf}, **kw,
    )


def make_hf(path, variant: str, seed: int = 0, **overrides):
    """Save a tiny random Qwen3_5ForCausalLM to ``path``; return the (eval, fp32) model.
    ``overrides`` replace ``Qwen3_5TextConfig`` arguments of :func:`text_kwargs`."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    hc = Qwen3_5TextConfig(**{**text_kwargs(variant), **overrides})
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(hc).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "dt_bias" in name:
                p.normal_(0.0, 0.2)  # norms stored as offsets start at zero: make them matter
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    model = make_hf(path, request.param)
    return str(path), model


def ids_for(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def test_from_hf_logits_and_grads_sp1(hf_dir):
    from lasp.models import from_hf
    from lasp.models.hf import lasp_to_hf_name

    path, hf = hf_dir
    model = from_hf(path)
    assert model.config.architecture == "qwen3_5"
    ids = ids_for(40)
    ref = hf(ids).logits
    out = model(ids)
    assert_close(ref, out, rtol=1e-4, name="logits")
    hf64 = type(hf)(hf.config).double().eval()  # gradients: the float64 transformers model is the oracle
    hf64.load_state_dict(hf.state_dict())
    hf64(ids).logits.pow(2).mean().backward()
    out.pow(2).mean().backward()
    hf_params = dict(hf64.named_parameters())
    for name, p in model.named_parameters():
        g = hf_params[lasp_to_hf_name(name, model.config)].grad
        # A_log / dt_bias: sums over every token of dg * (large) g, where per-token 1e-7 errors of
        # the fp32 delta rule add up (transformers' own fp32 run is 3e-5 off its float64 run there)
        rtol = 1e-3 if name.endswith(("A_log", "dt_bias")) else 1e-4
        assert_close(g.reshape(p.shape), p.grad, rtol=rtol, name=f"d{name}")


def sp_logits(rank, world, path, ids, layout):
    from lasp.models import from_hf

    model = from_hf(path)
    logits = model(shard_sequence(ids, rank, world, layout), group=dist.group.WORLD, layout=layout)
    logits.pow(2).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("P", [2, 4])
def test_from_hf_logits_sp_zigzag(spawn, hf_dir, P):
    """Logits equal transformers'; gradients (summed over ranks) equal lasp's SP = 1 ones."""
    from lasp.models import from_hf

    path, hf = hf_dir
    ids = ids_for(16 * P, seed=P)
    with torch.no_grad():
        ref = hf(ids).logits
    model = from_hf(path)
    model(ids).pow(2).sum().backward()
    results = spawn(P).run(sp_logits, path, ids, "zigzag")
    assert_close(ref, unshard_sequence([r[0] for r in results], "zigzag"), rtol=1e-4, name="logits")
    for n, p in model.named_parameters():
        assert_close(p.grad, sum(r[1][n] for r in results), rtol=1e-4, name=f"d{n}")


def test_greedy_generation_matches_hf(hf_dir):
    from lasp.models import from_hf

    path, hf = hf_dir
    prompt = ids_for(9, seed=3)[:1]
    ref = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    out = from_hf(path).generate(prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (1, 29) and torch.equal(ref, out), (ref.tolist(), out.tolist())


def test_roundtrip_bit_exact_and_loadable(hf_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lasp.models import from_hf, to_hf

    path, hf = hf_dir
    to_hf(from_hf(path), tmp_path)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    back = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(back).__name__ == "Qwen3_5ForCausalLM"
    ids = ids_for(12)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_multimodal_sharded_checkpoint(hf_dir, tmp_path):
    """``Qwen3_5ForConditionalGeneration`` layout: text weights under ``model.language_model.``,
    a vision tower and an MTP head (skipped), shards listed in the index; bad names are errors."""
    from safetensors.torch import load_file, save_file

    from lasp.models import from_hf

    path, hf = hf_dir
    text = load_file(os.path.join(path, "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in text.items()}
    renamed["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(3, 3)
    renamed["mtp.fc.weight"] = torch.randn(2, 2)
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text_cfg = json.loads(open(os.path.join(path, "config.json")).read())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
                                                      "text_config": text_cfg, "vision_config": {},
                                                      "tie_word_embeddings": text_cfg["tie_word_embeddings"]}))
    ids = ids_for(10)
    with torch.no_grad():
        assert_close(hf(ids).logits, from_hf(tmp_path)(ids), rtol=1e-4, name="logits")
    # unknown and missing names are listed
    victim = "model.language_model.layers.0.linear_attn.A_log"
    file = weight_map[victim]
    shard = load_file(tmp_path / file)
    shard["model.language_model.layers.0.linear_attn.surprise"] = shard.pop(victim)
    save_file(shard, tmp_path / file)
    with pytest.raises(ValueError, match=r"unknown \['model.language_model.layers.0.linear_attn.surprise'\], missing \['model.layers.0.linear_attn.A_log'\]"):
        from_hf(tmp_path)


def test_model_info_counts_match_transformers(hf_dir, capsys):
    from lasp.models import from_hf
    from lasp.models.info import count_params, main as info_main

    path, hf = hf_dir
    cfg = from_hf(path).config
    assert count_params(cfg) == sum(p.numel() for p in hf.parameters())
    assert info_main([path, "--check", "--seq-len", "2048,32768,262144"]) == 0
    out = capsys.readouterr().out
    assert "architecture      qwen3_5" in out and "262144" in out


def test_config_yaml_layer_types(tmp_path):
    from lasp.models import ModelConfig

    cfg = ModelConfig.from_yaml("configs/models/qwen3_5-tiny.yaml")
    assert cfg.layer_pattern == "LLLS" and cfg.layer_types == ["linear", "linear", "linear", "softmax"]
    assert cfg.rope_dim == 4 and cfg.linear_dims == (2, 4, 16, 16)
    cfg.to_yaml(tmp_path / "m.yaml")
    assert ModelConfig.from_yaml(tmp_path / "m.yaml") == cfg
    with pytest.raises(ValueError, match="layer_types has 3 entries, num_layers=4"):
        ModelConfig(num_layers=4, layer_types=["linear"] * 3)
    with pytest.raises(ValueError, match="linear_num_value_heads"):
        ModelConfig(architecture="qwen3_5", linear_variant="gated_deltanet", linear_num_key_heads=3, linear_num_value_heads=4)


def test_import_lasp_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, lasp, lasp.models, lasp.train.trainer; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_finetune_config_resolves_init_from(hf_dir):
    from lasp.train.config import RunConfig
    from lasp.train.trainer import build_model_config

    path, hf = hf_dir
    cfg = RunConfig.from_yaml("configs/finetune-qwen3_5.yaml")
    cfg.model["init_from"] = path
    mcfg, init_from = build_model_config(cfg)
    assert init_from == path
    assert mcfg.architecture == "qwen3_5" and mcfg.num_layers == hf.config.num_hidden_layers
    cfg.model["init_from"] = path + "-missing"
    with pytest.raises(ValueError, match="model.init_from: no such directory"):
        build_model_config(cfg)


def test_bf16_checkpoint_runs(hf_dir, tmp_path):
    """Real checkpoints are bf16: the round trip keeps the dtype, the model runs in bf16."""
    from safetensors.torch import load_file

    from lasp.models import from_hf, to_hf

    path, hf = hf_dir
    model = from_hf(path, dtype=torch.bfloat16)
    to_hf(model, tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "model.safetensors").values())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    ids = ids_for(32)
    with torch.no_grad():
        assert_close(hf(ids).logits, from_hf(tmp_path)(ids), rtol=2e-2, name="bf16 logits")


def test_convert_cli_errors(tmp_path, capsys):
    from lasp.models.convert_cli import main as convert_main

    assert convert_main(["--from-hf", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bench_compare_hf_same_loss(tmp_path):
    """``lasp bench model --compare-hf``: lasp and transformers time the same weights (equal first
    losses); models without a transformers implementation are marked unavailable."""
    from lasp.bench import model
    from lasp.bench.results import load_results

    argv = ["--models", "qwen3_5-tiny,linear", "--compare-hf", "--seq-len", "32", "--reps", "1", "--warmup", "1", "--out", str(tmp_path)]
    assert model.main(argv) == 0
    recs = {r["label"]: r for r in load_results(str(tmp_path))["records"]}
    lasp_run, hf_run = recs["qwen3_5-tiny"], recs["qwen3_5-tiny+hf"]
    assert lasp_run["status"] == hf_run["status"] == "ok" and lasp_run["tokens_per_s"] > 0 and hf_run["tokens_per_s"] > 0
    assert abs(lasp_run["first_loss"] - hf_run["first_loss"]) <= 1e-5 * hf_run["first_loss"]
    assert recs["linear+hf"]["status"] == "unavailable" and "qwen3_5" in recs["linear+hf"]["reason"]
    assert (tmp_path / "hf_speedup.png").exists()


def conditional_config(tie: bool, **text_overrides):
    """A tiny ``Qwen3_5Config`` (a ``Qwen3_5ForConditionalGeneration``: 2 text layers, a 1-block
    vision tower, multimodal RoPE keys); ``tie``: its top-level ``tie_word_embeddings``."""
    from transformers import Qwen3_5Config

    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
                linear_num_key_heads=2, linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4, num_position_embeddings=16)
    return Qwen3_5Config(text_config={**text, **text_overrides}, vision_config=vision, tie_word_embeddings=tie)


@pytest.mark.parametrize("text_tie,top_tie", [(True, False), (False, True)])
def test_conditional_generation_model(tmp_path, text_tie, top_tie):
    """A real (tiny) ``Qwen3_5ForConditionalGeneration``: text logits equal, the vision tower is
    skipped, and the top-level ``tie_word_embeddings`` decides the tying (as in transformers)."""
    from transformers import Qwen3_5ForConditionalGeneration

    from lasp.models import from_hf

    torch.manual_seed(0)
    hf = Qwen3_5ForConditionalGeneration(conditional_config(top_tie, tie_word_embeddings=text_tie)).eval()
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.config.tie_embeddings == top_tie
    ids = ids_for(12)
    with torch.no_grad():
        assert_close(hf(input_ids=ids).logits, model(ids), rtol=1e-4, name="logits")
