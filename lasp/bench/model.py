"""``lasp bench model``: tokens/s of a full training step (forward, backward, gradient
all-reduce over the SP group, AdamW step) for models of the same size that differ only in
their token mixers, at growing sequence lengths, on P ranks.

    lasp bench model --models linear,hybrid,llama-ring --seq-len 2K,8K --sp 2 --out DIR

Models: :data:`MODELS`; details: ``docs/bench/README.md``.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm
from . import sweep
from .cli import common_args, csv_arg
from .results import fmt_bytes
from .timing import DTYPES

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
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "linear_variant")  # results.md
GRAD_TAG = "bench.grad_allreduce"


def model_config(point: dict):
    """The ``ModelConfig`` of a point: its base config with the model's pattern and methods."""
    from ..models import ModelConfig

    pattern, linear_method, softmax_method = MODELS[point["model"]]
    base = dict(point["_base_config"], layer_pattern=pattern, linear_method=linear_method, softmax_method=softmax_method,
                num_kv_heads=None, linear_backend=point["backend"])
    return ModelConfig.from_dict(base, source=f"bench model {point['model']}")


def build_step(point: dict, rank: int, world: int, device: torch.device):
    """The driver's ``build``: the model, its optimizer and this rank's tokens; forward = loss,
    backward = backward + gradient all-reduce + AdamW step."""
    from ..models import LinearLlamaForCausalLM
    from ..parallel import shard_sequence

    cfg = model_config(point)
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(cfg).to(device=device, dtype=DTYPES[point["dtype"]])
    model.set_activation_checkpointing(point["activation_checkpointing"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    group = dist.group.WORLD if world > 1 else None
    tokens = torch.randint(0, cfg.vocab_size, (point["batch"], point["seq_len"] + 1), generator=torch.Generator().manual_seed(42))
    ids, labels = (shard_sequence(t, rank, world, point["layout"]).to(device) for t in (tokens[:, :-1], tokens[:, 1:]))
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        return F.cross_entropy(model(ids, group=group, layout=point["layout"]).flatten(0, 1), labels.flatten())

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        if world > 1:  # replicated weights: average the SP ranks' gradients, one collective
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            comm.all_reduce(flat, group, tag=GRAD_TAG)
            for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        opt.step()

    return forward, backward, {"parameters": sum(p.numel() for p in params)}


def finish(point: dict, rec: dict, per_rank: list[dict]) -> dict:
    """Parameters, model TFLOP/s and the attention part of the communication (without the gradients')."""
    from ..models.info import count_flops

    cfg = model_config(point)
    return dict(
        layer_pattern=cfg.layer_pattern, parameters=per_rank[0]["parameters"],
        model_tflops=count_flops(cfg, rec["seq_len"]) * rec["tokens_per_s"] / 1e12,
        bytes_per_rank_attention=max(r["bytes"] - r["tag_bytes"].get(GRAD_TAG, 0) for r in per_rank),
        collectives_attention=max(r["calls"] - r["tag_calls"].get(GRAD_TAG, 0) for r in per_rank),
    )


BENCH = sweep.Bench(
    kind="model", series="model", order=MODELS, build=build_step, finish=finish,
    time_header="step ms (median)", plot_series="label",
    header=lambda config: "Base shape: " + ", ".join(f"{k} {config['base_config'].get(k)}" for k in SHAPE_KEYS),
    plots={"tokens_per_s_vs_seq_len.png": dict(metric="tokens_per_s", ylabel="training tokens/s (whole SP group)",
                                               title="training step"),
           "time_vs_seq_len.png": dict(metric="time_ms", ylabel="step time (ms)", title="training step"),
           "linear_speedup.png": dict(base="linear", against=("llama-ring", "hybrid", "llama-allgather", "linear-lasp1"),
                                      title="pure linear (LASP-2) speed-up")},
    columns=[("ckpt", lambda r: "on" if r["activation_checkpointing"] else "off"), ("model TFLOP/s", lambda r: f"{r['model_tflops']:.4f}"),
             ("sent/rank (attention)", lambda r: f"{fmt_bytes(r['bytes_per_rank'])} ({fmt_bytes(r['bytes_per_rank_attention'])})")],
    note="step: forward + backward + gradient all-reduce + AdamW, slowest rank, median; sent/rank: bytes one rank "
         "sends per step (attention part in brackets; the rest is the gradient all-reduce); ckpt: activation "
         "checkpointing of every decoder layer (plots: +ckpt).",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare-hf" in argv:  # lasp vs transformers on the same Qwen3.5 model (lasp.bench.compare_hf)
        from .compare_hf import main as compare_hf_main

        return compare_hf_main(argv)
    ap = argparse.ArgumentParser(prog="lasp bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=csv_arg(str, "--models", MODELS), default=["linear", "hybrid", "llama-ring"],
                    help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--config", default=None, help="base model YAML (configs/models/*.yaml); default: a built-in small shape")
    ap.add_argument("--activation-checkpointing", choices=("off", "on", "both"), default="off",
                    help="recompute each decoder layer in backward; both: every point with and without")
    common_args(ap, default_budget=30.0)
    args = ap.parse_args(argv)
    if args.dtype == "fp16":
        ap.error("--dtype: the model bench supports fp32 and bf16")
    args.base_config = dict(SMALL)
    if args.config:
        from ..models import ModelConfig

        try:
            args.base_config = ModelConfig.from_yaml(args.config).to_dict()
        except (ValueError, OSError) as e:
            ap.error(f"--config: {e}")
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[args.activation_checkpointing]
    points = [dict(model=m, label=m + "+ckpt" * c, activation_checkpointing=c, seq_len=n, sp=sp, _base_config=args.base_config)
              for sp in args.sp for m in args.models for n in args.seq_len for c in ckpt]
    return sweep.main(BENCH, args, argv, points)
