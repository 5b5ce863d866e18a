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
- a resume that DeepSpeed cannot load (another world size, precision or model, a ZeRO stage
  other than 1 <-> 2) is refused, every difference named, before DeepSpeed reads a file; another
  world size is accepted with ``--resume-reshard`` (:mod:`lasp.train.reshard`);
- a resume whose batches would differ from the checkpointed run's (``train.seq_len``, the
  windows per step ``micro_batch_size x grad_accum x dp_size`` -- a changed ``sp_size`` changes
  ``dp_size`` --, the data, ``data.pack_documents``) is refused with the list of differences,
  unless ``--resume-allow-data-change`` (then the new batches are used from the checkpoint's
  step on; the step count, schedule and tokens-seen carry on);
- a torchrun elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes by itself, but only a
  checkpoint its own run wrote (the run id recorded in the checkpoint).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import yaml

from . import checkpoint
from .config import RunConfig

#: model config keys that say how to compute, not what is computed: they may change on resume
COMPUTE_ONLY_MODEL_KEYS = ("linear_method", "linear_backend", "softmax_method", "description")

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


def data_fingerprint(data) -> dict:
    """What a checkpoint records about its dataset (a :class:`lasp.train.data.TokenDataset`)."""
    import zlib

    with open(os.path.join(data.path, "header.json"), "rb") as f:
        crc = zlib.crc32(f.read())
    return {"path": os.path.abspath(data.path), "num_tokens": data.num_tokens, "header_crc": crc}


def batch_settings(cfg: RunConfig, world: int, packed: bool | None = None) -> dict:
    """What decides a run's batches (recorded in every checkpoint, compared on resume);
    ``packed``: whether the run packs documents (None: unknown)."""
    t, dp = cfg.train, world // cfg.parallel.sp_size
    return {"seq_len": t.seq_len, "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum, "sp_size": cfg.parallel.sp_size,
            "dp_size": dp, "windows_per_step": t.micro_batch_size * t.grad_accum * dp, "pack_documents": packed}


def _saved_run(ckpt_dir: str, tag: str, name: str) -> dict:
    path = os.path.join(ckpt_dir, tag, name)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}


def incompatibilities(ckpt_dir: str, tag: str, cfg: RunConfig, model: dict | None) -> list[str]:
    """What DeepSpeed cannot load into this run: ZeRO stage, precision, model (``model``: the new
    run's model config dict); one ``"key: checkpoint X, now Y"`` item each."""
    saved = _saved_run(ckpt_dir, tag, "run.yaml").get("train") or {}
    out = []
    old, new = saved.get("zero_stage"), cfg.train.zero_stage
    if old is not None and old != new and not {old, new} <= {1, 2}:  # ZeRO-1 and -2 share one checkpoint format
        out.append(f"train.zero_stage: checkpoint {old}, now {new} (DeepSpeed stores the optimizer state of ZeRO-0, ZeRO-1/2 "
                   "and ZeRO-3 in different layouts)")
    old, new = saved.get("dtype"), cfg.train.dtype
    if old is not None and old != new:
        out.append(f"train.dtype: checkpoint {old!r}, now {new!r} (the optimizer state and loss scaling differ per precision)")
    old_model = _saved_run(ckpt_dir, tag, "model.yaml")
    if model is not None and old_model:
        keys = [k for k in sorted(set(old_model) | set(model)) if k not in COMPUTE_ONLY_MODEL_KEYS]
        diffs = [f"{k}: checkpoint {old_model.get(k)!r}, now {model.get(k)!r}" for k in keys if old_model.get(k) != model.get(k)]
        if diffs:
            out.append("model: " + ", ".join(diffs))
    return out


def batch_differences(state: dict, ckpt_dir: str, tag: str, cfg: RunConfig, world: int, data: dict | None,
                      packed: bool | None = None) -> tuple[list[str], list[str]]:
    """``(differences, notes)``: how this run's batches would differ from the checkpointed run's
    (``data``: this run's :func:`data_fingerprint`; ``packed``: whether it packs documents), and
    changes that leave them alone."""
    saved_run = _saved_run(ckpt_dir, tag, "run.yaml")
    old = state.get("batch")
    if old is None:  # a checkpoint written before the record: rebuild it from its run.yaml
        t, p = saved_run.get("train") or {}, saved_run.get("parallel") or {}
        old_world, old_sp = state.get("world_size", world), p.get("sp_size", state.get("sp_size", 1))
        if "seq_len" not in t:
            old = None
        else:
            dp = old_world // old_sp
            old = {"seq_len": t["seq_len"], "micro_batch_size": t.get("micro_batch_size"), "grad_accum": t.get("grad_accum"),
                   "sp_size": old_sp, "dp_size": dp, "windows_per_step": t.get("micro_batch_size", 0) * t.get("grad_accum", 0) * dp,
                   "pack_documents": None}
    new = batch_settings(cfg, world, packed)
    diffs, notes = [], []
    if old is not None:
        if old["seq_len"] != new["seq_len"]:
            diffs.append(f"train.seq_len: checkpoint {old['seq_len']}, now {new['seq_len']}")
        if old["windows_per_step"] != new["windows_per_step"]:
            show = lambda b: (f"{b['windows_per_step']} (micro_batch_size {b['micro_batch_size']} x grad_accum {b['grad_accum']} "  # noqa: E731
                              f"x dp_size {b['dp_size']}, sp_size {b['sp_size']})")
            diffs.append(f"windows per step: checkpoint {show(old)}, now {show(new)}")
        elif (old["sp_size"], old["micro_batch_size"], old["grad_accum"]) != (new["sp_size"], new["micro_batch_size"], new["grad_accum"]):
            notes.append(f"sp_size / micro_batch_size / grad_accum changed ({old['sp_size']}/{old['micro_batch_size']}/{old['grad_accum']} -> "
                         f"{new['sp_size']}/{new['micro_batch_size']}/{new['grad_accum']}); the global batch is the same")
        if None not in (old.get("pack_documents"), new["pack_documents"]) and old["pack_documents"] != new["pack_documents"]:
            diffs.append(f"data.pack_documents: checkpoint {old.get('pack_documents')!r}, now {new['pack_documents']!r}")
    old_data = state.get("data")
    if old_data is not None and data is not None:
        same_content = (old_data.get("num_tokens"), old_data.get("header_crc")) == (data["num_tokens"], data["header_crc"])
        if not same_content:
            diffs.append(f"data: checkpoint {old_data.get('path')} ({old_data.get('num_tokens'):,} tokens), "
                         f"now {data['path']} ({data['num_tokens']:,} tokens{', same path, other content' if old_data.get('path') == data['path'] else ''})")
        elif old_data.get("path") != data["path"]:
            notes.append(f"data.path: the dataset moved ({old_data.get('path')} -> {data['path']}), same content")
    elif old_data is None and data is not None:
        old_path = (saved_run.get("data") or {}).get("path")
        if old_path is not None and os.path.abspath(old_path) != data["path"]:
            diffs.append(f"data.path: checkpoint {old_path}, now {data['path']}")
    return diffs, notes


@dataclass
class StartPlan:
    """What :func:`plan_start` decided."""

    resume_tag: str | None = None  # the checkpoint to load (None: fresh start)
    start_step: int = 0
    done: bool = False  # the checkpoint is at or past train.steps: do nothing
    move_aside: bool = False  # --overwrite: move the old run aside before starting
    reshard: bool = False  # the checkpoint was written by another number of ranks: load it as a universal checkpoint
    messages: list[str] = field(default_factory=list)  # tell the user (rank 0)


def plan_start(cfg: RunConfig, *, world: int, resume: bool, overwrite: bool = False, reset_schedule: bool = False,
               allow_data_change: bool = False, reshard: bool = False, run_id: str | None = None, restarts: int = 0,
               model: dict | None = None, data: dict | None = None, packed: bool | None = None) -> StartPlan:
    """Decide how this run starts (see the module docstring); ValueError when it must refuse.
    ``model``: the run's model config dict; ``data``: its :func:`data_fingerprint`; ``packed``:
    whether it packs documents (compared with the checkpoint's on resume when given)."""
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
    tag, state, notes = checkpoint.resume_point(ckpt_dir, world, cfg.train.seed, reshard=reshard, ep_size=cfg.parallel.ep_size)
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
    where = os.path.join(ckpt_dir, tag)
    hard = incompatibilities(ckpt_dir, tag, cfg, model)
    if hard:
        raise ValueError(
            f"--resume: checkpoint {where} cannot be loaded into this run: " + "; ".join(hard)
            + " (restore the old values, or start a new run from its weights: `lasp export --checkpoint "
            + f"{where} --output DIR`, then --set model.init_from=DIR)"
        )
    batch_diffs, batch_notes = batch_differences(state, ckpt_dir, tag, cfg, world, data, packed)
    plan.messages += [f"--resume: {n}" for n in batch_notes]
    if batch_diffs and not allow_data_change:
        raise ValueError(
            f"--resume: the batches would differ from checkpoint {where}'s run: " + "; ".join(batch_diffs)
            + " (restore the old values, or pass --resume-allow-data-change to continue with the new batches)"
        )
    if batch_diffs:
        plan.messages.append("--resume-allow-data-change: continuing with new batches (" + "; ".join(batch_diffs) + ")")
    diffs = schedule_differences(state.get("schedule"), schedule_settings(cfg))
    if diffs and not reset_schedule:
        raise ValueError(
            f"--resume: the optimizer / schedule settings differ from checkpoint {os.path.join(ckpt_dir, tag)}: "
            + "; ".join(diffs) + " (pass --resume-reset-schedule to apply the new ones, or restore the old values)"
        )
    if diffs:
        plan.messages.append("--resume-reset-schedule: applying the new settings (" + "; ".join(diffs) + ")")
    plan.resume_tag, plan.start_step = tag, step
    if state.get("world_size", world) != world:
        plan.reshard = True
        plan.messages.append(f"--resume-reshard: repartitioning {where} from {state['world_size']} to {world} ranks "
                             "(DeepSpeed universal checkpoint)")
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
