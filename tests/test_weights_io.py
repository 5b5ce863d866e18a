"""Weight directories written and read one tensor at a time (``lasp.models.shards``): sizes, shards
with an index that ``load_pretrained`` reads back, ``lasp convert`` replacing the weights already in
its output (issue 23 F2) and copying every tokenizer file, and ``model.init_from`` under ZeRO 0-2
building the model in the training dtype (issue 21 item 4: no fp32 tensor for a bf16 run).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lasp.models import LinearLlamaForCausalLM, ModelConfig, load_pretrained, save_pretrained
from lasp.models.shards import parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: one of each kind of file that travels with the weights (contents are never parsed by lasp)
COMPANIONS = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}',
    "tokenizer_config.json": '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}',
    "special_tokens_map.json": '{"eos_token": "</s>"}',
    "added_tokens.json": '{"<pad>": 0}',
    "vocab.json": '{"a": 3}',
    "merges.txt": "#version: 0.2\na b\n",
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "generation_config.json": '{"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0}',
    "preprocessor_config.json": "{}",
}


def write_companions(path) -> None:
    for name, text in COMPANIONS.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(text)


def tiny_qwen() -> ModelConfig:
    return ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "qwen3_5-tiny.yaml"))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == parse_size(1000) == parse_size("1000B") == 1000 and parse_size("1.5kb") == 1500
    for bad in ("5 parsecs", "", "-1", "0"):
        with pytest.raises(ValueError, match="--max-shard-size"):
            parse_size(bad, "--max-shard-size")


def test_sharded_save_pretrained_loads_back(tmp_path):
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(tiny_qwen())
    written = save_pretrained(model, tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(written.files) > 1 and sorted(set(index["weight_map"].values())) == written.files
    assert index["metadata"]["total_size"] == written.total_size == sum(p.numel() * 4 for p in model.parameters())
    back = load_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, t in back.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, model.state_dict()[name].to(torch.bfloat16)), name
    # written again unsharded: the shards and the index go, the new file is what loads
    assert save_pretrained(model, tmp_path).removed == written.files + ["model.safetensors.index.json"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "model.yaml"]


def test_convert_replaces_old_weights_and_copies_companions(tmp_path):
    """Issue 23 F2: converting into a directory that holds another model's shards and index leaves
    neither behind (before: transformers loaded the new weights, from_hf the old ones)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lasp.models import from_hf
    from lasp.models.convert_cli import main as convert_main

    from test_qwen3_5 import make_hf

    src, lasp_dir, out = tmp_path / "hf", tmp_path / "lasp", tmp_path / "out"
    make_hf(src, "gqa2-untied", seed=0)
    write_companions(src)
    make_hf(tmp_path / "other", "gqa2-untied", seed=1).save_pretrained(out, max_shard_size="20KB")  # HF's own shards
    (out / "notes.txt").write_text("mine")
    assert (out / "model.safetensors.index.json").exists()
    assert convert_main(["--from-hf", str(src), "--output", str(lasp_dir)]) == 0
    assert convert_main(["--from-lasp", str(lasp_dir), "--output", str(out)]) == 0
    assert sorted(p for p in os.listdir(out) if "safetensors" in p) == ["model.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    want = load_file(src / "model.safetensors")
    assert load_file(out / "model.safetensors").keys() == want.keys()
    hf = AutoModelForCausalLM.from_pretrained(out).state_dict()
    ours = from_hf(out)
    for name, t in ours.state_dict().items():
        from lasp.models.hf import lasp_to_hf_name

        hf_name = lasp_to_hf_name(name, ours.config)
        assert torch.equal(hf[hf_name].reshape(t.shape), t) and torch.equal(want[hf_name].reshape(t.shape), t), name
    for d in (lasp_dir, out):
        for name, text in COMPANIONS.items():
            assert (d / name).read_text() == text, (d, name)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, [2, 5], 0)
    # and into a lasp directory holding another model's shards (and a stray HF config)
    save_pretrained(from_hf(tmp_path / "other"), lasp_dir, max_shard_size="20KB")
    (lasp_dir / "config.json").write_text("{}")
    assert convert_main(["--from-hf", str(src), "--output", str(lasp_dir)]) == 0
    assert sorted(p for p in os.listdir(lasp_dir) if "safetensors" in p or p.endswith(".json") and "config" in p) == [
        "generation_config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"]
    for name, t in load_pretrained(lasp_dir).state_dict().items():
        assert torch.equal(t, ours.state_dict()[name]), name


def test_convert_keeps_config_token_ids(tmp_path):
    """An HF source with its ids only in config.json: the lasp directory keeps them in its
    generation_config.json, and they come back in the HF config.json."""
    from lasp.models.convert_cli import main as convert_main

    from test_qwen3_5 import make_hf

    make_hf(tmp_path / "hf", "gqa4-tied")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "bos_token_id": 7, "eos_token_id": 8, "pad_token_id": None}))
    (tmp_path / "hf" / "generation_config.json").unlink(missing_ok=True)
    assert convert_main(["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "lasp")]) == 0
    assert json.loads((tmp_path / "lasp" / "generation_config.json").read_text()) == {"bos_token_id": 7, "eos_token_id": 8}
    assert convert_main(["--from-lasp", str(tmp_path / "lasp"), "--output", str(tmp_path / "back"), "--dtype", "bf16"]) == 0
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["bos_token_id"], back["eos_token_id"], back["dtype"]) == (7, 8, "bfloat16") and "pad_token_id" not in back


class CreatedTensors(TorchDispatchMode):
    """Records (dtype, numel) of every tensor an op creates off the meta device."""

    def __init__(self):
        super().__init__()
        self.created: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.created.append((t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_init_from_loads_in_the_training_dtype(tmp_path, zero):
    """A bf16 checkpoint for a bf16 run: every parameter handed to DeepSpeed is bf16 and no fp32
    tensor is made on the way; for an fp32 run, no fp32 tensor larger than one parameter."""
    from lasp.train.init_from import build_initial_model

    cfg = tiny_qwen()
    torch.manual_seed(0)
    save_pretrained(LinearLlamaForCausalLM(cfg), tmp_path, dtype=torch.bfloat16, max_shard_size="30KB")
    ref = load_pretrained(tmp_path).state_dict()
    with CreatedTensors() as rec:
        model = build_initial_model(cfg, str(tmp_path), zero, {"bf16": {"enabled": True}})
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    assert not [c for c in rec.created if c[0] == torch.float32]
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name
    with CreatedTensors() as rec:
        model = build_initial_model(cfg, str(tmp_path), zero, {"bf16": {"enabled": False}})
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert max(n for d, n in rec.created if d == torch.float32) == max(p.numel() for p in model.parameters())


def test_export_takes_the_checkpoints_own_tokenizer_first(tmp_path):
    """The tokenizer beside a checkpoint's weights (what lasp train saves) wins over the dataset's,
    which may have moved; a dataset's relative tokenizer path is read from its directory."""
    from lasp.train.export import dataset_tokenizer

    data, tag = tmp_path / "data", tmp_path / "step00000001"
    data.mkdir()
    tag.mkdir()
    (data / "header.json").write_text(json.dumps({"tokenizer": "tokenizer.json", "separator": 7}))
    (data / "tokenizer.json").write_text("{}")
    run = {"data": {"path": str(data)}}
    assert dataset_tokenizer(run, str(tag)) == (str(data / "tokenizer.json"), {"eos_token_id": 7})
    (tag / "tokenizer.json").write_text("{}")
    assert dataset_tokenizer(run, str(tag)) == (str(tag / "tokenizer.json"), {"eos_token_id": 7})
    (tag / "tokenizer.json").unlink()
    (data / "tokenizer.json").unlink()
    assert dataset_tokenizer(run, str(tag)) == (None, {"eos_token_id": 7})  # gone: no tokenizer, no error
    assert dataset_tokenizer({}, str(tag)) == (None, {})
