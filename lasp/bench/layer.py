"""``lasp bench layer``: one attention layer, forward + backward, across methods, total
sequence lengths and SP sizes.

    lasp bench layer --method lasp2,lasp1,ring --seq-len 8192,32768 --sp 2,4 --out DIR

Methods: the registry :data:`METHODS`. Records, timing, memory, bytes, ``--documents``:
``docs/bench/README.md``.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import sweep
from .cli import common_args, csv_arg, positive
from .results import fmt_bytes
from ..testing import document_starts
from .timing import DTYPES, mem_available_gb


def attention_inputs(point: dict, rnd):
    """``lasp.linear_attention`` / ``lasp.softmax_attention`` (by the point's ``kind``) and random
    q, k, v (softmax K/V have ``kv_heads`` heads)."""
    import lasp

    H, D = point["heads"], point["head_dim"]
    H_kv = H if point["kind"] == "linear" else point["kv_heads"]
    leaves = [rnd(H, D, std=0.5), rnd(H_kv, D, std=0.5), rnd(H_kv, D)]
    if point["kind"] == "softmax":
        return lasp.softmax_attention, leaves, {}
    return lasp.linear_attention, leaves, {"backend": point["backend"]}


def delta_inputs(point: dict, rnd):
    """``lasp.gated_delta_rule`` (q, k L2-normalised inside) and random q, k, v, ``g =
    logsigmoid(x) / 8`` (<= 0), ``beta = sigmoid(x)`` (fla's order)."""
    import lasp

    H, D = point["heads"], point["head_dim"]
    leaves = [rnd(H, D), rnd(H, D), rnd(H, D), rnd(H, fn=lambda x: F.logsigmoid(x) / 8), rnd(H, fn=torch.sigmoid)]
    return lasp.gated_delta_rule, leaves, {"backend": point["backend"], "use_qk_l2norm_in_kernel": True}


# operator family -> inputs(point, rnd) -> (public operator, this rank's leaves, keywords), drawn with
# rnd(*dims, std=1.0, fn=None): a random [B, T/P, *dims] tensor
INPUTS: dict[str, Callable] = {"linear": attention_inputs, "softmax": attention_inputs, "delta": delta_inputs}
# benchmark method name -> (operator family, the public operator's method=): adding a method is one entry here
METHODS: dict[str, tuple[str, str]] = {
    "lasp2": ("linear", "lasp2"),
    "lasp1": ("linear", "lasp1"),
    "ulysses-linear": ("linear", "ulysses"),
    "allgather": ("softmax", "allgather"),
    "ring": ("softmax", "ring"),
    "ulysses-softmax": ("softmax", "ulysses"),
    "gdn-lasp2": ("delta", "lasp2"),
    "gdn-lasp1": ("delta", "lasp1"),
    "gdn-ulysses": ("delta", "ulysses"),
}
ALIASES = {"lasp2h": "allgather", "ulysses_linear": "ulysses-linear", "ulysses_softmax": "ulysses-softmax"}


def build_step(point: dict, rank: int, world: int, device: torch.device):
    """The driver's ``build``: forward = ``op(*leaves, group=, method=, layout=, **kw)`` on this
    rank's inputs (seeded by rank; ``fn`` applied in fp32; with ``cu_seqlens`` for ``--documents``),
    backward with a random output gradient (drawn last); no extra info."""
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)

    def rnd(*dims: int, std: float = 1.0, fn=None) -> torch.Tensor:
        x = torch.randn(point["batch"], point["seq_len"] // world, *dims, generator=gen) * std
        return (fn(x) if fn else x).to(device=device, dtype=DTYPES[point["dtype"]])

    op, leaves, kw = INPUTS[point["kind"]](point, rnd)
    do = rnd(point["heads"], point["head_dim"], std=point["seq_len"] ** -0.5)
    kw.update(group=dist.group.WORLD if world > 1 else None, method=point["op_method"], layout=point["layout"])
    if point.get("documents"):
        kw["cu_seqlens"] = document_starts(point["seq_len"], point["documents"]).to(device)
    for x in leaves:
        x.requires_grad_()

    def forward() -> torch.Tensor:
        for x in leaves:
            x.grad = None
        return op(*leaves, **kw)

    return forward, lambda o: o.backward(do), {}


def precheck(point: dict) -> tuple[str, str] | None:
    """Unavailable (not in the operators' public method table) or over the memory guard."""
    from ..attention import LINEAR_METHODS, SOFTMAX_METHODS

    kind, op = point["kind"], point["op_method"]
    table = {"linear": LINEAR_METHODS, "delta": LINEAR_METHODS, "softmax": SOFTMAX_METHODS}.get(kind)
    if table is not None and op not in table:
        return "unavailable", f"{kind} attention method {op!r} is not implemented (choose from {', '.join(table)})"
    if (point.get("documents") or 0) > point["seq_len"]:
        return "skipped", f"--documents {point['documents']} > seq_len {point['seq_len']} (documents hold >= 1 token)"
    # rough peak memory of all ranks (GiB), linear in T for every method (no softmax scores are kept)
    est, limit = 40.0 * point["batch"] * point["seq_len"] * point["heads"] * point["head_dim"] * 4 / 2**30, point["_max_memory_gb"]
    if limit > 0 and point["device"] != "cuda" and est > limit:
        return "skipped", f"estimated memory {est:.1f} GiB > --max-memory-gb {limit:.1f}"
    return None


BENCH = sweep.Bench(
    kind="layer", series="method", order=METHODS, build=build_step, precheck=precheck, time_header="time ms (median)",
    plots={"time_vs_seq_len.png": dict(metric="time_ms", ylabel="fwd+bwd time per step (ms)",
                                       title="one attention layer (dashed: softmax)",
                                       dashed=tuple(n for n, (kind, _) in METHODS.items() if kind == "softmax")),
           "lasp2_speedup.png": dict(base="lasp2", against=("ring", "lasp1", "allgather", "ulysses-linear"),
                                     title="LASP-2 speed-up (time ratio)"),
           "gdn_lasp2_speedup.png": dict(base="gdn-lasp2", against=("gdn-lasp1", "gdn-ulysses"),
                                         title="gated delta rule: LASP-2 speed-up (time ratio)")},
    columns=[("docs", lambda r: str(r.get("documents") or "-")), ("sent/rank fwd+bwd", lambda r: fmt_bytes(r["bytes_per_rank"])), ("calls/rank", lambda r: str(r["collectives"]))],
    note="time: one forward + backward of one attention layer, slowest rank, median of the timed steps; "
         "docs: documents per window (cu_seqlens; - = none); sent/rank: bytes one rank sends per forward + backward (max over ranks, lasp.comm accounting); "
         "peak mem: {mem_method} per rank (max over ranks).",
)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lasp bench layer", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", type=csv_arg(lambda m: ALIASES.get(m, m), METHODS), default=["lasp2", "lasp1", "ring"],
                    help=f"comma-separated, of {', '.join(METHODS)}")
    common_args(ap, default_budget=20.0)
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each point on its own instead of interleaving the methods' repetitions per (P, length)")
    ap.add_argument("--heads", type=positive(), default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="softmax K/V heads (GQA); default --heads")
    ap.add_argument("--head-dim", type=positive(), default=64)
    ap.add_argument("--documents", type=csv_arg(positive(zero=True)), default=[0],
                    help="documents per window, comma-separated (random seeded lengths, passed as cu_seqlens; "
                         "0 = no cu_seqlens, to compare in the same sweep); default: no cu_seqlens")
    ap.add_argument("--max-memory-gb", type=float, default=0.7 * (mem_available_gb() or 0.0),
                    help="CPU guard (0 = off); default 70%% of available memory")
    args = ap.parse_args(argv)
    points = [dict(method=method, kind=METHODS[method][0], op_method=METHODS[method][1], seq_len=n, sp=sp, heads=args.heads,
                   kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim, documents=docs or None, _max_memory_gb=args.max_memory_gb)
              for sp in args.sp for method in args.method for n in args.seq_len for docs in args.documents]
    return sweep.main(BENCH, args, argv, points, interleave=args.interleave)
