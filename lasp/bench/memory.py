"""``lasp bench memory``: the memory estimate (:mod:`lasp.train.memory`) against the peaks real
training runs measure on this machine.

    lasp bench memory --out docs/bench/memory                 # every point
    lasp bench memory --out DIR --points sp2-zero3-bf16,runtime
    lasp bench memory --out docs/bench/memory --reestimate    # today's estimate of the measured runs

Each point is a ``lasp train`` run of ``configs/tiny-hybrid.yaml`` (the embedded corpus, packed
documents) with the point's overrides and ``train.steps=2``, in its own processes; its
``metrics.jsonl`` gives rank 0's ``peak_memory_mb`` (max RSS on the CPU, the CUDA allocator's peak on
a GPU) and the step time. The estimate is taken for the same run on SP rank 0 (``device="cpu"`` on a
CPU). Writes ``results.json`` and ``results.md`` (the table: estimate, measured, ratio, breakdown).
The ``runtime`` point (a tiny model) measures what a rank holds beyond its tensors: the CPU runtime
term of the estimate (:data:`lasp.train.memory.CPU_RUNTIME_BYTES`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

RUN_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny-hybrid.yaml")
MID = {"model.hidden_size": 256, "model.intermediate_size": 688, "model.num_heads": 4, "model.num_kv_heads": 2}
WIDE = {"model.hidden_size": 768, "model.intermediate_size": 2048, "model.num_heads": 12, "model.num_kv_heads": 4}
GDN = {"model.architecture": "qwen3_5", "model.linear_variant": "gated_deltanet", "model.hidden_size": 256,
       "model.intermediate_size": 688, "model.num_heads": 4, "model.num_kv_heads": 2, "model.attention_head_dim": 64,
       "model.partial_rotary_factor": 0.25, "model.linear_num_key_heads": 2, "model.linear_num_value_heads": 4,
       "model.linear_key_head_dim": 64, "model.linear_value_head_dim": 64, "model.rms_norm_eps": 1e-6}

# name -> (model overrides, seq_len, sp, zero, dtype, activation_checkpointing, activation_offload)
POINTS: dict[str, tuple[dict, int, int, int, str, bool, bool]] = {
    "runtime": ({}, 256, 1, 0, "fp32", False, False),
    "sp1-zero0-fp32": (MID, 8192, 1, 0, "fp32", False, False),
    "sp2-zero1-fp32": (MID, 16384, 2, 1, "fp32", False, False),
    "sp2-zero3-bf16": (MID, 16384, 2, 3, "bf16", False, False),
    "sp2-zero2-fp32-ckpt": (MID, 32768, 2, 2, "fp32", True, False),
    "sp2-zero2-fp32-offload": (MID, 32768, 2, 2, "fp32", True, True),
    "wide-sp1-zero0-fp32": (WIDE, 2048, 1, 0, "fp32", False, False),
    "wide-sp2-zero3-fp32": (WIDE, 4096, 2, 3, "fp32", False, False),
    "gdn-sp2-zero2-bf16": (GDN, 8192, 2, 2, "bf16", False, False),
}


def point_overrides(name: str, out_dir: str) -> list[str]:
    """The ``--set`` overrides of a point's run."""
    model, seq_len, sp, zero, dtype, ckpt, offload = POINTS[name]
    sets = {**model, "model.max_seq_len": max(seq_len, 512), "parallel.sp_size": sp, "parallel.nproc": sp, "parallel.layout": "zigzag", "train.seq_len": seq_len,
            "train.micro_batch_size": 1, "train.grad_accum": 1, "train.steps": 2, "train.warmup": 1, "train.zero_stage": zero,
            "train.dtype": dtype, "train.activation_checkpointing": ckpt, "train.activation_offload": offload,
            "sample.max_new_tokens": 0, "checkpoint.every": 0, "out_dir": out_dir}
    if "model.architecture" in model:  # a Qwen3.5-style model: per-layer types, GDN layers
        sets["model.layer_pattern"] = "LLLS"
    return [f"{k}={v}" for k, v in sets.items()]


MMAP_THRESHOLD = 1 << 20
"""``MALLOC_MMAP_THRESHOLD_`` of the runs (``--malloc mmap``, the default): glibc then maps every block
of 1 MiB or more on its own and unmaps it when freed, so the max RSS follows the live tensors. With
glibc's default (a dynamic threshold of 128 KiB to 32 MiB) freed blocks below it stay in the heap,
and the RSS peak of these runs is 20-45% above the live tensors (``--malloc default``; the README
gives both)."""


def run_point(name: str, workdir: str, timeout: float, malloc: str = "mmap") -> dict:
    """Train the point (its own processes) and return rank 0's metrics of the last step."""
    out_dir = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "lasp.cli", "train", "--config", RUN_CONFIG, "--no-progress"]
    for s in point_overrides(name, out_dir):
        cmd += ["--set", s]
    start = time.perf_counter()
    env = dict(os.environ)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"point {name}: lasp train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return dict(peak_memory_mb=max(r["peak_memory_mb"] for r in recs), step_time_s=recs[-1]["step_time_s"], wall_s=round(wall, 1),
                losses=[r["loss"] for r in recs])


def estimate_point(name: str, loss: str = "fused"):
    """The estimate of a point's run on SP rank 0 (this machine's device; ``loss``: as
    :func:`~lasp.train.memory.estimate_memory`, default the fused loss ``lasp train`` uses)."""
    from ..models import ModelConfig
    from ..train.config import RunConfig
    from ..train.memory import estimate_memory

    cfg = RunConfig.from_yaml(RUN_CONFIG, point_overrides(name, tempfile.gettempdir()))
    t = cfg.train
    mcfg = ModelConfig.from_dict(cfg.model)
    return estimate_memory(
        mcfg, seq_len=t.seq_len, sp=cfg.parallel.sp_size, dp=cfg.world_size // cfg.parallel.sp_size, zero=t.zero_stage,
        dtype=t.dtype, micro_batch=t.micro_batch_size, activation_checkpointing=t.activation_checkpointing,
        activation_offload=t.activation_offload, layout=cfg.parallel.layout, device="cuda" if torch.cuda.is_available() else "cpu",
        rank=0, documents=True, loss=loss,
    )


def table(rows: list[dict]) -> str:
    """The markdown table of ``results.md``."""
    mib = 2**20
    head = ("| point | T | SP | ZeRO | dtype | ckpt | offload | estimate | measured | est/meas | states | activations | "
            "transient (what) | runtime | step s |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        s, e = r["setup"], r["estimate"]
        lines.append(
            f"| {r['name']} | {s['seq_len']:,} | {s['sp']} | {s['zero']} | {s['dtype']} | {'yes' if s['activation_checkpointing'] else 'no'} | "
            f"{'yes' if s['activation_offload'] else 'no'} | {e['total'] / mib:,.0f} MiB | {r['measured']['peak_memory_mb']:,.0f} MiB | "
            f"{r['ratio']:.2f} | {e['states'] / mib:,.0f} | {e['activations'] / mib:,.0f} | {e['transient'] / mib:,.0f} ({e['transient_source']}) | "
            f"{e['runtime'] / mib:,.0f} | {r['measured']['step_time_s']:.2f} |"
        )
    return "\n".join(lines)


def _row(name: str, measured: dict, est) -> dict:
    return dict(name=name, setup=est.setup, estimate=est.as_dict(), measured=measured,
                ratio=round(est.total / (measured["peak_memory_mb"] * 2**20), 3))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lasp bench memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (results.json, results.md)")
    ap.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, of {', '.join(POINTS)}")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    ap.add_argument("--reestimate", action="store_true",
                    help="run nothing: estimate the points measured in OUT/results.json again (after a change to the estimate)")
    ap.add_argument("--malloc", choices=("mmap", "default"), default="mmap",
                    help="mmap: MALLOC_MMAP_THRESHOLD_=1MiB, the RSS follows the live tensors (default); default: glibc's own")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.points.split(",") if p.strip()]
    bad = [p for p in names if p not in POINTS]
    if bad:
        ap.error(f"--points: unknown {bad[0]!r}; choose from {', '.join(POINTS)}")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    if args.reestimate:
        with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
            old = json.load(f)
        args.malloc, names = old["malloc"], [r["name"] for r in old["points"]]
        for r in old["points"]:
            rows.append(_row(r["name"], r["measured"], estimate_point(r["name"], loss=r["setup"]["loss"])))
    else:
        with tempfile.TemporaryDirectory(prefix="lasp-bench-memory-") as work:
            for name in names:
                rows.append(_row(name, run_point(name, work, args.timeout, args.malloc), estimate_point(name)))
    for r in rows:
        print(f"{r['name']:<26} estimate {r['estimate']['total'] / 2**20:8,.0f} MiB  measured {r['measured']['peak_memory_mb']:8,.0f} MiB  "
              f"ratio {r['ratio']:.2f}  step {r['measured']['step_time_s']:.2f} s", flush=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"device": "cuda" if torch.cuda.is_available() else "cpu", "malloc": args.malloc, "points": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# lasp bench memory\n\n`lasp bench memory --out {args.out} --points {','.join(names)} --malloc {args.malloc}`"
                f"\n\n{table(rows)}\n")
    return 0
