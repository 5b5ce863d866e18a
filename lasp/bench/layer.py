"""``lasp bench layer``: one attention layer, forward + backward, across methods, total
sequence lengths and SP sizes.

    lasp bench layer --method lasp2,lasp1,ring --seq-len 8192,32768 --sp 2,4 --out DIR

Methods: the registry :data:`METHODS` (name -> public operator and its ``method=``). Each point
builds random ``[B, T/P, H, D]`` q, k, v, do on every rank; the methods of one (P, length) have
their repetitions interleaved (``--no-interleave``: each point alone). Recorded
(:mod:`lasp.bench.sweep`): time (median, spread, samples), tokens/s (``B * T / time``), peak
memory per rank, and from :func:`lasp.comm.record` the calls and bytes each rank sends per
forward + backward (max over ranks). GPUs: ``torchrun --nproc-per-node 8 -m lasp.cli bench layer
--sp 8 ...``. ``--documents 0,1,16,256``: each window packs N documents of random (seeded) lengths,
passed as ``cu_seqlens`` (the record's ``documents`` field; 0 or no flag: no ``cu_seqlens``, field
None). CPU memory guard: a point whose estimate (:func:`estimate_memory_gb`) exceeds
``--max-memory-gb`` (default 70% of the available memory) is ``skipped``, not run.
"""
from __future__ import annotations

import argparse
import inspect
import random
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import sweep
from .cli import common_args, csv_arg, positive
from .results import fmt_bytes
from .timing import DTYPES, mem_available_gb


def document_starts(seq_len: int, n_docs: int, seed: int = 0) -> torch.Tensor:
    """``cu_seqlens [n_docs + 1]`` (int64): ``n_docs`` documents of random lengths (>= 1) filling
    ``seq_len`` tokens; seeded, so identical on every rank."""
    cuts = sorted(random.Random(seed).sample(range(1, seq_len), n_docs - 1))
    return torch.tensor([0, *cuts, seq_len], dtype=torch.int64)


def attention_step(m: "Method", point: dict, rank: int, world: int, device: torch.device):
    """``(forward, backward)`` of ``lasp.linear_attention`` / ``lasp.softmax_attention`` (by
    ``m.kind``) with ``method=m.op`` on this rank's random shard (seeded by rank; softmax K/V
    have ``kv_heads`` heads)."""
    import lasp

    B, H, D, T = point["batch"], point["heads"], point["head_dim"], point["seq_len"]
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)

    def rnd(h: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(B, T // world, h, D, generator=gen) * std).to(device=device, dtype=DTYPES[point["dtype"]])

    H_kv = H if m.kind == "linear" else point["kv_heads"]
    q, k, v = (x.requires_grad_() for x in (rnd(H, 0.5), rnd(H_kv, 0.5), rnd(H_kv)))
    do = rnd(H) / T**0.5
    kw = dict(group=dist.group.WORLD if world > 1 else None, method=m.op, layout=point["layout"])
    op = lasp.softmax_attention if m.kind == "softmax" else lasp.linear_attention
    if m.kind == "linear":
        kw["backend"] = point["backend"]
    if point.get("documents"):
        kw["cu_seqlens"] = document_starts(T, point["documents"]).to(device)

    def forward() -> torch.Tensor:
        q.grad = k.grad = v.grad = None
        return op(q, k, v, **kw)

    return forward, lambda o: o.backward(do)


@dataclass(frozen=True)
class Method:
    """A benchmark method: ``kind`` (``linear`` | ``softmax`` | a new family), ``op`` (the public
    operator's ``method=``) and ``step(method, point, rank, world, device) -> (forward, backward)``,
    which builds this rank's inputs; ``backward(forward())`` is one measured step."""

    kind: str
    op: str
    step: Callable = attention_step


# benchmark method name -> Method: adding a method is one entry here
METHODS: dict[str, Method] = {
    "lasp2": Method("linear", "lasp2"),
    "lasp1": Method("linear", "lasp1"),
    "ulysses-linear": Method("linear", "ulysses"),
    "allgather": Method("softmax", "allgather"),
    "ring": Method("softmax", "ring"),
    "ulysses-softmax": Method("softmax", "ulysses"),
}
ALIASES = {"lasp2h": "allgather", "ulysses_linear": "ulysses-linear", "ulysses_softmax": "ulysses-softmax"}


def build_step(point: dict, rank: int, world: int, device: torch.device):
    """The driver's ``build``: the point's method's step, no extra info."""
    m = METHODS[point["method"]]
    return (*m.step(m, point, rank, world, device), {})


def estimate_memory_gb(point: dict) -> float:
    """Rough peak memory of a point summed over its ranks (GiB), for the CPU guard.

    Linear in T for every method (inputs, outputs, gradients, fp32 copies, chunk work:
    ``~40 * B * T * H * D * 4`` bytes); the softmax methods run flash kernels on blocks
    that need no mask and keep no scores (:mod:`lasp.ops.softmax_local`).
    """
    B, T, H, D = point["batch"], point["seq_len"], point["heads"], point["head_dim"]
    total = 40.0 * B * T * H * D * 4
    return total / 2**30


def precheck(point: dict) -> tuple[str, str] | None:
    """Unavailable (not in the operators' public method table) or over the memory guard."""
    from ..attention import LINEAR_METHODS, SOFTMAX_METHODS

    m = METHODS[point["method"]]
    table = {"linear": LINEAR_METHODS, "softmax": SOFTMAX_METHODS}.get(m.kind)
    if table is not None and m.op not in table:
        return "unavailable", f"{m.kind} attention method {m.op!r} is not implemented (choose from {', '.join(table)})"
    if point.get("documents"):
        import lasp

        op = {"linear": lasp.linear_attention, "softmax": lasp.softmax_attention}.get(m.kind)
        if op is not None and "cu_seqlens" not in inspect.signature(op).parameters:
            return "unavailable", f"lasp.{m.kind}_attention takes no cu_seqlens (packed documents) in this build"
        if point["documents"] > point["seq_len"]:
            return "skipped", f"--documents {point['documents']} > seq_len {point['seq_len']} (documents hold >= 1 token)"
    est, limit = estimate_memory_gb(point), point["_max_memory_gb"]
    if limit > 0 and point["device"] != "cuda" and est > limit:
        return "skipped", f"estimated memory {est:.1f} GiB > --max-memory-gb {limit:.1f}"
    return None


BENCH = sweep.Bench(
    kind="layer", series="method", order=METHODS, build=build_step, precheck=precheck,
    finish=lambda point, rec, per_rank: {}, time_header="time ms (median)",
    plots={"time_vs_seq_len.png": dict(metric="time_ms", ylabel="fwd+bwd time per step (ms)",
                                       title="one attention layer (dashed: softmax)",
                                       dashed=tuple(n for n, m in METHODS.items() if m.kind == "softmax")),
           "lasp2_speedup.png": dict(base="lasp2", against=("ring", "lasp1", "allgather", "ulysses-linear"),
                                     title="LASP-2 speed-up (time ratio)")},
    columns=[("docs", lambda r: str(r.get("documents") or "-")), ("sent/rank fwd+bwd", lambda r: fmt_bytes(r["bytes_per_rank"])), ("calls/rank", lambda r: str(r["collectives"]))],
    note="time: one forward + backward of one attention layer, slowest rank, median of the timed steps; "
         "docs: documents per window (cu_seqlens; - = none); sent/rank: bytes one rank sends per forward + backward (max over ranks, lasp.comm accounting); "
         "peak mem: {mem_method} per rank (max over ranks).",
)


def _documents_arg(s: str) -> int | None:
    """``--documents`` item: N >= 1 documents per window, or 0 = no ``cu_seqlens`` (None)."""
    n = int(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s!r}")
    return n or None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="lasp bench layer", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", type=csv_arg(str, "--method"), default=["lasp2", "lasp1", "ring"], help=f"comma-separated, of {', '.join(METHODS)}")
    common_args(ap, default_budget=20.0)
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each point on its own instead of interleaving the methods' repetitions per (P, length)")
    ap.add_argument("--heads", type=positive(), default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="softmax K/V heads (GQA); default --heads")
    ap.add_argument("--head-dim", type=positive(), default=64)
    ap.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="linear attention backend")
    ap.add_argument("--documents", type=csv_arg(_documents_arg, "--documents"), default=[None],
                    help="documents per window, comma-separated (random seeded lengths, passed as cu_seqlens; "
                         "0 = no cu_seqlens, to compare in the same sweep); default: no cu_seqlens")
    ap.add_argument("--max-memory-gb", type=float, default=None, help="CPU guard (0 = off); default 70%% of available memory")
    args = ap.parse_args(argv)
    args.method = [ALIASES.get(m, m) for m in args.method]
    for m in args.method:
        if m not in METHODS:
            ap.error(f"--method: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.max_memory_gb is None:
        args.max_memory_gb = 0.7 * (mem_available_gb() or 0.0)
    points = [dict(method=method, kind=METHODS[method].kind, op_method=METHODS[method].op, seq_len=n, sp=sp,
                   batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                   dtype=args.dtype, layout=args.layout, backend=args.backend, warmup=args.warmup, reps=args.reps,
                   min_reps=args.min_reps, max_seconds=args.max_seconds_per_point, device=sweep.local_device(args.device).type,
                   documents=docs, _max_memory_gb=args.max_memory_gb)
              for sp in args.sp for method in args.method for n in args.seq_len for docs in args.documents]
    return sweep.main(BENCH, args, argv, points, interleave=args.interleave)
