"""Measuring one distributed step: adaptive repetitions (the slowest rank's time), per-rank
peak memory, env facts. The rules: ``docs/bench/README.md``."""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
import resource
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def max_over_group(values: list[float], group) -> list[float]:
    """Element-wise max of a list of floats over the group (identity for one process: ``group=None``)."""
    if group is None or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


def _proc_kb(path: str, key: str) -> int | None:
    """A ``key: N kB`` value of a /proc file (None when unknown)."""
    try:
        with open(path, encoding="ascii") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith(key + ":")), None)
    except OSError:
        return None


def measure_peak_memory(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Run ``step()`` once; return (peak extra memory in MiB during it, method name)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda-max-allocated-delta"
    with contextlib.suppress(OSError, AttributeError):  # give freed heap pages back first (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss = None
    with contextlib.suppress(OSError):  # Linux: reset the high-water mark VmHWM
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        rss = _proc_kb("/proc/self/status", "VmRSS")
    if rss is not None:
        step()
        return max((_proc_kb("/proc/self/status", "VmHWM") or rss) - rss, 0) / 1024, "rss-hwm-delta"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, 0) / 1024, "ru_maxrss-delta"


def _timed(step: Callable[[], None], group, device: torch.device) -> float:
    """One step's seconds on this rank (CPU: barrier-to-barrier; CUDA: events)."""
    barrier = dist.barrier if group is not None else lambda group: None
    barrier(group=group)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    barrier(group=group)
    return time.perf_counter() - t0


def time_steps(steps: list[Callable[[], None]], *, group, device: torch.device, warmup: int, reps: int,
               max_seconds: float, min_reps: int = 3) -> list[dict]:
    """Warm up and time each of ``steps`` adaptively, repetitions interleaved from a rotating start
    (``docs/bench/README.md``). Per step ``{"samples_s", "warmup_s"}``, the same on every rank."""
    out, counts = [], []
    for step in steps:
        warm: list[float] = []
        for i in range(max(1, warmup)):
            if i > 0 and max_over_group([sum(warm)], group)[0] > max_seconds / 3:
                break  # slow point: spend the budget on timed steps
            warm.append(_timed(step, group, device))
        warm = max_over_group(warm, group)
        estimate = max(warm[-1], 1e-6)
        floor = min_reps if min_reps * estimate <= max_seconds else 1
        counts.append(max(1, min(reps, max(int((max_seconds - sum(warm)) // estimate), floor))))
        out.append({"samples_s": [], "warmup_s": warm})
    for r in range(max(counts, default=0)):
        for j in range(len(steps)):
            i = (r + j) % len(steps)
            if len(out[i]["samples_s"]) < counts[i]:
                out[i]["samples_s"].append(_timed(steps[i], group, device))
    for o in out:
        o["samples_s"] = max_over_group(o["samples_s"], group)
    return out


def summarize_samples(samples_s: list[float]) -> dict:
    """Median, min, max, quartiles and std of the samples (at least one), in milliseconds."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p25, p50, p75 = np.percentile(ms, [25, 50, 75])
    return {"time_ms": float(p50), "time_ms_min": float(ms.min()), "time_ms_max": float(ms.max()),
            "time_ms_p25": float(p25), "time_ms_p75": float(p75),
            "time_ms_std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, "n_reps": len(ms)}


def env_info(device: str, world: int, **extra) -> dict:
    """Versions, device and machine facts stored in every results.json."""
    try:
        from triton import __version__ as triton_version
    except Exception:  # noqa: BLE001 - triton is optional at run time
        triton_version = None
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    return {
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(), "device": device,
        "world": world, "cpu_count": os.cpu_count(), "torch_threads_per_rank": torch.get_num_threads(),
        "platform": platform.platform(), "hostname": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra,
    }


def mem_available_gb() -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None when unknown)."""
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    return None if kb is None else kb / 2**20
