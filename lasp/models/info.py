"""Closed-form parameter and FLOP counts of a ModelConfig, and ``lasp model-info CONFIG``.

FLOPs are for TRAINING (forward + backward = 3 x forward), per token, counting a multiply-add
as 2 FLOPs, as used for MFU:

- every weight matrix: ``6 * rows * cols`` per token (the LM head included, tied or not;
  embedding lookups and norms excluded); in a sparse-MoE layer only the matrices a token passes
  through: the router (``E * hidden``), its ``k`` routed experts (``3 * hidden * I_expert`` each) and
  the shared expert with its gate (``3 * hidden * I_shared + hidden``), its ACTIVE parameters;
- a causal softmax layer's attention (QK^T and AV over on average ``T/2`` earlier tokens):
  ``3 * 2 * 2 * H * D * T / 2 = 6 * hidden * T`` per token, growing with the sequence length T;
- a linear layer's attention (state update ``k^T v`` and readout ``q S``, ``H`` states of
  ``D x D``): ``3 * 4 * H * D * D = 12 * hidden * D`` per token, independent of T
  (qwen3_5: ``12 * value_heads * key_dim * value_dim``).

``CONFIG`` is a model YAML, or a lasp / Hugging Face model directory (``model.yaml`` / ``config.json``).

``--memory`` prints the per-rank memory of a training step instead (:mod:`lasp.train.memory`)::

    lasp model-info CONFIG --memory --seq-len 1M --sp 8 --dp 1 --zero 3 --dtype bf16 \
        [--activation-checkpointing] [--activation-offload] [--micro-batch N] [--device-memory 141GiB] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import DELTA_VARIANTS, QWEN_ARCHITECTURES, ModelConfig
from .delta_mixer import delta_param_counts
from .qwen3_5 import qwen35_param_counts


def _mixer_counts(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """``(matrix weights, other weights)`` of one token mixer of kind ``kind``."""
    h, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    if cfg.architecture in QWEN_ARCHITECTURES:
        return qwen35_param_counts(cfg, kind)
    if kind == "softmax":
        return 2 * h * H * D + 2 * h * cfg.kv_heads * D, 0
    if cfg.linear_variant in DELTA_VARIANTS:
        return delta_param_counts(cfg)
    gla = cfg.linear_variant == "simple_gla"
    gate = h * cfg.gate_low_rank_dim + cfg.gate_low_rank_dim * H if gla else 0
    others = (D if cfg.output_norm else 0) + (H if gla else 0)  # output norm, gate bias
    return 4 * h * H * D + gate, others


def _mlp_matrices(cfg: ModelConfig, moe: bool, active: bool) -> int:
    """Weights of one layer's MLP: dense SwiGLU, or the MoE block's router, routed experts (all of
    them, or the ``k`` a token uses with ``active``), shared expert and its gate."""
    h = cfg.hidden_size
    if not moe:
        return 3 * h * cfg.intermediate_size
    experts = cfg.num_experts_per_tok if active else cfg.num_experts
    shared = 3 * h * cfg.shared_expert_intermediate_size + h if cfg.shared_expert_intermediate_size else 0
    return cfg.num_experts * h + experts * 3 * h * cfg.expert_intermediate_size + shared


def _layer_matrices(cfg: ModelConfig, i: int, active: bool = False) -> int:
    """Weights in the matrices of decoder layer ``i`` (``active``: only those one token's matmuls touch)."""
    return _mlp_matrices(cfg, cfg.moe_layers[i], active) + _mixer_counts(cfg, cfg.layer_types[i])[0]


def count_params(cfg: ModelConfig, include_embedding: bool = True, active: bool = False) -> int:
    """Number of parameters of ``LinearLlamaForCausalLM(cfg)`` (a tied head counts once); with
    ``active``, those one token uses (a sparse-MoE layer's ``k`` routed experts, not all ``E``)."""
    h = cfg.hidden_size
    total = h  # final norm
    for i, kind in enumerate(cfg.layer_types):
        total += 2 * h + _layer_matrices(cfg, i, active) + _mixer_counts(cfg, kind)[1]
    if include_embedding:
        total += cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    elif not cfg.tie_embeddings:
        total += cfg.vocab_size * h  # the untied LM head is a real matrix
    return total


def _linear_state_size(cfg: ModelConfig) -> int:
    """Elements of one linear layer's recurrent states (all heads)."""
    if cfg.architecture in QWEN_ARCHITECTURES:
        _, nv, dk, dv = cfg.linear_dims
        return nv * dk * dv
    return cfg.num_heads * cfg.head_dim * cfg.head_dim


def flop_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, by part: ``matmul``, ``softmax_attention``, ``linear_attention``, ``total``."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    h, D = cfg.hidden_size, cfg.head_dim
    matrices = sum(_layer_matrices(cfg, i, active=True) for i in range(cfg.num_layers)) + cfg.vocab_size * h
    n_soft = cfg.layer_types.count("softmax")
    n_lin = cfg.num_layers - n_soft
    parts = {
        "matmul": 6.0 * matrices,
        "softmax_attention": 6.0 * n_soft * cfg.num_heads * D * seq_len,
        "linear_attention": 12.0 * n_lin * _linear_state_size(cfg),
    }
    parts["total"] = sum(parts.values())
    return parts


def count_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Training (fwd + bwd) FLOPs per token at sequence length ``seq_len`` (for MFU)."""
    return flop_breakdown(cfg, seq_len)["total"]


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def describe(cfg: ModelConfig, seq_lens: list[int]) -> str:
    """The text ``lasp model-info`` prints."""
    n_soft = cfg.layer_types.count("softmax")
    lines = [
        f"architecture      {cfg.architecture}",
        f"layers            {cfg.num_layers} (pattern {cfg.layer_pattern!r}: {cfg.num_layers - n_soft} linear, {n_soft} softmax)",
        f"hidden / heads    {cfg.hidden_size} / {cfg.num_heads} heads of {cfg.head_dim} (softmax kv heads {cfg.kv_heads})",
        f"mlp / vocab       {cfg.intermediate_size} / {cfg.vocab_size} ({'tied' if cfg.tie_embeddings else 'untied'} embeddings)",
        (f"linear variant    {cfg.linear_variant} (feature map {cfg.feature_map}, output norm {cfg.output_norm})"
         if cfg.architecture not in QWEN_ARCHITECTURES else
         f"linear layers     {cfg.architecture} Gated DeltaNet: " + "{} key heads / {} value heads, key dim {}, value dim {}".format(*cfg.linear_dims))
        if n_soft < cfg.num_layers else "linear variant    - (no linear layers)",
        f"parameters        {count_params(cfg):,} ({_human(count_params(cfg))}); "
        f"non-embedding {count_params(cfg, include_embedding=False):,}",
    ]
    if cfg.mlp == "moe":
        n_moe = sum(cfg.moe_layers)
        lines += [
            f"experts           {n_moe} MoE layers: top-{cfg.num_experts_per_tok} of {cfg.num_experts} experts of "
            f"{cfg.expert_intermediate_size}, shared expert {cfg.shared_expert_intermediate_size or 'none'}",
            f"active parameters {count_params(cfg, active=True):,} ({_human(count_params(cfg, active=True))}) per token; "
            f"non-embedding {count_params(cfg, include_embedding=False, active=True):,}",
        ]
    lines += [
        "training FLOPs per token (fwd+bwd):",
        f"  {'seq_len':>9}  {'total':>12}  {'matmul':>12}  {'softmax attn':>12}  {'linear attn':>12}",
    ]
    for T in seq_lens:
        p = flop_breakdown(cfg, T)
        lines.append(
            f"  {T:>9}  {_human(p['total']):>12}  {_human(p['matmul']):>12}  "
            f"{_human(p['softmax_attention']):>12}  {_human(p['linear_attention']):>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lasp model-info", description="parameter and FLOP counts of a model config")
    ap.add_argument("config", help="model YAML (configs/models/*.yaml), or a lasp / Hugging Face model directory")
    ap.add_argument("--seq-len", default=None, help="comma-separated sequence lengths (default: 2048,8192,32768 and max_seq_len)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--check", action="store_true", help="also build the model on the meta device and compare the parameter count")
    mem = ap.add_argument_group("memory estimate (--memory)")
    mem.add_argument("--memory", action="store_true", help="print the per-rank memory of a training step (lasp.train.memory)")
    mem.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks (default 1)")
    mem.add_argument("--dp", type=int, default=1, help="data-parallel groups (default 1)")
    mem.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage (default 1)")
    mem.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="training dtype (default bf16)")
    mem.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-step (default 1)")
    mem.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    mem.add_argument("--activation-offload", action="store_true", help="keep the checkpointed layer inputs in host memory (implies checkpointing)")
    mem.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"), help="token layout (default zigzag)")
    mem.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda: Triton kernels (default); cpu: the torch path, max RSS")
    mem.add_argument("--rank", type=int, default=None, help="SP rank to estimate (default: the one with the most memory)")
    mem.add_argument("--documents", action="store_true", help="packed documents (cu_seqlens)")
    mem.add_argument("--loss", default="fused", choices=("fused", "plain"),
                     help="fused: lasp.linear_cross_entropy, what lasp train uses (default); plain: [T_local, vocab] fp32 logits")
    mem.add_argument("--device-memory", default=None, help="memory per device, e.g. 80GiB, 141GiB: say whether it fits")
    args = ap.parse_args(argv)
    try:
        if os.path.isdir(args.config):
            from .weights import source_config

            cfg = source_config(args.config)
        else:
            cfg = ModelConfig.from_yaml(args.config)
        from ..train.memory import parse_size

        seq_lens = sorted({2048, 8192, 32768, cfg.max_seq_len}) if args.seq_len is None else [parse_size(s) for s in args.seq_len.split(",")]
        for T in seq_lens:
            if T < 1:
                raise ValueError(f"--seq-len values must be positive, got {T}")
        if args.memory:
            return _memory(args, cfg, seq_lens)
    except (ValueError, OSError) as e:
        print(f"lasp model-info: {e}", file=sys.stderr)
        return 2
    if args.check:
        from .model import LinearLlamaForCausalLM

        built = LinearLlamaForCausalLM(cfg, device="meta").num_parameters()
        if built != count_params(cfg):
            print(f"lasp model-info: built model has {built} parameters, formula says {count_params(cfg)}", file=sys.stderr)
            return 1
    if args.json:
        out = {
            "config": args.config,
            "parameters": count_params(cfg),
            "non_embedding_parameters": count_params(cfg, include_embedding=False),
            "active_parameters": count_params(cfg, active=True),
            "active_non_embedding_parameters": count_params(cfg, include_embedding=False, active=True),
            "flops_per_token": {str(T): flop_breakdown(cfg, T) for T in seq_lens},
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.config}")
        print(describe(cfg, seq_lens))
    return 0


def _memory(args, cfg: ModelConfig, seq_lens: list[int]) -> int:
    """``--memory``: the estimate for each sequence length (text or ``--json``)."""
    from ..train.memory import describe_estimate, estimate_memory, parse_size

    device_memory = None if args.device_memory is None else parse_size(args.device_memory)
    ests = [
        estimate_memory(cfg, seq_len=T, sp=args.sp, dp=args.dp, zero=args.zero, dtype=args.dtype, micro_batch=args.micro_batch,
                        activation_checkpointing=args.activation_checkpointing, activation_offload=args.activation_offload,
                        layout=args.layout, device=args.device, rank=args.rank, documents=args.documents, loss=args.loss,
                        device_memory=device_memory)
        for T in seq_lens
    ]
    if args.json:
        print(json.dumps({"config": args.config, "estimates": [e.as_dict() for e in ests]}, indent=2))
    else:
        print(args.config)
        print("\n\n".join(describe_estimate(e) for e in ests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
