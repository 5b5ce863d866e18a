"""``lasp bench model``: tokens/s of a full training step (forward, backward, gradient
all-reduce over the SP group, AdamW step) for models of the same size that differ only in
their token mixers, at growing sequence lengths, on P ranks.

    lasp bench model --models linear,hybrid,llama-ring --seq-len 2K,8K --sp 2 --out DIR

Models (every one is the base config -- ``--config`` or the built-in small shape -- with the
layer pattern and methods below; ``num_kv_heads`` is set to ``num_heads`` so all variants have
the same parameters, up to the D-sized output norm of each linear layer):

    linear        pattern "L"     every layer linear attention, LASP-2
    hybrid        pattern "LLLS"  1/4 softmax: LASP-2 + LASP-2H (all-gather K/V)
    llama-ring    pattern "S"     plain Llama (softmax only), ring attention
    llama-allgather  pattern "S"  plain Llama, LASP-2H
    linear-lasp1  pattern "L"     pure linear with LASP-1

One step on every rank: random token ids of the whole sequence (same seed on every rank),
this rank's shard in ``--layout`` order, ``model(ids, group=, layout=)``, mean cross-entropy of
the local tokens, backward, ONE all-reduce of the flattened gradients (averaged over the SP
ranks, as data parallelism would), ``torch.optim.AdamW.step``. Timing, repetitions and memory
as in :mod:`lasp.bench.timing`; ``tokens_per_s = B * T / step time`` for the whole group, and
``model_tflops`` = training FLOPs per token (:func:`lasp.models.info.count_flops`) x tokens/s.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm
from .layer import common_args
from .plots import plot_metric_vs_seq_len, plot_speedup
from .results import env_line, fmt_bytes, fmt_num, markdown_table, results_doc, status_cell, write_results
from .sweep import launched_world, local_device, resolve_device, run_points, spawned_cuda_check
from .timing import env_info, mem_available_gb, measure_peak_memory, summarize_samples, time_step

# model name -> (layer_pattern, linear_method, softmax_method)
MODELS: dict[str, tuple[str, str, str]] = {
    "linear": ("L", "lasp2", "allgather"),
    "hybrid": ("LLLS", "lasp2", "allgather"),
    "llama-ring": ("S", "lasp2", "ring"),
    "llama-allgather": ("S", "lasp2", "allgather"),
    "linear-lasp1": ("L", "lasp1", "allgather"),
}

# the built-in base shape: small enough for a 2-core CPU at 16K tokens
SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
             linear_variant="lightning", rope_theta=10000.0, max_seq_len=65536)
_GRAD_TAG = "bench.grad_allreduce"


def model_config(point: dict):
    """The ``ModelConfig`` of a point: its base config with the model's pattern and methods."""
    from ..models import ModelConfig

    base = dict(point["base_config"])
    pattern, linear_method, softmax_method = MODELS[point["model"]]
    base.update(layer_pattern=pattern, linear_method=linear_method, softmax_method=softmax_method,
                num_kv_heads=None, linear_backend=point["backend"])
    return ModelConfig.from_dict(base, source=f"bench model {point['model']}")


def model_worker(rank: int, world: int, point: dict) -> dict:
    """Runs on every rank: build the model, warm up, instrument, time training steps."""
    from ..models import LinearLlamaForCausalLM
    from ..parallel import shard_sequence

    device = local_device(point.get("device", "auto"))
    cfg = model_config(point)
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(cfg).to(device=device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[point["dtype"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    group = dist.group.WORLD if world > 1 else None
    T, B = point["seq_len"], point["batch"]
    gen = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
    ids = shard_sequence(tokens[:, :-1], rank, world, point["layout"]).to(device)
    labels = shard_sequence(tokens[:, 1:], rank, world, point["layout"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        logits = model(ids, group=group, layout=point["layout"])
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        if world > 1:  # replicated weights: average the SP ranks' gradients, one collective
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            comm.all_reduce(flat, group, tag=_GRAD_TAG)
            flat /= world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        opt.step()

    def instrument(_step) -> dict:
        with comm.record() as log:
            mem_mb, how = measure_peak_memory(step, device)
        sent = [e for e in log.events if e.kind != "recv"]
        attn = [e for e in sent if e.tag != _GRAD_TAG]
        return dict(peak_mem_mb=mem_mb, mem_method=how, bytes=sum(e.bytes for e in sent),
                    bytes_attention=sum(e.bytes for e in attn), calls=len(sent), calls_attention=len(attn))

    out = time_step(step, group=group, device=device, warmup=point["warmup"], reps=point["reps"],
                    min_reps=point.get("min_reps", 3), max_seconds=point["max_seconds"], instrument=instrument)
    return {"rank": rank, "samples_s": out["samples_s"], "warmup_s": out["warmup_s"],
            "parameters": sum(p.numel() for p in params), **out["instrumented"]}


def merge_model(point: dict, per_rank: list[dict]) -> dict:
    from ..models.info import count_flops

    r0 = per_rank[0]
    stats = summarize_samples(r0["samples_s"])
    tokens_per_s = point["batch"] * point["seq_len"] / (stats["time_ms"] / 1e3)
    cfg = model_config(point)
    rec = dict(point)
    rec.pop("base_config", None)
    rec.update(status="ok", reason="", **stats)
    rec.update(
        layer_pattern=cfg.layer_pattern, parameters=r0["parameters"],
        samples_ms=[s * 1e3 for s in r0["samples_s"]], warmup_ms=[s * 1e3 for s in r0["warmup_s"]],
        tokens_per_s=tokens_per_s, model_tflops=count_flops(cfg, point["seq_len"]) * tokens_per_s / 1e12,
        peak_mem_mb=max(r["peak_mem_mb"] for r in per_rank), mem_method=r0["mem_method"],
        bytes_per_rank=max(r["bytes"] for r in per_rank),
        bytes_per_rank_attention=max(r["bytes_attention"] for r in per_rank),
        collectives=max(r["calls"] for r in per_rank),
        collectives_attention=max(r["calls_attention"] for r in per_rank),
    )
    return rec


def make_precheck():
    from ..parallel import check_shardable

    def precheck(point: dict) -> dict | None:
        rec = spawned_cuda_check(point)
        if rec:
            return dict({k: v for k, v in rec.items() if k != "base_config"})
        try:
            model_config(point)
            check_shardable(point["seq_len"], point["sp"], point["layout"])
        except ValueError as e:
            return dict({k: v for k, v in point.items() if k != "base_config"}, status="skipped", reason=str(e))
        return None

    return precheck


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lasp bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=["linear", "hybrid", "llama-ring"],
                    help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--config", default=None, help="base model YAML (configs/models/*.yaml); default: a built-in small shape")
    ap.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="linear attention backend")
    common_args(ap, default_budget=30.0)
    args = ap.parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            ap.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.dtype == "fp16":
        ap.error("--dtype: the model bench supports fp32 and bf16")
    if any(p < 1 for p in args.sp) or any(n < 1 for n in args.seq_len) or args.batch < 1 or args.reps < 1:
        ap.error("--sp, --seq-len, --batch and --reps must be >= 1")
    if args.config:
        from ..models import ModelConfig

        try:
            args.base_config = ModelConfig.from_yaml(args.config).to_dict()
        except (ValueError, OSError) as e:
            ap.error(f"--config: {e}")
    else:
        args.base_config = dict(SMALL)
    return args


def build_points(args) -> list[dict]:
    return [
        dict(model=m, seq_len=n, sp=sp, batch=args.batch, dtype=args.dtype, layout=args.layout, backend=args.backend,
             warmup=args.warmup, reps=args.reps, min_reps=args.min_reps, max_seconds=args.max_seconds_per_point,
             device=resolve_device(args.device), base_config=args.base_config)
        for sp in args.sp for m in args.models for n in args.seq_len
    ]


def model_markdown(records: list[dict], env: dict, command: str, shape: str) -> str:
    headers = ["model", "status", "P", "seq len", "step ms (median)", "min-max ms", "reps", "tokens/s", "model TFLOP/s",
               "sent/rank (attention)", "peak mem/rank"]
    rows = []
    for r in sorted(records, key=lambda r: (r["sp"], r["seq_len"], list(MODELS).index(r["model"]))):
        ok = r["status"] == "ok"
        rows.append([
            r["model"], "ok" if ok else status_cell(r), str(r["sp"]), f"{r['seq_len']:,}",
            fmt_num(r.get("time_ms")) if ok else "-",
            f"{r['time_ms_min']:.1f}-{r['time_ms_max']:.1f}" if ok else "-",
            str(r.get("n_reps")) if ok else "-",
            fmt_num(r.get("tokens_per_s"), 0) if ok else "-",
            f"{r['model_tflops']:.4f}" if ok else "-",
            f"{fmt_bytes(r['bytes_per_rank'])} ({fmt_bytes(r['bytes_per_rank_attention'])})" if ok else "-",
            f"{r['peak_mem_mb']:.0f} MiB" if ok else "-",
        ])
    return "\n".join([
        "# lasp bench model", "", f"`{command}`", "", f"Base shape: {shape}", "", f"Environment: {env_line(env)}", "",
        markdown_table(headers, rows), "",
        "step: forward + backward + gradient all-reduce + AdamW, slowest rank, median; sent/rank: bytes one rank "
        "sends per step (attention part in brackets; the rest is the gradient all-reduce).", "",
    ])


def _shape(base: dict) -> str:
    keys = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "linear_variant")
    return ", ".join(f"{k} {base.get(k)}" for k in keys)


def write_outputs(out: str, records: list[dict], env: dict, config: dict, command: str, *, final: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    records = [{k: v for k, v in r.items() if k != "base_config"} for r in records]
    plots = []
    if final:
        plots.append(os.path.basename(plot_metric_vs_seq_len(
            records, os.path.join(out, "tokens_per_s_vs_seq_len.png"), series="model", metric="tokens_per_s",
            ylabel="training tokens/s (whole SP group)", title="training step")))
        plots.append(os.path.basename(plot_metric_vs_seq_len(
            records, os.path.join(out, "time_vs_seq_len.png"), series="model", metric="time_ms",
            ylabel="step time (ms)", title="training step")))
        plots.append(os.path.basename(plot_speedup(
            records, os.path.join(out, "linear_speedup.png"), series="model", base="linear",
            against=("llama-ring", "hybrid", "llama-allgather", "linear-lasp1"), title="pure linear (LASP-2) speed-up")))
    doc = results_doc("model", env, config, records, plots)
    write_results(out, doc, model_markdown(records, env, command, _shape(config["base_config"])))
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "lasp bench model " + " ".join(argv)
    device = local_device(args.device)
    env = env_info(str(device), launched_world() or max(args.sp),
                   launcher="external" if launched_world() else "spawned gloo", mem_available_gb=mem_available_gb())
    if not launched_world():
        env["torch_threads_per_rank"] = 1
    config = {k: v for k, v in vars(args).items()}
    done: list[dict] = []

    def save_partial(rec: dict) -> None:
        done.append(rec)
        write_outputs(args.out, done, env, config, command, final=False)

    records = run_points(build_points(args), model_worker, merge_model, desc="bench model", timeout_s=args.point_timeout,
                         precheck=make_precheck(), on_record=save_partial)
    if launched_world() > 1 and dist.get_rank() != 0:
        return 0
    write_outputs(args.out, records, env, config, command)
    print(model_markdown(records, env, command, _shape(args.base_config)))
    print(f"wrote {os.path.join(args.out, 'results.json')}, results.md and plots")
    return 0
