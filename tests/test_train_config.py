"""Run configs and overrides, the LR schedule, the DeepSpeed config, crash-safe checkpoints,
metrics, and `lasp train` refusing bad input before any process starts (no DeepSpeed runs)."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from lasp.train import checkpoint
from lasp.train.config import RunConfig, apply_override
from lasp.train.data import prepare, stdlib_sources
from lasp.train.ds_config import build_deepspeed_config, lr_lambda
from lasp.train.main import main as train_main
from lasp.train.metrics import MetricsLogger, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny-hybrid.yaml")


def test_make_train_config_loads():
    cfg = RunConfig.from_yaml(TINY)
    assert cfg.parallel.sp_size == 2 and cfg.world_size == 4 and cfg.train.dtype == "fp32"
    assert cfg.train.zero_stage in (1, 2)
    assert cfg.model["layer_pattern"] == "LLLS"  # the model YAML path was resolved and loaded
    from lasp.models import ModelConfig

    ModelConfig.from_dict(cfg.model, source="tiny")


def test_overrides():
    cfg = RunConfig.from_yaml(TINY, ["train.steps=7", "train.lr=3e-4", "parallel.layout=contiguous", "model.num_layers=8", "data.path=null"])
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(3e-4)  # "3e-4" is a string to YAML 1.1
    assert cfg.parallel.layout == "contiguous" and cfg.model["num_layers"] == 8 and cfg.data.path is None


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=3", "unknown key 'train.stepz'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("train.steps=abc", "train.steps must be int"),
        ("train.seq_len=250", "train.seq_len=250 must be divisible by 4"),
        ("parallel.nproc=0", "parallel.nproc must be >= 1"),
        ("train.zero_stage=4", "train.zero_stage must be one of"),
        ("train.dtype=fp8", "train.dtype must be one of"),
        ("parallel.layout=spiral", "parallel.layout must be one of"),
        ("train", "expected dotted.key=value"),
    ],
    ids=["unknown-train-key", "unknown-top-key", "bad-int", "seq-len-zigzag", "nproc-zero", "zero-stage", "dtype", "layout", "no-equals"],
)
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ValueError) as err:
        RunConfig.from_yaml(TINY, [override])
    assert needle in str(err.value)


def test_model_yaml_unknown_key_names_it(tmp_path):
    cfg = RunConfig.from_yaml(TINY, ["model.hiden_size=64"])
    from lasp.models import ModelConfig

    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict(cfg.model, source="run:model")


def test_apply_override_nested():
    d = {"train": {"steps": 1}}
    apply_override(d, "train.steps=5")
    apply_override(d, "checkpoint.every=2")
    assert d == {"train": {"steps": 5}, "checkpoint": {"every": 2}}


def test_config_yaml_round_trip(tmp_path):
    cfg = RunConfig.from_yaml(TINY)
    cfg.to_yaml(str(tmp_path / "run.yaml"))
    again = RunConfig.from_dict(yaml.safe_load(open(tmp_path / "run.yaml")), source="round-trip")
    assert again == cfg


def test_lr_schedule_warmup_then_cosine_to_min():
    kw = dict(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [lr_lambda(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_lambda(0, steps=5, warmup=0, lr=1.0, min_lr=0.0) == pytest.approx(1.0)


def test_deepspeed_config():
    cfg = RunConfig.from_yaml(TINY, ["train.grad_accum=3", "train.zero_stage=3", "train.dtype=bf16"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 3 * 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["gradient_clipping"] == cfg.train.grad_clip


def test_deepspeed_json_example_is_accepted(tmp_path):
    example = os.path.join(ROOT, "configs", "deepspeed", "zero2-fp32.json")
    cfg = RunConfig.from_yaml(TINY, [f"deepspeed={example}"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["zero_optimization"]["stage"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=99"):
        build_deepspeed_config(RunConfig.from_yaml(TINY, [f"deepspeed={bad}"]), world_size=4)


# ---------------------------------------------------------------------------- checkpoints


class FakeEngine:
    """Writes a DeepSpeed-like checkpoint; ``crash`` makes the save die half-way."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        os.makedirs(os.path.join(save_dir, tag))
        open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "w").write("x")
        if self.crash:
            raise KeyboardInterrupt("killed mid-save")


def test_crash_mid_save_keeps_latest(tmp_path):
    d = str(tmp_path / "ck")
    checkpoint.save(FakeEngine(), d, 3, {"step": 3}, {"model.yaml": "a: 1\n"}, rank=0)
    assert checkpoint.read_latest(d) == "step00000003"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(crash=True), d, 6, {"step": 6}, {}, rank=0)
    assert checkpoint.read_latest(d) == "step00000003"  # the half-written step 6 is not "latest"
    assert os.path.isdir(os.path.join(d, ".tmp-step00000006"))
    checkpoint.save(FakeEngine(), d, 9, {"step": 9}, {}, rank=0)
    assert checkpoint.read_latest(d) == "step00000009"
    assert not any(n.startswith(".tmp-") for n in os.listdir(d))  # leftovers cleaned
    assert json.load(open(os.path.join(d, "step00000009", checkpoint.TRAINER_STATE)))["step"] == 9


def test_latest_naming_a_missing_dir_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step00000042")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        checkpoint.read_latest(str(tmp_path))


# ---------------------------------------------------------------------------- metrics


def test_metrics_jsonl_and_plot(tmp_path):
    log = MetricsLogger(str(tmp_path), rank=0, total_steps=3, progress=False)
    for s in range(1, 4):
        log.log(s, 5.0 - s, 1e-3, 100 * s, 1000.0, 0.1)
    png = log.close()
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert set(recs[0]) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "peak_memory_mb"}
    assert os.path.getsize(png) > 1000
    assert MetricsLogger(str(tmp_path / "r1"), rank=1, total_steps=3).close() is None
    assert not os.path.exists(tmp_path / "r1" / "metrics.jsonl")


# ---------------------------------------------------------------------------- `lasp train` bad input


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("d") / "data")
    prepare([], out, "bytes", files=stdlib_sources()[:3])
    return out


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--set", "data.path=/nonexistent/data"], "data.path: no such dataset directory"),
        (["--set", "train.seq_len=30"], "train.seq_len=30 must be divisible by 4 (2 * sp_size for the zigzag layout)"),
        (["--nproc", "3"], "parallel.sp_size=2 must divide the world size 3"),
        (["--set", "parallel.nproc=3"], "parallel.sp_size=2 must divide the world size 3"),
        (["--set", "DATA"], "corrupt data header"),
        (["--resume", "--set", "DATA"], "--resume: no intact checkpoint to resume from"),
    ],
    ids=["missing-data-path", "seq-len-not-divisible", "sp-not-dividing-world", "sp-not-dividing-nproc", "corrupt-header", "resume-without-checkpoint"],
)
def test_train_cli_refuses_bad_input_before_starting(tmp_path, small_data, capsys, extra, needle, monkeypatch):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    data = small_data
    if needle == "corrupt data header":
        data = str(tmp_path / "corrupt")
        os.makedirs(data)
        for name in ("tokens.bin", "header.json"):
            open(os.path.join(data, name), "wb").write(open(os.path.join(small_data, name), "rb").read())
        open(os.path.join(data, "header.json"), "w").write('{"format": "lasp-tokens", "dtype": "uint16"')
    extra = [f"data.path={data}" if a == "DATA" else a for a in extra]
    argv = ["--config", TINY, "--set", f"out_dir={tmp_path / 'run'}", "--set", f"data.path={data}", *extra]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # nothing started


def test_resume_with_another_world_size_or_seed_is_refused(tmp_path):
    d = str(tmp_path / "ck")
    checkpoint.save(FakeEngine(), d, 4, {"step": 4, "seed": 1, "world_size": 4}, {}, rank=0)
    assert checkpoint.check_resumable(d, 4, 1)["step"] == 4
    with pytest.raises(ValueError, match="written by 4 ranks, this run has 2"):
        checkpoint.check_resumable(d, 2, 1)
    with pytest.raises(ValueError, match="train.seed=1, the config says 5"):
        checkpoint.check_resumable(d, 4, 5)


def test_metrics_resume_drops_redone_steps(tmp_path):
    log = MetricsLogger(str(tmp_path), rank=0, total_steps=6, progress=False)
    for s in range(1, 5):
        log.log(s, 5.0 - s, 1e-3, 100 * s, 1000.0, 0.1)
    log.close(plot=False)
    log = MetricsLogger(str(tmp_path), rank=0, total_steps=6, start_step=3, progress=False)  # resumed from step 3
    log.log(4, 0.5, 1e-3, 400, 1000.0, 0.1)
    log.close(plot=False)
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4] and json.loads(lines[-1])["loss"] == 0.5


def test_manifest_catches_corruption_and_resaving_a_step_keeps_the_old_until_the_new_is_in(tmp_path):
    d = str(tmp_path / "ck")
    for step in (2, 4):
        checkpoint.save(FakeEngine(), d, step, {"step": step}, {"model.yaml": "a: 1\n"}, rank=0)
    tag_dir = os.path.join(d, "step00000004")
    assert checkpoint.verify(tag_dir) is None
    shard = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    open(shard, "w").write("y")  # same size, other bytes
    assert "does not match its checksum" in checkpoint.verify(tag_dir)
    assert checkpoint.find_resumable(d)[0] == "step00000002"
    os.remove(shard)
    assert "is missing" in checkpoint.verify(tag_dir)
    # a crash while re-saving step 4 leaves the damaged step 4 and the intact step 2 alone
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(crash=True), d, 4, {"step": 4}, {}, rank=0)
    assert checkpoint.list_tags(d) == ["step00000004", "step00000002"] and checkpoint.verify(os.path.join(d, "step00000002")) is None
    checkpoint.save(FakeEngine(), d, 4, {"step": 4}, {}, rank=0)
    assert checkpoint.find_resumable(d) == ("step00000004", [])
    assert not [n for n in os.listdir(d) if n.startswith(".")]  # no temporary or retired directory left
