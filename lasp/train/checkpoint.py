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
Retention (``keep_last``): once a new checkpoint is complete, the checkpoints of lower steps
beyond the newest ``keep_last`` are removed (renamed aside first, so a removal cut short never
looks like a checkpoint). A rank that cannot write its part (a full disk above all) makes the
save fail on EVERY rank with :class:`CheckpointWriteError`, the half-written directory removed
and ``latest`` untouched; a full disk is named as such ("no space left on device"), whatever
the layer that noticed it (torch's zip writer reports it as ``unexpected pos``).

On resume :func:`find_resumable` verifies the latest checkpoint against its manifest; a
damaged one is reported by name and the newest intact checkpoint is used instead. The
checkpoint directory must be visible to every rank (one machine, or a shared filesystem).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

LATEST = "latest"
TMP_PREFIX = ".tmp-"
RETIRED_PREFIX = ".retired-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_TAG_RE = re.compile(r"^step(\d{8})$")
#: less free space than this after a failed write means the disk was full
FULL_DISK_BYTES = 16 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (raised on every rank; the message says why)."""


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


def resume_point(ckpt_dir: str, world_size: int, seed: int, reshard: bool = False, ep_size: int = 1) -> tuple[str, dict, list[str]]:
    """``(tag, state, notes)`` of the checkpoint a ``--resume`` continues from: the newest intact
    one. ValueError unless there is one, written by ``world_size`` ranks (or ``reshard``: any
    number, :mod:`lasp.train.reshard`) with ``seed`` (ZeRO shards are per rank; the data order
    is per seed) and ``ep_size`` (experts are per EP rank; no resharding with expert parallelism)."""
    tag, notes = find_resumable(ckpt_dir)
    if tag is None:
        why = ("; ".join(notes)) if notes else "none was ever written"
        raise ValueError(f"--resume: no intact checkpoint to resume from in {ckpt_dir!r} ({why})")
    state = read_state(ckpt_dir, tag)
    where = os.path.join(ckpt_dir, tag)
    if state.get("world_size", world_size) != world_size and not reshard:
        raise ValueError(
            f"--resume: checkpoint {where} was written by {state['world_size']} ranks, this run has {world_size} "
            f"(ZeRO partitions the optimizer state per rank): run it on {state['world_size']} ranks, add --resume-reshard "
            f"to repartition it for {world_size} (DeepSpeed's universal checkpoint: optimizer state kept), or continue from "
            f"its weights only: `lasp export --checkpoint {where} --output DIR`, then a new run with --set model.init_from=DIR"
        )
    if state.get("seed", seed) != seed:
        raise ValueError(f"--resume: checkpoint {where} was trained with train.seed={state['seed']}, the config says {seed}")
    if state.get("ep_size", 1) != ep_size:
        raise ValueError(f"--resume: checkpoint {where} was written with parallel.ep_size={state.get('ep_size', 1)}, "
                         f"the config says {ep_size}")
    if reshard and ep_size > 1:
        raise ValueError(f"--resume-reshard: checkpoint {where} holds expert-parallel shards (parallel.ep_size={ep_size}); "
                         "resharding them is not supported")
    return tag, state, notes


def check_resumable(ckpt_dir: str, world_size: int, seed: int) -> dict:
    """:func:`resume_point`'s state only."""
    return resume_point(ckpt_dir, world_size, seed)[1]


# ---------------------------------------------------------------------------- writing


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process can still write on the filesystem of ``path``."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def is_disk_full(err: BaseException, path: str) -> bool:
    """Whether ``err`` (raised while writing under ``path``) comes from a full disk: ENOSPC or
    EDQUOT anywhere in its chain, or hardly any space left on ``path``'s filesystem."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:
        return free_bytes(path) < FULL_DISK_BYTES
    except OSError:
        return False


def _describe_write_error(err: BaseException, ckpt_dir: str, step: int, full: bool) -> str:
    newest = read_latest_quietly(ckpt_dir)
    keep = f"the newest complete checkpoint is still {os.path.join(ckpt_dir, newest)}" if newest else "no checkpoint was completed"
    if full:
        return (f"checkpoint: no space left on device while saving step {step} to {ckpt_dir} "
                f"({free_bytes(ckpt_dir) / 2**20:,.0f} MiB free after removing the partial save; {keep}): free some space, "
                f"lower checkpoint.keep_last, or point checkpoint.dir at a larger disk, then --resume")
    return f"checkpoint: could not save step {step} to {ckpt_dir}: {type(err).__name__}: {err} ({keep})"


def read_latest_quietly(ckpt_dir: str) -> str | None:
    """:func:`read_latest` without raising (None when unreadable)."""
    try:
        return read_latest(ckpt_dir)
    except (OSError, ValueError):
        return None


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one tiny all-reduce; the local flag
    without a process group)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def prune(ckpt_dir: str, keep_last: int | None, newest_step: int) -> list[str]:
    """Remove the checkpoints of steps <= ``newest_step`` beyond the newest ``keep_last`` (higher
    steps, left by an earlier timeline, are replaced when training reaches them). Returns the
    removed tags. Each is renamed aside before it is deleted."""
    if keep_last is None:
        return []
    tags = [t for t in list_tags(ckpt_dir) if int(t[4:]) <= newest_step]
    removed = []
    for tag in tags[keep_last:]:
        aside = os.path.join(ckpt_dir, RETIRED_PREFIX + tag)
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(os.path.join(ckpt_dir, tag), aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(tag)
    return removed


def save(engine, ckpt_dir: str, step: int, client_state: dict, extra_files: dict[str, str], rank: int,
         keep_last: int | None = None, write_more=None) -> str:
    """Save ``engine`` as ``tag_for(step)`` atomically (see the module docstring); every rank
    calls this. ``extra_files`` (name -> text) are written next to DeepSpeed's files by rank 0.
    ``keep_last``: retention (None keeps every checkpoint). ``write_more(tag_dir)``, when given,
    runs on every rank after DeepSpeed's save (files of its own, e.g. expert-parallel shards), then
    one barrier, so the manifest lists them. Returns the checkpoint's directory;
    :class:`CheckpointWriteError` on every rank when any rank could not write its part."""
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, final_dir = os.path.join(ckpt_dir, tmp_tag), os.path.join(ckpt_dir, tag)
    retired = os.path.join(ckpt_dir, RETIRED_PREFIX + tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of an interrupted save or removal
            if name.startswith((TMP_PREFIX, RETIRED_PREFIX)):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    _barrier()
    error: BaseException | None = None
    try:
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        error = e
        _barrier()  # the barrier that closes DeepSpeed's save, which the others are waiting in
    if write_more is not None:  # on every rank, then one barrier (whatever failed)
        if error is None:
            try:
                write_more(tmp_dir)
            except OSError as e:
                error = e
        _barrier()
    if rank == 0 and error is None:
        try:
            files = dict(extra_files)
            files[TRAINER_STATE] = json.dumps(client_state, indent=2) + "\n"
            for name, text in files.items():
                _fsync_write(os.path.join(tmp_dir, name), text)
            write_manifest(tmp_dir)
        except OSError as e:
            error = e
    if any_rank(error is not None):
        full = error is not None and is_disk_full(error, ckpt_dir)  # before the partial save is removed
        _barrier()
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _barrier()
        if error is None:
            raise CheckpointWriteError(f"checkpoint: another rank could not write its part of step {step} to {ckpt_dir} (see its error)")
        raise CheckpointWriteError(_describe_write_error(error, ckpt_dir, step, full)) from None
    if rank == 0:
        if os.path.isdir(final_dir):  # re-saving a step: keep the old one until the new one is in
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(final_dir, retired)
        os.rename(tmp_dir, final_dir)
        _fsync_write(os.path.join(ckpt_dir, LATEST + ".tmp"), tag)
        os.replace(os.path.join(ckpt_dir, LATEST + ".tmp"), os.path.join(ckpt_dir, LATEST))
        shutil.rmtree(retired, ignore_errors=True)
        prune(ckpt_dir, keep_last, step)
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
