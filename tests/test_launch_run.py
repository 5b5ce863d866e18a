"""The launch scripts run real 2-process jobs on the CPU, and a job whose rank is killed
restarts from its latest checkpoint and ends with the same loss as an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lasp.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = {  # one linear and one softmax layer: both SP paths run
    "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
    "num_heads": 2, "num_kv_heads": 1, "layer_pattern": "LS", "linear_variant": "lightning",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("launch") / "data"
    subprocess.run([sys.executable, "-m", "lasp.cli", "data", "prepare", "--input", str(ROOT / "lasp"), "--output", str(out)],
                   check=True, capture_output=True)
    return str(out)


def write_config(path: Path, data: str, out_dir: Path, steps: int, every: int) -> Path:
    cfg = {
        "model": MODEL,
        "parallel": {"sp_size": 2, "layout": "zigzag", "timeout_s": 60},
        "train": {"steps": steps, "seq_len": 64, "micro_batch_size": 2, "lr": 1e-2, "warmup": 2,
                  "min_lr": 1e-3, "seed": 3, "zero_stage": 1, "dtype": "fp32"},
        "data": {"path": data},
        "checkpoint": {"every": every},
        "sample": {"max_new_tokens": 0},
        "out_dir": str(out_dir),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra) -> dict:
    e = dict(os.environ, PYTHON=sys.executable, NPROC="2", OMP_NUM_THREADS="1", **extra)
    e.pop("WORLD_SIZE", None)
    return e


def losses(out_dir: Path) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/deepspeed.sh"])
def test_script_runs_a_two_process_job(script, data_dir, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", data_dir, tmp_path / "out", steps=3, every=100)
    r = subprocess.run(["bash", script, str(cfg), "--no-progress"], cwd=ROOT, env=env(MASTER_PORT=str(free_port())),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "world: 1 node(s) x 2 process(es) = 2 ranks; SP=2 x DP=1; backend gloo" in r.stdout
    assert sorted(losses(tmp_path / "out")) == [1, 2, 3]


def _worker_pid(config: Path, local_rank: int) -> int | None:
    """PID of the training process with LOCAL_RANK=local_rank started for ``config`` (not the agent)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in cmd and b"lasp.train" in cmd and f"LOCAL_RANK={local_rank}".encode() in environ \
                and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
            return int(proc.name)
    return None


def _reference_losses(rank: int, world: int, config: str) -> list[float]:
    """The uninterrupted run of ``config`` on a spawned gloo group of the same size (the same
    ranks, backend and numerics as the torchrun job, without starting one more job)."""
    import torch

    from lasp.train.config import RunConfig
    from lasp.train.trainer import train

    torch.set_num_threads(1)
    return train(RunConfig.from_yaml(config), progress=False, sample=False, verbose=False).losses


def test_killed_rank_restarts_from_latest_checkpoint(data_dir, tmp_path, spawn):
    steps, every = 16, 4
    ref_cfg = write_config(tmp_path / "ref.yaml", data_dir, tmp_path / "ref", steps, every)
    reference = dict(enumerate(spawn(2).run(_reference_losses, str(ref_cfg), timeout=300)[0], start=1))

    cfg = write_config(tmp_path / "faulty.yaml", data_dir, tmp_path / "faulty", steps, every)
    metrics = tmp_path / "faulty" / "metrics.jsonl"
    job = subprocess.Popen(["bash", "launch/torchrun.sh", str(cfg), "--max-restarts", "2", "--no-progress"], cwd=ROOT,
                           env=env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if done >= every + 2:  # past the first checkpoint, before the end
            pid = _worker_pid(cfg, local_rank=1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed_at = done
                break
        time.sleep(0.05)
    out, _ = job.communicate(timeout=300)
    assert killed_at is not None and killed_at < steps, f"never killed a rank mid-run\n{out[-3000:]}"
    assert job.returncode == 0, out[-4000:]
    assert "elastic restart 1: resuming this run" in out, out[-4000:]
    got = losses(tmp_path / "faulty")
    assert sorted(got) == list(range(1, steps + 1))
    assert abs(got[steps] - reference[steps]) <= 1e-6 * abs(reference[steps]), (got[steps], reference[steps])
    assert all(abs(got[s] - reference[s]) <= 1e-6 * abs(reference[s]) for s in got)
