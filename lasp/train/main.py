"""``lasp train --config PATH [--set dotted.key=value ...] [--resume | --overwrite] [--nproc N]``.

Three ways to run it:

- under a launcher (``torchrun ... -m lasp.train``, ``deepspeed ... -m lasp.train`` which also
  passes ``--local_rank``): every process trains its rank;
- on its own with a world of one (``parallel.nproc`` / ``--nproc`` is 1): trains in-process;
- on its own with more processes asked for (``--nproc N``, else ``parallel.nproc`` of the run
  config, else ``parallel.sp_size``): checks the config and the data, prepares the embedded
  corpus if needed, checks that no other run holds ``out_dir``, then starts ``N`` local
  processes under torchrun's elastic agent, run in this process (:mod:`lasp.train.local_launch`).
  ``make train`` uses this: ``configs/tiny-hybrid.yaml`` asks for 4 processes (SP=2 x DP=2).

Where a run starts (fresh, ``--resume``, ``--overwrite``, elastic restarts) and what it refuses
is decided in :mod:`lasp.train.resume`. Every rank that fails prints its error prefixed with
its rank and host, one line, no traceback. Exit status: 0 done; 2 bad input or a refusal; 1 a
failure while training (a collective timed out, a checkpoint could not be written); ``128 +
signal`` when SIGINT (130) / SIGTERM (143) stopped the run after a step, with a checkpoint of
that step (:mod:`lasp.train.preemption`).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from .config import RunConfig
from .local_launch import LAUNCHED_ENV, launch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lasp train", description="train a Linear-Llama model with LASP-2 sequence parallelism on DeepSpeed")
    p.add_argument("--config", required=True, help="run config YAML (e.g. configs/tiny-hybrid.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in checkpoint.dir")
    p.add_argument("--overwrite", action="store_true", help="start over in an out_dir holding checkpoints: move the old run aside to <dir>.old-<timestamp>")
    p.add_argument("--resume-reset-schedule", action="store_true", help="with --resume: apply changed lr / schedule / weight decay settings instead of refusing")
    p.add_argument("--resume-reshard", action="store_true",
                   help="with --resume: continue a checkpoint written by another number of ranks (DeepSpeed universal checkpoint; same ZeRO stage)")
    p.add_argument("--resume-allow-data-change", action="store_true",
                   help="with --resume: continue with changed batches (seq_len, windows per step, sp_size's dp_size, data) instead of refusing")
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


def resume_command(argv: list[str]) -> str:
    """How to continue a stopped run: the trainer arguments ``argv`` with ``--resume``, without
    ``--overwrite`` / ``--stop-after``, as a ``lasp train`` command (with the ``--nproc`` of the
    ``lasp train`` that started this rank), or for the launcher that started it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--stop-after",):
            skip = True
        elif a != "--overwrite" and not a.startswith("--stop-after="):
            out.append(a)
    if "--resume" not in out:
        out.append("--resume")
    nproc = os.environ.get(LAUNCHED_ENV)
    if nproc:
        return f"lasp train --nproc {nproc} " + " ".join(out)
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ and "CROSS_RANK" in os.environ:
        return "your launcher, with the trainer arguments " + " ".join(out)
    return "lasp train " + " ".join(out)


def _under_elastic_or_deepspeed(args) -> bool:
    """Started as a rank by torchrun's agent or the deepspeed launcher (not a spawned test group)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or args.local_rank is not None


def collective_error(err: BaseException, timeout_s: float | None) -> str | None:
    """The one-line message of a torch.distributed failure (a collective that timed out, or whose
    peer died), naming the timeout in force; None for any other error."""
    import torch.distributed as dist

    text = str(err).strip()
    low = text.lower()
    if not (isinstance(err, getattr(dist, "DistError", ())) or any(w in low for w in ("gloo", "nccl", "timed out", "timeout"))):
        return None
    limit = f"parallel.timeout_s={timeout_s:g} s" if timeout_s else "parallel.timeout_s (default $LASP_COLLECTIVE_TIMEOUT or 600 s)"
    first = text.splitlines()[0] if text else type(err).__name__
    return f"a collective failed: a rank stopped answering for {limit}, or died ({type(err).__name__}: {first})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    where = f"lasp train: rank {rank} on {socket.gethostname()}"
    cfg = None
    try:
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other (continue the run, or move it aside and start over)")
        if args.resume_reset_schedule and not args.resume:
            raise ValueError("--resume-reset-schedule needs --resume")
        if args.resume_allow_data_change and not args.resume:
            raise ValueError("--resume-allow-data-change needs --resume")
        if args.resume_reshard and not args.resume:
            raise ValueError("--resume-reshard needs --resume")
        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        under_launcher = _under_launcher()
        if under_launcher and _under_elastic_or_deepspeed(args):
            from .preemption import die_with_parent

            die_with_parent()  # torchrun starts each rank in its own session: `kill -9` of the job must still reach it
        world = int(os.environ["WORLD_SIZE"]) if under_launcher and "WORLD_SIZE" in os.environ else args.nproc
        cfg = RunConfig.from_yaml(args.config, args.overrides, world=world)
        if not under_launcher:
            nproc = args.nproc or cfg.world_size
            from .preflight import check_world, preflight
            from .resume import data_fingerprint, plan_start
            from .run_lock import check_unlocked, lock_dirs

            check_world(cfg, nproc)
            mcfg, _, data, packed = preflight(cfg, nproc)  # errors here, once, before any process starts
            if nproc > 1:
                check_unlocked(lock_dirs(cfg.out_dir, cfg.checkpoint_dir))
                plan = plan_start(cfg, world=nproc, resume=args.resume, overwrite=args.overwrite, reset_schedule=args.resume_reset_schedule,
                                  allow_data_change=args.resume_allow_data_change, reshard=args.resume_reshard, model=mcfg.to_dict(),
                                  data=data_fingerprint(data), packed=packed)
                if plan.done:
                    print("\n".join(f"lasp train: {m}" for m in plan.messages), flush=True)
                    return 0
                return launch(_child_argv(argv), nproc)
        from .trainer import train

        train(cfg, resume=args.resume, overwrite=args.overwrite, reset_schedule=args.resume_reset_schedule,
              allow_data_change=args.resume_allow_data_change, reshard=args.resume_reshard, stop_after=args.stop_after,
              progress=not args.no_progress)
    except ValueError as err:
        print(f"{where}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a SIGINT before the training loop took over the signal
        print(f"{where}: interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - the known failures get one line, the rest their traceback
        from .checkpoint import CheckpointWriteError
        from .preemption import Preempted

        if isinstance(err, Preempted):
            if rank == 0:
                print(f"lasp train: {err} of {cfg.train.steps}; checkpoint {err.checkpoint_dir} saved; continue with: "
                      f"{resume_command(_child_argv(argv))}", file=sys.stderr, flush=True)
            return err.exit_status
        if isinstance(err, CheckpointWriteError):
            print(f"{where}: error: {err}", file=sys.stderr, flush=True)
            return 1
        line = collective_error(err, cfg.parallel.timeout_s if cfg is not None else None)
        if line is None:
            raise
        print(f"{where}: error: {line}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
