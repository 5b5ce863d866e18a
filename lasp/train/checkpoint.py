"""Crash-safe DeepSpeed checkpoints.

Layout under the checkpoint directory::

    latest                  the tag of the newest COMPLETE checkpoint (DeepSpeed's own file name)
    step00000050/           one DeepSpeed checkpoint (+ model.yaml, run.yaml, trainer_state.json)
    step00000100/

A save goes to a hidden temporary tag ``.tmp-stepN`` first; after every rank has written its
files (barrier), rank 0 renames it to ``stepN`` and only then replaces ``latest`` atomically
(``latest.tmp`` + ``os.replace``). A crash at any point leaves ``latest`` naming an older,
complete checkpoint; leftovers of an interrupted save are removed by the next save. The
checkpoint directory must be visible to every rank (one machine, or a shared filesystem).
"""
from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_latest(ckpt_dir: str) -> str | None:
    """The tag named by ``ckpt_dir/latest`` (None if there is none); ValueError if it names a
    directory that does not exist."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise ValueError(f"checkpoint: {path} names {tag!r}, which is not a checkpoint directory in {ckpt_dir}")
    return tag


def read_trainer_state(ckpt_dir: str) -> dict | None:
    """The client state (step, tokens, seed, world_size, ...) of the latest checkpoint, read
    from disk without DeepSpeed (None when there is no checkpoint)."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    path = os.path.join(ckpt_dir, tag, TRAINER_STATE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint: cannot read {path}: {e}") from None


def check_resumable(ckpt_dir: str, world_size: int, seed: int) -> dict:
    """ValueError unless the latest checkpoint exists and was written by ``world_size`` ranks
    with ``seed`` (ZeRO shards are per rank; the data order is per seed)."""
    state = read_trainer_state(ckpt_dir)
    if state is None:
        raise ValueError(f"--resume: no checkpoint to resume from in {ckpt_dir!r}")
    if state.get("world_size", world_size) != world_size:
        raise ValueError(f"--resume: the latest checkpoint in {ckpt_dir!r} was written by {state['world_size']} ranks, this run has {world_size}")
    if state.get("seed", seed) != seed:
        raise ValueError(f"--resume: the latest checkpoint in {ckpt_dir!r} was trained with train.seed={state['seed']}, the config says {seed}")
    return state


def save(engine, ckpt_dir: str, step: int, client_state: dict, extra_files: dict[str, str], rank: int) -> str:
    """Save ``engine`` as ``tag_for(step)`` atomically (see the module docstring); every rank
    calls this. ``extra_files`` (name -> text) are written next to DeepSpeed's files by rank 0.
    Returns the checkpoint's directory."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of an interrupted save
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    _barrier()
    if rank == 0:
        files = dict(extra_files)
        files[TRAINER_STATE] = json.dumps(client_state, indent=2) + "\n"
        for name, text in files.items():
            _fsync_write(os.path.join(tmp_dir, name), text)
        if os.path.isdir(final_dir):  # re-saving a step (e.g. after a resume): replace it
            shutil.rmtree(final_dir)
        os.rename(tmp_dir, final_dir)
        _fsync_write(os.path.join(ckpt_dir, LATEST + ".tmp"), tag)
        os.replace(os.path.join(ckpt_dir, LATEST + ".tmp"), os.path.join(ckpt_dir, LATEST))
    _barrier()
    return final_dir


def load(engine, ckpt_dir: str) -> dict:
    """Load the latest checkpoint of ``ckpt_dir`` into ``engine`` (model, optimizer, LR
    schedule); returns its client state (``step``, ...). ValueError if there is none."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        raise ValueError(f"--resume: no checkpoint to resume from in {ckpt_dir!r} (no {LATEST!r} file)")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"--resume: DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}")
    return client_state or {}
