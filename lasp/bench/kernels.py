"""``lasp bench kernels``: one-device speed of the chunked linear-attention compute paths.

Providers: ``triton`` (``lasp.linear_attention(..., backend="triton")``, the kernels under
``kernels/``), ``torch`` (the chunked torch path), and ``fla`` (flash-linear-attention's
``chunk_simple_gla``) when that package is importable. Modes: ``fwd`` (no autograd) and
``fwdbwd`` (forward + backward). CUDA: CUDA events, median over ``--reps`` runs after
``--warmup`` runs; CPU: wall clock, the torch path only.

FLOPs counted are those of the chunked algorithm with chunk ``C = 64`` per (batch, head)
(the same count for every provider):

* forward ``2 T C (K + V) + 4 T K V`` (intra scores and their product with V; chunk states;
  queries against states);
* backward ``2 T C (3K + 2V) + 8 T K V``.

TFLOP/s is reported against a bf16 matmul peak measured on the same device
(8192^3 ``torch.matmul``). Writes ``kernels.json``, ``kernels.md`` (and ``kernels.png`` when
matplotlib is installed) under ``--out``. ``--check`` first compares each provider with the
float64 oracle (outputs and all gradients) on a small problem.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from .timing import time_step

CHUNK = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def chunked_flops(B: int, H: int, T: int, K: int, V: int, mode: str, C: int = CHUNK) -> float:
    """FLOPs of the chunked algorithm (see the module docstring)."""
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
        kw = {"scale": scale}
        if "head_first" in params:
            kw["head_first"] = False
        if g_gamma is not None:
            if "g_gamma" not in params:
                raise RuntimeError("this fla version has no g_gamma")
            kw["g_gamma"] = g_gamma
        out = chunk_simple_gla(q, k, v, g=g, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def providers(device: torch.device, wanted: list[str]):
    """name -> ``f(q, k, v, g, g_gamma, scale) -> o``, for those available on ``device``."""
    import lasp

    table = {"torch": lambda q, k, v, g, gg, s: lasp.linear_attention(q, k, v, g, gg, scale=s, backend="torch")}
    if device.type == "cuda":
        table["triton"] = lambda q, k, v, g, gg, s: lasp.linear_attention(q, k, v, g, gg, scale=s, backend="triton")
        f = fla_fn()
        if f is not None:
            table["fla"] = f
    return {n: table[n] for n in wanted if n in table}


def make_inputs(B, T, H, K, V, gates, dtype, device, seed=0):
    from lasp.testing import linear_inputs

    q, k, v, g, gg = linear_inputs(B, T, H, K, V, gates=gates, dtype=dtype, seed=seed)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(g), to(gg)


def time_ms(step, device, warmup: int, reps: int, budget_s: float) -> float:
    """Median milliseconds of ``step()`` on this process (CUDA events on a GPU, wall clock on
    the CPU), through the benchmarks' shared adaptive timer."""
    samples = time_step(step, group=None, device=device, warmup=warmup, reps=reps, max_seconds=budget_s)["samples_s"]
    return statistics.median(samples) * 1e3


def matmul_peak_tflops(device) -> float | None:
    """Measured bf16 ``8192^3`` matmul TFLOP/s (median of 10 after 3 warm-ups); None on CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup=3, reps=10, budget_s=10.0)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_case(fn, B, T, H, K, V, gates, dtype, device, mode, warmup, reps, budget_s) -> float:
    q, k, v, g, gg = make_inputs(B, T, H, K, V, gates, dtype, device)
    scale = K**-0.5
    if mode == "fwd":

        def step():
            with torch.no_grad():
                fn(q, k, v, g, gg, scale)

    else:
        leaves = [x.requires_grad_() for x in (q, k, v, g, gg) if x is not None]
        do = torch.randn(B, T, H, V, device=device, dtype=dtype)

        def step():
            for x in leaves:
                x.grad = None
            fn(q, k, v, g, gg, scale).backward(do)

    return time_ms(step, device, warmup, reps, budget_s)


def check_provider(fn, name, dims, gates, device) -> list[dict]:
    """Rel. errors vs the float64 oracle, fp32 and bf16 inputs, T not a multiple of the chunk."""
    from lasp.ops import reference
    from lasp.testing import rel_error

    rows = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for K, V in dims:
            full = make_inputs(2, 777, 4, K, V, gates, dtype, device, seed=K + V)
            do = torch.randn(2, 777, 4, V, generator=torch.Generator().manual_seed(K)).to(device=device, dtype=dtype)
            ins = [None if x is None else x.clone().requires_grad_() for x in full]
            o = fn(*ins, K**-0.5)
            o.backward(do)
            ref_in = [None if x is None else x.detach().double().requires_grad_() for x in full]
            ref = reference.naive_recurrent_linear_attention(*ref_in, scale=K**-0.5)
            ref.backward(do.double())
            errs = {"o": rel_error(ref, o)}
            for n, a, r in zip(("q", "k", "v", "g", "g_gamma"), ins, ref_in):
                if a is not None:  # None: the provider gives no gradient for it
                    errs["d" + n] = None if a.grad is None else rel_error(r.grad, a.grad)
            bound = {"fp32": 1e-5, "bf16": 1e-2}[dname]
            ok = all(e is None or e <= (1e-4 if n == "dg_gamma" and dname == "fp32" else bound) for n, e in errs.items())
            rows.append({"provider": name, "dtype": dname, "K": K, "V": V, "gates": gates, "errors": errs, "ok": ok})
            print(f"check {name:6s} {dname} K={K} V={V}: " + " ".join(f"{n}={e:.1e}" if e is not None else f"{n}=none" for n, e in errs.items()) + ("" if ok else "  FAIL"))
    return rows


def markdown(results: list[dict], peak: float | None, meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}; dtype {meta['dtype']}; gates {meta['gates']}; "
        f"bf16 matmul peak measured: {'%.0f TFLOP/s' % peak if peak else 'n/a'}",
        "",
        "| mode | T | K=V | provider | ms | TFLOP/s | of peak | vs fla |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    index = {(r["mode"], r["T"], r["K"], r["provider"]): r for r in results}
    for r in results:
        ref = index.get((r["mode"], r["T"], r["K"], "fla"))
        if r.get("error"):
            lines.append(f"| {r['mode']} | {r['T']} | {r['K']} | {r['provider']} | {r['error'][:40]} | | | |")
            continue
        vs = f"{ref['ms'] / r['ms']:.2f}x" if ref and not ref.get("error") and r["provider"] != "fla" else ""
        frac = f"{r['frac_peak'] * 100:.1f}%" if r.get("frac_peak") else ""
        lines.append(f"| {r['mode']} | {r['T']} | {r['K']} | {r['provider']} | {r['ms']:.3f} | {r['tflops']:.4g} | {frac} | {vs} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the plot is optional
        return
    dims = sorted({r["K"] for r in results})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
        for prov in sorted({r["provider"] for r in results}):
            for mode in ("fwd", "fwdbwd"):
                pts = [(r["T"], r["tflops"]) for r in results if r["K"] == d and r["provider"] == prov and r["mode"] == mode and not r.get("error")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{prov} {mode}", linestyle="-" if mode == "fwdbwd" else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s (chunked algorithm)")
        ax.set_title(f"K = V = {d}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lasp bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when available)")
    p.add_argument("--B", type=int, default=None, help="batch (default 8 on CUDA, 1 on CPU)")
    p.add_argument("--H", type=int, default=None, help="heads (default 16 on CUDA, 2 on CPU)")
    p.add_argument("--T", type=ints, default=None, help="sequence lengths (default 2048,8192,32768 on CUDA; 256,1024 on CPU)")
    p.add_argument("--dims", type=ints, default=None, help="head dims K=V (default 64,128 on CUDA; 64 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--gates", choices=("none", "g", "g_gamma", "both"), default="g")
    p.add_argument("--providers", default="triton,torch,fla", help="comma list; unavailable ones are skipped")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget", type=float, default=3.0, help="max seconds of timed runs per case (at least 3 runs)")
    p.add_argument("--check", action="store_true", help="compare each provider with the float64 oracle first")
    p.add_argument("--out", default=None, help="directory for kernels.json, kernels.md, kernels.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    device = torch.device(dev)
    gpu = device.type == "cuda"
    B = args.B or (8 if gpu else 1)
    H = args.H or (16 if gpu else 2)
    Ts = args.T or ([2048, 8192, 32768] if gpu else [256, 1024])
    dims = args.dims or ([64, 128] if gpu else [64])
    dtype = DTYPES[args.dtype]
    provs = providers(device, args.providers.split(","))
    if not provs:
        print(f"no provider of {args.providers!r} is available on {device}", file=sys.stderr)
        return 2
    meta = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "dtype": args.dtype, "gates": args.gates, "B": B, "H": H, "chunk": CHUNK,
        "providers": list(provs), "fla_available": fla_fn() is not None,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"lasp bench kernels on {meta['device']}: providers {list(provs)}, B={B} H={H} T={Ts} K=V={dims} {args.dtype} gates={args.gates}")

    checks, failed = [], False
    if args.check:
        for name, fn in provs.items():
            try:
                rows = check_provider(fn, name, [(d, d) for d in dims], args.gates, device)
            except Exception as e:  # noqa: BLE001 - report and go on to timing
                rows = [{"provider": name, "error": f"{type(e).__name__}: {e}", "ok": False}]
                print(f"check {name}: {rows[0]['error']}")
            checks += rows
        failed = not all(r["ok"] for r in checks)

    peak = matmul_peak_tflops(device)
    if peak:
        print(f"bf16 matmul peak: {peak:.0f} TFLOP/s")
    results = []
    for mode in args.modes.split(","):
        for d in dims:
            for T in Ts:
                for name, fn in provs.items():
                    row = {"mode": mode, "T": T, "K": d, "V": d, "provider": name, "B": B, "H": H}
                    try:
                        ms = bench_case(fn, B, T, H, d, d, args.gates, dtype, device, mode, args.warmup, args.reps, args.budget)
                        tf = chunked_flops(B, H, T, d, d, mode) / (ms * 1e-3) / 1e12
                        row.update(ms=ms, tflops=tf, frac_peak=(tf / peak if peak else None))
                        print(f"{mode:7s} T={T:6d} K=V={d:4d} {name:7s} {ms:10.3f} ms {tf:10.4g} TFLOP/s")
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        print(f"{mode:7s} T={T:6d} K=V={d:4d} {name:7s} ERROR {row['error']}")
                        if gpu:
                            torch.cuda.empty_cache()
                    results.append(row)
    table = markdown(results, peak, meta)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"meta": meta, "peak_tflops": peak, "checks": checks, "results": results}, indent=2))
        (out / "kernels.md").write_text(table)
        plot(results, out / "kernels.png")
        print(f"wrote {out}/kernels.json, kernels.md" + (", kernels.png" if (out / 'kernels.png').exists() else ""))
    if failed:
        print("CHECK FAILED: a provider exceeded the numerics contract (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
