"""One run per output directory: an exclusive ``flock`` on ``<out_dir>/.lock``.

Rank 0 of a run takes the lock before it writes anything into ``out_dir`` (and into
``checkpoint.dir`` when that is outside ``out_dir``) and holds it until the run ends; the file
names the holder (pid, host, start time, command). A second run into the same directory is
refused on every rank, naming the first one, before it writes a byte: no interleaved
``metrics.jsonl``, no checkpoint replaced by another run's. The lock dies with its process (a
killed run leaves no stale lock; the file stays, unlocked). ``flock`` works across hosts on
filesystems that support it (NFSv4, Lustre with ``flock``; not every NFSv3 mount).

``lasp train`` also checks the lock before it starts any process (:func:`check_unlocked`), so a
second ``lasp train`` is refused at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = ".lock"


def lock_dirs(out_dir: str, checkpoint_dir: str) -> list[str]:
    """The directories a run locks: ``out_dir``, and ``checkpoint_dir`` when it is outside it."""
    out, ck = os.path.abspath(out_dir), os.path.abspath(checkpoint_dir)
    return [out] if ck == out or ck.startswith(out + os.sep) else [out, ck]


def holder(path: str) -> str:
    """Who holds the lock file ``path``, in words (from what it wrote there)."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return (f"pid {info['pid']} on {info['host']} (started {info.get('started', '?')}: "
                f"{info.get('command', '?')})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no owner yet)"


def refusal(directory: str) -> str:
    """The message of a run refused because ``directory`` is locked."""
    path = os.path.join(directory, LOCK_FILE)
    return (f"out_dir {directory!r} is in use by another run: {holder(path)}; wait for it to end, stop it, "
            f"or choose another out_dir (its lock: {path})")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class RunLock:
    """The lock of one run on its directories (:func:`lock_dirs`); :meth:`acquire` / :meth:`release`."""

    def __init__(self, dirs: list[str]):
        self.dirs = list(dirs)
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Lock every directory (created if needed); ValueError (:func:`refusal`) if another run
        holds one (then nothing stays locked)."""
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
            fd = os.open(os.path.join(d, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                self.release()
                raise ValueError(refusal(d))
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            self._fds.append(fd)

    def reacquire(self) -> None:
        """Lock the directories again after they were moved aside (``--overwrite``): the lock
        files this holds moved with them."""
        self.release()
        self.acquire()

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the descriptor drops the flock
        self._fds.clear()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(dirs: list[str]) -> None:
    """ValueError (:func:`refusal`) if another run holds the lock of one of ``dirs``; creates nothing."""
    for d in dirs:
        path = os.path.join(d, LOCK_FILE)
        if not os.path.isfile(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            if not _try_lock(fd):
                raise ValueError(refusal(d))
        finally:
            os.close(fd)
