"""Side-by-side CPU timing of an MoE layer's routed experts: ``torch._grouped_mm`` vs a loop of one
matmul per expert (lasp.ops.grouped_mm's two paths), forward + backward of the SwiGLU experts on
rows sorted by expert (random top-k routing), median of ``--reps`` interleaved runs::

    .venv/bin/python scripts/bench_grouped_mm.py --experts 8 --hidden 256 --inter 512 --tokens 2048 8192
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lasp.ops.grouped_mm import grouped_linear  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def experts_step(method: str, rows, gate_up, down, counts) -> float:
    xs, gu, dn = (t.detach().clone().requires_grad_() for t in (rows, gate_up, down))
    t0 = time.perf_counter()
    g, u = grouped_linear(xs, gu, counts, method=method).chunk(2, dim=-1)
    y = grouped_linear(F.silu(g) * u, dn, counts, method=method)
    y.backward(torch.ones_like(y))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--dtype", choices=DTYPES, nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows_out = []
    print("| dtype | tokens | rows | grouped_mm ms | loop ms | loop / grouped_mm |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for dt in args.dtype:
        for n in args.tokens:
            idx = torch.stack([torch.randperm(args.experts)[: args.top_k] for _ in range(n)]).reshape(-1)
            counts = torch.bincount(idx, minlength=args.experts)
            dtype = DTYPES[dt]
            rows = torch.randn(idx.numel(), args.hidden, dtype=dtype)
            gate_up = torch.randn(args.experts, 2 * args.inter, args.hidden, dtype=dtype) * 0.05
            down = torch.randn(args.experts, args.hidden, args.inter, dtype=dtype) * 0.05
            times = {"grouped_mm": [], "loop": []}
            for m in times:  # warm-up
                experts_step(m, rows, gate_up, down, counts)
            for _ in range(args.reps):
                for m in times:
                    times[m].append(experts_step(m, rows, gate_up, down, counts))
            g, lp = (statistics.median(times[m]) * 1e3 for m in ("grouped_mm", "loop"))
            rows_out.append(dict(dtype=dt, tokens=n, rows=idx.numel(), grouped_mm_ms=g, loop_ms=lp))
            print(f"| {dt} | {n:,} | {idx.numel():,} | {g:.1f} | {lp:.1f} | {lp / g:.2f} |", flush=True)
    print(json.dumps({"config": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows_out}))


if __name__ == "__main__":
    main()
