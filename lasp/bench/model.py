"""``lasp bench model``: tokens/s of a full training step (forward, backward, gradient
all-reduce over the SP group, AdamW step) for models of the same size that differ only in
their token mixers, at growing sequence lengths, on P ranks.

    lasp bench model --models linear,hybrid,llama-ring --seq-len 2K,8K --sp 2 --out DIR
    lasp bench model --models qwen3_5-tiny --compare-hf --seq-len 512,2K --out DIR   # vs transformers

Models: :data:`MODELS`; ``--compare-hf`` adds transformers' implementation of each (the same
weights, written by ``lasp.models.to_hf``; SP = 1; needs ``lasp[hf]``). Details: ``docs/bench/README.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import comm
from ..models.config import QWEN_ARCHITECTURES
from . import sweep
from .cli import common_args, csv_arg
from .results import fmt_bytes
from .timing import DTYPES

# model name -> (layer_pattern, linear_method, softmax_method[, more keys]) on the base shape, or a model YAML of its own
MODELS: dict[str, tuple | str] = {
    "linear": ("L", "lasp2", "allgather"),
    "hybrid": ("LLLS", "lasp2", "allgather"),
    "llama-ring": ("S", "lasp2", "ring"),
    "llama-allgather": ("S", "lasp2", "allgather"),
    "linear-lasp1": ("L", "lasp1", "allgather"),
    "moe-hybrid": ("LLLS", "lasp2", "allgather", dict(mlp="moe", num_experts=8, moe_intermediate_size=256, shared_expert_intermediate_size=256)),
    "qwen3_5-tiny": os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models", "qwen3_5-tiny.yaml"),
}

# the built-in base shape: small enough for a 2-core CPU at 16K tokens
SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
             linear_variant="lightning", rope_theta=10000.0, max_seq_len=65536)
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "linear_variant")  # results.md
GRAD_TAG = "bench.grad_allreduce"


def model_config(point: dict):
    """The ``ModelConfig`` of a point: the base config with the model's pattern and methods (or its own YAML)."""
    from ..models import ModelConfig

    spec = MODELS[point["model"]]
    if isinstance(spec, str):
        return dataclasses.replace(ModelConfig.from_yaml(spec), linear_backend=point["backend"])
    base = dict(point["_base_config"], layer_pattern=spec[0], linear_method=spec[1], softmax_method=spec[2],
                num_kv_heads=None, linear_backend=point["backend"], **(spec[3] if len(spec) > 3 else {}))
    return ModelConfig.from_dict(base, source=f"bench model {point['model']}")


def build_step(point: dict, rank: int, world: int, device: torch.device):
    """The driver's ``build``: the model (lasp's or transformers'), its optimizer and this rank's
    tokens; forward = loss (the first one kept), backward = backward + gradient all-reduce + AdamW step."""
    from ..models import LinearLlamaForCausalLM, to_hf
    from ..parallel import new_expert_groups, shard_sequence

    cfg, hf = model_config(point), point["impl"] == "transformers"
    if point["ep"] > 1 and cfg.mlp != "moe":  # (new_expert_groups: ep must divide the world)
        raise ValueError(f"ep={point['ep']} needs a mixture-of-experts model (moe-hybrid)")
    ep_group, edp_group = new_expert_groups(point["ep"]) if point["ep"] > 1 else (None, None)
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(cfg, ep_group=ep_group)
    if hf:  # transformers' implementation with the same weights
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as d:
            to_hf(model, d)
            model = AutoModelForCausalLM.from_pretrained(d)
    model = model.to(device=device, dtype=DTYPES[point["dtype"]]).train()
    if point["activation_checkpointing"]:
        if hf:
            model.gradient_checkpointing_enable()
        else:
            model.set_activation_checkpointing(True, offload=point.get("activation_offload", False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    group = dist.group.WORLD if world > 1 else None
    tokens = torch.randint(0, cfg.vocab_size, (point["batch"], point["seq_len"] + 1), generator=torch.Generator().manual_seed(42))
    ids, labels = (shard_sequence(t, rank, world, point["layout"]).to(device) for t in (tokens[:, :-1], tokens[:, 1:]))
    params = [p for n, p in model.named_parameters() if p.requires_grad and not (ep_group is not None and ".experts." in n)]
    info = {"parameters": sum(p.numel() for p in model.parameters())}

    def forward() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        if hf:  # transformers' model builds its logits: the peer as users run it
            loss = F.cross_entropy(model(ids).logits.float().flatten(0, 1), labels.flatten())
        else:  # the fused loss (lasp.linear_cross_entropy): no [T, vocab] logits
            loss = model(ids, group=group, layout=point["layout"], labels=labels, loss_reduction="mean")
        if "first_loss" not in info:
            info["first_loss"] = loss.item()
        return loss

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        reduce = [(params, group)] + ([([p for n, p in model.named_parameters() if ".experts." in n], edp_group)] if world > point["ep"] > 1 else [])
        for ps, grp in reduce if world > 1 else []:  # average the gradients (experts: over their EDP group), one collective
            flat = torch.cat([p.grad.reshape(-1) for p in ps])
            comm.all_reduce(flat, grp, tag=GRAD_TAG)
            for p, g in zip(ps, (flat / world).split([p.numel() for p in ps])):
                p.grad.copy_(g.view_as(p))
        opt.step()

    return forward, backward, info


def precheck(point: dict) -> tuple[str, str] | None:
    """transformers' model: one process, a Qwen3.5 model, transformers installed."""
    if point["impl"] != "transformers":
        return None
    if point["sp"] != 1:
        return "skipped", "transformers' model runs on one process (sp=1)"
    if model_config(point).architecture not in QWEN_ARCHITECTURES:
        return "unavailable", f"{point['model']} has no transformers implementation (only architecture: qwen3_5 / qwen3_next have)"
    if importlib.util.find_spec("transformers") is None:
        return "unavailable", "--compare-hf needs transformers (pip install 'lasp[hf]')"
    return None


def finish(point: dict, rec: dict, per_rank: list[dict]) -> dict:
    """Parameters, model TFLOP/s, the first step's loss (mean over the ranks' equal shards), the attention and MoE parts of the bytes."""
    from ..models.info import count_flops

    cfg = model_config(point)
    return dict(
        layer_pattern=cfg.layer_pattern, parameters=per_rank[0]["parameters"],
        first_loss=sum(r["first_loss"] for r in per_rank) / len(per_rank),
        model_tflops=count_flops(cfg, rec["seq_len"]) * rec["tokens_per_s"] / 1e12,
        bytes_per_rank_a2a=max(sum(v for k, v in r["tag_bytes"].items() if k.startswith("moe.")) for r in per_rank),
        bytes_per_rank_attention=max(sum(v for k, v in r["tag_bytes"].items() if k != GRAD_TAG and not k.startswith("moe.")) for r in per_rank),
        collectives_attention=max(sum(c for k, c in r["tag_calls"].items() if k != GRAD_TAG and not k.startswith("moe.")) for r in per_rank),
    )


BENCH = sweep.Bench(
    kind="model", series="model", order=MODELS, build=build_step, finish=finish, precheck=precheck,
    time_header="step ms (median)", plot_series="label",
    header=lambda config: "Base shape (models without a YAML of their own): " + ", ".join(f"{k} {config['base_config'].get(k)}" for k in SHAPE_KEYS),
    plots={"tokens_per_s_vs_seq_len.png": dict(metric="tokens_per_s", ylabel="training tokens/s (whole SP group)",
                                               title="training step"),
           "time_vs_seq_len.png": dict(metric="time_ms", ylabel="step time (ms)", title="training step"),
           "linear_speedup.png": dict(base="linear", against=("llama-ring", "hybrid", "llama-allgather", "linear-lasp1"),
                                      title="pure linear (LASP-2) speed-up"),
           "hf_speedup.png": dict(base="qwen3_5-tiny", against=("qwen3_5-tiny+hf",), title="lasp over transformers, same model")},
    columns=[("ckpt", lambda r: "offload" if r.get("activation_offload") else "on" if r["activation_checkpointing"] else "off"), ("model TFLOP/s", lambda r: f"{r['model_tflops']:.4f}"),
             ("sent/rank (attention; all-to-all)", lambda r: f"{fmt_bytes(r['bytes_per_rank'])} ({fmt_bytes(r['bytes_per_rank_attention'])}; "
              f"{fmt_bytes(r['bytes_per_rank_a2a'])})")],
    note="step: forward + backward + gradient all-reduce + AdamW, slowest rank, median; sent/rank: bytes one rank sends per step "
         "(attention and MoE all-to-all parts in brackets; the rest is the gradient all-reduce); +epN: experts over N ranks; ckpt: "
         "activation checkpointing of every decoder layer (+ckpt), with its inputs in host memory (+offload); +hf: transformers' implementation, the same weights (--compare-hf).",
)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lasp bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=csv_arg(str, MODELS), default=["linear", "hybrid", "llama-ring"], help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--config", default=None, help="base model YAML (configs/models/*.yaml); default: a built-in small shape")
    ap.add_argument("--activation-checkpointing", choices=("off", "on", "both", "offload"), default="off",
                    help="recompute each decoder layer in backward; both: every point with and without; offload: every "
                         "point with checkpointing alone and with the layer inputs offloaded to host memory, interleaved")
    ap.add_argument("--ep", type=csv_arg(int), default=[1], help="expert-parallel sizes (MoE models), comma-separated; each divides --sp")
    ap.add_argument("--compare-hf", action="store_true", help="also time transformers' implementation of each model, the same weights (SP = 1)")
    common_args(ap, default_budget=30.0)
    ap.set_defaults(sp=None)  # default: [1] with --compare-hf, else [2]
    args = ap.parse_args(argv)
    args.sp = args.sp or ([1] if args.compare_hf else [2])
    if args.dtype == "fp16":
        ap.error("--dtype: the model bench supports fp32 and bf16")
    args.base_config = dict(SMALL)
    if args.config:
        from ..models import ModelConfig

        try:
            args.base_config = ModelConfig.from_yaml(args.config).to_dict()
        except (ValueError, OSError) as e:
            ap.error(f"--config: {e}")
    ckpt = {"off": [(False, False)], "on": [(True, False)], "both": [(False, False), (True, False)],
            "offload": [(True, False), (True, True)]}[args.activation_checkpointing]
    impls = ["lasp", "transformers"][:1 + args.compare_hf]
    points = [dict(model=m, impl=impl, label=m + "+ckpt" * c + "+offload" * o + "+hf" * (impl != "lasp") + f"+ep{e}" * (e > 1),
                   activation_checkpointing=c, activation_offload=o, seq_len=n, sp=sp, ep=e, _base_config=args.base_config)
              for sp in args.sp for m in args.models for n in args.seq_len for c, o in ckpt for impl in impls for e in args.ep]
    return sweep.main(BENCH, args, argv, points, interleave=args.compare_hf or args.activation_checkpointing == "offload")
