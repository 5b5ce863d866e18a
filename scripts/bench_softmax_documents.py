"""Cost of packed documents for the softmax methods: forward + backward time and peak memory per
rank of ``lasp.softmax_attention`` with 0 (no cu_seqlens), 1, 16 and 256 documents per window.

    python scripts/bench_softmax_documents.py --seq-len 8192 --sp 2 --methods allgather,ring

Documents have random lengths (seeded); the table gives the median of ``--reps`` steps (max over
ranks) and the peak extra RSS of one step (max over ranks). Until ``lasp bench layer --documents``
lands this is the measurement; it prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import lasp
from lasp.bench.timing import measure_peak_memory
from lasp.parallel import shard_sequence
from lasp.spawn import SpawnedGroup


def documents(n: int, t: int) -> torch.Tensor | None:
    if n == 0:
        return None
    cuts = torch.randperm(t - 1, generator=torch.Generator().manual_seed(n))[: n - 1] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([t])])


def worker(rank, world, T, H, H_kv, D, method, layout, n_docs, reps):
    torch.manual_seed(0)
    q, do = (torch.randn(1, T, H, D) * 0.5 for _ in range(2))
    k, v = (torch.randn(1, T, H_kv, D) for _ in range(2))
    ins = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in (q, k, v)]
    do = shard_sequence(do, rank, world, layout)
    cu = documents(n_docs, T)
    group = dist.group.WORLD

    def step():
        for x in ins:
            x.grad = None
        lasp.softmax_attention(*ins, group=group, method=method, layout=layout, cu_seqlens=cu).backward(do)

    step()  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier(group)
        t0 = time.perf_counter()
        step()
        dist.barrier(group)
        times.append(time.perf_counter() - t0)
    mem, _ = measure_peak_memory(step, torch.device("cpu"))
    return statistics.median(times), mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--methods", default="allgather,ring")
    ap.add_argument("--layouts", default="zigzag")
    ap.add_argument("--documents", default="0,1,16,256")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    pool = SpawnedGroup(a.sp, timeout=1200)
    print("| method | layout | documents | fwd+bwd (s) | peak extra RSS/rank (MiB) |\n|---|---|---|---|---|")
    try:
        for method in a.methods.split(","):
            for layout in a.layouts.split(","):
                for n in (int(x) for x in a.documents.split(",")):
                    res = pool.run(worker, a.seq_len, a.heads, a.kv_heads, a.head_dim, method, layout, n, a.reps)
                    t, mem = max(r[0] for r in res), max(r[1] for r in res)
                    print(f"| {method} | {layout} | {n or 'none'} | {t:.3f} | {mem:.0f} |", flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
