"""The trainer end to end on spawned gloo ranks: DeepSpeed ZeRO 1/2/3 with SP=4 and SP=2 x DP=2
follows the single-process SP=1 loss curve, also with packed documents (short documents of varied
lengths: ranks and micro-steps hold different numbers of counted tokens); kill-and-resume
reproduces the uninterrupted curve; export round trip; a bad world size is an error on every
rank before any collective.

DeepSpeed start-up is slow, so all 4-rank runs of a module share one pool job.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist

from lasp.spawn import RankError
from lasp.testing import assert_close
from lasp.train.config import RunConfig
from lasp.train.data import prepare, stdlib_sources

STEPS = 10
RTOL = 1e-4
MODEL = {  # tiny hybrid: one linear layer, one softmax layer (GQA 2/1)
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "layer_pattern": "LS",
    "linear_variant": "lightning",
    "rope_theta": 10000.0,
}
# (id, sp_size, layout, zero_stage): 4 ranks, global batch of 4 windows per step in every run
RUNS = [
    ("sp4-contiguous-zero1", 4, "contiguous", 1),
    ("sp4-zigzag-zero2", 4, "zigzag", 2),
    ("sp4-contiguous-zero3", 4, "contiguous", 3),
    ("sp2xdp2-zigzag-zero1", 2, "zigzag", 1),
    ("sp2xdp2-contiguous-zero2", 2, "contiguous", 2),
    ("sp2xdp2-zigzag-zero3", 2, "zigzag", 3),
]
RESUME_RUN = "sp2xdp2-zigzag-zero3"  # also the export source (a ZeRO-3 checkpoint)
WINDOWS_PER_STEP = 4
# packed documents (issue 15): (id, sp_size, layout, zero_stage) on the documents dataset
DOC_RUNS = [
    ("docs-sp4-zigzag-zero1", 4, "zigzag", 1),
    ("docs-sp2xdp2-contiguous-zero2", 2, "contiguous", 2),
]


def run_dict(tmp: str, name: str, sp: int, layout: str, zero: int, world: int) -> dict:
    dp = world // sp
    return {
        "model": dict(MODEL),
        "parallel": {"sp_size": sp, "layout": layout},
        "train": {
            "steps": STEPS, "seq_len": 32, "micro_batch_size": WINDOWS_PER_STEP // dp, "grad_accum": 2,
            "lr": 1e-2, "warmup": 3, "min_lr": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0, "seed": 7,
            "zero_stage": zero, "dtype": "fp32",
        },
        "data": {"path": os.path.join(tmp, "data"), "pack_documents": False},
        "checkpoint": {"every": 3},
        "sample": {"max_new_tokens": 0},
        "out_dir": os.path.join(tmp, name),
    }


def doc_run_dict(tmp: str, name: str, sp: int, layout: str, zero: int, world: int) -> dict:
    d = run_dict(tmp, name, sp, layout, zero, world)
    d["data"] = {"path": os.path.join(tmp, "docs"), "pack_documents": True}
    d["checkpoint"] = {"every": 0}
    return d


def _train(cfg_dict: dict, **kw):
    from lasp.train.trainer import train

    torch.set_num_threads(1)
    return train(RunConfig.from_dict(cfg_dict, source="test"), progress=False, sample=False, verbose=False, **kw)


def _four_rank_job(rank: int, world: int, tmp: str) -> dict:
    out: dict = {}
    for name, sp, layout, zero in RUNS:
        out[name] = _train(run_dict(tmp, name, sp, layout, zero, world)).losses
    for name, sp, layout, zero in DOC_RUNS:
        out[name] = _train(doc_run_dict(tmp, name, sp, layout, zero, world)).losses
    # kill-and-resume: same config as RESUME_RUN in a fresh out_dir, stopped after step 6
    name, sp, layout, zero = next(r for r in RUNS if r[0] == RESUME_RUN)
    d = run_dict(tmp, "resumed", sp, layout, zero, world)
    out["stopped"] = _train(d, stop_after=6).losses
    resumed = _train(d, resume=True, keep_weights=True)
    out["resumed"], out["resumed_weights"] = resumed.losses, resumed.weights
    # the reference of the 4 -> 2 ranks reshard: this ZeRO-3 checkpoint continued 2 steps on 4 ranks
    if rank == 0:
        for copy in ("reshard-ref", "reshard"):
            shutil.copytree(os.path.join(tmp, "resumed"), os.path.join(tmp, copy))
    dist.barrier()
    more = run_dict(tmp, "reshard-ref", sp, layout, zero, world)
    more["train"]["steps"] = STEPS + 2
    out["reshard-ref"] = _train(more, resume=True, reset_schedule=True).losses
    return out if rank == 0 else {}


def _two_rank_reshard(rank: int, world: int, tmp: str) -> list[float]:
    name, sp, layout, zero = next(r for r in RUNS if r[0] == RESUME_RUN)
    d = run_dict(tmp, "reshard", sp, layout, zero, world)  # SP=2 x DP=1: twice the micro-batch, the same 4 windows per step
    d["train"]["steps"] = STEPS + 2
    return _train(d, resume=True, reset_schedule=True, reshard=True).losses


def _one_rank_job(rank: int, world: int, tmp: str) -> dict:
    out = {"reference": _train(run_dict(tmp, "reference", 1, "contiguous", 0, world)).losses}
    out["docs-reference"] = _train(doc_run_dict(tmp, "docs-reference", 1, "contiguous", 0, world)).losses
    return out


def write_documents(path: str, n: int = 400, seed: int = 0) -> None:
    """Short text documents of varied lengths (1 to 60 bytes; windows are 33 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(path)
    for d in range(n):
        words = rng.choice(["def", "x", "return", "(", ")", ":", " ", "\n", "class", "=", "1"], size=rng.integers(1, 20))
        with open(os.path.join(path, f"{d:04d}.py"), "w") as f:
            f.write("".join(words)[: int(rng.integers(1, 61))])


def _bad_world_job(rank: int, world: int, tmp: str) -> None:
    d = run_dict(tmp, "bad", 3, "contiguous", 1, world)
    d["train"]["seq_len"] = 36
    _train(d)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spawn):
    tmp = str(tmp_path_factory.mktemp("train"))
    prepare([], os.path.join(tmp, "data"), "bytes", files=stdlib_sources()[:20])
    write_documents(os.path.join(tmp, "doc-files"))
    prepare([os.path.join(tmp, "doc-files")], os.path.join(tmp, "docs"), "bytes")
    one = spawn(1).run(_one_rank_job, tmp, timeout=300)[0]
    results = spawn(4).run(_four_rank_job, tmp, timeout=900)[0]
    results.update({k: v for k, v in one.items() if k.startswith("docs-")})
    return tmp, one["reference"], results


def assert_follows(ref: list[float], out: list[float], name: str) -> None:
    ref, out = torch.tensor(ref, dtype=torch.float64), torch.tensor(out, dtype=torch.float64)
    assert len(out) == STEPS
    assert torch.isfinite(out).all()
    assert out[-1] < out[0], "the loss must go down"
    assert ((out - ref).abs() / ref.abs()).max().item() <= RTOL, f"{name}: {out.tolist()} vs SP=1 {ref.tolist()}"


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_loss_curve_matches_sp1(runs, name):
    _, reference, results = runs
    assert_follows(reference, results[name], name)


@pytest.mark.parametrize("name", [r[0] for r in DOC_RUNS])
def test_packed_documents_loss_curve_matches_sp1(runs, name):
    """Packed documents (cu_seqlens in every operator, per-document RoPE, labels that never cross a
    document): the exact global token mean over SP x DP and micro-steps follows SP = 1."""
    _, _, results = runs
    assert_follows(results["docs-reference"], results[name], name)
    assert results["docs-reference"] != results[RUNS[0][0]]


def test_kill_and_resume_reproduces_the_curve(runs):
    tmp, _, results = runs
    full = results[RESUME_RUN]
    assert len(results["stopped"]) == 6 and len(results["resumed"]) == STEPS - 6
    got = torch.tensor(results["stopped"] + results["resumed"], dtype=torch.float64)
    want = torch.tensor(full, dtype=torch.float64)
    assert ((got - want).abs() / want.abs()).max().item() <= RTOL
    with open(os.path.join(tmp, "resumed", "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step{STEPS:08d}"


def test_resume_on_half_the_ranks_through_a_universal_checkpoint(runs, spawn):
    """Issue 23: a ZeRO-3 checkpoint of 4 ranks continues on 2 (`--resume --resume-reshard`:
    DeepSpeed's universal checkpoint, optimizer state included) with the losses of the 4-rank
    continuation; without the flag it is refused, naming it."""
    tmp, _, results = runs
    from lasp.train.resume import plan_start

    with pytest.raises(ValueError, match="written by 4 ranks, this run has 2 .* add --resume-reshard"):
        plan_start(RunConfig.from_dict(run_dict(tmp, "reshard", 2, "zigzag", 3, 2), source="test"), world=2, resume=True)
    got = spawn(2).run(_two_rank_reshard, tmp, timeout=300)[0]
    assert_close(torch.tensor(results["reshard-ref"]), torch.tensor(got), rtol=RTOL, name="losses after the reshard")
    assert len(got) == 2 and not any(n.startswith(".universal-") for n in os.listdir(os.path.join(tmp, "reshard", "checkpoints")))


def test_first_loss_is_the_plain_cross_entropy(runs):
    """The trainer's fused loss (``model(..., labels=...)``, issue 21) at step 1 is ``F.cross_entropy``
    of the initial model's logits over the step's global batch: on one process and under ZeRO-3."""
    import torch.nn.functional as F

    from lasp.models import LinearLlamaForCausalLM, ModelConfig
    from lasp.train.data import BatchSpec, TokenDataset, micro_batch

    tmp, reference, results = runs
    torch.manual_seed(7)  # the run's seed: the trainer's initial weights
    model = LinearLlamaForCausalLM(ModelConfig.from_dict(MODEL))
    data, spec = TokenDataset(os.path.join(tmp, "data")), BatchSpec(32, WINDOWS_PER_STEP, 2, 1, 7)
    total, count = 0.0, 0
    with torch.no_grad():
        for micro in range(2):
            ids, labels = micro_batch(data, spec, 0, micro, 0, 0, 1, "contiguous")
            total += F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    plain = total / count
    for name, loss in [("SP=1", reference[0])] + [(n, results[n][0]) for n, *_, zero in RUNS if zero == 3]:
        assert abs(loss - plain) <= 1e-5 * plain, f"{name}: step-1 loss {loss} vs plain {plain}"


def test_export_round_trip_same_logits(runs):
    from lasp.models import LinearLlamaForCausalLM, ModelConfig, load_pretrained
    from lasp.train.export import main as export_main

    tmp, _, results = runs
    out_dir = os.path.join(tmp, "exported")
    assert export_main(["--checkpoint", os.path.join(tmp, "resumed", "checkpoints"), "--output", out_dir]) == 0
    exported = load_pretrained(out_dir)
    trained = LinearLlamaForCausalLM(ModelConfig.from_dict(MODEL))
    trained.load_state_dict(results["resumed_weights"])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(trained(ids), exported(ids), rtol=1e-6, name="logits")


def test_bad_world_size_errors_on_every_rank(runs, spawn):
    tmp = runs[0]
    with pytest.raises(RankError) as err:
        spawn(4).run(_bad_world_job, tmp, timeout=120)
    msg = str(err.value)
    for r in range(4):
        assert f"rank {r} raised" in msg
    assert "parallel.sp_size=3 must divide the world size 4" in msg
