"""Training an MoE hybrid with expert parallelism on 4 gloo ranks: EP = 2 and 4 under ZeRO 0, 1
and 2 (SP = 2 x DP = 2, and SP = 1 x DP = 4), and EP = 1 under ZeRO-3, follow the EP = 1 ZeRO-1 run
(losses, the logged router losses, final weights), kill-and-resume under EP reproduces it, the export of an EP checkpoint
holds the same weights (a bf16 run's export holds its fp32 masters); ZeRO-3 with EP, and EP on a dense model, are refused by name (init_from with EP is not)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lasp.models import ModelConfig
from lasp.models.config import MOE_KEYS
from lasp.testing import assert_close
from lasp.train.config import RunConfig
from lasp.train.data import prepare, stdlib_sources

STEPS, RTOL = 6, 1e-4
MODEL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, layer_pattern="LS",
             linear_variant="lightning", rope_theta=10000.0, mlp="moe", num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=16, shared_expert_intermediate_size=16, router_aux_loss_coef=0.05, router_z_loss_coef=0.01)
# (name, sp_size, ep_size, zero_stage); the first is the reference
RUNS = [("ep1-zero1", 2, 1, 1), ("ep2-zero0", 2, 2, 0), ("ep2-zero2", 2, 2, 2), ("ep4-zero1", 2, 4, 1), ("sp1-ep4-zero2", 1, 4, 2),
        ("ep1-zero3", 2, 1, 3)]  # (ZeRO-3 takes the MoE model without expert parallelism)


def run_dict(tmp: str, name: str, sp: int, ep: int, zero: int, world: int = 4) -> dict:
    return {
        "model": dict(MODEL), "parallel": {"sp_size": sp, "ep_size": ep, "layout": "zigzag"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch_size": 4 * sp // world, "grad_accum": 2, "lr": 1e-2, "warmup": 2,
                  "min_lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0, "seed": 7, "zero_stage": zero, "dtype": "fp32"},
        "data": {"path": os.path.join(tmp, "data"), "pack_documents": False}, "checkpoint": {"every": 3},
        "sample": {"max_new_tokens": 0}, "out_dir": os.path.join(tmp, name),
    }


def _train(d: dict, **kw):
    from lasp.train.trainer import train

    torch.set_num_threads(1)
    return train(RunConfig.from_dict(d, source="test"), progress=False, sample=False, verbose=False, **kw)


def _job(rank: int, world: int, tmp: str) -> dict:
    out = {}
    for name, sp, ep, zero in RUNS:
        r = _train(run_dict(tmp, name, sp, ep, zero), keep_weights=True)
        out[name] = (r.losses, r.weights)
    d = run_dict(tmp, "bf16", 2, 2, 2)
    d["train"].update(dtype="bf16", steps=2)
    d["checkpoint"]["every"] = 2
    out["bf16"] = _train(d, keep_weights=True).weights
    d = run_dict(tmp, "resumed", 2, 2, 1)
    out["stopped"] = _train(d, stop_after=3).losses
    r = _train(d, resume=True, keep_weights=True)
    out["resumed"] = (r.losses, r.weights)
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spawn):
    tmp = str(tmp_path_factory.mktemp("train_moe"))
    prepare([], os.path.join(tmp, "data"), "bytes", files=stdlib_sources()[:20])
    return tmp, spawn(4).run(_job, tmp, timeout=600)[0]


def router_log(tmp: str, name: str) -> torch.Tensor:
    with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return torch.tensor([[r["aux_loss"], r["z_loss"]] for r in recs], dtype=torch.float64)


@pytest.mark.parametrize("name", [r[0] for r in RUNS[1:]])
def test_expert_parallel_run_follows_ep1(runs, name):
    tmp, out = runs
    (ref, ref_w), (got, got_w) = out["ep1-zero1"], out[name]
    ref, got = torch.tensor(ref, dtype=torch.float64), torch.tensor(got, dtype=torch.float64)
    assert len(got) == STEPS and got[-1] < got[0]
    assert ((got - ref).abs() / ref).max().item() <= RTOL, f"{name}: {got.tolist()} vs EP=1 {ref.tolist()}"
    assert_close(router_log(tmp, "ep1-zero1"), router_log(tmp, name), rtol=RTOL, name="aux_loss, z_loss")
    for k, w in ref_w.items():  # full weights: every EP rank's experts gathered
        assert_close(w, got_w[k], rtol=RTOL, name=k)


def test_resume_and_export_under_expert_parallelism(runs, tmp_path):
    from lasp.models import load_pretrained
    from lasp.train.export import export

    tmp, out = runs
    ref, ref_w = out["ep1-zero1"]
    assert out["stopped"] == pytest.approx(ref[:3], rel=RTOL)
    assert out["resumed"][0] == pytest.approx(ref[3:], rel=RTOL)
    exported = load_pretrained(export(os.path.join(tmp, "resumed", "checkpoints"), str(tmp_path / "export")).output)
    for k, w in exported.state_dict().items():
        assert_close(ref_w[k], w, rtol=RTOL, name=k)
        assert_close(out["resumed"][1][k], w, rtol=1e-6, name=k)


def test_bf16_expert_parallel_export_is_the_fp32_master(runs, tmp_path):
    """A bf16 run with EP = 2 under ZeRO-2 over 4 ranks (each EP rank's experts partitioned over its 2
    expert-data-parallel ranks): ``lasp export`` reads the fp32 masters, so the default (bf16) export
    equals the module's bf16 weights and the fp32 one rounds to them without being them; an expert
    tensor's rows, read alone, are those of the whole."""
    from lasp.models import LinearLlamaForCausalLM, load_pretrained
    from lasp.train.consolidate import checkpoint_sources
    from lasp.train.export import export

    tmp, out = runs
    module = out["bf16"]
    for dtype in (None, torch.float32):
        got = load_pretrained(export(os.path.join(tmp, "bf16", "checkpoints"), str(tmp_path / str(dtype)), dtype=dtype).output).state_dict()
        for k, w in module.items():
            assert torch.equal(got[k].to(torch.bfloat16).float(), w), k
        assert (dtype is None) == all(torch.equal(got[k].float(), w) for k, w in module.items())
    sources = checkpoint_sources(os.path.join(tmp, "bf16", "checkpoints"), "step00000002",
                                 LinearLlamaForCausalLM(ModelConfig(**MODEL), device="meta"))
    src = sources["layers.1.mlp.experts.gate_up_proj"]
    assert src.rows is not None
    for first, count in ((0, 1), (1, 2), (3, 1)):
        assert torch.equal(src.read_rows(first, count), src.read()[first:first + count])


def test_unsupported_combinations_are_refused_by_name(tmp_path):
    from lasp.train.preflight import check_experts

    d = run_dict(str(tmp_path), "x", 2, 2, 3)
    with pytest.raises(ValueError, match=r"train\.zero_stage=3 .*parallel\.ep_size=2"):
        RunConfig.from_dict(d, source="test")
    dense = {k: v for k, v in MODEL.items() if k not in MOE_KEYS and k != "mlp"}
    with pytest.raises(ValueError, match="num_experts is a mixture-of-experts key, but mlp is 'dense'"):
        ModelConfig.from_dict({**dense, "num_experts": 16})
    for model, why in ((dense, "parallel.ep_size=4 needs a mixture-of-experts model"),
                       ({**MODEL, "num_experts": 6}, "must divide model.num_experts=6")):
        cfg = RunConfig.from_dict({**run_dict(str(tmp_path), "x", 2, 4, 1), "model": model}, source="test")
        with pytest.raises(ValueError, match=why):
            check_experts(cfg, ModelConfig.from_dict(cfg.model), None)
    cfg = RunConfig.from_dict(run_dict(str(tmp_path), "x", 2, 4, 1), source="test")
    check_experts(cfg, ModelConfig.from_dict(cfg.model), str(tmp_path))  # init_from with EP: each rank reads its experts (test_hf_moe)
