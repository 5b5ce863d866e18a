"""Peak host memory per rank while loading pretrained weights and while exporting a checkpoint.

Makes a random Qwen3.5-shaped model (``--hidden``, ``--vocab``, ``--layers``; tied embeddings),
writes it in bf16 as a Hugging Face directory, then measures each case in a FRESH process (or
two, for the 2-rank cases): after the imports the kernel's high-water mark is reset
(``/proc/self/clear_refs``), the weights are loaded and every parameter is read once (a
parameter whose dtype did not change may still be a lazily mapped view of the file), and
``VmHWM`` minus the RSS before the load is the load's peak. Cases:

- ``from_hf(dtype=bf16 | fp32)``;
- ``model.init_from`` (``lasp.train.init_from.build_initial_model``) under ZeRO 0, 1, 2 for a
  bf16 and an fp32 run (the model handed to ``deepspeed.initialize``; DeepSpeed's own fp32
  master copy comes after and is not counted), and ZeRO-3 on 2 ranks (bf16);
- ``lasp export`` of a bf16 checkpoint written by DeepSpeed under ZeRO 0 (1 rank), ZeRO 1
  and ZeRO 3 (2 ranks), to bf16 Hugging Face shards of ``--max-shard-size``.

``--baseline DIR`` (a checkout of older lasp code) measures the same cases with that code for a
before/after table. Writes ``results.json`` and ``results.md`` into ``--out``::

    python scripts/measure_load_memory.py --out docs/bench/load-memory [--baseline /tmp/old-lasp]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import json, os, sys, torch
os.environ.setdefault("DS_ACCELERATOR", "cpu")
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
_anon_peak = [0]
def _sample():
    import time
    while True:
        _anon_peak[0] = max(_anon_peak[0], status()["RssAnon"])
        time.sleep(0.002)
def reset_peak():
    import threading
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _anon_peak[0] = status()["RssAnon"]
    threading.Thread(target=_sample, daemon=True).start()
def touch(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not getattr(p, "ds_numel", None):
                p.sum().item()  # reads every byte, allocates no copy
def warm(tiny_dir):
    # import and run every code path once on a tiny model, so the measurement sees the load only
    import safetensors.torch, deepspeed, deepspeed.utils.zero_to_fp32, lasp.train.export
    from lasp.models import from_hf
    from lasp.models.weights import source_config
    from lasp.train.init_from import build_initial_model
    touch(from_hf(tiny_dir, dtype=torch.float32))
    touch(build_initial_model(source_config(tiny_dir), tiny_dir, 1, {"bf16": {"enabled": True}}))
def report(before, **extra):
    after = status()
    print("RESULT " + json.dumps({"peak_mb": (after["VmHWM"] - before["VmRSS"]) / 1e6,
                                  "anon_peak_mb": (max(_anon_peak[0], after["RssAnon"]) - before["RssAnon"]) / 1e6,
                                  "anon_after_mb": (after["RssAnon"] - before["RssAnon"]) / 1e6, **extra}), flush=True)
"""


def run_python(code: str, code_dir: str, env: dict | None = None) -> list[dict]:
    """Run ``code`` in a fresh interpreter with ``code_dir`` first on sys.path; its RESULT lines."""
    e = dict(os.environ, PYTHONPATH=code_dir, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=code_dir, env=e,
                       capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not rows:
        raise RuntimeError(f"measurement failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return rows


def load_case(kind: str, path: str, dtype: str, zero: int | None = None) -> str:
    tiny = os.path.join(os.path.dirname(path), "tiny-hf")
    if kind == "from_hf":
        return f"""
            from lasp.models import from_hf
            warm({tiny!r})
            before = status(); reset_peak()
            m = from_hf({path!r}, dtype=torch.{dtype}); touch(m)
            report(before)
        """
    return f"""
        from lasp.models.weights import source_config
        from lasp.train.init_from import build_initial_model
        cfg = source_config({path!r})
        ds = {{"bf16": {{"enabled": {dtype == 'bfloat16'}}}}}
        warm({tiny!r})
        before = status(); reset_peak()
        m = build_initial_model(cfg, {path!r}, {zero}, ds); touch(m)
        report(before, dtypes=sorted({{str(p.dtype) for p in m.parameters()}}))
    """


ZERO3_LOAD = """
    from lasp.spawn import SpawnedGroup
    sys.path.insert(0, {script_dir!r})
    from measure_load_memory_ranks import zero3_load
    with SpawnedGroup(2, timeout=1800) as pool:
        for r in pool.run(zero3_load, {path!r}, {tiny!r}, {load!r}):
            print("RESULT " + json.dumps(r), flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--baseline", default=None, help="a checkout of older lasp code to measure the same cases with")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--cases", default="load,zero3,export", help="which measurements (comma-separated)")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from lasp.models import LinearLlamaForCausalLM, ModelConfig, to_hf

    work = args.work or tempfile.mkdtemp(prefix="lasp-load-memory-")
    h = args.hidden
    cfg = ModelConfig(architecture="qwen3_5", vocab_size=args.vocab, hidden_size=h, intermediate_size=3 * h,
                      num_layers=args.layers, num_heads=h // 128, num_kv_heads=max(1, h // 512), attention_head_dim=128,
                      layer_pattern="LLLS", linear_variant="gated_deltanet", linear_num_key_heads=h // 128,
                      linear_num_value_heads=2 * (h // 128), linear_key_head_dim=128, linear_value_head_dim=128,
                      partial_rotary_factor=0.25, tie_embeddings=True)
    hf_dir = os.path.join(work, "hf-bf16")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        torch.manual_seed(0)
        to_hf(LinearLlamaForCausalLM(cfg), hf_dir, dtype=torch.bfloat16, max_shard_size=args.max_shard_size)
    tiny = os.path.join(work, "tiny-hf")
    if not os.path.isfile(os.path.join(tiny, "config.json")):
        tiny_cfg = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "qwen3_5-tiny.yaml"))
        to_hf(LinearLlamaForCausalLM(tiny_cfg), tiny, dtype=torch.bfloat16)
    n_params = LinearLlamaForCausalLM(cfg, device="meta").num_parameters()
    largest = max(p.numel() for p in LinearLlamaForCausalLM(cfg, device="meta").parameters())
    info = {"params": n_params, "bf16_mb": 2 * n_params / 1e6, "fp32_mb": 4 * n_params / 1e6,
            "largest_tensor_bf16_mb": 2 * largest / 1e6, "checkpoint_files": sorted(os.listdir(hf_dir))}
    print(json.dumps(info, indent=1), flush=True)

    codes = {"new": ROOT} | ({"old": os.path.abspath(args.baseline)} if args.baseline else {})
    rows = []

    def add(case: str, code: str, results: list[dict]):
        for rank, r in enumerate(results):
            rows.append({"case": case, "code": code, "rank": rank, **r})
            print(rows[-1], flush=True)

    cases = set(args.cases.split(","))
    for code, code_dir in codes.items() if "load" in cases else ():
        for dtype in ("bfloat16", "float32"):
            add(f"from_hf(dtype={dtype})", code, run_python(load_case("from_hf", hf_dir, dtype), code_dir))
            for zero in (0, 1, 2):
                add(f"init_from ZeRO-{zero}, {dtype} run", code, run_python(load_case("init", hf_dir, dtype, zero), code_dir))
    for load in (False, True) if "zero3" in cases else ():
        code = ZERO3_LOAD.format(script_dir=os.path.dirname(os.path.abspath(__file__)), path=hf_dir, tiny=tiny, load=load)
        what = "init_from ZeRO-3 (2 ranks), bfloat16 run" if load else "ZeRO-3 construction alone (zero.Init, 2 ranks, bf16)"
        add(what, "new", run_python(code, ROOT))

    from measure_load_memory_ranks import make_checkpoint  # noqa: E402 (next to this script)

    for zero, world in ((0, 1), (1, 2), (3, 2)) if "export" in cases else ():
        ckpt = os.path.join(work, f"ckpt-zero{zero}")
        if not os.path.isdir(ckpt):
            make_checkpoint(cfg, hf_dir, ckpt, zero, world)
        for code, code_dir in codes.items():
            out = os.path.join(work, f"export-zero{zero}-{code}")
            argv = ["--checkpoint", ckpt, "--output", out, "--format", "hf"]
            if code == "new":
                argv += ["--max-shard-size", args.max_shard_size]
            results = run_python(f"""
                from lasp.train.export import main
                import contextlib, io
                warm({os.path.join(work, "tiny-hf")!r})
                before = status(); reset_peak()
                with contextlib.redirect_stdout(io.StringIO()):
                    rc = main({argv!r})
                files = sorted(os.listdir({out!r}))
                size = sum(os.path.getsize(os.path.join({out!r}, f)) for f in files if f.endswith(".safetensors"))
                report(before, rc=rc, files=files, weights_mb=size / 1e6)
            """, code_dir)
            add(f"export ZeRO-{zero} bf16 checkpoint ({world} rank{'s' if world > 1 else ''}) -> hf", code, results)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": info, "config": cfg.to_dict(), "rows": rows}, f, indent=1)
    lines = [f"Model: {n_params:,} parameters (bf16 {info['bf16_mb']:.0f} MB, fp32 {info['fp32_mb']:.0f} MB; largest tensor "
             f"{info['largest_tensor_bf16_mb']:.0f} MB in bf16), hidden {h}, vocab {args.vocab:,}, {args.layers} layers, tied.",
             "", "| case | code | rank | peak RSS MB (VmHWM - RSS before) | peak private (anonymous) MB | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                         if k in ("dtypes", "weights_mb", "partition_mb", "construct_peak_mb") and v)
        if "files" in r:
            note += f", {sum(f.endswith('.safetensors') for f in r['files'])} safetensors file(s)"
        lines.append(f"| {r['case']} | {r['code']} | {r['rank']} | {r['peak_mb']:,.0f} | {r['anon_peak_mb']:,.0f} | {note} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
