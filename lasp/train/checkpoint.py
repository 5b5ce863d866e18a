"""Crash-safe, verified DeepSpeed checkpoints.

Layout under the checkpoint directory::

    latest                  the tag of the newest COMPLETE checkpoint (DeepSpeed's own file name)
    step00000050/           one DeepSpeed checkpoint (+ model.yaml, run.yaml, trainer_state.json,
    step00000100/            manifest.json: the size and sha256 of every other file)

A save goes to a hidden temporary tag ``.tmp-stepN`` first. After every rank has written its
files (barrier), rank 0 writes the manifest, renames the temporary directory into place and
only then replaces ``latest`` atomically (``latest.tmp`` + ``os.replace``). Re-saving a step
that exists moves the old directory aside (``.retired-stepN``) and deletes it only after the
new one is complete and ``latest`` names it: no complete checkpoint is ever deleted to make
room for one that is not. Leftovers of an interrupted save are removed by the next save.

On resume :func:`find_resumable` verifies the latest checkpoint against its manifest; a
damaged one is reported by name and the newest intact checkpoint is used instead. The
checkpoint directory must be visible to every rank (one machine, or a shared filesystem).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch.distributed as dist

LATEST = "latest"
TMP_PREFIX = ".tmp-"
RETIRED_PREFIX = ".retired-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_TAG_RE = re.compile(r"^step(\d{8})$")


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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- manifest


def write_manifest(tag_dir: str) -> dict:
    """Write ``tag_dir/manifest.json``: ``{"files": {relpath: {"size": n, "sha256": h}}}``."""
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, tag_dir)
            if rel != MANIFEST:
                files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    manifest = {"format": "lasp-checkpoint", "version": 1, "files": files}
    _fsync_write(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify(tag_dir: str) -> str | None:
    """None if ``tag_dir`` matches its manifest, else what is wrong with it (one line)."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isdir(tag_dir):
        return "the directory does not exist"
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"{MANIFEST} is missing (an incomplete save, or written by an older lasp)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in sorted(files.items()):
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its checksum (corrupt)"
    return None


# ---------------------------------------------------------------------------- reading


def list_tags(ckpt_dir: str) -> list[str]:
    """The ``stepN`` tags in ``ckpt_dir``, newest (highest step) first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [n for n in os.listdir(ckpt_dir) if _TAG_RE.match(n) and os.path.isdir(os.path.join(ckpt_dir, n))]
    return sorted(tags, reverse=True)


def has_checkpoints(ckpt_dir: str) -> bool:
    """True when ``ckpt_dir`` holds a ``latest`` file or any ``stepN`` directory."""
    return os.path.isfile(os.path.join(ckpt_dir, LATEST)) or bool(list_tags(ckpt_dir))


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


def read_state(ckpt_dir: str, tag: str) -> dict:
    """The client state (step, tokens, seed, world_size, run_id, optim, ...) of checkpoint ``tag``."""
    path = os.path.join(ckpt_dir, tag, TRAINER_STATE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint: cannot read {path}: {e}") from None


def find_resumable(ckpt_dir: str) -> tuple[str | None, list[str]]:
    """``(tag, notes)``: the newest intact checkpoint of ``ckpt_dir`` (None if there is none)
    and one line per damaged checkpoint skipped on the way (the latest first)."""
    notes: list[str] = []
    latest_path = os.path.join(ckpt_dir, LATEST)
    candidates = list_tags(ckpt_dir)
    if os.path.isfile(latest_path):
        with open(latest_path, encoding="utf-8") as f:
            named = f.read().strip()
        if named in candidates:  # the latest first, then older ones
            candidates = [named] + [t for t in candidates if t < named]
        else:
            notes.append(f"checkpoint {os.path.join(ckpt_dir, named or '<empty>')} named by {latest_path} does not exist")
    for tag in candidates:
        problem = verify(os.path.join(ckpt_dir, tag))
        if problem is None:
            return tag, notes
        notes.append(f"checkpoint {os.path.join(ckpt_dir, tag)} is damaged: {problem}")
    return None, notes


def read_trainer_state(ckpt_dir: str) -> dict | None:
    """The client state of the newest intact checkpoint (None when there is none)."""
    tag, _ = find_resumable(ckpt_dir)
    return None if tag is None else read_state(ckpt_dir, tag)


def resume_point(ckpt_dir: str, world_size: int, seed: int, ep_size: int = 1) -> tuple[str, dict, list[str]]:
    """``(tag, state, notes)`` of the checkpoint a ``--resume`` continues from: the newest intact
    one. ValueError unless there is one, written by ``world_size`` ranks with ``seed`` (ZeRO
    shards are per rank; the data order is per seed) and ``ep_size`` (experts are per EP rank)."""
    tag, notes = find_resumable(ckpt_dir)
    if tag is None:
        why = ("; ".join(notes)) if notes else "none was ever written"
        raise ValueError(f"--resume: no intact checkpoint to resume from in {ckpt_dir!r} ({why})")
    state = read_state(ckpt_dir, tag)
    where = os.path.join(ckpt_dir, tag)
    if state.get("world_size", world_size) != world_size:
        raise ValueError(f"--resume: checkpoint {where} was written by {state['world_size']} ranks, this run has {world_size}")
    if state.get("seed", seed) != seed:
        raise ValueError(f"--resume: checkpoint {where} was trained with train.seed={state['seed']}, the config says {seed}")
    if state.get("ep_size", 1) != ep_size:
        raise ValueError(f"--resume: checkpoint {where} was written with parallel.ep_size={state.get('ep_size', 1)}, "
                         f"the config says {ep_size}")
    return tag, state, notes


def check_resumable(ckpt_dir: str, world_size: int, seed: int) -> dict:
    """:func:`resume_point`'s state only."""
    return resume_point(ckpt_dir, world_size, seed)[1]


# ---------------------------------------------------------------------------- writing


def save(engine, ckpt_dir: str, step: int, client_state: dict, extra_files: dict[str, str], rank: int, write_more=None) -> str:
    """Save ``engine`` as ``tag_for(step)`` atomically (see the module docstring); every rank
    calls this. ``extra_files`` (name -> text) are written next to DeepSpeed's files by rank 0;
    ``write_more(tag_dir)``, when given, runs on every rank after DeepSpeed's save (files of its
    own, e.g. expert-parallel shards). Returns the checkpoint's directory."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)
    retired = os.path.join(ckpt_dir, RETIRED_PREFIX + tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of an interrupted save
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    if write_more is not None:
        write_more(tmp_dir)
    _barrier()
    if rank == 0:
        files = dict(extra_files)
        files[TRAINER_STATE] = json.dumps(client_state, indent=2) + "\n"
        for name, text in files.items():
            _fsync_write(os.path.join(tmp_dir, name), text)
        write_manifest(tmp_dir)
        if os.path.isdir(final_dir):  # re-saving a step: keep the old one until the new one is in
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(final_dir, retired)
        os.rename(tmp_dir, final_dir)
        _fsync_write(os.path.join(ckpt_dir, LATEST + ".tmp"), tag)
        os.replace(os.path.join(ckpt_dir, LATEST + ".tmp"), os.path.join(ckpt_dir, LATEST))
        shutil.rmtree(retired, ignore_errors=True)
    _barrier()
    return final_dir


def load(engine, ckpt_dir: str, tag: str | None = None) -> dict:
    """Load checkpoint ``tag`` (default: the newest intact one) of ``ckpt_dir`` into ``engine``
    (model, optimizer, LR schedule); returns its client state. ValueError if there is none."""
    if tag is None:
        tag, notes = find_resumable(ckpt_dir)
        if tag is None:
            raise ValueError(f"--resume: no intact checkpoint to resume from in {ckpt_dir!r} ({'; '.join(notes) or 'none written'})")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"--resume: DeepSpeed could not load checkpoint {tag!r} from {ckpt_dir!r}")
    return client_state or {}
