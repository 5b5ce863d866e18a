"""Fine-tuning a converted Qwen3.5 checkpoint: ``lasp convert`` / ``model.init_from`` under ZeRO-1
and ZeRO-3 with SP=2 (zigzag) follow the single-process SP=1 run for five steps, and step 1's
loss is the pretrained model's loss (the weights were loaded, not a random init). Also ``lasp
export --format hf`` of the fine-tuned checkpoint loads in transformers with the same logits.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lasp.train.data import prepare, stdlib_sources

from test_train import _train

transformers = pytest.importorskip("transformers")

STEPS = 5
RTOL = 1e-4
RUNS = [("sp2-zero1-lasp-dir", 1, "lasp"), ("sp2-zero3-hf-dir", 3, "hf")]


def run_dict(tmp: str, name: str, sp: int, zero: int, src: str) -> dict:
    return {
        "model": {"init_from": os.path.join(tmp, src)},
        "parallel": {"sp_size": sp, "layout": "zigzag"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-2, "warmup": 1,
                  "min_lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0, "seed": 3, "zero_stage": zero, "dtype": "fp32"},
        "data": {"path": os.path.join(tmp, "data")},
        "checkpoint": {"every": 0},
        "sample": {"max_new_tokens": 0},
        "out_dir": os.path.join(tmp, name),
    }


def _one(rank, world, tmp):
    return _train(run_dict(tmp, "reference", 1, 0, "lasp")).losses


def _two(rank, world, tmp):
    return {name: _train(run_dict(tmp, name, 2, zero, src)).losses for name, zero, src in RUNS}


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
    )
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(hc).save_pretrained(os.path.join(tmp, "hf"))
    assert convert_main(["--from-hf", os.path.join(tmp, "hf"), "--output", os.path.join(tmp, "lasp")]) == 0
    prepare([], os.path.join(tmp, "data"), "bytes", files=stdlib_sources()[:10])
    ref = spawn(1).run(_one, tmp, timeout=300)[0]
    out = spawn(2).run(_two, tmp, timeout=600)[0]
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
