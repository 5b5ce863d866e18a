"""A pool of P spawned gloo processes that run functions on every rank: the multi-rank test
harness and the CPU benchmarks' launcher.

``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank (``fn`` must be
importable, i.e. defined at module level) and returns the per-rank results. A failed run raises
:class:`RankError` carrying a structured :class:`Failure` per failed rank (``kind``:
``exception``, ``oom`` or ``timeout``; the exception's class name and message; the traceback).
A run that does not finish in ``timeout`` seconds kills the pool (never a hang); a broken pool is
restarted on the next ``run``.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass

_GRACE_S = 5.0  # after a rank failed, how long its peers (maybe stuck in a collective) get


@dataclass
class Failure:
    """Why a rank (or a whole run) failed. ``kind``: ``exception`` | ``oom`` | ``timeout``."""

    kind: str
    exc_type: str = ""  # the exception's class name, e.g. "ValueError" ("" for a timeout / killed rank)
    message: str = ""  # str(exception), or what happened
    traceback: str = ""
    rank: int | None = None

    @classmethod
    def from_exception(cls, e: BaseException, rank: int | None = None) -> "Failure":
        """The failure of the exception being handled (call inside ``except``)."""
        oom = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError
        return cls("oom" if oom else "exception", type(e).__name__, str(e), traceback.format_exc(), rank)


class RankError(AssertionError):
    """A rank raised, died or the pool timed out: ``.failures`` (rank -> Failure), ``.failure``
    (the first rank's), ``.kind`` (its kind). ``str()`` gives every failed rank's traceback."""

    def __init__(self, failures: dict[int, Failure], text: str):
        super().__init__(text)
        self.failures = failures
        self.failure = failures[min(failures)]
        self.kind = self.failure.kind


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox, outbox, threads: int, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    while True:
        job = inbox.get()
        if job is None:
            break
        job_id, fn, args, kwargs = job
        try:
            outbox.put((job_id, rank, True, fn(rank, world, *args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            outbox.put((job_id, rank, False, Failure.from_exception(e, rank)))
    dist.destroy_process_group()


class SpawnedGroup:
    """P gloo processes kept alive between runs (spawned lazily on first use)."""

    def __init__(self, world_size: int, *, timeout: float = 180.0, threads: int = 1):
        self.world_size, self.timeout, self.threads = world_size, timeout, threads
        self._procs: list = []
        self._job = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._inboxes[r], self._outbox, self.threads, self.timeout),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float | None = None, **kwargs) -> list:
        """``[fn(rank, world_size, *args, **kwargs) for each rank]``, run concurrently on the ranks."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        self._job += 1
        for box in self._inboxes:
            box.put((self._job, fn, args, kwargs))
        timeout = timeout or self.timeout
        results: dict[int, object] = {}
        errors: dict[int, Failure] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size and time.monotonic() < deadline:
            try:
                job_id, rank, ok, value = self._outbox.get(timeout=1.0)
            except queue.Empty:
                for r, p in enumerate(self._procs):  # a rank that died without reporting (e.g. the OOM killer)
                    if p.exitcode is not None and r not in results and r not in errors:
                        errors[r] = Failure("oom" if p.exitcode == -9 else "exception", "",
                                            f"rank {r} died with exit code {p.exitcode}", rank=r)
                continue
            if job_id != self._job:
                continue
            if ok:
                results[rank] = value
            else:
                errors[rank] = value
            if errors:  # peers of a failed rank may be stuck in a collective: short grace
                deadline = min(deadline, time.monotonic() + _GRACE_S)
        if errors or len(results) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
            msg = [f"rank {r} raised:\n{f.traceback or f.message}" for r, f in sorted(errors.items())]
            if missing:
                self.close()  # stuck ranks: restart the pool next time
                text = f"ranks {missing} did not finish in {timeout:.0f} s (timeout or stuck in a collective); pool restarted"
                msg.append(text)
                if not errors:
                    errors = {r: Failure("timeout", "", text, rank=r) for r in missing}
            raise RankError(errors, "\n".join(msg))
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
