"""``lasp bench <kind> [args...]`` (each kind is a module with ``main(argv)``) and the argument
helpers the benchmarks share."""
from __future__ import annotations

import argparse

KINDS = {
    "kernels": ("lasp.bench.kernels", "Triton vs torch chunk path (vs fla when installed), one device"),
    "layer": ("lasp.bench.layer", "one attention layer fwd+bwd across methods, sequence lengths, SP sizes"),
    "model": ("lasp.bench.model", "tokens/s of a training step: pure linear, 1/4 hybrid, Llama + ring"),
    "predict": ("lasp.bench.predict", "analytic cost model, calibrated from a layer run"),
    "memory": ("lasp.bench.memory", "the memory estimate against peaks measured by lasp train runs"),
}


def main(argv: list[str]) -> int:
    from lasp.cli import dispatch

    return dispatch(KINDS, argv, "lasp bench")


def positive(kind=int, zero: bool = False):
    """An argparse type: a ``kind`` > 0 (>= 0 with ``zero``)."""

    def parse(s: str):
        x = kind(s)
        if not (x >= 0 if zero else x > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {s!r}")
        return x

    return parse


def seq_len_arg(s: str) -> int:
    """``8192``, ``8K``, ``1M`` -> tokens."""
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024**2}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def csv_arg(kind, choices=None):
    """An argparse type: a non-empty comma-separated list of ``kind`` (each in ``choices`` if given)."""

    def parse(s: str):
        try:
            vals = [kind(x.strip()) for x in s.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"{e} (in the comma-separated list {s!r})") from None
        unknown = [v for v in vals if choices is not None and v not in choices]
        if unknown or not vals:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(choices)}" if unknown
                                             else "must not be empty")
        return vals

    return parse


def common_args(ap: argparse.ArgumentParser, *, default_budget: float) -> None:
    """The sweep flags of ``lasp bench layer`` and ``lasp bench model`` (fields of every point)."""
    from .timing import DTYPES

    ap.add_argument("--seq-len", type=csv_arg(positive(seq_len_arg)), default=[2048, 8192],
                    help="total sequence lengths (8192 or 8K), comma-separated")
    ap.add_argument("--sp", type=csv_arg(positive()), default=[2], help="sequence-parallel sizes P, comma-separated")
    ap.add_argument("--batch", type=positive(), default=1)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    ap.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="linear / delta-rule backend")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (at least 1; fewer for slow points)")
    ap.add_argument("--reps", type=positive(), default=10, help="most timed steps per point")
    ap.add_argument("--min-reps", type=int, default=3, help="fewest timed steps when that many fit in the budget")
    ap.add_argument("--max-seconds-per-point", type=positive(float), default=default_budget, help="time budget per point (warm-up + timed steps)")
    ap.add_argument("--point-timeout", type=float, default=1200.0, help="seconds before a point is abandoned (pool restarted)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA when visible (P > 1 on GPUs: launch with torchrun, one process per GPU)")
    ap.add_argument("--out", required=True, help="output directory (results.json, results.md, PNG plots)")

