"""Issue 23: stopping on a signal with a checkpoint, one run per out_dir, every collective times
out, disk full, clear refusals on resume, the machine's precision, the end-of-run sample.

The runs are `lasp train` (the CLI's ``main``) in a spawned gloo process, as in
tests/test_train_resume.py (whose helpers these reuse); one test starts a real `lasp train
--nproc 2` job and stops it with SIGTERM.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from lasp.train import checkpoint
from lasp.train.data import prepare, stdlib_sources
from lasp.train.main import main as train_main
from lasp.train.run_lock import RunLock

from test_train_resume import MODEL, ROOT, TINY, _cli, _metrics
from test_train_config import FakeEngine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("reliability") / "data")
    prepare([], out, "bytes", files=stdlib_sources()[:4])
    return out


def _argv(data: str, out_dir, *extra: str, steps: int = 4, every: int = 0) -> list[str]:
    sets = [*MODEL, "parallel.sp_size=1", "parallel.nproc=1", "train.seq_len=64", "train.micro_batch_size=2", f"train.steps={steps}",
            "train.warmup=1", f"checkpoint.every={every}", "sample.max_new_tokens=0", f"data.path={data}", f"out_dir={out_dir}"]
    return ["--config", TINY, "--no-progress"] + [a for s in sets for a in ("--set", s)] + list(extra)


def _signal_on_step(step: int, signum: int, ranks: tuple[int, ...]) -> None:
    """Make this rank send itself ``signum`` during optimizer step ``step`` (1-based) when it is in ``ranks``."""
    from lasp.train import trainer

    original, calls = trainer.backward_scale, []

    def scale(labels, world, grad_accum):  # called once per step, on every rank
        calls.append(1)
        if len(calls) == step and int(os.environ.get("RANK", "0")) in ranks:
            os.kill(os.getpid(), signum)
        return original(labels, world, grad_accum)

    trainer.backward_scale = scale


def _cli_signalled(rank: int, world: int, argv: list[str], step: int, signum: int) -> tuple[int, str, str]:
    from lasp.train import trainer

    original = trainer.backward_scale
    _signal_on_step(step, signum, (0,))
    try:
        return _cli(rank, world, argv, {})
    finally:
        trainer.backward_scale = original


def _cli_disk_full(rank: int, world: int, argv: list[str]) -> tuple[int, str, str]:
    import errno

    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.save_checkpoint

    def full(self, save_dir, tag=None, **kw):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    DeepSpeedEngine.save_checkpoint = full
    try:
        return _cli(rank, world, argv, {})
    finally:
        DeepSpeedEngine.save_checkpoint = original


# ---------------------------------------------------------------------------- SIGINT / SIGTERM


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_loses_nothing(spawn, data, tmp_path):
    rc, _, err = spawn(1).run(_cli, _argv(data, tmp_path / "ref"), {}, timeout=300)[0]
    assert rc == 0, err
    reference = {r["step"]: r["loss"] for r in _metrics(tmp_path / "ref")}

    argv = _argv(data, tmp_path / "run")
    rc, _, err = spawn(1).run(_cli_signalled, argv, 2, signal.SIGTERM, timeout=300)[0]
    ck = tmp_path / "run" / "checkpoints"
    assert rc == 143, err
    assert f"lasp train: stopped by SIGTERM after step 2 of 4; checkpoint {ck / 'step00000002'} saved; continue with: lasp train " in err
    assert err.rstrip().endswith("--resume") and "Traceback" not in err
    assert checkpoint.find_resumable(str(ck)) == ("step00000002", [])
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2]

    rc, _, err = spawn(1).run(_cli, argv + ["--resume"], {}, timeout=300)[0]
    assert rc == 0, err
    got = {r["step"]: r["loss"] for r in _metrics(tmp_path / "run")}
    assert sorted(got) == [1, 2, 3, 4]
    assert all(abs(got[s] - reference[s]) <= 1e-6 * abs(reference[s]) for s in got), (got, reference)


def _two_rank_signalled(rank: int, world: int, tmp: str, data: str) -> tuple[int, int]:
    from lasp.train.config import RunConfig
    from lasp.train.preemption import Preempted
    from lasp.train.trainer import backward_scale, train
    from lasp.train import trainer

    torch.set_num_threads(1)
    cfg = {"model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2},
           "parallel": {"sp_size": 2}, "train": {"steps": 6, "seq_len": 32, "micro_batch_size": 1},
           "data": {"path": data}, "checkpoint": {"every": 0}, "sample": {"max_new_tokens": 0}, "out_dir": os.path.join(tmp, "run")}
    _signal_on_step(3, signal.SIGINT, (1,))  # only rank 1 is interrupted
    try:
        train(RunConfig.from_dict(cfg, source="test"), progress=False, verbose=False)
    except Preempted as e:
        return e.step, e.exit_status
    finally:
        trainer.backward_scale = backward_scale
    return -1, 0


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(spawn, data, tmp_path):
    results = spawn(2).run(_two_rank_signalled, str(tmp_path), data, timeout=300)
    assert results == [(3, 130), (3, 130)]
    ck = str(tmp_path / "run" / "checkpoints")
    assert checkpoint.find_resumable(ck) == ("step00000003", [])


CHILD = """import sys, time
from lasp.train.preemption import die_with_parent
die_with_parent()
open(sys.argv[1], "w").write("armed")
time.sleep(120)
"""
PARENT = """import subprocess, sys
child = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], start_new_session=True)  # as torchrun starts a rank
print(child.pid, flush=True)
child.wait()
"""


def test_a_rank_dies_with_its_launcher_even_on_sigkill(tmp_path):
    """The mechanism the ranks arm at start (torchrun starts each in its own session, so `kill -9`
    of the job's process group does not reach them)."""
    marker = str(tmp_path / "armed")
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "parent.py").write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "child.py"), marker], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker)
    os.killpg(parent.pid, signal.SIGKILL)  # `kill -9` of the launcher's process group, which the child is not in
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _job_pids(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    out = []
    for proc in os.listdir("/proc"):
        if proc.isdigit() and int(proc) != os.getpid():
            try:
                cmd = open(f"/proc/{proc}/cmdline", "rb").read()
            except OSError:
                continue
            if marker.encode() in cmd and _alive(int(proc)):
                out.append(int(proc))
    return out


def test_sigterm_to_lasp_train_reaches_the_ranks_which_save_and_exit(data, tmp_path):
    """A real `lasp train --nproc 2`: SIGTERM (what `timeout` and `kill` send) to it makes both
    ranks stop after the same step with a checkpoint; no rank is left behind, no traceback."""
    out = tmp_path / "job"
    argv = _argv(data, out, "--nproc", "2", "--set", "parallel.nproc=2", steps=500)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    job = subprocess.Popen([sys.executable, "-m", "lasp.cli", "train", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    assert job.poll() is None, job.communicate()[0][-3000:]
    job.send_signal(signal.SIGTERM)
    text, _ = job.communicate(timeout=120)
    assert job.returncode == 143, text[-3000:]
    step = len(_metrics(out))
    assert 2 <= step < 500
    assert f"lasp train: stopped by SIGTERM after step {step} of 500; checkpoint {out / 'checkpoints' / f'step{step:08d}'} saved" in text
    assert "Traceback" not in text, text[-3000:]
    assert checkpoint.find_resumable(str(out / "checkpoints")) == (f"step{step:08d}", [])
    deadline = time.monotonic() + 10
    while _job_pids(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _job_pids(str(out)), "ranks left running"


# ---------------------------------------------------------------------------- one run per out_dir


def test_a_second_run_into_a_busy_out_dir_is_refused_naming_the_first(spawn, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    held = RunLock([str(out)])
    held.acquire()  # "the first run" (this process)
    try:
        who = f"pid {os.getpid()} on {socket.gethostname()}"
        rc, _, err = spawn(1).run(_cli, _argv(data, out), {}, timeout=300)[0]  # as under torchrun: rank 0 locks
        assert rc == 2 and f"error: out_dir '{out}' is in use by another run: {who}" in err, err
        for key in ("WORLD_SIZE", "RANK"):
            monkeypatch.delenv(key, raising=False)
        assert train_main(_argv(data, out, "--nproc", "2", "--set", "parallel.nproc=2")) == 2  # `lasp train` refuses before starting
        assert who in capsys.readouterr().err
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        held.release()
    rc, _, err = spawn(1).run(_cli, _argv(data, out, steps=1), {}, timeout=300)[0]
    assert rc == 0, err
    assert "pid" in (out / ".lock").read_text()  # the holder's record stays; the lock itself died with the run
    RunLock([str(out)]).acquire()


# ---------------------------------------------------------------------------- timeouts


def _stalled_rank(rank: int, world: int) -> list[tuple[float, str]]:
    import datetime

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from lasp.parallel import init_parallel
    from lasp.train.main import collective_error

    saved = distributed_c10d.default_pg_timeout
    try:
        state = init_parallel(2, timeout_s=2)
        deepspeed_like = dist.new_group([0, 1])  # DeepSpeed creates its groups without a timeout
        if rank == 1:
            time.sleep(5.5)  # stalled past both timeouts of rank 0
            return []
        out = []
        for group in (state.sp_group, deepspeed_like):
            start = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1), group=group)
                out.append((time.monotonic() - start, "no error"))
            except Exception as e:  # noqa: BLE001
                out.append((time.monotonic() - start, collective_error(e, 2)))
        return out
    finally:
        distributed_c10d.default_pg_timeout = saved if isinstance(saved, datetime.timedelta) else saved


def test_a_stalled_rank_fails_every_group_within_the_timeout(spawn):
    got = spawn(2).run(_stalled_rank, timeout=60)[0]
    assert len(got) == 2
    for seconds, message in got:
        assert seconds < 6, got
        assert message and "parallel.timeout_s=2 s" in message, got


# ---------------------------------------------------------------------------- disk full, retention


def test_disk_full_during_a_save_is_named_and_the_newest_checkpoint_survives(tmp_path, monkeypatch):
    import errno

    d = str(tmp_path / "ck")
    checkpoint.save(FakeEngine(), d, 3, {"step": 3}, {}, rank=0)

    class Full(FakeEngine):
        def __init__(self, err):
            super().__init__()
            self.err = err

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            super().save_checkpoint(save_dir, tag, client_state, save_latest)
            raise self.err

    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        checkpoint.save(Full(OSError(errno.ENOSPC, "No space left on device")), d, 6, {"step": 6}, {}, rank=0)
    assert "no space left on device while saving step 6" in str(e.value)
    assert f"the newest complete checkpoint is still {os.path.join(d, 'step00000003')}" in str(e.value)
    assert checkpoint.read_latest(d) == "step00000003" and not glob.glob(os.path.join(d, ".tmp-*"))  # the partial save is gone
    # torch's zip writer reports a full disk as "unexpected pos": named by the free space left
    torch_err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310")
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 0)
    with pytest.raises(checkpoint.CheckpointWriteError, match="no space left on device while saving step 6"):
        checkpoint.save(Full(torch_err), d, 6, {"step": 6}, {}, rank=0)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1 << 40)
    with pytest.raises(checkpoint.CheckpointWriteError, match="could not save step 6 .*unexpected pos"):
        checkpoint.save(Full(torch_err), d, 6, {"step": 6}, {}, rank=0)


def test_disk_full_in_a_run_is_one_line_and_exit_status_1(spawn, data, tmp_path):
    rc, _, err = spawn(1).run(_cli_disk_full, _argv(data, tmp_path / "run", steps=1), timeout=300)[0]
    assert rc == 1 and "error: checkpoint: no space left on device while saving step 1" in err and "Traceback" not in err, err


def test_keep_last_removes_old_checkpoints_once_a_new_one_is_complete(tmp_path):
    d = str(tmp_path / "ck")
    checkpoint.save(FakeEngine(), d, 9, {"step": 9}, {}, rank=0)  # left by an earlier timeline: replaced when reached, not pruned
    for step in range(1, 6):
        checkpoint.save(FakeEngine(), d, step, {"step": step}, {}, rank=0, keep_last=2)
    assert checkpoint.list_tags(d) == ["step00000009", "step00000005", "step00000004"]
    checkpoint.save(FakeEngine(), d, 6, {"step": 6}, {}, rank=0)  # None: keep every checkpoint
    assert len(checkpoint.list_tags(d)) == 4 and not [n for n in os.listdir(d) if n.startswith(".")]


# ---------------------------------------------------------------------------- refusals before start


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--set", "train.dtype=fp16"], "train.dtype=fp16: this CPU has no fp16 support"),
        (["--set", "model.max_seq_len=32"], "train.seq_len=64 exceeds the model's max_seq_len=32"),
        (["--set", "parallel.sp_size=3", "--set", "train.seq_len=256", "--nproc", "4"],
         "parallel.sp_size=3 must divide the world size 4 (3 does not divide 4)"),
    ],
    ids=["fp16-without-cpu-support", "seq-len-above-max", "sp-not-dividing-world-first"],
)
def test_refused_before_start(data, tmp_path, capsys, monkeypatch, extra, needle):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("lasp.train.preflight.cpu_supports_fp16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_main(_argv(data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and "seq_len=256 must be divisible" not in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_refuses_what_deepspeed_cannot_load_and_a_changed_batch(spawn, data, tmp_path):
    out = tmp_path / "run"
    rc, _, err = spawn(1).run(_cli, _argv(data, out, "--stop-after", "2", every=2), {}, timeout=300)[0]
    assert rc == 0, err
    cases = [
        (["--set", "train.zero_stage=3"], 2, "train.zero_stage: checkpoint 2, now 3"),
        (["--set", "train.zero_stage=0"], 2, "train.zero_stage: checkpoint 2, now 0"),
        (["--set", "train.dtype=bf16"], 2, "train.dtype: checkpoint 'fp32', now 'bf16'"),
        (["--set", "model.hidden_size=64", "--set", "model.intermediate_size=128"], 2,
         "model: hidden_size: checkpoint 32, now 64, intermediate_size: checkpoint 64, now 128"),
        (["--set", "train.seq_len=32"], 2, "the batches would differ from checkpoint"),
        (["--set", "train.micro_batch_size=1"], 2, "windows per step: checkpoint 2 (micro_batch_size 2 x grad_accum 1 x dp_size 1, sp_size 1), now 1"),
        (["--set", f"data.path={tmp_path / 'other'}"], 2, f"data: checkpoint {data} ("),
        (["--set", "train.seq_len=32", "--resume-allow-data-change"], 0, "--resume-allow-data-change: continuing with new batches"),
    ]
    prepare([], str(tmp_path / "other"), "bytes", files=stdlib_sources()[4:6])
    for extra, want_rc, needle in cases:
        rc, stdout, err = spawn(1).run(_cli, _argv(data, out, "--resume", *extra, every=2), {}, timeout=300)[0]
        assert rc == want_rc and needle in stdout + err and "Traceback" not in err, (extra, stdout, err)
        if rc == 2:
            assert len(err.strip().splitlines()) == 1 and "--resume" in err


def test_resume_refusals_of_another_world_or_sp_size(tmp_path):
    """World size: refused with the way to continue; SP 2 -> 4 on the same 4 ranks halves the
    global batch (dp 2 -> 1): refused, unless the windows per step stay the same."""
    from lasp.train.config import RunConfig
    from lasp.train.resume import batch_settings, plan_start

    cfg = RunConfig.from_yaml(TINY, ["parallel.sp_size=2", f"out_dir={tmp_path}"], world=4)
    d = cfg.checkpoint_dir
    checkpoint.save(FakeEngine(), d, 4, {"step": 4, "seed": 0, "world_size": 4, "batch": batch_settings(cfg, 4, True)}, {}, rank=0)
    with pytest.raises(ValueError, match="written by 4 ranks, this run has 2 .* `lasp export --checkpoint .*step00000004 --output DIR`, "
                                         "then a new run with --set model.init_from=DIR"):
        plan_start(cfg, world=2, resume=True)
    sp4 = RunConfig.from_yaml(TINY, ["parallel.sp_size=4", f"out_dir={tmp_path}"], world=4)
    with pytest.raises(ValueError, match=r"windows per step: checkpoint 8 \(micro_batch_size 4 x grad_accum 1 x dp_size 2, sp_size 2\), "
                                         r"now 4 \(micro_batch_size 4 x grad_accum 1 x dp_size 1, sp_size 4\)"):
        plan_start(sp4, world=4, resume=True, packed=True)
    sp4.train.micro_batch_size = 8  # the same 8 windows per step: the batches are the same
    plan = plan_start(sp4, world=4, resume=True, packed=True)
    assert plan.resume_tag == "step00000004" and any("the global batch is the same" in m for m in plan.messages)


# ---------------------------------------------------------------------------- the end-of-run sample, generate


def test_a_lost_tokenizer_never_fails_a_finished_run(spawn, data, tmp_path):
    import shutil

    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    header = json.loads((moved / "header.json").read_text())
    (moved / "header.json").write_text(json.dumps({**header, "tokenizer": "/nonexistent/tokenizer.json"}))
    argv = _argv(str(moved), tmp_path / "run", "--set", "sample.max_new_tokens=4", steps=1)
    rc, out, err = spawn(1).run(_cli, argv, {}, timeout=300)[0]
    assert rc == 0, err
    assert "warning: no end-of-run sample (ValueError: data.path: the tokenizer of" in err and "the run itself is complete" in err
    assert "done: steps 0->1 of 1" in out


def test_generate_uses_the_models_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    from lasp.models import LinearLlamaForCausalLM, ModelConfig, save_pretrained
    from lasp.models.generate_cli import main as generate_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "</s>"]))
    torch.manual_seed(0)
    save_pretrained(LinearLlamaForCausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)),
                    tmp_path / "m")
    tok.save(str(tmp_path / "m" / "tokenizer.json"))  # as `lasp convert` leaves it
    assert generate_main(["--checkpoint", str(tmp_path / "m"), "--prompt", "the quick fox", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(tok.decode(tok.encode("the quick fox").ids)) and "warning" not in out.err
    assert generate_main(["--checkpoint", str(tmp_path / "m"), "--prompt", "x", "--tokenizer", "bytes"]) == 2  # vocab 64 < 256
    assert "byte-level tokenizer needs vocab_size >= 256" in capsys.readouterr().err
