"""The GPU check of lasp: its sections, run by ``scripts/gpu_check.sh`` (which installs lasp, gives
each section a time budget and prints the summary), or by hand:

    python scripts/gpu_check.py [--smoke] [--out DIR] run SECTION[,SECTION...]   # in one process
    python scripts/gpu_check.py [--out DIR] summary                              # the one table

Each section appends result rows (section, check, result, detail) to ``DIR/rows.jsonl`` as it goes,
so one stopped by its time budget still reports what it finished; ``summary`` prints them with the
shell's per-section status (``DIR/status.tsv``: exit status, seconds) as one table, also written to
``DIR/summary.md``. Results: ``ok`` / ``FAIL`` (a check failed), ``info`` (a measurement), ``skip``.

  env      versions, the GPU, which optional packages import
  kernels  every Triton kernel, forward + backward, against the torch chunk path in float64 on the
           same device: simple GLA and the gated delta rule, fp32/bf16/fp16, K != V, gates
           none/g/g_gamma/both, hard resets, initial + final states, packed documents, T not a
           multiple of the chunk, fla's test_gdn case (cumulative log-gates far below -88)
  softmax  the softmax blocks on CUDA (flash; memory-efficient and the float32 reference, forced with
           torch's SDPA switches) against a float64 oracle: packed documents, GQA, more keys than
           queries, head dims 64..256; their time at T=8192 next to torch's own SDPA
  speed    T=8192, H=16, K=V=128 bf16, fwd and fwd+bwd ms: lasp's Triton kernels, fla's (when
           importable), the torch chunk path; the binaries launched (registers, spills, shared memory)
  train    ``lasp train`` of configs/tiny-hybrid.yaml on this GPU: one process, a few bf16 steps
``--mini``: the kernels section's bf16 K = V = 128 cases at T = 200 (the shell's compute-sanitizer run).
``--smoke``: on the CPU (TRITON_INTERPRET=1) with tiny shapes, the CUDA-only parts skipped with a row
saying so; ``tests/test_gpu_check.py`` runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # the project's numerics contract
SECTIONS: dict = {}


def section(fn):
    SECTIONS[fn.__name__] = fn
    return fn


class Report:
    """Rows of one section, printed and appended to ``rows.jsonl`` as they come."""

    def __init__(self, out: str, name: str, smoke: bool, mini: bool = False):
        self.path, self.section, self.smoke, self.mini = os.path.join(out, "rows.jsonl"), name, smoke, mini
        self.dev = torch.device("cpu" if smoke else "cuda")

    def row(self, check: str, result: str, detail: str = "") -> None:
        print(f"  {result:4s} {check}: {detail}", flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"section": self.section, "check": check, "result": result, "detail": detail}) + "\n")

    def errors(self, check: str, errs: dict, rtol: float) -> None:
        bad = [n for n, e in errs.items() if not e <= rtol]
        worst = max(errs, key=lambda n: errs[n] if math.isfinite(errs[n]) else math.inf)
        detail = f"max rel err {errs[worst]:.1e} ({worst}; bound {rtol:.0e})" + (f"; over: {', '.join(bad)}" if bad else "")
        self.row(check, "FAIL" if bad else "ok", detail)

    def guarded(self, check: str, fn) -> None:
        """Run ``fn()``; an exception becomes a FAIL row (the next check still runs)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            self.row(check, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def bench_ms(fn, smoke: bool) -> float:
    """Median time of ``fn`` in ms (triton's do_bench on a GPU; one timed call on the CPU)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=150, return_mode="median")


# ----------------------------------------------------------------------------- env


@section
def env(r: Report) -> None:
    import triton

    gpu = "no CUDA device (smoke)" if r.smoke else (
        f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}, "
        f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    r.row("versions", "info", f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
                              f"triton {triton.__version__}; {gpu}")
    found = []
    for mod in ("lasp.kernels", "deepspeed", "fla", "yaml", "safetensors", "tqdm"):
        try:
            __import__(mod)
            found.append(f"{mod} yes")
        except Exception as e:  # noqa: BLE001
            found.append(f"{mod} NO ({type(e).__name__})")
    r.row("packages", "ok" if found[0].endswith("yes") else "FAIL", ", ".join(found))


# ----------------------------------------------------------------------------- kernels


def compare(r: Report, check: str, fn, ins, names, dtype) -> None:
    """``fn(inputs, backend) -> (o, final)``: Triton in ``dtype`` vs the torch path in float64 on
    the same device, outputs, final state and every input gradient (loss <o, dO> + <final, dF>)."""
    from lasp.testing import rel_error

    def leaves(dt=None):
        return [None if x is None else (x.detach().to(dt) if dt else x.detach()).clone().requires_grad_() for x in ins]

    a, ref = leaves(), leaves(torch.float64)
    o, fin = fn(a, "triton")
    ro, rfin = fn(ref, "torch")
    gen = torch.Generator().manual_seed(1)
    do, dfin = torch.randn(ro.shape, generator=gen).to(r.dev), torch.randn(rfin.shape, generator=gen).to(r.dev)
    ((o.float() * do.to(o.dtype).float()).sum() + (fin * dfin).sum()).backward()
    ((ro * do.to(o.dtype).double()).sum() + (rfin * dfin.double()).sum()).backward()
    errs = {"o": rel_error(ro, o), "final": rel_error(rfin, fin)}
    for n, x, y in zip(names, a, ref):
        if x is not None:
            errs["d" + n] = math.inf if x.grad is None else rel_error(y.grad, x.grad)
    r.errors(check, errs, RTOL[dtype])


def check_linear(r: Report, dname, B, T, H, K, V, gates, resets=(), docs=0):
    import lasp
    from lasp.testing import document_starts, linear_inputs

    dtype = DT[dname]
    q, k, v, g, gg = linear_inputs(B, T, H, K, V, gates=gates, dtype=dtype, seed=K + V + T, device=r.dev, resets=resets)
    s0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(3)).to(r.dev)
    cu = document_starts(T, docs, seed=T).to(r.dev) if docs else None

    def run(x, backend):
        return lasp.linear_attention(*x[:5], scale=K ** -0.5, initial_state=x[5], output_final_state=True, backend=backend,
                                     cu_seqlens=cu)
    tag = f"simple GLA {dname} B{B} T{T} H{H} K{K} V{V} gates={gates}" + (" resets" if resets else "") + (f" {docs} docs" if docs else "")
    r.guarded(tag, lambda: compare(r, tag + " +states", run, [q, k, v, g, gg, s0], ("q", "k", "v", "g", "g_gamma", "s0"), dtype))


def check_delta(r: Report, dname, B, T, H, K, V, gates, l2, docs=0, gate_scale=None, hv=None):
    import lasp
    from lasp.testing import delta_inputs, document_starts

    dtype = DT[dname]
    q, k, v, g, beta, s0 = delta_inputs(B, T, H, K, V, gates=gates, dtype=dtype, l2norm=l2, init=True, seed=K + V + T,
                                        device=r.dev, hv=hv)
    HV = v.shape[2]  # GVA when hv > H
    if gate_scale is not None:  # fla's test_gdn: g = logsigmoid(U(0, 1)) / gate_logit_normalizer
        g = torch.nn.functional.logsigmoid(torch.rand(B, T, HV, generator=torch.Generator().manual_seed(5))).to(r.dev) / gate_scale
    cu = document_starts(T, docs, seed=T).to(r.dev) if docs else None
    if docs:  # fla's varlen states: one initial state per document (and one final state each)
        s0 = torch.randn(docs, HV, K, V, generator=torch.Generator().manual_seed(6)).to(r.dev)

    def run(x, backend):
        return lasp.gated_delta_rule(*x[:5], scale=K ** -0.5, initial_state=x[5], output_final_state=True,
                                     use_qk_l2norm_in_kernel=l2, backend=backend, cu_seqlens=cu)
    tag = (f"gated delta {dname} B{B} T{T} H{H}" + (f" HV{HV}" if HV != H else "") + f" K{K} V{V} g={gates} l2={l2}"
           + (f" {docs} docs" if docs else "")
           + (f" g/{gate_scale} (fla test_gdn)" if gate_scale else ""))
    r.guarded(tag, lambda: compare(r, tag + " +states", run, [q, k, v, g, beta, s0], ("q", "k", "v", "g", "beta", "s0"), dtype))


@section
def kernels(r: Report) -> None:
    if r.smoke:  # the interpreter: one case per kind
        check_linear(r, "fp32", 1, 40, 2, 16, 32, "both", resets=(5, 21))
        check_delta(r, "fp32", 1, 40, 2, 16, 16, "g", True, docs=3, hv=4)
        return
    if r.mini:  # the compute-sanitizer run: the kernels of the bf16 K = V = 128 cases, a short T
        check_linear(r, "bf16", 1, 200, 4, 128, 128, "g", resets=(5, 64))
        check_delta(r, "bf16", 1, 200, 4, 128, 128, "g", True)
        return
    T = 976  # not a multiple of 64; T % 16 == 0 like the long sequences
    check_linear(r, "bf16", 2, T, 8, 128, 128, "g", resets=(5, 64, 200))
    check_delta(r, "bf16", 2, T, 8, 128, 128, "g", True)
    check_linear(r, "fp32", 2, T, 8, 64, 64, "both", resets=(5, 64, 200))
    check_linear(r, "bf16", 2, T, 8, 64, 128, "g_gamma")
    check_linear(r, "fp16", 2, T, 8, 64, 64, "both")
    check_linear(r, "bf16", 2, 1000, 4, 256, 64, "none")
    check_linear(r, "bf16", 1, T, 8, 128, 128, "g", docs=7)
    check_delta(r, "fp32", 2, T, 8, 64, 64, "g", True)
    check_delta(r, "bf16", 2, T, 8, 128, 128, "reset", False)
    check_delta(r, "fp16", 2, T, 8, 64, 64, "g", False)
    check_delta(r, "bf16", 2, T, 8, 64, 128, "none", True)
    check_delta(r, "bf16", 1, T, 8, 128, 128, "g", True, docs=7)
    check_delta(r, "bf16", 2, T, 4, 128, 128, "g", True, hv=8)  # GVA (Qwen3.5: value heads a multiple of q/k heads)
    check_delta(r, "bf16", 1, T, 4, 128, 128, "g", True, docs=7, hv=12)  # GVA x varlen with per-document states
    for dname in ("fp32", "bf16"):
        check_delta(r, dname, 2, 75, 4, 64, 64, "g", True, gate_scale=0.01)


# ----------------------------------------------------------------------------- softmax


@contextlib.contextmanager
def sdpa_backends(which: str):
    """``flash``: torch's default switches; ``efficient``: flash off; ``reference``: both off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
               "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], "reference": [SDPBackend.MATH]}[which]
    with sdpa_kernel(allowed):
        yield


@contextlib.contextmanager
def kernels_used(seen: dict):
    """Count which block kernel :func:`lasp.ops.softmax_kernels.select_kernel` picks."""
    from lasp.ops import softmax_kernels

    real = softmax_kernels.select_kernel

    def counting(q, k, v, mask):
        kern = real(q, k, v, mask)
        name = "reference" if kern is None else kern.name
        seen[name] = seen.get(name, 0) + 1
        return kern
    softmax_kernels.select_kernel = counting
    try:
        yield
    finally:
        softmax_kernels.select_kernel = real


def softmax_case(r: Report, dname: str, H: int, H_kv: int, D: int, T: int, route: str, *, docs=None, Tq=None):
    """Packed documents (``docs``: ``cu_seqlens``) or bottom-right causal ``Tq < T`` keys (B=2)
    through lasp's softmax path on this device vs each document / the whole in float64."""
    import lasp
    from lasp.ops import reference
    from lasp.ops.softmax_local import sdpa_attention
    from lasp.testing import rel_error, softmax_inputs

    dtype, scale = DT[dname], 0.3
    B = 1 if docs is not None else 2
    full, do = softmax_inputs(B, T, H, H_kv, D, dtype, seed=D + T)
    full, do = [x.to(r.dev) for x in full], do.to(r.dev)
    if Tq is not None:
        full[0], do = full[0][:, T - Tq:], do[:, T - Tq:]
    ins = [x.clone().requires_grad_() for x in full]
    seen: dict = {}
    with sdpa_backends(route), kernels_used(seen):
        if docs is not None:
            o = lasp.softmax_attention(*ins, scale=scale, cu_seqlens=docs)
        else:
            o = sdpa_attention(*ins, causal=True, scale=scale)
        o.backward(do)
    ref_ins = [x.detach().double().requires_grad_() for x in full]
    if docs is not None:
        b = docs.tolist()
        ref = torch.cat([reference.softmax_attention_reference(*(x[:, s:f] for x in ref_ins), causal=True, scale=scale)
                         for s, f in zip(b[:-1], b[1:])], dim=1)
    else:
        q_pad = torch.cat([torch.zeros(B, T - Tq, H, D, dtype=torch.float64, device=r.dev), ref_ins[0]], 1)
        ref = reference.softmax_attention_reference(q_pad, ref_ins[1], ref_ins[2], causal=True, scale=scale)[:, T - Tq:]
    ref.backward(do.double())
    errs = {"o": rel_error(ref, o), **{f"d{n}": rel_error(x.grad, y.grad) for n, x, y in zip("qkv", ref_ins, ins)}}
    shape = f"{len(docs) - 1} docs in T{T}" if docs is not None else f"Tq{Tq} of Tk{T}"
    used = ", ".join(f"{k} x{v}" for k, v in sorted(seen.items()))
    tag = f"{dname} H{H}/{H_kv} D{D} {shape}, {route} allowed [{used}]"
    r.errors(tag, errs, RTOL[dtype])


def softmax_timing(r: Report) -> None:
    """B=1 T=8192 H=16/4 D=128 bf16 causal, one square block through lasp's path per kernel, next
    to torch's SDPA (its own flash, GQA)."""
    from lasp.ops.softmax_local import PiecesAttention, lower_right_pieces

    B, T, H, H_kv, D = 1, 8192, 16, 4, 128
    gen = torch.Generator().manual_seed(0)
    q, do = (torch.randn(B, T, H, D, generator=gen).to(r.dev, torch.bfloat16).requires_grad_() for _ in range(2))
    k, v = (torch.randn(B, T, H_kv, D, generator=gen).to(r.dev, torch.bfloat16).requires_grad_() for _ in range(2))
    pieces = functools.partial(lower_right_pieces, T, T)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                                is_causal=True, enable_gqa=True).transpose(1, 2)
    runs = {route: (lambda q, k, v: PiecesAttention.apply(q, k, v, D ** -0.5, pieces)) for route in ("flash", "efficient", "reference")}
    runs["torch sdpa"] = sdpa
    times = {}
    for name, fn in runs.items():
        with sdpa_backends(name if name in ("flash", "efficient", "reference") else "flash"):
            def step():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).backward(do)
            with torch.no_grad():
                tf = bench_ms(lambda: fn(q, k, v), r.smoke)
            times[name] = (tf, bench_ms(step, r.smoke))
    r.row(f"time B{B} T{T} H{H}/{H_kv} D{D} bf16 causal, fwd / fwd+bwd ms", "info",
          "; ".join(f"{n} {a:.2f} / {b:.2f}" for n, (a, b) in times.items()))


@section
def softmax(r: Report) -> None:
    from lasp.testing import document_starts

    dev = r.dev
    if r.smoke:
        r.row("CUDA kernels", "skip", "no CUDA device: the CPU flash kernel and the reference run instead "
                                       "(tests/test_softmax_kernels.py drives the CUDA wrappers with stand-in ops)")
        r.guarded("smoke docs", lambda: softmax_case(r, "fp32", 4, 2, 16, 64, "flash", docs=document_starts(64, 4).to(dev)))
        r.guarded("smoke lower-right", lambda: softmax_case(r, "bf16", 4, 2, 16, 64, "flash", Tq=24))
        return
    docs = document_starts(2048, 9, seed=1).to(dev)
    tiny = torch.tensor([0, *range(3, 300, 4), 300], device=dev)  # 75 documents of 3-4 tokens: masked groups
    cases = [("bf16", 16, 4, 128, 2048, "flash", dict(docs=docs)),
             ("fp32", 16, 4, 64, 2048, "flash", dict(docs=docs)),  # fp32: the efficient kernel
             ("bf16", 16, 4, 128, 2048, "efficient", dict(docs=docs)),
             ("bf16", 16, 4, 128, 2048, "reference", dict(docs=docs)),
             ("bf16", 8, 8, 128, 2048, "flash", dict(Tq=512)),
             ("fp16", 8, 2, 64, 2048, "flash", dict(Tq=700)),
             ("bf16", 4, 1, 256, 1024, "flash", dict(docs=document_starts(1024, 5, seed=2).to(dev))),
             ("bf16", 8, 2, 96, 1024, "efficient", dict(Tq=333)),
             ("bf16", 4, 2, 64, 300, "flash", dict(docs=tiny))]
    for dname, H, H_kv, D, T, route, kw in cases:
        r.guarded(f"{dname} D{D} {route}", lambda: softmax_case(r, dname, H, H_kv, D, T, route, **kw))
    r.guarded("softmax timing", lambda: softmax_timing(r))


# ----------------------------------------------------------------------------- speed


def provider(op: str, name: str):
    import lasp
    from lasp.bench.kernels import fla_fn

    if name == "fla":
        return fla_fn(op)
    if op == "linear":
        return lambda x, s: lasp.linear_attention(*x, scale=s, backend=name)
    return lambda x, s: lasp.gated_delta_rule(*x, scale=s, use_qk_l2norm_in_kernel=True, backend=name)


@section
def speed(r: Report) -> None:
    from lasp.testing import delta_inputs, linear_inputs

    H, D, T = (2, 16, 64) if r.smoke else (16, 128, 8192)
    for op in ("linear",) if r.smoke else ("linear", "gated_delta"):
        for B in (1,) if r.smoke else (1, 4):
            if op == "linear":
                base = list(linear_inputs(B, T, H, D, D, gates="g", dtype=torch.bfloat16, device=r.dev))
            else:
                base = delta_inputs(B, T, H, D, D, gates="g", dtype=torch.bfloat16, l2norm=True, device=r.dev)[:5]
            times, notes = {}, []
            for name in ("triton", "fla", "torch"):
                fn = provider(op, name)
                if fn is None:
                    notes.append(f"{name} not importable")
                    continue
                if name == "torch" and B > 1:
                    continue
                x = [None if t is None else t.clone().requires_grad_() for t in base]
                do = torch.randn_like(x[2])

                def step():
                    for t in x:
                        if t is not None:
                            t.grad = None
                    fn(x, D ** -0.5).backward(do)
                try:
                    t0 = time.perf_counter()
                    step()  # compiles and autotunes: not timed
                    first = time.perf_counter() - t0
                    with torch.no_grad():
                        tf = bench_ms(lambda: fn(x, D ** -0.5), r.smoke)
                    times[name] = (tf, bench_ms(step, r.smoke))
                    notes.append(f"{name} first call {first:.1f}s")
                except Exception as e:  # noqa: BLE001
                    r.row(f"{op} B{B} {name}", "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
                finally:
                    del x
                    if not r.smoke:
                        torch.cuda.empty_cache()
            detail = "; ".join(f"{n} {a:.2f} / {b:.2f}" for n, (a, b) in times.items())
            if "triton" in times and "fla" in times:
                (a, b), (c, d) = times["triton"], times["fla"]
                detail += f"; triton/fla {a / c:.2f}x / {b / d:.2f}x"
            r.row(f"{op} B{B} T{T} H{H} K=V={D} bf16 fwd / fwd+bwd ms", "info", detail + (f" ({', '.join(notes)})" if notes else ""))
    if not r.smoke:
        r.guarded("binaries", lambda: binaries(r))


def binaries(r: Report) -> None:
    """The compiled binaries launched so far: warps, stages, shared memory, registers, spills."""
    import importlib

    rows = []
    for m in ("lasp.kernels.simple_gla.fwd", "lasp.kernels.simple_gla.bwd", "lasp.kernels.gated_delta.fwd",
              "lasp.kernels.gated_delta.bwd", "lasp.kernels.gated_delta.local_bwd"):
        try:
            mod = importlib.import_module(m)
        except Exception:  # noqa: BLE001 - the other module layout of a later kernel version
            continue
        for name, obj in sorted(vars(mod).items()):
            jit = getattr(obj, "fn", obj)
            if not name.endswith("_kernel") or not hasattr(jit, "device_caches"):
                continue
            for entry in list(jit.device_caches.values()):
                for kern in list((entry[0] if isinstance(entry, tuple) else entry).values()):
                    with contextlib.suppress(Exception):
                        kern._init_handles()
                    md, spills = kern.metadata, getattr(kern, "n_spills", None)
                    rows.append((name, md.num_warps, md.num_stages, md.shared / 1024, getattr(kern, "n_regs", "?"), spills))
    for name, w, s, smem, regs, spills in rows:
        r.row(f"binary {name} w{w} s{s}", "FAIL" if spills else "info", f"smem {smem:.1f} KiB, regs {regs}, spills {spills}")


# ----------------------------------------------------------------------------- train


@section
def train(r: Report) -> None:
    if r.smoke:
        r.row("tiny-hybrid on one GPU", "skip", "needs CUDA (NCCL): not run in the smoke mode")
        return
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # noqa: BLE001
        r.row("tiny-hybrid on one GPU", "skip", f"deepspeed not importable ({type(e).__name__}): carry its wheels (scripts/gpu_wheels.sh)")
        return
    out_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lasp-gpu-check-train")
    steps = 8
    cmd = [sys.executable, "-m", "lasp.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny-hybrid.yaml"),
           "--nproc", "1", "--overwrite", "--no-progress",
           *[a for kv in ("parallel.sp_size=1", "parallel.nproc=1", f"train.steps={steps}", "train.warmup=2",
                          "train.dtype=bf16", "checkpoint.every=1000", "sample.max_new_tokens=16", f"out_dir={out_dir}")
             for a in ("--set", kv)]]
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", 0))  # set by gpu_check.sh: the section's end
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(10.0, deadline - time.time() - 8) if deadline else None)
    except subprocess.TimeoutExpired as e:
        sys.stdout.write(str(e.stdout or "")[-4000:] + str(e.stderr or "")[-4000:])
        r.row("tiny-hybrid on one GPU", "FAIL", f"lasp train still running after {time.perf_counter() - t0:.0f}s (the section's time)")
        return
    wall = time.perf_counter() - t0
    sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if proc.returncode != 0 or not os.path.exists(metrics):
        r.row("tiny-hybrid on one GPU", "FAIL", f"exit status {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}")
        return
    recs = [json.loads(line) for line in open(metrics, encoding="utf-8") if line.strip()]
    losses = [x["loss"] for x in recs]
    good = len(recs) == steps and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    last = recs[-1]
    r.row(f"tiny-hybrid {steps} steps bf16 SP=1, packed documents", "ok" if good else "FAIL",
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {last.get('tokens_per_s', 0):,.0f} tok/s, "
          f"peak {last.get('peak_memory_mb', 0):.0f} MiB, {wall:.0f}s with start-up")


# ----------------------------------------------------------------------------- summary


def summary(out: str) -> int:
    """Print (and write ``summary.md``) the one table; exit status 1 when a check failed."""
    rows = []
    status_path, rows_path = os.path.join(out, "status.tsv"), os.path.join(out, "rows.jsonl")
    if os.path.exists(status_path):
        for line in open(status_path, encoding="utf-8"):
            name, rc, secs, note = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
            result = "skip" if note.startswith("skip") else ("ok" if rc == "0" else ("FAIL" if rc != "124" else "TIME"))
            rows.append({"section": name, "check": "section", "result": result,
                         "detail": note or (f"{secs}s" + ("" if rc in ("0", "1") else f", exit status {rc}" + (" (time budget)" if rc == "124" else "")))})
    if os.path.exists(rows_path):
        rows += [json.loads(line) for line in open(rows_path, encoding="utf-8") if line.strip()]
    order = {name: i for i, name in enumerate(dict.fromkeys(x["section"] for x in rows))}
    rows.sort(key=lambda x: (order[x["section"]], x["check"] != "section"))
    w = [max(len(x[c]) for x in rows + [{"section": "section", "check": "check", "result": "result"}]) for c in ("section", "check", "result")]
    lines = [f"{'section':{w[0]}}  {'check':{w[1]}}  {'result':{w[2]}}  detail"]
    lines += [f"{x['section']:{w[0]}}  {x['check']:{w[1]}}  {x['result']:{w[2]}}  {x['detail']}" for x in rows]
    bad = [x for x in rows if x["result"] in ("FAIL", "TIME")]
    lines.append(f"\nGPU check: {len(rows)} rows, {len(bad)} problem(s)" + (": " + "; ".join(f"{x['section']}: {x['check']}" for x in bad[:20]) if bad else ""))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("```\n" + text + "\n```\n")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, CUDA-only parts skipped")
    ap.add_argument("--mini", action="store_true", help="kernels: two short bf16 cases (for compute-sanitizer)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench-results", "gpu-check"))
    ap.add_argument("command", choices=["run", "summary"])
    ap.add_argument("sections", nargs="?", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "summary":
        return summary(args.out)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke on a CPU)", file=sys.stderr)
        return 2
    failed = False
    for name in args.sections.split(","):
        if name not in SECTIONS:
            print(f"gpu_check: unknown section {name!r} (have {', '.join(SECTIONS)})", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        print(f"===== {name}", flush=True)
        r = Report(args.out, name, args.smoke, args.mini)
        try:
            SECTIONS[name](r)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r.row("section", "FAIL", f"crashed: {type(e).__name__}: {str(e)[:200]}")
            failed = True
        print(f"----- {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
