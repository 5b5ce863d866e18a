"""``lasp bench kernels``: one-device speed of the chunked linear-attention compute paths.

Providers ``triton``, ``torch`` (``lasp.linear_attention(..., backend=)``) and ``fla`` (when
importable); modes ``fwd`` and ``fwdbwd``; TFLOP/s of the chunked algorithm (:func:`chunked_flops`);
``--check``: the float64 oracle first; ``--op gated_delta``: the gated delta rule instead
(:mod:`lasp.bench.delta_kernels`). Details: ``docs/bench/README.md``.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch

from ..ops.reference import naive_recurrent_linear_attention
from ..testing import linear_inputs, rel_error
from . import delta_kernels
from .cli import csv_arg
from .results import fmt_num, markdown_table, plot_metric_vs_seq_len, report, results_doc, status_cell, write_results
from .timing import DTYPES, env_info, summarize_samples, time_steps

CHUNK = 64


def chunked_flops(B: int, H: int, T: int, K: int, V: int, mode: str, C: int = CHUNK) -> float:
    """FLOPs of the chunked algorithm (chunk ``C``, the same for every provider): forward
    ``2 T C (K + V) + 4 T K V``, backward ``2 T C (3K + 2V) + 8 T K V``, per batch and head."""
    fwd = 2 * T * C * (K + V) + 4 * T * K * V
    bwd = 2 * T * C * (3 * K + 2 * V) + 8 * T * K * V
    return float(B * H * (fwd + (bwd if mode == "fwdbwd" else 0)))


def fla_fn():
    """flash-linear-attention's ``chunk_simple_gla`` as ``f(q, k, v, g, g_gamma, scale)``, or None."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    params = inspect.signature(chunk_simple_gla).parameters

    def run(q, k, v, g, g_gamma, scale):
        kw = {"scale": scale, **({"head_first": False} if "head_first" in params else {})}
        if g_gamma is not None:
            if "g_gamma" not in params:
                raise RuntimeError("this fla version has no g_gamma")
            kw["g_gamma"] = g_gamma
        out = chunk_simple_gla(q, k, v, g=g, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def providers(device: torch.device, wanted: list[str]) -> dict:
    """name -> ``f(q, k, v, g, g_gamma, scale) -> o``, for those available on ``device``."""
    import lasp

    def ours(backend: str):
        return lambda q, k, v, g, gg, s: lasp.linear_attention(q, k, v, g, gg, scale=s, backend=backend)

    table = {"torch": ours("torch")}
    if device.type == "cuda":
        table.update(triton=ours("triton"), fla=fla_fn())
    return {n: table[n] for n in wanted if table.get(n) is not None}


def check_provider(fn, name: str, dims: list[int], gates: str, device: torch.device) -> list[dict]:
    """Rel. errors vs the float64 oracle, fp32 and bf16 inputs, T not a multiple of the chunk."""
    rows = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for d in dims:
            full = linear_inputs(2, 777, 4, d, d, gates=gates, dtype=dtype, seed=2 * d, device=device)
            do = torch.randn(2, 777, 4, d, generator=torch.Generator().manual_seed(d)).to(device=device, dtype=dtype)
            ins = [None if x is None else x.clone().requires_grad_() for x in full]
            ref_in = [None if x is None else x.detach().double().requires_grad_() for x in full]
            o, ref = fn(*ins, d**-0.5), naive_recurrent_linear_attention(*ref_in, scale=d**-0.5)
            o.backward(do)
            ref.backward(do.double())
            errs = {"o": rel_error(ref, o)}
            for n, a, r in zip(("q", "k", "v", "g", "g_gamma"), ins, ref_in):
                if a is not None:  # None: the provider gives no gradient for it
                    errs["d" + n] = None if a.grad is None else rel_error(r.grad, a.grad)
            bound = {"fp32": 1e-5, "bf16": 1e-2}[dname]
            ok = all(e is None or e <= (1e-4 if n == "dg_gamma" and dname == "fp32" else bound) for n, e in errs.items())
            rows.append({"provider": name, "dtype": dname, "K": d, "V": d, "gates": gates, "errors": errs, "ok": ok})
            print(f"check {name:6s} {dname} K=V={d}: " + " ".join(f"{n}={'none' if e is None else f'{e:.1e}'}"
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
    p.add_argument("--T", type=csv_arg(int, "--T"), default=None, help="sequence lengths (default 2048,8192,32768 on CUDA; 256,1024 on CPU)")
    p.add_argument("--dims", type=csv_arg(int, "--dims"), default=None, help="head dims K=V (default 64,128 on CUDA; 64 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--gates", choices=("none", "g", "g_gamma", "both"), default="g")
    p.add_argument("--providers", default="triton,torch,fla", help="comma list; unavailable ones are skipped")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--warmup", type=int, default=3, help="CPU: warm-up runs (CUDA: do_bench warms up for 25 ms)")
    p.add_argument("--reps", type=int, default=20, help="CPU: most timed runs per case")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per case (CPU: default 3; CUDA: "
                   "do_bench's repetition time, default 0.25)")
    p.add_argument("--op", choices=("linear", "gated_delta"), default="linear",
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
        if args.op == "gated_delta":
            ins = delta_kernels.delta_inputs(args.B, T, args.H, d, d, dtype=DTYPES[args.dtype], device=args.device)
        else:
            ins = linear_inputs(args.B, T, args.H, d, d, gates=args.gates, dtype=DTYPES[args.dtype], device=args.device)
        leaves = [x.requires_grad_() for x in ins if x is not None and mode != "fwd"]
        do = torch.randn(args.B, T, args.H, d, device=args.device, dtype=DTYPES[args.dtype])

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    return fn(*ins, d**-0.5)
            for x in leaves:
                x.grad = None
            fn(*ins, d**-0.5).backward(do)

        if args.device.type == "cuda":
            from triton.testing import do_bench

            samples = list(do_bench(step, warmup=25, rep=1e3 * args.budget, return_mode="all"))
        else:
            out = time_steps([step], group=None, device=args.device, warmup=args.warmup, reps=args.reps, max_seconds=args.budget)
            samples = [s * 1e3 for s in out[0]["samples_s"]]
        rec.update(summarize_samples([s / 1e3 for s in samples]), samples_ms=samples)
        flops = delta_kernels.delta_flops if args.op == "gated_delta" else chunked_flops
        rec["tflops"] = flops(args.B, args.H, T, d, d, mode) / (rec["time_ms"] * 1e-3) / 1e12
        rec["frac_peak"] = rec["tflops"] / peak if peak else None
        result = f"{rec['time_ms']:10.3f} ms {rec['tflops']:10.4g} TFLOP/s"
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
        rec.update(status="error", reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        result = f"ERROR {rec['reason']}"
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{mode:7s} T={T:6d} K=V={d:4d} {name:7s} {result}")
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    delta = args.op == "gated_delta"
    provs = (delta_kernels.delta_providers if delta else providers)(args.device, args.providers.split(","))
    if not provs:
        print(f"no provider of {args.providers!r} is available on {args.device}", file=sys.stderr)
        return 2
    env = env_info(str(args.device), 1, providers=list(provs), fla_available=(delta_kernels.fla_gdn_fn if delta else fla_fn)() is not None, chunk=CHUNK)
    print(f"lasp bench kernels on {env['device']}: providers {list(provs)}, B={args.B} H={args.H} T={args.T} "
          f"K=V={args.dims} {args.dtype} gates={args.gates}")
    checks = []
    for name, fn in provs.items() if args.check else ():
        try:
            checks += (delta_kernels.delta_check_provider if delta else check_provider)(fn, name, args.dims, args.gates, args.device)
        except Exception as e:  # noqa: BLE001 - report and go on to timing
            checks.append({"provider": name, "error": f"{type(e).__name__}: {e}", "ok": False})
            print(f"check {name}: {checks[-1]['error']}")
    peak = matmul_peak_tflops(args.device)
    records = [run_case(fn, name, mode, T, d, peak, args) for mode in args.modes.split(",") for d in args.dims
               for T in args.T for name, fn in provs.items()]
    text = markdown(records, env, "lasp bench kernels " + " ".join(argv), peak, args)
    print("\n" + text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
