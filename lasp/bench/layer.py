"""``lasp bench layer``: one attention layer, forward + backward, across methods, total
sequence lengths and SP sizes.

    lasp bench layer --method lasp2,lasp1,ring --seq-len 8192,32768 --sp 2,4 --out DIR

Methods (benchmark name -> public operator):

    lasp2            lasp.linear_attention(method="lasp2")      one all-gather of states
    lasp1            lasp.linear_attention(method="lasp1")      P2P ring of states
    ulysses-linear   lasp.linear_attention(method="ulysses")    all-to-all of q/k/v/o
    allgather        lasp.softmax_attention(method="allgather") LASP-2H: all-gather K/V
    ring             lasp.softmax_attention(method="ring")      ring attention, P2P K/V
    ulysses-softmax  lasp.softmax_attention(method="ulysses")   all-to-all of q/k/v/o

Each point builds random ``[B, T/P, H, D]`` q, k, v (and ``do``) on every rank, runs warm-up
steps (the first under the communication recorder and the memory meter), then timed steps
(see :mod:`lasp.bench.timing`). Recorded per point: median time and spread, every raw
sample, tokens/s (``B * T / time``, the whole group), peak memory per rank, and from
:func:`lasp.comm.record` the calls and bytes each rank sends per forward + backward
(``bytes_per_rank`` = max over ranks; ``collectives`` = calls per rank, a send/recv pair
counted once).

On the CPU the ranks are spawned gloo processes, one thread each. Under ``torchrun`` (GPUs:
NCCL, one process per GPU) each process is a rank: ``torchrun --nproc-per-node 8 -m lasp.cli
bench layer --sp 8 ...``; CUDA events time the steps.

Memory guard (CPU): a point whose rough peak-memory estimate (:func:`estimate_memory_gb`)
exceeds ``--max-memory-gb`` (default 70% of the memory available at start) is recorded as
``skipped`` instead of run, so a quadratic method cannot take the machine down.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from .. import comm
from .plots import plot_metric_vs_seq_len, plot_speedup
from .results import env_line, fmt_bytes, fmt_num, markdown_table, results_doc, status_cell, write_results
from .sweep import launched_world, local_device, resolve_device, run_points, spawned_cuda_check
from .timing import env_info, mem_available_gb, measure_peak_memory, summarize_samples, time_interleaved, time_step

# benchmark method name -> (operator kind, public method name)
METHODS: dict[str, tuple[str, str]] = {
    "lasp2": ("linear", "lasp2"),
    "lasp1": ("linear", "lasp1"),
    "ulysses-linear": ("linear", "ulysses"),
    "allgather": ("softmax", "allgather"),
    "ring": ("softmax", "ring"),
    "ulysses-softmax": ("softmax", "ulysses"),
}
ALIASES = {"lasp2h": "allgather", "ulysses_linear": "ulysses-linear", "ulysses_softmax": "ulysses-softmax"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- the measured step


def make_inputs(point: dict, rank: int, world: int, device: torch.device):
    """Random local ``q, k, v, do`` for this rank (seeded by rank), q/k/v requiring grad."""
    kind = METHODS[point["method"]][0]
    B, H, D = point["batch"], point["heads"], point["head_dim"]
    H_kv = H if kind == "linear" else point["kv_heads"]
    T_local = point["seq_len"] // world
    dtype = DTYPES[point["dtype"]]
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)

    def rnd(h: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(B, T_local, h, D, generator=gen) * std).to(device=device, dtype=dtype)

    q, k, v = rnd(H, 0.5), rnd(H_kv, 0.5), rnd(H_kv)
    do = rnd(H) / point["seq_len"] ** 0.5
    return [x.requires_grad_() for x in (q, k, v)], do


def make_step(point: dict, rank: int, world: int, device: torch.device):
    """``(forward, backward)`` closures of one layer on this rank's shard."""
    import lasp

    kind, method = METHODS[point["method"]]
    group = dist.group.WORLD if world > 1 else None
    (q, k, v), do = make_inputs(point, rank, world, device)
    kw = dict(group=group, method=method, layout=point["layout"])
    if kind == "linear":
        kw["backend"] = point["backend"]

    def forward() -> torch.Tensor:
        for x in (q, k, v):
            x.grad = None
        if kind == "linear":
            return lasp.linear_attention(q, k, v, **kw)
        return lasp.softmax_attention(q, k, v, **kw)

    def backward(o: torch.Tensor) -> None:
        o.backward(do)

    return forward, backward


def comm_summary(events: list, n_fwd: int) -> dict:
    """Bytes this rank sends and calls it makes, forward / backward / by kind."""
    sent = [e for e in events if e.kind != "recv"]
    fwd = [e for e in events[:n_fwd] if e.kind != "recv"]
    by_kind: dict[str, int] = {}
    for e in sent:
        by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
    return {
        "bytes": sum(e.bytes for e in sent),
        "bytes_fwd": sum(e.bytes for e in fwd),
        "bytes_bwd": sum(e.bytes for e in sent) - sum(e.bytes for e in fwd),
        "calls": len(sent),
        "calls_fwd": len(fwd),
        "by_kind": by_kind,
    }


def instrument_for(forward, backward, device):
    """The first warm-up step of a point, run under the communication recorder and the memory
    meter: returns the comm summary (forward/backward split) and peak memory."""

    def instrument(_step) -> dict:
        split: dict[str, int] = {}

        def fwd_bwd() -> None:
            o = forward()
            split["n_fwd"] = len(log.events)
            backward(o)

        with comm.record() as log:
            mem_mb, how = measure_peak_memory(fwd_bwd, device)
        return dict(comm_summary(log.events, split["n_fwd"]), peak_mem_mb=mem_mb, mem_method=how)

    return instrument


def layer_worker(rank: int, world: int, point: dict) -> dict:
    """Runs on every rank: warm up, instrument, time one point. Returns this rank's view."""
    device = local_device(point.get("device", "auto"))
    torch.manual_seed(0)
    forward, backward = make_step(point, rank, world, device)

    def step() -> None:
        backward(forward())

    group = dist.group.WORLD if world > 1 else None
    out = time_step(step, group=group, device=device, warmup=point["warmup"], reps=point["reps"],
                    min_reps=point.get("min_reps", 3), max_seconds=point["max_seconds"],
                    instrument=instrument_for(forward, backward, device))
    return {"rank": rank, "samples_s": out["samples_s"], "warmup_s": out["warmup_s"], **out["instrumented"]}


def layer_group_worker(rank: int, world: int, group_point: dict) -> list[dict]:
    """Runs on every rank: the points of ``group_point["points"]`` (same SP size and length,
    different methods) timed with interleaved repetitions; this rank's view of each."""
    device = local_device(group_point.get("device", "auto"))
    torch.manual_seed(0)
    steps = {}
    for p in group_point["points"]:
        forward, backward = make_step(p, rank, world, device)
        steps[p["method"]] = (forward, backward)

    p0 = group_point["points"][0]
    group = dist.group.WORLD if world > 1 else None
    outs = []
    calls = [(lambda f=f, b=b: b(f())) for f, b in steps.values()]
    instruments = [instrument_for(f, b, device) for f, b in steps.values()]
    timed = time_interleaved(calls, group=group, device=device, warmup=p0["warmup"], reps=p0["reps"],
                             min_reps=p0.get("min_reps", 3), max_seconds=p0["max_seconds"], instrument=instruments)
    for out in timed:
        outs.append({"rank": rank, "samples_s": out["samples_s"], "warmup_s": out["warmup_s"], **out["instrumented"]})
    return outs


def merge_layer_group(group_point: dict, per_rank: list[list[dict]]) -> list[dict]:
    """One record per point of the group."""
    return [merge_layer(p, [r[i] for r in per_rank]) for i, p in enumerate(group_point["points"])]


def group_points(points: list[dict]) -> list[dict]:
    """Points with the same SP size and length (and every other setting) -> one group each."""
    groups: dict[tuple, dict] = {}
    for p in points:
        key = (p["sp"], p["seq_len"])
        g = groups.setdefault(key, {"sp": p["sp"], "seq_len": p["seq_len"], "method": "", "points": [],
                                    "device": p.get("device", "auto")})
        g["points"].append(p)
        g["method"] = "+".join(q["method"] for q in g["points"])
    return list(groups.values())


def merge_layer(point: dict, per_rank: list[dict]) -> dict:
    """One record from every rank's result."""
    r0 = per_rank[0]
    stats = summarize_samples(r0["samples_s"])
    rec = dict(point)
    rec.update(status="ok", reason="", **stats)
    rec.update(
        samples_ms=[s * 1e3 for s in r0["samples_s"]],
        warmup_ms=[s * 1e3 for s in r0["warmup_s"]],
        tokens_per_s=point["batch"] * point["seq_len"] / (stats["time_ms"] / 1e3),
        peak_mem_mb=max(r["peak_mem_mb"] for r in per_rank),
        peak_mem_mb_by_rank=[r["peak_mem_mb"] for r in per_rank],
        mem_method=r0["mem_method"],
        bytes_per_rank=max(r["bytes"] for r in per_rank),
        bytes_per_rank_fwd=max(r["bytes_fwd"] for r in per_rank),
        bytes_per_rank_bwd=max(r["bytes_bwd"] for r in per_rank),
        bytes_by_rank=[r["bytes"] for r in per_rank],
        collectives=max(r["calls"] for r in per_rank),
        collectives_fwd=max(r["calls_fwd"] for r in per_rank),
        collectives_by_kind=r0["by_kind"],
    )
    return rec


# ----------------------------------------------------------------------------- guards


def estimate_memory_gb(point: dict) -> float:
    """Rough peak memory of a point summed over its ranks (GiB), for the CPU guard.

    Linear in T for every method (inputs, outputs, gradients, fp32 copies, chunk work:
    ``~40 * B * T * H * D * 4`` bytes); the softmax methods run flash kernels on blocks
    that need no mask and keep no scores (:mod:`lasp.ops.softmax_local`).
    """
    B, T, H, D = point["batch"], point["seq_len"], point["heads"], point["head_dim"]
    total = 40.0 * B * T * H * D * 4
    return total / 2**30


def _method_available(name: str) -> str | None:
    """None if the method's operator imports, else why not."""
    from .. import attention

    kind, method = METHODS[name]
    try:
        attention._method_impl(attention._LINEAR if kind == "linear" else attention._SOFTMAX, method, kind)
    except NotImplementedError as e:
        return str(e)
    return None


def make_precheck(max_memory_gb: float):
    from ..parallel import check_shardable

    def precheck(point: dict) -> dict | None:
        rec = spawned_cuda_check(point)
        if rec:
            return rec
        why = _method_available(point["method"])
        if why:
            return dict(point, status="unavailable", reason=why)
        try:
            check_shardable(point["seq_len"], point["sp"], point["layout"])
        except ValueError as e:
            return dict(point, status="skipped", reason=str(e))
        est = estimate_memory_gb(point)
        if max_memory_gb > 0 and point.get("device") != "cuda" and est > max_memory_gb:
            return dict(point, status="skipped", reason=f"estimated memory {est:.1f} GiB > --max-memory-gb {max_memory_gb:.1f}")
        return None

    return precheck


# ----------------------------------------------------------------------------- CLI


def _csv(kind, what: str):
    def parse(s: str):
        try:
            vals = [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list, got {s!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"{what} must not be empty")
        return vals

    return parse


def seq_len_arg(s: str) -> int:
    """``8192``, ``8K``, ``1M`` -> tokens."""
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024**2}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def common_args(ap: argparse.ArgumentParser, *, default_budget: float) -> None:
    ap.add_argument("--seq-len", type=_csv(seq_len_arg, "--seq-len"), default=[2048, 8192], help="total sequence lengths (8192 or 8K), comma-separated")
    ap.add_argument("--sp", type=_csv(int, "--sp"), default=[2], help="sequence-parallel sizes P, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (at least 1; fewer for slow points)")
    ap.add_argument("--reps", type=int, default=10, help="most timed steps per point")
    ap.add_argument("--min-reps", type=int, default=3, help="fewest timed steps when that many fit in the budget")
    ap.add_argument("--max-seconds-per-point", type=float, default=default_budget, help="time budget per point (warm-up + timed steps)")
    ap.add_argument("--point-timeout", type=float, default=1200.0, help="seconds before a point is abandoned (pool restarted)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA when visible (P > 1 on GPUs: launch with torchrun, one process per GPU)")
    ap.add_argument("--out", required=True, help="output directory (results.json, results.md, PNG plots)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lasp bench layer", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", type=_csv(str, "--method"), default=["lasp2", "lasp1", "ring"], help=f"comma-separated, of {', '.join(METHODS)}")
    common_args(ap, default_budget=20.0)
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each point on its own instead of interleaving the methods' repetitions per (P, length)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="softmax K/V heads (GQA); default --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="linear attention backend")
    ap.add_argument("--max-memory-gb", type=float, default=None, help="CPU guard (0 = off); default 70%% of available memory")
    args = ap.parse_args(argv)
    methods = []
    for m in args.method:
        m = ALIASES.get(m, m)
        if m not in METHODS:
            ap.error(f"--method: unknown method {m!r}; choose from {', '.join(METHODS)}")
        methods.append(m)
    args.method = methods
    for name in ("batch", "heads", "head_dim", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(p < 1 for p in args.sp) or any(n < 1 for n in args.seq_len):
        ap.error("--sp and --seq-len values must be >= 1")
    if args.max_seconds_per_point <= 0:
        ap.error("--max-seconds-per-point must be > 0")
    if args.max_memory_gb is None:
        args.max_memory_gb = 0.7 * (mem_available_gb() or 0.0)
    return args


def build_points(args) -> list[dict]:
    points = []
    for sp in args.sp:
        for method in args.method:
            for n in args.seq_len:
                points.append(dict(
                    method=method, kind=METHODS[method][0], op_method=METHODS[method][1], seq_len=n, sp=sp,
                    batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                    dtype=args.dtype, layout=args.layout, backend=args.backend, warmup=args.warmup, reps=args.reps,
                    min_reps=args.min_reps, max_seconds=args.max_seconds_per_point, device=resolve_device(args.device),
                ))
    return points


def layer_markdown(records: list[dict], env: dict, command: str) -> str:
    headers = ["method", "status", "P", "seq len", "time ms (median)", "min-max ms", "reps", "tokens/s",
               "sent/rank fwd+bwd", "calls/rank", "peak mem/rank"]
    rows = []
    for r in sorted(records, key=lambda r: (r["sp"], r["seq_len"], list(METHODS).index(r["method"]))):
        ok = r["status"] == "ok"
        rows.append([
            r["method"], "ok" if ok else status_cell(r), str(r["sp"]), f"{r['seq_len']:,}",
            fmt_num(r.get("time_ms")) if ok else "-",
            f"{r['time_ms_min']:.1f}-{r['time_ms_max']:.1f}" if ok else "-",
            str(r.get("n_reps", "-")) if ok else "-",
            fmt_num(r.get("tokens_per_s"), 0) if ok else "-",
            fmt_bytes(r.get("bytes_per_rank")) if ok else "-",
            str(r.get("collectives", "-")) if ok else "-",
            f"{r['peak_mem_mb']:.0f} MiB" if ok else "-",
        ])
    return "\n".join([
        "# lasp bench layer", "", f"`{command}`", "", f"Environment: {env_line(env)}", "",
        markdown_table(headers, rows), "",
        "time: one forward + backward of one attention layer, slowest rank, median of the timed steps; "
        "sent/rank: bytes one rank sends per forward + backward (max over ranks, lasp.comm accounting); "
        f"peak mem: {next((r['mem_method'] for r in records if r.get('mem_method')), '-')} per rank (max over ranks).", "",
    ])


def write_outputs(out: str, records: list[dict], env: dict, config: dict, command: str, *, final: bool = True) -> dict:
    """results.json, results.md and (when ``final``) the plots; returns the JSON document."""
    os.makedirs(out, exist_ok=True)
    plots = []
    if final:
        plots.append(os.path.basename(plot_metric_vs_seq_len(
            records, os.path.join(out, "time_vs_seq_len.png"), series="method", metric="time_ms",
            ylabel="fwd+bwd time per step (ms)", title="one attention layer (dashed: softmax)",
            dashed=tuple(m for m, (kind, _) in METHODS.items() if kind == "softmax"))))
        plots.append(os.path.basename(plot_speedup(
            records, os.path.join(out, "lasp2_speedup.png"), series="method", base="lasp2",
            against=("ring", "lasp1", "allgather", "ulysses-linear"), title="LASP-2 speed-up (time ratio)")))
    doc = results_doc("layer", env, config, records, plots)
    write_results(out, doc, layer_markdown(records, env, command))
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "lasp bench layer " + " ".join(argv)
    device = local_device(args.device)
    world = launched_world() or max(args.sp)
    env = env_info(str(device), world, launcher="external" if launched_world() else "spawned gloo",
                   mem_available_gb=mem_available_gb())
    if not launched_world():
        env["torch_threads_per_rank"] = 1  # SpawnedGroup ranks (and P = 1 here) use one thread
    config = {k: v for k, v in vars(args).items()}
    points = build_points(args)
    done: list[dict] = []

    def save_partial(rec: dict) -> None:
        done.append(rec)
        write_outputs(args.out, done, env, config, command, final=False)

    if args.interleave:  # prechecked points stay single; the rest run in groups per (P, length)
        precheck = make_precheck(args.max_memory_gb)
        failed = [r for r in (precheck(p) for p in points) if r is not None]
        for rec in failed:
            save_partial(rec)
        runnable = [p for p in points if precheck(p) is None]
        records = failed + run_points(group_points(runnable), layer_group_worker, merge_layer_group, desc="bench layer",
                                      timeout_s=args.point_timeout * max(len(args.method), 1), on_record=save_partial)
    else:
        records = run_points(points, layer_worker, merge_layer, desc="bench layer", timeout_s=args.point_timeout,
                             precheck=make_precheck(args.max_memory_gb), on_record=save_partial)
    if launched_world() > 1 and dist.get_rank() != 0:
        return 0
    write_outputs(args.out, records, env, config, command)
    print(layer_markdown(records, env, command))
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.md and plots")
    return 0
