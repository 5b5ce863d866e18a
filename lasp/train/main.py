"""``lasp train --config PATH [--set dotted.key=value ...] [--resume | --overwrite] [--nproc N]``.

Three ways to run it:

- under a launcher (``torchrun ... -m lasp.train``, ``deepspeed ... -m lasp.train`` which also
  passes ``--local_rank``): every process trains its rank;
- on its own with a world of one (``parallel.nproc`` / ``--nproc`` is 1): trains in-process;
- on its own with more processes asked for (``--nproc N``, else ``parallel.nproc`` of the run
  config, else ``parallel.sp_size``): checks the config and the data, prepares the embedded
  corpus if needed, then starts ``N`` local processes with torchrun
  (``python -m torch.distributed.run --standalone``) running this same command.
  ``make train`` uses this: ``configs/tiny-hybrid.yaml`` asks for 4 processes (SP=2 x DP=2).

Where a run starts (fresh, ``--resume``, ``--overwrite``, elastic restarts) and what it refuses
is decided in :mod:`lasp.train.resume`. Every rank that fails prints its error prefixed with
its rank and host.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from .config import RunConfig

LAUNCHED_ENV = "LASP_TRAIN_LAUNCHED"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lasp train", description="train a Linear-Llama model with LASP-2 sequence parallelism on DeepSpeed")
    p.add_argument("--config", required=True, help="run config YAML (e.g. configs/tiny-hybrid.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in checkpoint.dir")
    p.add_argument("--overwrite", action="store_true", help="start over in an out_dir holding checkpoints: move the old run aside to <dir>.old-<timestamp>")
    p.add_argument("--resume-reset-schedule", action="store_true", help="with --resume: apply changed lr / schedule / weight decay settings instead of refusing")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other (continue the run, or move it aside and start over)")
        if args.resume_reset_schedule and not args.resume:
            raise ValueError("--resume-reset-schedule needs --resume")
        cfg = RunConfig.from_yaml(args.config, args.overrides)
        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        if not _under_launcher():
            nproc = args.nproc or cfg.world_size
            from .trainer import check_world, preflight

            check_world(cfg, nproc)
            preflight(cfg, nproc)  # errors here, once, before any process starts
            if nproc > 1:
                from .resume import plan_start

                plan = plan_start(cfg, world=nproc, resume=args.resume, overwrite=args.overwrite, reset_schedule=args.resume_reset_schedule)
                if plan.done:
                    print("\n".join(f"lasp train: {m}" for m in plan.messages), flush=True)
                    return 0
                return launch(argv, nproc)
        from .trainer import train

        train(cfg, resume=args.resume, overwrite=args.overwrite, reset_schedule=args.resume_reset_schedule,
              stop_after=args.stop_after, progress=not args.no_progress)
    except ValueError as err:
        print(f"lasp train: rank {rank} on {socket.gethostname()}: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
