"""Fine-tuning a converted Qwen3.5 checkpoint: ``lasp convert`` / ``model.init_from`` under ZeRO-1
and ZeRO-3 with SP=2 (zigzag) follow the single-process SP=1 run for five steps, and step 1's
loss is the pretrained model's loss (the weights were loaded, not a random init). The ZeRO-3 run
gets fresh processes, as ``lasp train`` does: ``deepspeed.zero.Init`` must not rely on an earlier
run having initialised ``deepspeed.comm`` (issue 23 F1).

Export: ``lasp export --format hf`` of the fine-tuned checkpoints loads in transformers with the
same logits; a bf16 run (ZeRO-2, one step, from a bf16 conversion) exports bf16 shards under a
tiny ``--max-shard-size`` with an index, the bos/eos/pad ids and every tokenizer file of its
``init_from`` directory, each tensor its fp32 master rounded once; the streamed consolidation
equals DeepSpeed's ``zero_to_fp32`` under ZeRO 1, 2 and 3.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lasp.spawn import SpawnedGroup
from lasp.train.data import prepare, stdlib_sources

from test_train import _train
from test_weights_io import COMPANIONS, write_companions

transformers = pytest.importorskip("transformers")

STEPS = 5
RTOL = 1e-4
RUNS = [("sp2-zero1-lasp-dir", 1, "lasp"), ("sp2-zero3-hf-dir", 3, "hf")]
BF16_RUN = ("sp2-zero2-bf16", 2, "lasp-bf16")  # not compared with SP=1: the export source


def run_dict(tmp: str, name: str, sp: int, zero: int, src: str, dtype: str = "fp32", steps: int = STEPS) -> dict:
    return {
        "model": {"init_from": os.path.join(tmp, src)},
        "parallel": {"sp_size": sp, "layout": "zigzag"},
        "train": {"steps": steps, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2, "warmup": 1,
                  "min_lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0, "seed": 3, "zero_stage": zero, "dtype": dtype},
        "data": {"path": os.path.join(tmp, "data")},
        "checkpoint": {"every": 0},
        "sample": {"max_new_tokens": 0},
        "out_dir": os.path.join(tmp, name),
    }


def _one(rank, world, tmp):
    return _train(run_dict(tmp, "reference", 1, 0, "lasp")).losses


def _run(rank, world, tmp, name, zero, src, dtype="fp32", steps=STEPS):
    return _train(run_dict(tmp, name, 2, zero, src, dtype, steps)).losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spawn):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from lasp.models.convert_cli import main as convert_main

    tmp = str(tmp_path_factory.mktemp("finetune"))
    hc = Qwen3_5TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_conv_kernel_dim=3, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=1, linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"],
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(hc).save_pretrained(os.path.join(tmp, "hf"))
    write_companions(os.path.join(tmp, "hf"))  # pad_token_id only in its generation_config.json
    assert convert_main(["--from-hf", os.path.join(tmp, "hf"), "--output", os.path.join(tmp, "lasp")]) == 0
    assert convert_main(["--from-hf", os.path.join(tmp, "hf"), "--output", os.path.join(tmp, "lasp-bf16"), "--dtype", "bf16"]) == 0
    prepare([], os.path.join(tmp, "data"), "bytes", files=stdlib_sources()[:10])
    ref = spawn(1).run(_one, tmp, timeout=300)[0]
    out = {}
    for name, zero, src in RUNS:
        if zero == 3:  # fresh processes: deepspeed.comm not initialised by an earlier run (issue 23 F1)
            with SpawnedGroup(2) as fresh:
                out[name] = fresh.run(_run, tmp, name, zero, src, timeout=600)[0]
        else:
            out[name] = spawn(2).run(_run, tmp, name, zero, src, timeout=600)[0]
    name, zero, src = BF16_RUN
    spawn(2).run(_run, tmp, name, zero, src, "bf16", 1, timeout=600)
    return tmp, ref, out


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_finetune_sp2_follows_sp1(runs, name):
    _, ref, out = runs
    ref, got = torch.tensor(ref, dtype=torch.float64), torch.tensor(out[name], dtype=torch.float64)
    assert len(got) == STEPS and torch.isfinite(got).all()
    assert ((got - ref).abs() / ref.abs()).max().item() <= RTOL, f"{name}: {got.tolist()} vs SP=1 {ref.tolist()}"


def test_first_loss_is_the_pretrained_models(runs):
    from lasp.models import load_pretrained
    from lasp.train.data import BatchSpec, TokenDataset, micro_batch

    tmp, ref, _ = runs
    model = load_pretrained(os.path.join(tmp, "lasp"))
    ids, labels = micro_batch(TokenDataset(os.path.join(tmp, "data")), BatchSpec(32, 2, 1, 1, 3), 0, 0, 0, 0, 1, "contiguous")
    with torch.no_grad():
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten()).item()
    assert abs(loss - ref[0]) <= 1e-5 * loss


def test_export_hf_loads_in_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from lasp.models import from_hf
    from lasp.testing import assert_close
    from lasp.train.export import main as export_main

    tmp, _, _ = runs
    ckpt = os.path.join(tmp, "sp2-zero3-hf-dir", "checkpoints")
    assert export_main(["--checkpoint", ckpt, "--output", str(tmp_path), "--format", "hf"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(hf(ids).logits, from_hf(tmp_path)(ids), rtol=1e-4, name="logits")


def _ckpt(tmp: str, run: str) -> str:
    return os.path.join(tmp, run, "checkpoints")


def test_export_bf16_run_sharded_hf(runs, tmp_path):
    """bf16 shards of at most --max-shard-size (tensor bytes, as Hugging Face counts them) with an
    index; config.json with the ids; every companion file copied; transformers' logits = lasp's."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lasp.models import from_hf
    from lasp.testing import assert_close
    from lasp.train.export import main as export_main

    tmp, _, _ = runs
    limit = 20_000
    assert export_main(["--checkpoint", _ckpt(tmp, BF16_RUN[0]), "--output", str(tmp_path), "--format", "hf",
                        "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    total = 0
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        assert sum(sizes) <= limit or len(sizes) == 1, (shard, sizes)
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        assert all(index["weight_map"][k] == shard for k in tensors)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    config = json.loads((tmp_path / "config.json").read_text())  # init_from is the lasp conversion: its generation_config's ids
    assert (config["dtype"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ("bfloat16", 1, [2, 5], 0)
    for name in COMPANIONS:
        assert (tmp_path / name).read_bytes() == open(os.path.join(tmp, "hf", name), "rb").read(), name
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert set(index["weight_map"]) == set(hf.state_dict()) - {"lm_head.weight"}  # tied
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(hf(ids).logits, from_hf(tmp_path, dtype=torch.float32)(ids), rtol=1e-4, name="logits")


def test_export_rounds_the_fp32_master_once(runs, tmp_path):
    """The default export of a bf16 run is its fp32 master copy rounded to bf16 once, bit for bit."""
    from safetensors.torch import load_file

    from lasp.train.export import main as export_main

    tmp, _, _ = runs
    ck = _ckpt(tmp, BF16_RUN[0])
    assert export_main(["--checkpoint", ck, "--output", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert export_main(["--checkpoint", ck, "--output", str(tmp_path / "bf16")]) == 0
    master, rounded = load_file(tmp_path / "fp32" / "model.safetensors"), load_file(tmp_path / "bf16" / "model.safetensors")
    assert sorted(master) == sorted(rounded)
    for name, m in master.items():
        assert m.dtype == torch.float32 and rounded[name].dtype == torch.bfloat16
        assert torch.equal(m.to(torch.bfloat16), rounded[name]), name
    # the master copy, not the bf16 module: a step of lr 1e-2 leaves most tensors off the bf16 grid
    assert sum(not torch.equal(m, m.to(torch.bfloat16).float()) for m in master.values()) >= len(master) // 2


@pytest.mark.parametrize("run", ["sp2-zero1-lasp-dir", BF16_RUN[0], "sp2-zero3-hf-dir"])
def test_streamed_consolidation_equals_deepspeeds(runs, run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lasp.models import LinearLlamaForCausalLM, ModelConfig
    from lasp.train.checkpoint import read_latest
    from lasp.train.consolidate import checkpoint_sources

    tmp, _, _ = runs
    ck = _ckpt(tmp, run)
    tag = read_latest(ck)
    model = LinearLlamaForCausalLM(ModelConfig.from_yaml(os.path.join(ck, tag, "model.yaml")), device="meta")
    ours = checkpoint_sources(ck, tag, model)
    theirs = get_fp32_state_dict_from_zero_checkpoint(ck, tag=tag)
    assert sorted(ours) == sorted(theirs)
    for name, src in ours.items():
        assert torch.equal(src.read(), theirs[name]), name
