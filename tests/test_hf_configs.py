"""Hugging Face configs never misread (issue 24): RoPE settings read as transformers reads them
and YaRN implemented (logits equal transformers' models built from its own config objects, both
legacy spellings), the ``rope_scaling`` config key, one-line refusals (other rope types,
quantized checkpoints, missing shards, MoE settings lasp cannot hold), a tied checkpoint shipping ``lm_head.weight``,
and ``--like`` exports in a ``Qwen3_5ForConditionalGeneration``'s layout.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

from lasp.testing import assert_close

from test_qwen3_5 import VOCAB, conditional_config, ids_for, make_hf, sp_logits

transformers = pytest.importorskip("transformers")

#: Qwen's documented 1M-context recipe for Qwen3.5 (rope_theta 1e7, 262,144 native positions)
YARN = {"factor": 4.0, "original_max_position_embeddings": 262144}
YARN_TEXT = dict(rope_theta=1e7, partial_rotary_factor=0.5, max_position_embeddings=1048576)


def hf_rotary(cfg_dict: dict):
    """``(inv_freq, attention_scaling)`` transformers' Qwen3.5 text model uses for a config.json mapping."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    rotary = Qwen3_5TextRotaryEmbedding(Qwen3_5TextConfig.from_dict(copy.deepcopy(cfg_dict)))
    return rotary.inv_freq.double(), rotary.attention_scaling


def lasp_rotary(cfg_dict: dict):
    from lasp.models.hf_config import config_from_hf
    from lasp.models.rope import rope_frequencies

    cfg = config_from_hf(copy.deepcopy(cfg_dict))
    return rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)


BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=32, num_attention_heads=4,
            num_key_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
            max_position_embeddings=4096)
ROPE_CASES = {
    "rope_scaling+top-level theta": dict(rope_scaling={"rope_type": "yarn", **YARN}, rope_theta=1e7),
    "rope_parameters with type": dict(rope_parameters={"type": "yarn", **YARN, "rope_theta": 1e7, "partial_rotary_factor": 1.0}),
    "rope_scaling replaces rope_parameters": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e7},
                                                 rope_scaling={"type": "yarn", "factor": 2.0}),
    "rope_type wins over type": dict(rope_parameters={"type": "yarn", "rope_type": "linear", "factor": 3.0}),
    "top-level original length wins": dict(rope_parameters={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
                                           original_max_position_embeddings=512),
    "yarn factor null: the lengths' ratio": dict(rope_parameters={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024}),
    "yarn every knob": dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16,
                                             "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False, "rope_theta": 5e5}),
    "yarn attention_factor": dict(rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                                                   "attention_factor": 1.5}),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 1e6}),
    "top-level theta and fraction": dict(rope_theta=123456.0, partial_rotary_factor=0.5),
    "rope_parameters theta wins": dict(rope_parameters={"rope_theta": 7e5}, rope_theta=123.0, partial_rotary_factor=0.75),
    "default, mrope keys": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
}


def test_rope_settings_read_as_transformers_does():
    """Every spelling: lasp's frequencies and attention factor equal those of transformers'
    Qwen3.5 rotary embedding built from the same config.json mapping (flat and nested)."""
    from lasp.models.hf_config import config_from_hf

    for name, case in ROPE_CASES.items():
        d = {**BASE, **case}
        want, scale = hf_rotary(d)
        got, got_scale = lasp_rotary(d)
        assert_close(want, got, rtol=1e-6, name=f"{name}: inv_freq")
        assert abs(got_scale - scale) <= 1e-12, (name, got_scale, scale)
        nested = config_from_hf({"model_type": "qwen3_5", "text_config": copy.deepcopy(d)})  # no nested model_type
        assert nested == config_from_hf(copy.deepcopy(d)), name


@pytest.fixture(scope="module", params=["rope_scaling", "rope_parameters-type"])
def yarn_dir(request, tmp_path_factory):
    """A tiny Qwen3_5ForCausalLM built from transformers' config object with YaRN given in one
    legacy spelling, saved with that spelling in its config.json (save_pretrained normalises it)."""
    path = tmp_path_factory.mktemp(f"yarn-{request.param}")
    if request.param == "rope_scaling":
        rope = dict(rope_parameters=None, rope_scaling={"rope_type": "yarn", **YARN}, rope_theta=YARN_TEXT["rope_theta"],
                    partial_rotary_factor=YARN_TEXT["partial_rotary_factor"])
    else:
        rope = dict(rope_parameters={"type": "yarn", **YARN, "rope_theta": YARN_TEXT["rope_theta"],
                                     "partial_rotary_factor": YARN_TEXT["partial_rotary_factor"]})
    hf = make_hf(path, "gqa2-untied", max_position_embeddings=YARN_TEXT["max_position_embeddings"], **copy.deepcopy(rope))
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]
    config.update({k: v for k, v in rope.items() if v is not None})
    (path / "config.json").write_text(json.dumps(config))
    return str(path), hf


def test_yarn_logits_equal_transformers(yarn_dir, tmp_path):
    """lasp's YaRN logits equal transformers' (3.4% off here as plain RoPE, the old reading); the
    export writes it back as rope_parameters, which transformers reads as the same model."""
    from transformers import AutoModelForCausalLM

    from lasp.models import from_hf, to_hf

    path, hf = yarn_dir
    model = from_hf(path)
    assert model.config.rope_scaling == {"rope_type": "yarn", **YARN}
    ids = ids_for(48)
    with torch.no_grad():
        ref = hf(ids).logits
        assert_close(ref, AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits, rtol=1e-6, name="transformers' own reading")
        out = model(ids)
        assert_close(ref, out, rtol=1e-4, name="YaRN logits")
        model.config.rope_scaling = None
        plain = model(ids)
    assert ((plain - ref).norm() / ref.norm()).item() > 0.01  # the test can see a misread
    model.config.rope_scaling = {"rope_type": "yarn", **YARN}
    to_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert written == {"rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.5, **YARN}
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, ref)


def test_yarn_sp2_zigzag(spawn, yarn_dir):
    """RoPE at global positions: SP = 2 zigzag equals transformers' whole-sequence logits."""
    from lasp.parallel import unshard_sequence

    path, hf = yarn_dir
    ids = ids_for(32, seed=2)
    with torch.no_grad():
        ref = hf(ids).logits
    results = spawn(2).run(sp_logits, path, ids, "zigzag")
    assert_close(ref, unshard_sequence([r[0] for r in results], "zigzag"), rtol=1e-4, name="logits")


def test_rope_scaling_config_key(tmp_path):
    """``rope_scaling`` in a model config: normalised (``type`` -> ``rope_type``), round trip
    through to_dict / from_dict / YAML, errors naming the key."""
    from lasp.models import ModelConfig
    from lasp.models.hf_config import config_to_hf

    cfg = ModelConfig.from_yaml("configs/models/qwen3_5-tiny.yaml")
    d = {**cfg.to_dict(), "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 262144.0, "beta_fast": 16}}
    yarn = ModelConfig.from_dict(d)
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144, "beta_fast": 16.0}
    assert ModelConfig.from_dict(yarn.to_dict()) == yarn
    yarn.to_yaml(tmp_path / "m.yaml")
    assert ModelConfig.from_yaml(tmp_path / "m.yaml") == yarn
    assert config_to_hf(yarn)["rope_parameters"] == {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor,
                                                    "factor": 4.0, "original_max_position_embeddings": 262144, "beta_fast": 16.0}
    assert ModelConfig.from_dict({**d, "rope_scaling": {"rope_type": "default"}}).rope_scaling is None
    assert ModelConfig.from_dict({**d, "rope_scaling": {"rope_type": "linear", "factor": 2}}).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    bad = {
        "rope_scaling.rope_type must be one of \\['default', 'linear', 'yarn'\\].*'dynamic'": {"rope_type": "dynamic", "factor": 2.0},
        "rope_scaling.original_max_position_embeddings is required for rope_type 'yarn'": {"rope_type": "yarn", "factor": 4.0},
        "rope_scaling.low_freq_factor is not a key of rope_type 'yarn'": {"rope_type": "yarn", **YARN, "low_freq_factor": 1.0},
        "rope_scaling.factor must be float": {"rope_type": "linear", "factor": "big"},
        "rope_scaling.factor must be > 0": {"rope_type": "linear", "factor": 0},
        "rope_scaling must be dict, got .yarn.": "yarn",
    }
    for msg, value in bad.items():
        with pytest.raises(ValueError, match=f"^x: {msg}"):
            ModelConfig.from_dict({**d, "rope_scaling": value}, source="x")


def write_config(path, **changes) -> dict:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return config


def test_refusals_are_one_line(tmp_path, capsys):
    """Other rope types, quantized checkpoints (config or tensors), a missing shard, MoE settings
    lasp cannot hold, other model types and a missing key: one ValueError line each (the CLI prints
    it and exits 2)."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5MoeConfig, Qwen3NextConfig

    from lasp.models import from_hf
    from lasp.models.convert_cli import main as convert_main
    from lasp.models.hf_config import config_from_hf

    src = tmp_path / "hf"
    make_hf(src, "gqa4-tied").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(set(json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"].values()))
    base = json.loads((src / "config.json").read_text())

    def refused(d: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match) as e:
            config_from_hf(copy.deepcopy(d))
        assert "\n" not in str(e.value)

    for rope_type in ("dynamic", "longrope", "llama3", "proportional", "su"):
        refused({**base, "rope_parameters": {"rope_type": rope_type, "factor": 2.0}},
                rf"^config.json: rope_parameters.rope_type '{rope_type}' is not supported \(lasp implements default, linear, yarn\)")
    refused({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"^config.json: rope_scaling.rope_type 'dynamic' is not supported")
    refused({**base, "rope_parameters": {"rope_type": "yarn"}}, r"^config.json: rope_parameters.factor is required for rope_type 'yarn'")
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    refused({**base, "quantization_config": fp8},
            r"^config.json: quantized checkpoints are not supported \(quantization_config: fp8 e4m3 \[128, 128\]\); use the unquantized \(bf16\) release$")
    # MoE configs lasp cannot represent: one line naming the field (the supported ones: tests/test_hf_moe.py)
    moe = Qwen3_5MoeConfig(text_config={"num_hidden_layers": 2, "num_experts": 4, "num_experts_per_tok": 2}).to_dict()
    assert config_from_hf(copy.deepcopy(moe)).mlp == "moe"
    del moe["text_config"]["model_type"]  # the nested type missing: the parent's (qwen3_5_moe -> qwen3_5_moe_text)
    assert config_from_hf(copy.deepcopy(moe)).num_experts == 4
    refused({**moe, "text_config": {**moe["text_config"], "hidden_act": "gelu"}}, r"^config.json: hidden_act='gelu' is not supported")
    refused(Qwen3NextConfig(num_hidden_layers=2, shared_expert_intermediate_size=0).to_dict(),
            r"^config.json: shared_expert_intermediate_size=0 is not supported")
    refused({**base, "model_type": "qwen3_moe"}, r"^config.json: model_type must be one of qwen3_5 / .* got 'qwen3_moe'$")
    refused({k: v for k, v in base.items() if k != "intermediate_size"}, r"^config.json: the text config has no 'intermediate_size'$")
    from lasp.models import ModelConfig
    from lasp.models.hf_config import config_to_hf

    moe_cfg = ModelConfig.from_dict({**config_from_hf(copy.deepcopy(base)).to_dict(), "mlp": "moe", "num_experts": 4,
                                     "shared_expert_intermediate_size": 8, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match=r"^model: mlp_only_layers=\[0\] has no place in a Qwen3_5MoeForCausalLM .*architecture: qwen3_next"):
        config_to_hf(moe_cfg)
    assert config_to_hf(dataclasses.replace(moe_cfg, architecture="qwen3_next"))["mlp_only_layers"] == [0]

    # quantized tensors without a quantization_config: names or dtypes, before any tensor is read
    tensors = load_file(src / "model.safetensors")
    scale = {"model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(1, 1), "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(1, 1)}
    save_file({**tensors, **scale}, src / "model.safetensors")
    with pytest.raises(ValueError, match=r"quantized weights are not supported \(2 tensors such as 'model.layers.0.mlp.down_proj.weight_scale_inv', dtype F32\)"):
        from_hf(src)
    w = "model.layers.0.mlp.down_proj.weight"
    save_file({**tensors, w: tensors[w].to(torch.float8_e4m3fn)}, src / "model.safetensors")
    with pytest.raises(ValueError, match=rf"quantized weights are not supported \(1 tensors such as '{w}', dtype F8_E4M3\)"):
        from_hf(src)
    write_config(src, quantization_config=fp8)
    capsys.readouterr()
    assert convert_main(["--from-hf", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{src}/config.json: quantized checkpoints are not supported (quantization_config: fp8" in err

    # a shard the index lists but the directory lacks
    os.remove(tmp_path / "sharded" / shards[1])
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json lists shard\(s\) that are missing: {shards[1]}$"):
        from_hf(tmp_path / "sharded")
    assert convert_main(["--from-hf", str(tmp_path / "sharded"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"missing: {shards[1]}" in err


def test_tied_checkpoint_with_lm_head(tmp_path):
    """A tied checkpoint that ships ``lm_head.weight``: an equal copy is ignored (tied, as
    transformers ties); a different one is loaded untied with a warning, as transformers does."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lasp.models import from_hf

    make_hf(tmp_path, "gqa4-tied")
    tensors = load_file(tmp_path / "model.safetensors")
    ids = ids_for(16)
    for same in (True, False):
        head = tensors["model.embed_tokens.weight"].clone() if same else torch.randn(VOCAB, 32)
        save_file({**tensors, "lm_head.weight": head}, tmp_path / "model.safetensors")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == same  # transformers' choice
        if same:
            model = from_hf(tmp_path)
        else:
            with pytest.warns(UserWarning, match="lm_head.weight differs from model.embed_tokens.weight: loaded untied, as transformers does"):
                model = from_hf(tmp_path)
        assert model.config.tie_embeddings == same
        with torch.no_grad():
            assert_close(hf(ids).logits, model(ids), rtol=1e-4, name=f"logits (same head: {same})")


def make_conditional(path, tie: bool, seed: int = 0, **text_overrides):
    """Save a tiny random Qwen3_5ForConditionalGeneration to ``path`` in 3+ shards, plus an MTP
    tensor (transformers ignores ``mtp.*``); return the model."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    hf = Qwen3_5ForConditionalGeneration(conditional_config(tie, **text_overrides)).eval()
    hf.save_pretrained(path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shard = load_file(path / first)
    shard["mtp.fc.weight"] = torch.randn(4, 4, dtype=torch.bfloat16)
    save_file(shard, path / first, metadata={"format": "pt"})
    index["weight_map"]["mtp.fc.weight"] = first
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return hf


def all_tensors(path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_like_writes_the_conditional_generation_layout(tmp_path, capsys):
    """``lasp convert --from-lasp ... --like CG_DIR`` gives back CG_DIR's tensors bit for bit (text
    weights under model.language_model.*, vision tower and MTP copied through) and its config;
    ``to_hf(..., like=)`` of changed weights (and YaRN added) loads in transformers'
    Qwen3_5ForConditionalGeneration with lasp's logits and the vision weights untouched, also
    written in place over the directory it takes its layout from."""
    from transformers import Qwen3_5ForConditionalGeneration

    from lasp.models import from_hf, to_hf
    from lasp.models.convert_cli import main as convert_main
    from lasp.models.hf import write_hf
    from lasp.models.rope import check_rope_scaling
    from lasp.models.shards import model_sources

    like, lasp_dir, out = tmp_path / "cg", tmp_path / "lasp", tmp_path / "out"
    hf = make_conditional(like, tie=True)
    (like / "tokenizer.json").write_text("{}")
    original = all_tensors(like)
    assert convert_main(["--from-hf", str(like), "--output", str(lasp_dir)]) == 0
    assert convert_main(["--from-lasp", str(lasp_dir), "--output", str(out), "--like", str(like), "--max-shard-size", "40KB"]) == 0
    printed = capsys.readouterr().out
    assert "tensors copied through unchanged: model.visual.* (21), mtp.* (1)" in printed
    back = all_tensors(out)
    assert sorted(back) == sorted(original)
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    want, got = json.loads((like / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert got == want  # nesting, architectures, vision config, mrope keys: all as they were
    assert (out / "tokenizer.json").exists()

    model = from_hf(out)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.config.rope_scaling = check_rope_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})
    ids = ids_for(24)
    for target in (tmp_path / "new", out):  # a new directory, then in place over `like` itself
        written = to_hf(model, target, like=out, max_shard_size="40KB")
        assert written.copied_through == sorted(n for n in original if not n.startswith("model.language_model."))
        cg = Qwen3_5ForConditionalGeneration.from_pretrained(target).eval()
        assert cg.config.text_config.rope_parameters["rope_type"] == "yarn" and cg.config.text_config.rope_parameters["mrope_section"] == [2, 1, 1]
        with torch.no_grad():
            assert_close(cg(input_ids=ids).logits, model(ids), rtol=1e-4, name="text logits")
        for name, p in hf.model.visual.state_dict().items():
            assert torch.equal(cg.model.visual.state_dict()[name], p), name
        assert torch.equal(all_tensors(target)["mtp.fc.weight"], original["mtp.fc.weight"])
    # a model of other shapes, --like with --from-hf
    with pytest.raises(ValueError, match=r"^--like: .* is another model \(vocab_size 97, this one 98\)"):
        write_hf(tmp_path / "x", dataclasses.replace(model.config, vocab_size=98), model_sources(model), like=like)
    assert convert_main(["--from-hf", str(like), "--output", str(tmp_path / "y"), "--like", str(like)]) == 2
    assert "--like: only with --from-lasp" in capsys.readouterr().err
