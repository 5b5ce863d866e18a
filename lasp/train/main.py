"""``lasp train --config PATH [--set dotted.key=value ...] [--resume] [--nproc N]``.

Three ways to run it:

- under a launcher (``torchrun ... -m lasp.train``, ``deepspeed ... -m lasp.train`` which also
  passes ``--local_rank``): every process trains its rank;
- on its own with a world of one (``parallel.nproc`` / ``--nproc`` is 1): trains in-process;
- on its own with more processes asked for (``--nproc N``, else ``parallel.nproc`` of the run
  config, else ``parallel.sp_size``): checks the config and the data, prepares the embedded
  corpus if needed, then starts ``N`` local processes with torchrun
  (``python -m torch.distributed.run --standalone``) running this same command.
  ``make train`` uses this: ``configs/tiny-hybrid.yaml`` asks for 4 processes (SP=2 x DP=2).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .config import RunConfig

LAUNCHED_ENV = "LASP_TRAIN_LAUNCHED"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lasp train", description="train a Linear-Llama model with LASP-2 sequence parallelism on DeepSpeed")
    p.add_argument("--config", required=True, help="run config YAML (e.g. configs/tiny-hybrid.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    p.add_argument("--nproc", type=int, default=None, help="processes to start when not under a launcher (default: parallel.nproc, else sp_size)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="end after this step without a final checkpoint (as if killed; for resume drills)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (metrics.jsonl is still written)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def _under_launcher() -> bool:
    import torch.distributed as dist

    return "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized())


def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc`` (the children are the processes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(argv: list[str], nproc: int) -> int:
    """Run ``python -m lasp.train <argv>`` on ``nproc`` local processes via torchrun."""
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lasp.train", *_child_argv(argv)]
    print(f"lasp train: starting {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)


def elastic_restart_should_resume(cfg: RunConfig, rank: int) -> bool:
    """True when torchrun restarted this job (a rank died) and a checkpoint exists to resume from.

    torchrun sets ``TORCHELASTIC_RESTART_COUNT`` > 0 on a restart; the restarted ranks run the
    same command line, so resuming has to be decided here. Without a checkpoint yet, the job
    starts over (batches depend only on (seed, step), so nothing is lost).
    """
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts <= 0:
        return False
    from .checkpoint import read_latest

    tag = read_latest(cfg.checkpoint_dir)
    if rank == 0:
        where = f"resuming from checkpoint {tag!r}" if tag else "no checkpoint yet, starting over"
        print(f"lasp train: elastic restart {restarts}: {where}", flush=True)
    return tag is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = RunConfig.from_yaml(args.config, args.overrides)
        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        if not _under_launcher():
            nproc = args.nproc or cfg.world_size
            from .trainer import check_world, preflight

            check_world(cfg, nproc)
            preflight(cfg, nproc)  # errors here, once, before any process starts
            if args.resume:
                from .checkpoint import check_resumable

                check_resumable(cfg.checkpoint_dir, nproc, cfg.train.seed)
            if nproc > 1:
                return launch(argv, nproc)
        from .trainer import train

        resume = args.resume or elastic_restart_should_resume(cfg, rank)
        train(cfg, resume=resume, stop_after=args.stop_after, progress=not args.no_progress)
    except ValueError as err:
        if rank == 0:
            print(f"lasp train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
