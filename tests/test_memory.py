"""The memory estimate (``lasp model-info --memory``, :mod:`lasp.train.memory`) and the host offload
of the checkpointed layer inputs (``train.activation_offload``).

- each layer kind's saved activations (the closed form of :mod:`lasp.models.activation_memory`)
  equal a census of what autograd keeps, on one process and on two SP ranks (LASP-2, LASP-2H);
- a live point: the live tensors of a training step (forward, loss, backward) measured by the
  profiler against the estimate's activations + transient, with and without checkpointing;
- the estimate is within 25% of the peaks ``lasp bench memory`` measured with ``lasp train``
  (docs/bench/memory/results.json, recomputed with today's formulas);
- offload: the same losses as checkpointing alone (bitwise: one process, two SP ranks, and the
  measured ``lasp train`` runs), and the layer inputs leave the tensors saved on the device (a
  saved-tensor census).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.models.activation_memory import RankShape, layer_kind, layer_memory
from lasp.models.layers import rope_cos_sin
from lasp.parallel import global_positions
from lasp.testing import SavedTensorCensus, live_peak_bytes, saved_storage_bytes
from lasp.train.memory import estimate_memory, parse_size, zero_states

ROOT = os.path.join(os.path.dirname(__file__), "..")
RESULTS = os.path.join(ROOT, "docs", "bench", "memory", "results.json")
BASE = dict(vocab_size=256, hidden_size=96, intermediate_size=160, num_layers=4, num_heads=3, num_kv_heads=1,
            layer_pattern="LLLS", rope_theta=1e4)
QWEN = dict(BASE, architecture="qwen3_5", linear_variant="gated_deltanet", num_heads=4, num_kv_heads=2, attention_head_dim=32,
            partial_rotary_factor=0.25, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=24)
MODELS = {
    "lightning": dict(BASE, linear_variant="lightning"),
    "gated_deltanet": dict(BASE, linear_variant="gated_deltanet"),
    "qwen3_5": QWEN,
}


def test_parse_size():
    assert parse_size("1M") == 1 << 20 and parse_size("256K") == 256 << 10 and parse_size("8192") == 8192
    assert parse_size("141GiB") == 141 << 30 and parse_size("80GB") == 80 * 10**9 and parse_size("2gib") == 2 << 30
    with pytest.raises(ValueError, match="size like"):
        parse_size("lots")


def test_zero_states_follow_deepspeed_layout():
    P, N = 1_000_000, 4
    z0 = zero_states(P, 0, 2, N, "cuda", 10)
    assert (z0["parameters"], z0["gradients"], z0["optimizer_states"]) == (2 * P, 2 * P, 12 * P)
    z3 = zero_states(P, 3, 2, N, "cuda", 10)
    assert (z3["parameters"], z3["gradients"], z3["optimizer_states"]) == (2 * P // N, 2 * P // N, 12 * P // N)
    assert zero_states(P, 2, 4, N, "cpu", 10)["gradients"] == 4 * P // N
    assert zero_states(P, 0, 4, N, "cpu", 10)["optimizer_states"] == 8 * P  # fp32: the parameters are the master


def _layer_census(rank: int, world: int, model: str, dtype_bytes: int, T: int):
    """Per layer: (kind, bytes its autograd graph saves beyond its input, the estimate's)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(MODELS[model])
    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    m = LinearLlamaForCausalLM(cfg).to(dtype)
    group = dist.group.WORLD if world > 1 else None
    t = T // world
    pos = global_positions(T, rank, world, "zigzag") if world > 1 else torch.arange(T)
    cos, sin = rope_cos_sin(pos, cfg.rope_dim, cfg.rope_theta)
    shape = RankShape(1, T, world, rank, "zigzag", dtype_bytes, "torch")
    out = []
    for i in (0, cfg.num_layers - 1):  # a linear layer, the softmax layer
        x = torch.randn(1, t, cfg.hidden_size, dtype=dtype, requires_grad=True)
        y, _ = m.layers[i](x, cos, sin, group, "zigzag")
        got = saved_storage_bytes(y, exclude=[*m.parameters(), x, cos, sin])
        kind = layer_kind(cfg, cfg.layer_types[i])
        out.append((kind, got, layer_memory(cfg, kind, shape).saved))
    return out


@pytest.mark.parametrize("dtype_bytes", [4, 2], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_layer_saved_bytes_match_census_one_process(model, dtype_bytes):
    for kind, got, est in _layer_census(0, 1, model, dtype_bytes, 256):
        assert abs(est / got - 1) <= 0.10, f"{model} {kind}: estimate {est} vs census {got} bytes"


def test_layer_saved_bytes_match_census_two_ranks(spawn):
    for model, dtype_bytes in (("lightning", 4), ("qwen3_5", 2)):
        for rank_out in spawn(2).run(_layer_census, model, dtype_bytes, 256):
            for kind, got, est in rank_out:
                assert abs(est / got - 1) <= 0.10, f"{model} {kind}: estimate {est} vs census {got} bytes"


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_live_training_step_within_the_estimate(ckpt):
    """A cheap live point: one forward + loss + backward of the 1/4 hybrid on packed documents;
    the live tensors' peak against the estimate's activations + largest transient."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(MODELS["lightning"], hidden_size=128, intermediate_size=256, num_heads=2))
    T = 1024
    model = LinearLlamaForCausalLM(cfg)
    model.set_activation_checkpointing(ckpt)
    ids, labels = torch.randint(0, 256, (2, 1, T))
    cu = torch.tensor([0, 300, 700, T])

    def step():
        model(ids, cu_seqlens=cu, labels=labels).backward()  # the trainer's path: the fused loss

    got = live_peak_bytes(step)
    est = estimate_memory(cfg, seq_len=T, zero=0, dtype="fp32", device="cpu", documents=True,
                          activation_checkpointing=ckpt)
    want = est.activations + est.transient + est.gradients  # the parameters' gradients appear in this step
    assert abs(want / got - 1) <= 0.25, f"estimate {want / 2**20:.1f} MiB vs live peak {got / 2**20:.1f} MiB"


def test_estimate_within_25_percent_of_measured_peaks():
    """``lasp bench memory``'s points (``lasp train`` runs on this CPU, rank 0's max RSS), each
    estimated again with today's formulas."""
    from lasp.bench.memory import estimate_point

    with open(RESULTS, encoding="utf-8") as f:
        rows = json.load(f)["points"]
    assert len(rows) >= 3 and len({(r["setup"]["seq_len"], r["setup"]["sp"], r["setup"]["zero"]) for r in rows}) >= 3
    for r in rows:
        est = estimate_point(r["name"], loss=r["setup"]["loss"]).total
        measured = r["measured"]["peak_memory_mb"] * 2**20
        assert abs(est / measured - 1) <= 0.25, f"{r['name']}: estimate {est / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB"
    by_name = {r["name"]: r["measured"] for r in rows}
    # the same run with train.activation_offload: the same losses (lasp train, SP = 2, ZeRO-2)
    assert by_name["sp2-zero2-fp32-offload"]["losses"] == by_name["sp2-zero2-fp32-ckpt"]["losses"]


def _offload_losses(rank: int, world: int, offload: bool, steps: int = 2):
    """Losses of ``steps`` AdamW steps of the 1/4 hybrid with checkpointing (and offload), on
    ``world`` SP ranks (zigzag); the first step's saved-tensor census; the model."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(MODELS["lightning"], hidden_size=48))
    model = LinearLlamaForCausalLM(cfg)
    model.set_activation_checkpointing(True, offload=offload)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels = torch.randint(0, 256, (2, 2, 128), generator=torch.Generator().manual_seed(1))
    group = dist.group.WORLD if world > 1 else None
    if world > 1:
        from lasp.parallel import shard_sequence

        ids, labels = (shard_sequence(x, rank, world, "zigzag") for x in (ids, labels))
    losses, census = [], SavedTensorCensus(exclude=list(model.parameters()))
    for step in range(steps):
        with census if step == 0 else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = model(ids, group=group, layout="zigzag", labels=labels, loss_reduction="mean")
        loss.backward()
        if world > 1:  # replicated weights: the SP ranks' gradients summed (each rank's loss is its shard's mean)
            for p in model.parameters():
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, census.bytes.get("cpu", 0), model


def test_offload_same_losses_and_inputs_leave_the_device():
    ref, ref_saved, _ = _offload_losses(0, 1, False)
    got, got_saved, model = _offload_losses(0, 1, True)
    assert got == ref  # bitwise: the inputs come back exactly
    cfg = model.config
    x = 2 * 128 * cfg.hidden_size * 4  # one layer's input [2, 128, hidden] fp32
    rope = 2 * 128 * (cfg.rope_dim // 2) * 4  # cos, sin
    per_step = model.activation_offload.packed_bytes // 2
    assert per_step == cfg.num_layers * (x + rope)
    # the census of what stays saved outside the offloaded calls: the layer inputs are gone from it
    # (without offload the layers' shared cos/sin are saved once, by the first checkpoint)
    assert ref_saved - got_saved == cfg.num_layers * x + rope


def _offload_losses_only(rank: int, world: int, offload: bool):
    return _offload_losses(rank, world, offload)[0]


def test_offload_same_losses_two_sp_ranks(spawn):
    ref = spawn(2).run(_offload_losses_only, False)
    assert spawn(2).run(_offload_losses_only, True) == ref


def test_model_info_memory_cli(capsys):
    from lasp.models.info import main

    path = os.path.join(ROOT, "configs", "models", "qwen3_5-text-default.yaml")
    args = [path, "--memory", "--seq-len", "256K,1M", "--sp", "8", "--zero", "3", "--dtype", "bf16", "--activation-checkpointing",
            "--device-memory", "141GiB", "--loss", "fused"]
    assert main(args + ["--json"]) == 0
    ests = json.loads(capsys.readouterr().out)["estimates"]
    assert [e["setup"]["tokens_per_rank"] for e in ests] == [32768, 131072]
    assert ests[0]["total"] < ests[1]["total"] and ests[0]["fits"] is True
    assert ests[1]["activations_checkpointing"] < ests[1]["activations_no_checkpointing"]
    assert main(args) == 0
    assert "largest transient" in capsys.readouterr().out
    assert main([path, "--memory", "--seq-len", "1M", "--sp", "3"]) == 2  # 1M tokens do not shard over 3 ranks


def test_bench_memory_reestimate(tmp_path, capsys):
    """``lasp bench memory --reestimate``: today's estimate of the committed measurements (no run)."""
    import shutil

    from lasp.bench.memory import main

    shutil.copy(RESULTS, tmp_path / "results.json")
    assert main(["--out", str(tmp_path), "--reestimate"]) == 0
    assert "sp2-zero3-bf16" in (tmp_path / "results.md").read_text()
    with open(tmp_path / "results.json", encoding="utf-8") as f:
        assert all(abs(r["ratio"] - 1) <= 0.25 for r in json.load(f)["points"])
