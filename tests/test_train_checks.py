"""Issue 13 items 7-11: every bad input is a clear error, on every rank, before training."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from lasp.spawn import RankError
from lasp.train.config import RunConfig
from lasp.train.data import prepare, stdlib_sources
from lasp.train.main import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny-hybrid.yaml")
SMALL = ["parallel.sp_size=1", "parallel.nproc=1", "train.seq_len=64", "train.steps=2", "sample.max_new_tokens=0", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("checks") / "data")
    prepare([], out, "bytes", files=stdlib_sources()[:3])
    return out


def _argv(tmp_path, data, *sets):
    items = [*SMALL, f"data.path={data}", f"out_dir={tmp_path / 'run'}", *sets]
    return ["--config", TINY] + [a for s in items for a in ("--set", s)]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("sample.temperature=-1", "sample.temperature must be finite and >= 0"),
        ("train.seed=-1", "train.seed must be an integer"),
        ("train.weight_decay=-5", "train.weight_decay must be finite and >= 0"),
        ("train.grad_clip=-1", "train.grad_clip must be finite and >= 0"),
        ("train.lr=.inf", "train.lr must be finite and > 0"),
        ("checkpoint.dir=/proc/nope", "checkpoint.dir: cannot write '/proc/nope'"),
        ("out_dir=/proc/nope", "out_dir: cannot write '/proc/nope'"),
    ],
    ids=["temperature", "seed", "weight-decay", "grad-clip", "lr-inf", "checkpoint-dir", "out-dir"],
)
def test_bad_values_name_the_key_before_anything_starts(tmp_path, small_data, capsys, monkeypatch, override, needle):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    assert train_main(_argv(tmp_path, small_data, override)) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not os.path.exists(tmp_path / "run")  # nothing started


def test_every_failing_rank_prints_its_error_with_rank_and_host(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under a launcher: rank 1 of 2, its data path missing
    assert train_main(_argv(tmp_path, "/nonexistent/data", "parallel.nproc=2")) == 2
    err = capsys.readouterr().err
    assert f"rank 1 on {socket.gethostname()}: error: data.path: no such dataset directory" in err


def _two_datasets_job(rank: int, world: int, tmp: str) -> None:
    from lasp.train.trainer import train

    d = {
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2},
        "parallel": {"sp_size": 1},
        "train": {"steps": 1, "seq_len": 32, "micro_batch_size": 1},
        "data": {"path": os.path.join(tmp, f"data{rank}")},  # rank 1 reads another dataset
        "sample": {"max_new_tokens": 0},
        "out_dir": os.path.join(tmp, "run"),
    }
    train(RunConfig.from_dict(d, source="test"), progress=False, sample=False, verbose=False)


def test_ranks_reading_different_datasets_fail_before_training(tmp_path, spawn):
    for r in range(2):
        prepare([], str(tmp_path / f"data{r}"), "bytes", files=stdlib_sources()[r : r + 2])
    with pytest.raises(RankError) as err:
        spawn(2).run(_two_datasets_job, str(tmp_path), timeout=120)
    msg = str(err.value)
    assert "rank 0 raised" in msg and "rank 1 raised" in msg and "rank 1 sees a different dataset than rank 0" in msg
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_token_ids_beyond_the_model_vocab_are_refused_before_start(tmp_path, small_data, capsys, monkeypatch):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    import json

    import numpy as np

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokens.bin").write_bytes((np.arange(300, dtype=np.uint16) % 200).tobytes())
    (bad / "header.json").write_text(json.dumps({"format": "lasp-tokens", "dtype": "uint16", "num_tokens": 300, "vocab_size": 100, "max_token_id": 199}))
    assert train_main(_argv(tmp_path, str(bad), "model.vocab_size=128")) == 2
    assert "holds token id 199, but the model's vocab_size is 128" in capsys.readouterr().err


def test_deepspeed_json_values_win_and_are_recorded(tmp_path):
    cfg = RunConfig.from_yaml(TINY, [f"deepspeed={ROOT}/configs/deepspeed/zero3-bf16.json"])
    assert cfg.train.zero_stage == 3 and cfg.train.dtype == "bf16"  # the banner and run.yaml read these
    cfg.to_yaml(str(tmp_path / "run.yaml"))
    again = RunConfig.from_yaml(str(tmp_path / "run.yaml"))
    assert again.train.zero_stage == 3 and again.train.dtype == "bf16"
    from lasp.train.ds_config import build_deepspeed_config

    ds = build_deepspeed_config(cfg, 4)
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage and ds["bf16"]["enabled"]


class _Engine:
    def __init__(self):
        self.module = torch.nn.Linear(3, 2).to(torch.bfloat16)


def test_end_of_run_weights_only_on_rank_0_and_on_the_cpu():
    from lasp.train.trainer import full_state_dict

    eng = _Engine()
    assert full_state_dict(eng, 0, rank=1) is None
    sd = full_state_dict(eng, 0, rank=0)
    assert list(sd) == ["weight", "bias"] and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())


def test_generate_with_a_prompt_that_is_not_utf8(tmp_path):
    import subprocess
    import sys

    from lasp.models import LinearLlamaForCausalLM, ModelConfig, save_pretrained

    torch.manual_seed(0)
    save_pretrained(LinearLlamaForCausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)), tmp_path / "m")
    argv = [sys.executable, "-m", "lasp.cli", "generate", "--checkpoint", str(tmp_path / "m"), "--max-new-tokens", "3",
            "--temperature", "0", "--prompt", b"caf\xe9 ".decode(sys.getfilesystemencoding(), "surrogateescape")]
    r = subprocess.run(argv, capture_output=True, env=dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout.startswith("caf\ufffd ".encode())
    from lasp.models.generate_cli import encode_bytes

    assert encode_bytes(b"caf\xe9".decode("utf-8", "surrogateescape")) == list(b"caf\xe9")
