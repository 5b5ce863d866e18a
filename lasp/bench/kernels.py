"""``lasp bench kernels``: one-device speed of the chunked compute paths of one operator
(``--op``, the table :data:`OPS`): linear attention or the gated delta rule.

Providers ``triton``, ``torch`` (the public operator's ``backend=``) and ``fla`` (when importable:
``chunk_simple_gla`` / ``chunk_gated_delta_rule``); modes ``fwd`` and ``fwdbwd``; TFLOP/s of the
chunked algorithm (:func:`chunked_flops`); ``--check``: the float64 oracle first. Details:
``docs/bench/README.md``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.delta_reference import naive_gated_delta_rule
from ..ops.reference import naive_recurrent_linear_attention
from ..testing import RTOL, delta_inputs, linear_inputs, rel_error
from .cli import csv_arg, positive
from .results import fmt_num, markdown_table, plot_metric_vs_seq_len, report, results_doc, status_cell, write_results
from .timing import DTYPES, env_info, summarize_samples, time_steps

CHUNK = 64


@dataclass(frozen=True)
class KernelOp:
    """One operator of the kernel bench. ``names``: its inputs, in the public operator's order
    (``None`` ones are left out); ``inputs(B, T, H, K, V, gates=, dtype=, device=, seed=)``;
    ``public``: the ``lasp`` function, ``fla``: (module, function) of the peer, both called with
    ``keywords``; ``oracle(*inputs, scale=)`` in float64."""

    names: tuple[str, ...]
    inputs: Callable
    public: str
    fla: tuple[str, str]
    oracle: Callable
    keywords: dict
    fla_fp32: bool = True  # whether fla's function accepts fp32 inputs (checked in fp32 and bf16, else bf16 only)


OPS = {
    "linear": KernelOp(names=("q", "k", "v", "g", "g_gamma"), inputs=linear_inputs, public="linear_attention",
                       fla=("fla.ops.simple_gla", "chunk_simple_gla"), oracle=naive_recurrent_linear_attention,
                       keywords={}),
    "gated_delta": KernelOp(names=("q", "k", "v", "g", "beta"), public="gated_delta_rule",
                            inputs=lambda *shape, gates, **kw: delta_inputs(*shape, l2norm=True, **kw)[:5],
                            fla=("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                            oracle=lambda *x, scale: naive_gated_delta_rule(*x, scale=scale, use_qk_l2norm=True),
                            keywords={"use_qk_l2norm_in_kernel": True}, fla_fp32=False),
}


def chunked_flops(B: int, H: int, T: int, K: int, V: int, mode: str, op: str = "linear", C: int = CHUNK) -> float:
    """FLOPs of ``op``'s chunked algorithm (chunk ``C``): linear attention forward
    ``2 T C (K + V) + 4 T K V``, backward ``2 T C (3K + 2V) + 8 T K V``; the gated delta rule
    forward ``2 T C (3K + 2V) + 8 T K V``, backward twice that; per batch and head, the same for every provider."""
    wy = 2 * T * C * (3 * K + 2 * V) + 8 * T * K * V
    fwd, bwd = (2 * T * C * (K + V) + 4 * T * K * V, wy) if op == "linear" else (wy, 2 * wy)
    return float(B * H * (fwd + (bwd if mode == "fwdbwd" else 0)))


def fla_fn(op: str = "linear"):
    """flash-linear-attention's function for ``op`` as ``f(inputs, scale) -> o``, or None."""
    spec = OPS[op]
    try:
        fn = getattr(importlib.import_module(spec.fla[0]), spec.fla[1])
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    params = inspect.signature(fn).parameters

    def run(ins, scale):
        kw = {n: x for n, x in zip(spec.names[3:], ins[3:]) if x is not None}
        for n in (n for n in kw if n not in params):
            raise RuntimeError(f"this fla version has no {n}")
        kw.update(spec.keywords, **({"head_first": False} if "head_first" in params else {}))
        out = fn(*ins[:3], scale=scale, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def providers(device: torch.device, wanted: list[str], op: str = "linear") -> dict:
    """name -> ``f(inputs, scale) -> o``, for those available on ``device``."""
    import lasp

    public, keywords = getattr(lasp, OPS[op].public), OPS[op].keywords

    def ours(backend: str):
        return lambda ins, s: public(*ins, scale=s, backend=backend, **keywords)

    table = {"torch": ours("torch")}
    if device.type == "cuda":
        table.update(triton=ours("triton"), fla=fla_fn(op))
    return {n: table[n] for n in wanted if table.get(n) is not None}


def check_provider(fn, name: str, op: str, dims: list[int], gates: str, device: torch.device) -> list[dict]:
    """Rel. errors of outputs and input gradients vs the float64 oracle, fp32 and bf16 inputs, T = 777
    (not a multiple of the chunk); fp32 not for an fla function that refuses it."""
    spec, rows = OPS[op], []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[0 if spec.fla_fp32 or name != "fla" else 1:]:
        for d in dims:
            full = spec.inputs(2, 777, 4, d, d, gates=gates, dtype=dtype, seed=2 * d, device=device)
            do = torch.randn(2, 777, 4, d, generator=torch.Generator().manual_seed(d)).to(device=device, dtype=dtype)
            ins = [None if x is None else x.clone().requires_grad_() for x in full]
            ref_in = [None if x is None else x.detach().double().requires_grad_() for x in full]
            o, ref = fn(ins, d**-0.5), spec.oracle(*ref_in, scale=d**-0.5)
            o.backward(do)
            ref.backward(do.double())
            errs = {"o": rel_error(ref, o)}
            for n, a, r in zip(spec.names, ins, ref_in):
                if a is not None:  # None: the provider gives no gradient for it
                    errs["d" + n] = None if a.grad is None else rel_error(r.grad, a.grad)
            bound = RTOL[dtype]
            ok = all(e is None or e <= (1e-4 if n == "dg_gamma" and dname == "fp32" else bound) for n, e in errs.items())
            rows.append({"provider": name, "op": op, "dtype": dname, "K": d, "V": d, "gates": gates, "errors": errs, "ok": ok})
            print(f"check {name:6s} {op} {dname} K=V={d}: " + " ".join(f"{n}={'none' if e is None else f'{e:.1e}'}"
                                                                  for n, e in errs.items()) + ("" if ok else "  FAIL"))
    return rows


def matmul_peak_tflops(device: torch.device) -> float | None:
    """Measured bf16 ``8192^3`` matmul TFLOP/s (``do_bench`` median); None on the CPU."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / (do_bench(lambda: a @ b, return_mode="median") * 1e-3) / 1e12


def markdown(records: list[dict], env: dict, command: str, peak: float | None, args) -> str:
    fla = {(r["mode"], r["seq_len"], r["K"]): r for r in records if r["provider"] == "fla" and r["status"] == "ok"}
    rows = []
    for r in records:
        ok, ref = r["status"] == "ok", fla.get((r["mode"], r["seq_len"], r["K"]))
        rows.append([r["provider"], r["mode"], str(r["seq_len"]), str(r["K"]), status_cell(r), fmt_num(r.get("time_ms"), 3),
                     f"{r['tflops']:.4g}" if ok else "-", f"{r['frac_peak'] * 100:.1f}%" if ok and peak else "",
                     f"{ref['time_ms'] / r['time_ms']:.2f}x" if ok and ref and r["provider"] != "fla" else ""])
    table = markdown_table(["provider", "mode", "T", "K=V", "status", "ms (median)", "TFLOP/s", "of peak", "vs fla"], rows)
    header = (f"op {args.op}, B {args.B}, H {args.H}, dtype {args.dtype}, gates {args.gates}; bf16 matmul peak measured: "
              + (f"{peak:.0f} TFLOP/s" if peak else "n/a"))
    return report("kernels", command, env, table, f"TFLOP/s: FLOPs of the chunked algorithm (C = {CHUNK}) / median time.", header)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasp bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when available)")
    p.add_argument("--B", type=int, default=None, help="batch (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--H", type=int, default=None, help="heads (default 16 on CUDA, 2 on CPU)")
    p.add_argument("--T", type=csv_arg(positive()), default=None, help="sequence lengths (default 2048,8192,32768 on CUDA; 256,1024 on CPU)")
    p.add_argument("--dims", type=csv_arg(positive()), default=None, help="head dims K=V (default 64,128 on CUDA; 64 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--gates", choices=("none", "g", "g_gamma", "both"), default="g", help="linear attention's gates")
    p.add_argument("--providers", default="triton,torch,fla", help="comma list; unavailable ones are skipped")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--warmup", type=int, default=3, help="CPU: warm-up runs (CUDA: do_bench warms up for 25 ms)")
    p.add_argument("--reps", type=int, default=20, help="CPU: most timed runs per case")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per case (CPU: default 3; CUDA: "
                   "do_bench's repetition time, default 0.25)")
    p.add_argument("--op", choices=OPS, default="linear",
                   help="linear attention (chunk_simple_gla's op) or the gated delta rule (chunk_gated_delta_rule's)")
    p.add_argument("--check", action="store_true", help="compare each provider with the float64 oracle first")
    p.add_argument("--out", default=None, help="directory for results.json, results.md, kernels.png")
    args = p.parse_args(argv)
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = args.device.type == "cuda"
    args.B, args.H, args.budget = args.B or (8 if gpu else 1), args.H or (16 if gpu else 2), args.budget or (0.25 if gpu else 3.0)
    args.T, args.dims = args.T or ([2048, 8192, 32768] if gpu else [256, 1024]), args.dims or ([64, 128] if gpu else [64])
    return args


def run_case(fn, name: str, mode: str, T: int, d: int, peak: float | None, args) -> dict:
    """One (provider, mode, T, K=V) record: ``triton.testing.do_bench`` on CUDA, the CPU timer otherwise."""
    rec = dict(provider=name, mode=mode, series=f"{name} {mode}", seq_len=T, K=d, V=d, B=args.B, H=args.H, status="ok", reason="")
    try:
        ins = OPS[args.op].inputs(args.B, T, args.H, d, d, gates=args.gates, dtype=DTYPES[args.dtype], device=args.device)
        leaves = [x.requires_grad_() for x in ins if x is not None and mode != "fwd"]
        do = torch.randn(args.B, T, args.H, d, device=args.device, dtype=DTYPES[args.dtype])

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    return fn(ins, d**-0.5)
            for x in leaves:
                x.grad = None
            fn(ins, d**-0.5).backward(do)

        if args.device.type == "cuda":
            from triton.testing import do_bench

            samples = list(do_bench(step, warmup=25, rep=1e3 * args.budget, return_mode="all"))
        else:
            out = time_steps([step], group=None, device=args.device, warmup=args.warmup, reps=args.reps, max_seconds=args.budget)
            samples = [s * 1e3 for s in out[0]["samples_s"]]
        rec.update(summarize_samples([s / 1e3 for s in samples]), samples_ms=samples)
        rec["tflops"] = chunked_flops(args.B, args.H, T, d, d, mode, args.op) / (rec["time_ms"] * 1e-3) / 1e12
        rec["frac_peak"] = rec["tflops"] / peak if peak else None
        result = f"{rec['time_ms']:10.3f} ms {rec['tflops']:10.4g} TFLOP/s"
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
        rec.update(status="error", reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        result = f"ERROR {rec['reason']}"
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{mode:7s} T={T:6d} K=V={d:4d} {name:7s} {result}")
    return rec


def main(argv: list[str]) -> int:
    args = parse(argv)
    provs = providers(args.device, args.providers.split(","), args.op)
    if not provs:
        print(f"no provider of {args.providers!r} is available on {args.device}", file=sys.stderr)
        return 2
    env = env_info(str(args.device), 1, providers=list(provs), fla_available=fla_fn(args.op) is not None, chunk=CHUNK)
    print(f"lasp bench kernels on {env['device']}: op {args.op}, providers {list(provs)}, B={args.B} H={args.H} T={args.T} "
          f"K=V={args.dims} {args.dtype} gates={args.gates}")
    checks = []
    for name, fn in provs.items() if args.check else ():
        try:
            checks += check_provider(fn, name, args.op, args.dims, args.gates, args.device)
        except Exception as e:  # noqa: BLE001 - report and go on to timing
            checks.append({"provider": name, "error": f"{type(e).__name__}: {e}", "ok": False})
            print(f"check {name}: {checks[-1]['error']}")
    peak = matmul_peak_tflops(args.device)
    records = [run_case(fn, name, mode, T, d, peak, args) for mode in args.modes.split(",") for d in args.dims
               for T in args.T for name, fn in provs.items()]
    text = markdown(records, env, "lasp bench kernels " + " ".join(argv), peak, args)
    print("\n" + text)
    if args.out:
        plot = plot_metric_vs_seq_len(records, os.path.join(args.out, "kernels.png"), series="series", metric="tflops",
                                      ylabel="TFLOP/s (chunked algorithm)", title="kernels (dashed: fwd only)", panel="K",
                                      panel_name="K=V", dashed=tuple(f"{n} fwd" for n in provs))
        doc = results_doc("kernels", env, dict(vars(args), device=str(args.device)), records, [os.path.basename(plot)])
        write_results(args.out, dict(doc, peak_tflops=peak, checks=checks), text)
        print(f"wrote {args.out}/results.json, results.md, kernels.png")
    if not all(r["ok"] for r in checks):
        print("CHECK FAILED: a provider exceeded the numerics contract (see above)", file=sys.stderr)
        return 1
    return 0
