"""Issue 13 items 1-6: no run destroys or silently mixes checkpoints.

Each test runs `lasp train` (the CLI's ``main``) in a one-rank spawned gloo process, the way a
user runs ``lasp train --nproc 1 --set parallel.sp_size=1 --set train.seq_len=64`` on a small
dataset.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os

import pytest
import torch

from lasp.train import checkpoint
from lasp.train.data import prepare, stdlib_sources
from lasp.train.ds_config import lr_lambda
from lasp.train.preflight import cpu_supports_fp16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny-hybrid.yaml")
MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.layer_pattern=LS",
         "model.num_heads=2", "model.num_kv_heads=1"]


def _cli(rank: int, world: int, argv: list[str], env: dict) -> tuple[int, str, str]:
    from lasp.train.main import main

    torch.set_num_threads(1)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("resume") / "data")
    prepare([], out, "bytes", files=stdlib_sources()[:4])
    return out


@pytest.fixture()
def run(spawn, data, tmp_path):
    """``run(*args, steps=, every=, env=)`` -> (rc, stdout, stderr) of one `lasp train` in tmp_path/run."""

    def go(*extra: str, steps: int = 3, every: int = 2, env: dict | None = None, out_dir: str | None = None):
        sets = [*MODEL, "parallel.sp_size=1", "parallel.nproc=1", "train.seq_len=64", "train.micro_batch_size=2",
                f"train.steps={steps}", "train.warmup=1", f"checkpoint.every={every}", "sample.max_new_tokens=0",
                f"data.path={data}", f"out_dir={out_dir or tmp_path / 'run'}"]
        argv = ["--config", TINY, "--no-progress"] + [a for s in sets for a in ("--set", s)] + list(extra)
        return spawn(1).run(_cli, argv, env or {}, timeout=300)[0]

    return go


def _snapshot(d: str) -> dict[str, str]:
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "**"), recursive=True)):
        if os.path.isfile(path):
            out[os.path.relpath(path, d)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(out_dir, "metrics.jsonl")).read().splitlines()]


def test_resume_at_or_past_the_target_touches_nothing(run, tmp_path):
    rc, _, err = run(steps=3, every=2)
    assert rc == 0, err
    ck = str(tmp_path / "run" / "checkpoints")
    assert checkpoint.list_tags(ck) == ["step00000003", "step00000002"]
    before = _snapshot(ck)
    for steps in (2, 3):
        rc, out, err = run("--resume", steps=steps, every=2)
        assert rc == 0, err
        assert "nothing to do" in out and "step00000003" in out and "no checkpoint was changed" in out
        assert _snapshot(ck) == before


def test_fresh_run_refuses_an_out_dir_with_checkpoints_and_overwrite_moves_it_aside(run, tmp_path):
    assert run(steps=2, every=0)[0] == 0
    ck = tmp_path / "run" / "checkpoints"
    rc, _, err = run(steps=2, every=0)
    assert rc == 2 and str(ck) in err and "--resume" in err and "--overwrite" in err
    old = _snapshot(str(tmp_path / "run"))
    rc, out, err = run("--overwrite", steps=2, every=0)
    assert rc == 0, err
    moved = glob.glob(str(tmp_path / "run.old-*"))
    assert len(moved) == 1 and _snapshot(moved[0]) == old and "moved the old run" in out
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]


def test_elastic_restart_resumes_only_its_own_run(run, tmp_path):
    rc, _, err = run("--stop-after", "2", steps=4, every=2, env={"TORCHELASTIC_RUN_ID": "job-a"})
    assert rc == 0, err
    state = checkpoint.read_trainer_state(str(tmp_path / "run" / "checkpoints"))
    assert state["run_id"] == "job-a" and state["step"] == 2
    rc, _, err = run(steps=4, every=2, env={"TORCHELASTIC_RUN_ID": "job-b", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert rc == 2 and "belong to run 'job-a'" in err
    rc, out, err = run(steps=4, every=2, env={"TORCHELASTIC_RUN_ID": "job-a", "TORCHELASTIC_RESTART_COUNT": "1"})
    assert rc == 0, err
    assert "resuming this run (job-a)" in out
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_changed_schedule_is_refused_and_the_logged_lr_is_the_optimizers(run, tmp_path):
    rc, _, err = run("--stop-after", "2", "--set", "train.lr=0.003", steps=4, every=2)
    assert rc == 0, err
    rc, _, err = run("--resume", "--set", "train.lr=0.0003", steps=4, every=2)
    assert rc == 2 and "train.lr: checkpoint 0.003, now 0.0003" in err and "--resume-reset-schedule" in err
    rc, out, err = run("--resume", "--resume-reset-schedule", "--set", "train.lr=0.0003", steps=4, every=2)
    assert rc == 0, err
    recs = _metrics(tmp_path / "run")
    want = {1: 0.003, 2: 0.003, 3: 0.0003, 4: 0.0003}
    for r in recs:
        lr = want[r["step"]]
        assert r["lr"] == pytest.approx(lr * lr_lambda(r["step"] - 1, steps=4, warmup=1, lr=lr, min_lr=3e-4 if lr > 3e-4 else lr))


def test_damaged_latest_checkpoint_falls_back_and_export_refuses_it(run, tmp_path, capsys):
    from lasp.train.export import main as export_main

    rc, _, err = run("--stop-after", "3", steps=4, every=1)
    assert rc == 0, err
    ck = str(tmp_path / "run" / "checkpoints")
    shard = glob.glob(os.path.join(ck, "step00000003", "*optim_states.pt"))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert export_main(["--checkpoint", ck, "--output", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "step00000003 is damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rc, out, err = run("--resume", steps=4, every=1)
    assert rc == 0, err
    assert "step00000003 is damaged" in out and "resuming from" in out and "step00000002, the newest intact" in out
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert checkpoint.find_resumable(ck) == ("step00000004", [])
    assert checkpoint.verify(os.path.join(ck, "step00000003")) is None  # re-saved whole


@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available() and not cpu_supports_fp16(), reason="this CPU has no fp16 support (train.dtype=fp16 is refused)"))])
def test_export_under_zero0_half_is_the_fp32_master_copy(run, tmp_path, dtype):
    from lasp.models.io import load_pretrained
    from lasp.train.export import main as export_main

    rc, _, err = run("--set", "train.zero_stage=0", "--set", "train.dtype=" + dtype, steps=2, every=0)
    assert rc == 0, err
    assert export_main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--output", str(tmp_path / "exp"), "--dtype", "fp32"]) == 0
    weights = dict(load_pretrained(str(tmp_path / "exp")).named_parameters())
    rounded = [n for n, w in weights.items() if torch.equal(w.detach().to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])).float(), w.detach())]
    assert not rounded, f"{dtype}-rounded weights exported: {rounded}"
