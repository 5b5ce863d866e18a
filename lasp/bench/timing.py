"""Measuring one distributed step: adaptive repetitions, per-rank peak memory, env facts.

Timing (every rank takes the same decisions, so every rank enters the same collectives):

- CPU: ``barrier; t0 = perf_counter(); step(); barrier; t1`` -- the trailing barrier makes
  each sample the time of the SLOWEST rank; the samples are then max-reduced over the group.
- CUDA: CUDA events around ``step()`` on each rank, ``synchronize``, then the per-rank
  samples are max-reduced over the group (the step time is the slowest rank's).

Repetitions adapt to a time budget: ``warmup`` steps (at least one; stopped early once they
used a third of ``max_seconds``), then ``n = min(reps, (max_seconds - warm-up time) / estimate)``
timed steps, where the estimate is the slowest rank's last warm-up step; ``n`` is at least
``min_reps`` when that many steps fit in ``max_seconds``, else at least 1 (a slow point gets
one timed step after one warm-up step). :func:`time_interleaved` times several steps with
their repetitions interleaved round-robin (fair ratios under background load).

Peak memory of a step (measured on the first warm-up step, per rank, max over ranks):

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the step, after
  ``reset_peak_memory_stats`` (the caching allocator's view: tensors only).
- CPU (Linux): ``VmHWM - VmRSS``: the resident-set high-water mark during the step (reset via
  ``/proc/self/clear_refs``) over the resident set before it, after ``malloc_trim(0)`` hands
  freed heap back to the OS. It is process memory (allocator slack included), not a tensor
  count. Elsewhere it falls back to ``ru_maxrss`` growth, which is 0 when the step stays below
  an earlier peak of the process.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import resource
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

CPU_MEM_METHOD = "rss-hwm-delta"  # VmHWM - VmRSS around the step (Linux)
CPU_MEM_FALLBACK = "ru_maxrss-delta"
CUDA_MEM_METHOD = "cuda-max-allocated-delta"


def _world(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def barrier(group) -> None:
    if _world(group) > 1:
        dist.barrier(group=group)


def max_over_group(values: list[float], group) -> list[float]:
    """Element-wise max of a list of floats over the group (identity for one process)."""
    if _world(group) == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


# ----------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_memory(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Run ``step()`` once; return (peak extra memory in MiB during it, method name)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, CUDA_MEM_METHOD
    _malloc_trim()
    rss = _proc_status_kb("VmRSS")
    if rss is not None and _reset_hwm():
        step()
        hwm = _proc_status_kb("VmHWM") or rss
        return max(hwm - rss, 0) / 1024, CPU_MEM_METHOD
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, 0) / 1024, CPU_MEM_FALLBACK


# ----------------------------------------------------------------------------- timing


def _timed(step: Callable[[], None], group, device: torch.device) -> float:
    """One step's seconds on this rank (CPU: barrier-to-barrier; CUDA: events)."""
    if device.type == "cuda":
        barrier(group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    barrier(group)
    t0 = time.perf_counter()
    step()
    barrier(group)
    return time.perf_counter() - t0


def time_step(
    step: Callable[[], None],
    *,
    group,
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: float,
    min_reps: int = 3,
    instrument: Callable[[Callable[[], None]], object] | None = None,
) -> dict:
    """Warm up, then time ``step`` adaptively (see the module docstring).

    ``instrument(step)``, if given, runs the FIRST warm-up step instead of ``step()`` (e.g. under
    the communication recorder and the memory meter) and its return value is kept.

    Returns ``{"samples_s": [...], "warmup_s": [...], "instrumented": <instrument's result>}``;
    samples are max-reduced over the group (identical on every rank).
    """
    return time_interleaved([step], group=group, device=device, warmup=warmup, reps=reps, max_seconds=max_seconds,
                            min_reps=min_reps, instrument=instrument)[0]


def _warm_up(step, instrument, *, group, device, warmup: int, max_seconds: float) -> tuple[list[float], object]:
    warm: list[float] = []
    instrumented = None
    for i in range(max(1, warmup)):
        if i > 0 and max_over_group([sum(warm)], group)[0] > max_seconds / 3:
            break  # slow point: spend the budget on timed steps
        if i == 0 and instrument is not None:
            barrier(group)
            t0 = time.perf_counter()
            instrumented = instrument(step)
            barrier(group)
            warm.append(time.perf_counter() - t0)
        else:
            warm.append(_timed(step, group, device))
    return max_over_group(warm, group), instrumented


def time_interleaved(
    steps: list[Callable[[], None]],
    *,
    group,
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: float,
    min_reps: int = 3,
    instrument: Callable | list[Callable] | None = None,
) -> list[dict]:
    """:func:`time_step` for several steps whose timed repetitions are INTERLEAVED.

    ``instrument`` is one callable for all steps or a list, one per step. Each step is warmed
    up and gets its own repetition count within its own ``max_seconds``
    budget; then round r runs every step that still needs an r-th sample, starting from a
    rotating position. On a machine shared with other work, the steps see the same background
    load, so their ratios are fairer than those of back-to-back runs.
    """
    warms, instrumented, counts = [], [], []
    instruments = instrument if isinstance(instrument, list) else [instrument] * len(steps)
    for step, instr in zip(steps, instruments):
        warm, inst = _warm_up(step, instr, group=group, device=device, warmup=warmup, max_seconds=max_seconds)
        estimate = max(warm[-1], 1e-6)
        fit = int((max_seconds - sum(warm)) // estimate)
        floor = min_reps if min_reps * estimate <= max_seconds else 1
        warms.append(warm)
        instrumented.append(inst)
        counts.append(max(1, min(reps, max(fit, floor))))
    samples: list[list[float]] = [[] for _ in steps]
    k = len(steps)
    for r in range(max(counts)):
        for j in range(k):
            i = (r + j) % k
            if len(samples[i]) < counts[i]:
                samples[i].append(_timed(steps[i], group, device))
    return [
        {"samples_s": max_over_group(s, group), "warmup_s": w, "instrumented": inst}
        for s, w, inst in zip(samples, warms, instrumented)
    ]


def summarize_samples(samples_s: list[float]) -> dict:
    """Median, min, max, quartiles and std of the samples, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples_s)
    if not ms:
        return {}
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {
        "time_ms": statistics.median(ms),
        "time_ms_min": ms[0],
        "time_ms_max": ms[-1],
        "time_ms_p25": q[0],
        "time_ms_p75": q[2],
        "time_ms_std": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "n_reps": len(ms),
    }


# ----------------------------------------------------------------------------- environment


def env_info(device: str, world: int, **extra) -> dict:
    """Versions, device and machine facts stored in every results.json."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional at run time
        triton_version = None
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(0)})"
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": dev,
        "world": world,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_rank": torch.get_num_threads(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra)
    return info


def mem_available_gb() -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None
