"""Running a benchmark sweep over points on P ranks, whatever launched us.

- **Spawned** (the default; CPU): for each SP size P, a :class:`lasp.spawn.SpawnedGroup` of P
  gloo processes (one torch thread each) runs ``worker(rank, P, point)`` for every point of
  that size; P = 1 runs in this process with one thread. The groups are kept for later sweeps
  of the same process and stopped at exit (:func:`close_pools`).
- **Launched** (``torchrun`` / the deepspeed launcher set ``WORLD_SIZE``; GPUs use NCCL): this
  process is one rank; points whose ``sp`` is not the world size are skipped; the per-rank
  results are gathered on rank 0, which alone writes files.

A point that fails never ends the sweep: the record gets ``status`` ``unavailable`` (the
method is not implemented), ``skipped`` (a ValueError before any collective, e.g. the heads do
not divide by P) or ``error`` (anything else, the rank's last traceback line as ``reason``).
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist

from ..spawn import RankError, SpawnedGroup

Worker = Callable[[int, int, dict], dict]
Merge = Callable[[dict, list[dict]], dict]


def launched_world() -> int:
    """World size set by an external launcher (torchrun, deepspeed), 0 when none."""
    return int(os.environ.get("WORLD_SIZE", "0") or 0)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def local_device(name: str = "auto") -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` or the CPU."""
    if resolve_device(name) == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def spawned_cuda_check(point: dict) -> dict | None:
    """Spawned ranks talk gloo: multi-rank CUDA points need an external launcher (NCCL)."""
    if point.get("device") == "cuda" and point["sp"] > 1 and not launched_world():
        return dict(point, status="skipped", reason=f"sp={point['sp']} on CUDA needs one process per GPU: "
                    f"torchrun --nproc-per-node {point['sp']} -m lasp.cli bench ...")
    return None


_POOLS: dict[int, SpawnedGroup] = {}


def _pool(size: int, timeout_s: float) -> SpawnedGroup:
    """A spawned group of ``size`` ranks, kept for later sweeps of this process (closed at exit)."""
    if size not in _POOLS:
        if not _POOLS:
            atexit.register(close_pools)
        _POOLS[size] = SpawnedGroup(size, timeout=timeout_s)
    _POOLS[size].timeout = timeout_s
    return _POOLS[size]


def close_pools() -> None:
    """Stop every spawned group this process started."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def _failure(point: dict, exc_text: str) -> dict:
    """Classify a failure from its traceback text."""
    lines = [ln.strip() for ln in exc_text.strip().splitlines() if ln.strip()]
    for kind, status in (("NotImplementedError", "unavailable"), ("ValueError", "skipped")):
        hits = [ln for ln in lines if ln.startswith(kind + ":")]
        if hits:
            return dict(point, status=status, reason=hits[-1].split(":", 1)[1].strip())
    tail = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))]
    return dict(point, status="error", reason=(tail[-1] if tail else exc_text)[:300])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pt", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def run_points(
    points: list[dict],
    worker: Worker,
    merge: Merge,
    *,
    desc: str,
    timeout_s: float,
    precheck: Callable[[dict], dict | None] | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every point; returns one record per point (on launched ranks > 0: an empty list).

    ``worker(rank, world, point) -> dict`` runs on every rank; ``merge(point, per_rank)`` builds
    the record (or a list of records, for a point that is a group ``{"points": [...], ...}``). ``precheck(point)`` may return a finished record (skipped / unavailable) so the
    point never reaches the ranks. ``on_record`` is called after each record (partial saves).
    """
    world = launched_world()
    if world > 1 or (world == 1 and dist.is_initialized()):
        return _run_launched(points, worker, merge, desc=desc, precheck=precheck, on_record=on_record)
    records: list[dict] = []
    bar = _progress(len(points), desc, True)
    by_sp: dict[int, list[dict]] = {}
    for p in points:
        by_sp.setdefault(p["sp"], []).append(p)
    for sp, pts in by_sp.items():
        for p in pts:
            bar.set_postfix_str(_label(p))
            rec = precheck(p) if precheck else None
            if rec is None:
                rec = _run_one(_pool(sp, timeout_s) if sp > 1 else None, worker, merge, p, timeout_s)
            for r in _expand(rec):
                records.append(r)
                if on_record:
                    on_record(r)
            bar.update(1)
    bar.close()
    return records


def _expand(rec: dict | list[dict]) -> list[dict]:
    """A merge may return several records (a group of points); a failed group fails each point."""
    if isinstance(rec, list):
        return rec
    if "points" in rec:
        return [dict(p, status=rec["status"], reason=rec.get("reason", "")) for p in rec["points"]]
    return [rec]


def _label(p: dict) -> str:
    name = p.get("method") or p.get("model")
    return f"{name} T={p['seq_len']} P={p['sp']}"


def _run_one(pool: SpawnedGroup | None, worker: Worker, merge: Merge, point: dict, timeout_s: float) -> dict:
    if pool is None:  # P = 1: this process, one thread (as one rank of a spawned group)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return merge(point, [worker(0, 1, point)])
        except Exception:  # noqa: BLE001 - any failure becomes a record
            import traceback

            return _failure(point, traceback.format_exc())
        finally:
            torch.set_num_threads(threads)
    try:
        return merge(point, pool.run(worker, point, timeout=timeout_s))
    except RankError as e:
        text = str(e)
        if "did not finish" in text and "raised" not in text:
            return dict(point, status="error", reason=f"timed out after {timeout_s:.0f} s (pool restarted)")
        return _failure(point, text)


def _run_launched(points, worker, merge, *, desc, precheck, on_record) -> list[dict]:
    """This process is one rank of an externally launched world (torchrun; NCCL on GPUs)."""
    if not dist.is_initialized():
        from ..parallel import init_parallel

        init_parallel(sp_size=launched_world())
    rank, world = dist.get_rank(), dist.get_world_size()
    records: list[dict] = []
    bar = _progress(len(points), desc, rank == 0)
    for p in points:
        rec = precheck(p) if precheck else None
        if rec is None and p["sp"] != world:
            rec = dict(p, status="skipped", reason=f"launched with world size {world}; this point needs sp={p['sp']}")
        if rec is None:
            try:
                mine = worker(rank, world, p)
                failed = None
            except Exception:  # noqa: BLE001 - ValueErrors are raised on every rank alike
                import traceback

                mine, failed = None, traceback.format_exc()
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (mine, failed))
            errs = [f for _, f in gathered if f]
            rec = _failure(p, errs[0]) if errs else merge(p, [m for m, _ in gathered])
        if rank == 0:
            for r in _expand(rec):
                records.append(r)
                if on_record:
                    on_record(r)
        bar.update(1)
    bar.close()
    return records
