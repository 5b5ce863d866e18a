"""Where a run starts: fresh, resumed, or nothing to do; and what it refuses.

The rules (decided on every rank from the same files, before any collective):

- a run without ``--resume`` refuses a checkpoint directory that holds checkpoints (another
  run's metrics and weights would mix with this one's); ``--overwrite`` moves the old run aside
  to ``<dir>.old-<timestamp>`` (never deletes it) and starts fresh;
- ``--resume`` continues from the newest INTACT checkpoint (a damaged latest one is reported by
  name and skipped); if that checkpoint is already at or past ``train.steps`` the run does
  nothing and says so (no checkpoint is touched);
- a resume whose optimizer / schedule settings differ from the checkpoint's is refused with the
  list of differences, unless ``--resume-reset-schedule`` (then the new settings apply);
- a torchrun elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes by itself, but only a
  checkpoint its own run wrote (the run id recorded in the checkpoint).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

from . import checkpoint
from .config import RunConfig

#: the run config keys a checkpoint's optimizer state and LR schedule depend on
SCHEDULE_KEYS = ("lr", "min_lr", "warmup", "steps", "weight_decay", "grad_clip")


def restart_count() -> int:
    """torchrun's restart counter of this process (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def env_run_id() -> str | None:
    """The id of this job when the launcher gives one (``LASP_RUN_ID``, else torchrun's run id)."""
    return os.environ.get("LASP_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or None


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def schedule_settings(cfg: RunConfig) -> dict:
    """The optimizer / schedule settings recorded in every checkpoint (compared on resume)."""
    s = {key: getattr(cfg.train, key) for key in SCHEDULE_KEYS}
    s["deepspeed"] = cfg.deepspeed
    return s


def schedule_differences(saved: dict | None, now: dict) -> list[str]:
    """``["train.lr: checkpoint 0.003, now 0.0003", ...]`` (empty when they agree or the
    checkpoint predates the record)."""
    if not saved:
        return []
    out = []
    for key, value in now.items():
        if key in saved and saved[key] != value:
            name = key if key == "deepspeed" else f"train.{key}"
            out.append(f"{name}: checkpoint {saved[key]!r}, now {value!r}")
    return out


@dataclass
class StartPlan:
    """What :func:`plan_start` decided."""

    resume_tag: str | None = None  # the checkpoint to load (None: fresh start)
    start_step: int = 0
    done: bool = False  # the checkpoint is at or past train.steps: do nothing
    move_aside: bool = False  # --overwrite: move the old run aside before starting
    messages: list[str] = field(default_factory=list)  # tell the user (rank 0)


def plan_start(cfg: RunConfig, *, world: int, resume: bool, overwrite: bool = False, reset_schedule: bool = False,
               run_id: str | None = None, restarts: int = 0) -> StartPlan:
    """Decide how this run starts (see the module docstring); ValueError when it must refuse."""
    ckpt_dir = cfg.checkpoint_dir
    plan = StartPlan()
    if restarts > 0 and not resume:
        tag, notes = checkpoint.find_resumable(ckpt_dir)
        state = checkpoint.read_state(ckpt_dir, tag) if tag else None
        if state is not None and run_id is not None and state.get("run_id") == run_id:
            plan.messages.append(f"elastic restart {restarts}: resuming this run ({run_id}) from its checkpoint {tag!r}")
            resume = True
        elif state is None and not checkpoint.has_checkpoints(ckpt_dir):
            plan.messages.append(f"elastic restart {restarts}: no checkpoint yet, starting over")
            return plan
        elif state is None:
            raise ValueError(f"elastic restart {restarts}: no intact checkpoint in {ckpt_dir!r} to resume from ({'; '.join(notes)})")
        elif state is not None and not overwrite:
            raise ValueError(
                f"elastic restart {restarts}: the checkpoints in {ckpt_dir!r} belong to run {state.get('run_id')!r}, "
                f"not to this run ({run_id!r}); not resuming them (pass --resume to continue them deliberately)"
            )
    if not resume:
        if checkpoint.has_checkpoints(ckpt_dir):
            if not overwrite:
                raise ValueError(
                    f"checkpoint.dir {ckpt_dir!r} already holds checkpoints of an earlier run: pass --resume to continue "
                    f"it, --overwrite to move it aside and start over, or choose another out_dir"
                )
            plan.move_aside = True
        return plan
    tag, state, notes = checkpoint.resume_point(ckpt_dir, world, cfg.train.seed, cfg.parallel.ep_size)
    plan.messages += notes
    if notes:
        plan.messages.append(f"resuming from {os.path.join(ckpt_dir, tag)}, the newest intact checkpoint")
    step = int(state["step"])
    if step >= cfg.train.steps:
        plan.done = True
        plan.messages.append(
            f"nothing to do: checkpoint {os.path.join(ckpt_dir, tag)} is at step {step}, train.steps is {cfg.train.steps} "
            "(no checkpoint was changed; raise train.steps to train further)"
        )
        return plan
    diffs = schedule_differences(state.get("schedule"), schedule_settings(cfg))
    if diffs and not reset_schedule:
        raise ValueError(
            f"--resume: the optimizer / schedule settings differ from checkpoint {os.path.join(ckpt_dir, tag)}: "
            + "; ".join(diffs) + " (pass --resume-reset-schedule to apply the new ones, or restore the old values)"
        )
    if diffs:
        plan.messages.append("--resume-reset-schedule: applying the new settings (" + "; ".join(diffs) + ")")
    plan.resume_tag, plan.start_step = tag, step
    return plan


def move_aside(cfg: RunConfig) -> list[str]:
    """Move the old run out of the way (``out_dir`` and, if outside it, the checkpoint dir) to
    ``<dir>.old-<timestamp>``; returns what moved where. Never deletes anything."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    dirs = [cfg.out_dir]
    ckpt = os.path.abspath(cfg.checkpoint_dir)
    if not ckpt.startswith(os.path.abspath(cfg.out_dir) + os.sep):
        dirs.append(cfg.checkpoint_dir)
    for d in dirs:
        if os.path.exists(d):
            dest, n = f"{d.rstrip(os.sep)}.old-{stamp}", 1
            while os.path.exists(dest):
                dest, n = f"{d.rstrip(os.sep)}.old-{stamp}-{n}", n + 1
            shutil.move(d, dest)
            moved.append(f"--overwrite: moved the old run {d!r} aside to {dest!r}")
    return moved
