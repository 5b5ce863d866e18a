"""A pool of P spawned gloo processes that run functions on every rank: the multi-rank test
harness and the CPU benchmarks' launcher.

``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank (``fn`` must be
importable, i.e. defined at module level) and returns the per-rank results. A rank that raises
makes ``run`` raise :class:`RankError` with that rank's traceback; a run that does not finish
in ``timeout`` seconds kills the pool and raises (never a hang). A broken pool is restarted on
the next ``run``.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


class RankError(AssertionError):
    """A rank raised, or the pool timed out."""


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
        except BaseException:  # noqa: BLE001 - report everything to the parent
            outbox.put((job_id, rank, False, traceback.format_exc()))
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
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(results) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            if errors:  # peers of a failed rank may be stuck in a collective: short grace
                remaining = min(remaining, 5.0)
            try:
                job_id, rank, ok, value = self._outbox.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                break
            if job_id != self._job:
                continue
            (results if ok else errors)[rank] = value
        if errors or len(results) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
            if missing:
                self.close()  # stuck ranks: restart the pool next time
            msg = [f"rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                msg.append(f"ranks {missing} did not finish (timeout or stuck in a collective); pool restarted")
            raise RankError("\n".join(msg))
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
