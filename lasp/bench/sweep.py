"""The one driver of ``lasp bench layer`` and ``lasp bench model``: spawned gloo ranks (a
:class:`lasp.spawn.SpawnedGroup` per SP size) or launched ones (``torchrun``), points run in
groups with interleaved repetitions, a status and reason for every point that does not run
(``docs/bench/README.md``)."""
from __future__ import annotations

import atexit
import functools
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import comm
from ..spawn import Failure, RankError, SpawnedGroup
from .results import fmt_num, markdown_table, plot_metric_vs_seq_len, plot_speedup, report, results_doc, status_cell, write_results
from .timing import env_info, measure_peak_memory, mem_available_gb, summarize_samples, time_steps


@dataclass
class Bench:
    """What one benchmark plugs into the driver."""

    kind: str  # results.json kind: "layer" | "model"
    series: str  # the record key naming a series: "method" | "model"
    order: dict  # the registry: series names in table order
    build: Callable  # module-level build(point, rank, world, device) -> (forward, backward, info dict)
    columns: list[tuple[str, Callable[[dict], str]]]  # results.md: (header, cell of an ok record) after tokens/s
    time_header: str
    note: str  # results.md footnote; {mem_method} is filled in
    plots: dict[str, dict]  # PNG name -> plot_speedup(**kw) when kw has "base", else plot_metric_vs_seq_len(**kw)
    precheck: Callable[[dict], tuple[str, str] | None] = lambda point: None  # (status, reason) of a point not to run
    finish: Callable[[dict, dict, list[dict]], dict] = lambda point, rec, per_rank: {}  # more ok-record fields
    header: Callable[[dict], str] = lambda config: ""  # an optional results.md line above the environment
    plot_series: str = ""  # the record key naming a plotted line, when not ``series``


def local_device(name: str = "auto") -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (``auto``: when a GPU is visible) or the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


_POOLS: dict[int, SpawnedGroup] = {}


@atexit.register
def close_pools() -> None:
    """Stop every spawned group this process started (they are kept for later sweeps until then)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def _instrumented(forward, backward, device: torch.device) -> dict:
    """Run one step under the communication recorder and the memory meter: what this rank sends
    (calls and bytes: all, forward, by kind, by tag) and its peak memory."""
    n_fwd = []

    def fwd_bwd() -> None:
        o = forward()
        n_fwd.append(len(log.events))
        backward(o)

    with comm.record() as log:
        mem_mb, how = measure_peak_memory(fwd_bwd, device)
    sent, fwd = ([e for e in evs if e.kind != "recv"] for evs in (log.events, log.events[: n_fwd[0]]))
    tag_bytes = sum((Counter({e.tag: e.bytes}) for e in sent), Counter())
    return {"bytes": sum(e.bytes for e in sent), "bytes_fwd": sum(e.bytes for e in fwd), "calls": len(sent),
            "calls_fwd": len(fwd), "by_kind": dict(Counter(e.kind for e in sent)), "tag_bytes": dict(tag_bytes),
            "tag_calls": dict(Counter(e.tag for e in sent)), "peak_mem_mb": mem_mb, "mem_method": how}


def group_worker(rank: int, world: int, build: Callable, points: list[dict]) -> list[dict]:
    """Runs on every rank: build, warm up and time the points of one group (their repetitions
    interleaved), the first warm-up step of each instrumented; this rank's view of each."""
    device = local_device(points[0]["device"])
    torch.manual_seed(0)
    built = [build(p, rank, world, device) for p in points]
    seen: list[dict] = [{} for _ in points]

    def step(i: int) -> None:
        forward, backward, _ = built[i]
        if seen[i]:
            backward(forward())
        else:  # the first warm-up step
            seen[i].update(_instrumented(forward, backward, device))

    timed = time_steps([functools.partial(step, i) for i in range(len(points))], group=dist.group.WORLD if world > 1 else None,
                       device=device, **{k: points[0][k] for k in ("warmup", "reps", "min_reps", "max_seconds")})
    return [dict(info, samples_s=t["samples_s"], warmup_s=t["warmup_s"], **inst) for (_, _, info), t, inst in zip(built, timed, seen)]


def _public(point: dict) -> dict:
    """A point's fields for its record (``_``-prefixed ones only feed the workers)."""
    return {k: v for k, v in point.items() if not k.startswith("_")}


def ok_record(bench: Bench, point: dict, per_rank: list[dict]) -> dict:
    """One record from every rank's view of a point."""
    r0, most = per_rank[0], lambda key: max(r[key] for r in per_rank)
    rec = dict(_public(point), status="ok", reason="", **summarize_samples(r0["samples_s"]))
    rec.update(
        samples_ms=[s * 1e3 for s in r0["samples_s"]], warmup_ms=[s * 1e3 for s in r0["warmup_s"]],
        tokens_per_s=point["batch"] * point["seq_len"] / (rec["time_ms"] / 1e3), peak_mem_mb=most("peak_mem_mb"),
        peak_mem_mb_by_rank=[r["peak_mem_mb"] for r in per_rank], mem_method=r0["mem_method"],
        bytes_per_rank=most("bytes"), bytes_per_rank_fwd=most("bytes_fwd"),
        bytes_per_rank_bwd=max(r["bytes"] - r["bytes_fwd"] for r in per_rank), bytes_by_rank=[r["bytes"] for r in per_rank],
        collectives=most("calls"), collectives_fwd=most("calls_fwd"), collectives_by_kind=r0["by_kind"],
    )
    return dict(rec, **bench.finish(point, rec, per_rank))


def failure_record(point: dict, failure: Failure) -> dict:
    """The record of a point whose run failed: NotImplementedError -> ``unavailable``, ValueError
    (raised on every rank before any collective) -> ``skipped``, anything else -> ``error``."""
    status = {"NotImplementedError": "unavailable", "ValueError": "skipped"}.get(failure.exc_type, "error")
    status = status if failure.kind == "exception" else "error"
    reason = f"{failure.exc_type}: {failure.message}" if status == "error" and failure.exc_type else failure.message
    return dict(_public(point), status=status, reason=("out of memory: " if failure.kind == "oom" else "") + reason[:300])


def _precheck(bench: Bench, point: dict, world: int) -> tuple[str, str] | None:
    from ..parallel import check_shardable

    if world and point["sp"] != world:
        return "skipped", f"launched with world size {world}; this point needs sp={point['sp']}"
    if point["device"] == "cuda" and point["sp"] > 1 and not world:
        return "skipped", (f"sp={point['sp']} on CUDA needs one process per GPU: "
                           f"torchrun --nproc-per-node {point['sp']} -m lasp.cli bench ...")
    try:
        check_shardable(point["seq_len"], point["sp"], point["layout"])
    except ValueError as e:
        return "skipped", str(e)
    return bench.precheck(point)


def _run_group(bench: Bench, points: list[dict], world: int, timeout_s: float) -> list[dict]:
    """Every record of one group of points (same SP size and length)."""
    per_rank, failure = None, None
    if world:  # launched: this process is one rank
        try:
            mine = group_worker(dist.get_rank(), world, bench.build, points), None
        except Exception as e:  # noqa: BLE001 - a failure becomes a record (ValueErrors are raised on every rank alike)
            mine = None, Failure.from_exception(e, dist.get_rank())
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        per_rank, failure = [m for m, _ in gathered], next((f for _, f in gathered if f), None)
    else:  # spawned ranks (one thread each), P = 1 included
        try:
            pool = _POOLS.setdefault(points[0]["sp"], SpawnedGroup(points[0]["sp"], timeout=timeout_s))
            pool.timeout = timeout_s  # (the gloo timeout of ranks it starts)
            per_rank = pool.run(group_worker, bench.build, points, timeout=timeout_s)
        except RankError as e:
            failure = e.failure
    if failure is not None and failure.kind == "exception" and len(points) > 1:  # find the failing point(s): one by one
        return [rec for p in points for rec in _run_group(bench, [p], world, timeout_s / len(points))]
    if failure is not None:
        return [failure_record(p, failure) for p in points]
    return [ok_record(bench, p, [r[i] for r in per_rank]) for i, p in enumerate(points)]


def markdown(bench: Bench, records: list[dict], env: dict, command: str, config: dict) -> str:
    """results.md of a sweep: one row per record."""
    headers = [bench.series, "status", "P", "seq len", bench.time_header, "min-max ms", "reps", "tokens/s"]
    headers += [h for h, _ in bench.columns] + ["peak mem/rank"]
    rows, order = [], list(bench.order)
    for r in sorted(records, key=lambda r: (r["sp"], r["seq_len"], order.index(r[bench.series]), r.get(bench.plot_series, ""))):
        row = [r.get(bench.plot_series, r[bench.series]), status_cell(r), str(r["sp"]), f"{r['seq_len']:,}"] + ["-"] * (len(headers) - 4)
        if r["status"] == "ok":
            row[4:] = [fmt_num(r["time_ms"]), f"{r['time_ms_min']:.1f}-{r['time_ms_max']:.1f}", str(r["n_reps"]),
                       fmt_num(r["tokens_per_s"], 0), *(cell(r) for _, cell in bench.columns), f"{r['peak_mem_mb']:.0f} MiB"]
        rows.append(row)
    mem = next((r["mem_method"] for r in records if r.get("mem_method")), "-")
    return report(bench.kind, command, env, markdown_table(headers, rows), bench.note.format(mem_method=mem),
                  bench.header(config))


def main(bench: Bench, args, argv: list[str], points: list[dict], *, interleave: bool = False) -> int:
    """A sweep command: run every point, with the fields of the common flags (``cli.common_args``)
    added (with ``interleave``, the points of one (P, length) as one group); after each record write
    results.json and results.md (on launched ranks > 0: nothing), at the end also the plots; print the table."""
    from tqdm import tqdm

    common = dict(batch=args.batch, dtype=args.dtype, layout=args.layout, backend=args.backend, warmup=args.warmup, reps=args.reps,
                  min_reps=args.min_reps, max_seconds=args.max_seconds_per_point, device=local_device(args.device).type)
    points = [dict(p, **common) for p in points]
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)  # set by an external launcher (torchrun, deepspeed)
    world = 0 if world == 1 and not dist.is_initialized() else world  # one process: run here
    if world and not dist.is_initialized():
        from ..parallel import init_parallel

        init_parallel(sp_size=world)
    main_rank, command = not world or dist.get_rank() == 0, f"lasp bench {bench.kind} " + " ".join(argv)
    env = env_info(str(local_device(args.device)), world or max(args.sp), launcher="external" if world else "spawned gloo",
                   mem_available_gb=mem_available_gb(), **({} if world else {"torch_threads_per_rank": 1}))  # spawned: 1 thread each
    config, records = dict(vars(args)), []

    def write(final: bool) -> str:
        text = markdown(bench, records, env, command, config)
        series = bench.plot_series or bench.series
        names = {r.get(series) for r in records}  # a speed-up plot needs its base series
        plots = [(plot_speedup if "base" in kw else plot_metric_vs_seq_len)(records, os.path.join(args.out, name), series=series, **kw)
                 for name, kw in bench.plots.items() if final and ("base" not in kw or kw["base"] in names)]
        write_results(args.out, results_doc(bench.kind, env, config, records, [os.path.basename(p) for p in plots]), text)
        return text

    def emit(recs: list[dict]) -> None:
        if main_rank:
            records.extend(recs)
            write(False)

    groups: dict[tuple, list[dict]] = {}
    for i, p in enumerate(points):
        why = _precheck(bench, p, world)
        if why:
            emit([dict(_public(p), status=why[0], reason=why[1])])
        else:
            groups.setdefault((p["sp"], p["seq_len"]) if interleave else (i,), []).append(p)
    bar = tqdm(groups.values(), desc=f"bench {bench.kind}", unit="group", disable=not main_rank, file=sys.stderr)
    for pts in bar:
        bar.set_postfix_str(f"{'+'.join(p[bench.series] for p in pts)} T={pts[0]['seq_len']} P={pts[0]['sp']}")
        emit(_run_group(bench, pts, world, args.point_timeout * len(pts)))
    if main_rank:
        print(write(True))
        print(f"wrote {os.path.join(args.out, 'results.json')}, results.md and plots")
    return 0
