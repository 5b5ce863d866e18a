"""Fused linear cross-entropy vs the plain path on this CPU: time and peak memory growth of
forward + backward, each method in a fresh process.

Methods (all ``reduction="sum"`` over the same random inputs, fp32):
- ``plain``: ``F.cross_entropy((hidden @ weight.T).float(), labels, reduction="sum")``;
- ``fused``: ``lasp.linear_cross_entropy`` (gradients computed in forward and kept);
- ``fused-recompute``: ``lasp.linear_cross_entropy(..., reduction="none").sum()``, which runs the
  op's other strategy (chunks recomputed in backward) on the same loss.

Time: median of ``--reps`` runs, the methods interleaved in one process (0: memory only).
Peak growth: the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) during one forward + backward, minus the resident set before it
(inputs allocated, one small warm-up run done); it includes the returned gradients. glibc's
mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so freed buffers leave the resident set::

    python scripts/bench_linear_cross_entropy.py --N 1024 --V 248320 --H 256 --methods plain,fused,fused-recompute --reps 3
    python scripts/bench_linear_cross_entropy.py --N 8192 --V 248320 --H 256 --methods fused,fused-recompute --reps 1

Writes ``results.json`` and ``results.md`` under ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

METHODS = ("plain", "fused", "fused-recompute")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def loss_fn(method: str, chunk_size: int | None):
    import torch.nn.functional as F

    from lasp import linear_cross_entropy

    if method == "plain":
        return lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, reduction="sum")
    if method == "fused":
        return lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum", chunk_size=chunk_size)
    return lambda h, w, y: linear_cross_entropy(h, w, y, reduction="none", chunk_size=chunk_size).sum()


def make_inputs(args):
    import torch

    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(args.N, args.H, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(args.V, args.H, generator=gen) * 0.05).requires_grad_()
    return h, w, torch.randint(0, args.V, (args.N,), generator=gen)


def fwd_bwd(fn, h, w, y) -> tuple[float, float]:
    """``(seconds, loss)`` of one forward + backward (gradients reset first)."""
    h.grad = w.grad = None
    t0 = time.perf_counter()
    loss = fn(h, w, y)
    loss.backward()
    return time.perf_counter() - t0, loss.item()


def child(args) -> dict:
    """Peak memory growth of one forward + backward of ``args.child`` in this fresh process."""
    import torch

    torch.set_num_threads(args.threads)
    fn = loss_fn(args.child, args.chunk_size)
    h, w, y = make_inputs(args)
    fwd_bwd(fn, h[:64].detach().requires_grad_(), w, y[:64])  # warm-up: thread pools, allocator, code paths
    w.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _status_kib("VmRSS")
    _, loss = fwd_bwd(fn, h, w, y)
    return dict(method=args.child, peak_growth_mib=(_status_kib("VmHWM") - base) / 1024, loss=loss)


def timings(args, methods: list[str]) -> dict[str, float]:
    """Median seconds of forward + backward per method, runs interleaved in this process (a shared
    machine's load hits every method alike)."""
    import torch

    torch.set_num_threads(args.threads)
    h, w, y = make_inputs(args)
    fns = {m: loss_fn(m, args.chunk_size) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.reps):
        for m in methods:
            times[m].append(fwd_bwd(fns[m], h, w, y)[0])
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--V", type=int, default=248320)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--chunk-size", type=int, default=None, help="default: lasp's default_chunk_size(V)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per method (0: memory only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for results.json / results.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    methods = args.methods.split(",")
    for method in methods:
        if method not in METHODS:
            ap.error(f"--methods: {method!r} is not one of {METHODS}")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    rows = []
    for method in methods:
        cmd = [sys.executable, __file__, "--child", method, "--N", str(args.N), "--V", str(args.V), "--H", str(args.H),
               "--threads", str(args.threads)] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    seconds = timings(args, methods) if args.reps else {}
    for r in rows:
        r.update(N=args.N, V=args.V, H=args.H, threads=args.threads, reps=args.reps, chunk_size=args.chunk_size,
                 time_s=seconds.get(r["method"], float("nan")))
    logits_gib = args.N * args.V * 4 / 2**30
    lines = [f"N = {args.N:,}, V = {args.V:,}, H = {args.H}, fp32, {args.threads} threads, forward + backward, median of "
             f"{args.reps}; fp32 logits [N, V] alone: {logits_gib:.2f} GiB", "",
             "| method | time (s) | peak growth (MiB) | loss |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['time_s']:.3f} | {r['peak_growth_mib']:,.0f} | {r['loss']:.6g} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
