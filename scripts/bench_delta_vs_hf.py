"""Side-by-side CPU timing: lasp's chunked gated delta rule vs transformers' Qwen3.5 torch path.

Forward + backward at P = 1 on the same inputs (fp32), median of ``--reps`` runs each, and the
relative difference of the two outputs. Needs an interpreter where both ``lasp`` (this checkout)
and ``transformers`` import WITHOUT flash-linear-attention (else transformers dispatches to fla)::

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers
    /tmp/hfvenv/bin/python scripts/bench_delta_vs_hf.py --T 2048 8192
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


def once(fn, inputs) -> float:
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    t0 = time.perf_counter()
    o = fn(*xs)
    o.backward(torch.ones_like(o))
    return time.perf_counter() - t0


def timed_pair(f1, f2, inputs, reps: int) -> tuple[float, float]:
    """Median times of ``f1`` and ``f2``, runs interleaved (a shared machine's load hits both alike)."""
    once(f1, inputs), once(f2, inputs)  # warm-up
    t1, t2 = [], []
    for _ in range(reps):
        t1.append(once(f1, inputs))
        t2.append(once(f2, inputs))
    return statistics.median(t1), statistics.median(t2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64, help="K = V head dim")
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from lasp.ops.delta_chunk import chunk_gated_delta_rule

    ours = lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm=True)  # noqa: E731
    theirs = lambda q, k, v, g, b: torch_chunk_gated_delta_rule(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
    rows = []
    for T in args.T:
        gen = torch.Generator().manual_seed(T)
        B, H, D = args.B, args.H, args.D
        q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
        beta = torch.rand(B, T, H, generator=gen)
        g = -torch.rand(B, T, H, generator=gen) * 0.5
        inputs = [q, k, v, g, beta]  # fla's order
        with torch.no_grad():
            a, b = ours(*inputs), theirs(*inputs)
            diff = ((a - b).norm() / b.norm()).item()
        t_ours, t_hf = timed_pair(ours, theirs, inputs, args.reps)
        rows.append(dict(B=B, H=H, K=D, V=D, T=T, lasp_s=round(t_ours, 4), transformers_s=round(t_hf, 4),
                         speedup=round(t_hf / t_ours, 2), rel_diff=diff))
    print(f"{'T':>6} {'lasp fwd+bwd s':>15} {'transformers s':>15} {'speedup':>8} {'rel diff':>9}")
    for r in rows:
        print(f"{r['T']:>6} {r['lasp_s']:>15.3f} {r['transformers_s']:>15.3f} {r['speedup']:>8.2f} {r['rel_diff']:>9.1e}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
