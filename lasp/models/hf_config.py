"""Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next ``config.json`` <-> :class:`ModelConfig`, read the way transformers reads it.

- :func:`config_from_hf`: the text decoder of a ``Qwen3_5ForCausalLM`` config (``model_type:
  qwen3_5_text``) or of a ``Qwen3_5ForConditionalGeneration`` one (``qwen3_5``, its
  ``text_config``); the same for the sparse-MoE ``Qwen3_5MoeForCausalLM`` (``qwen3_5_moe_text``) and
  ``Qwen3_5MoeForConditionalGeneration`` (``qwen3_5_moe``); and ``Qwen3NextForCausalLM``
  (``qwen3_next``: architecture ``qwen3_next``). RoPE as ``transformers.modeling_rope_utils``
  standardises it: a legacy
  ``rope_scaling`` mapping *replaces* ``rope_parameters`` when both are there (transformers does
  not merge them), ``type`` is an alias of ``rope_type``, ``rope_theta`` and
  ``partial_rotary_factor`` at the top of the text config fill in what the mapping lacks
  (defaults 10000 and 0.25), and YaRN's ``original_max_position_embeddings`` is the text
  config's own top-level key if it has one, else the mapping's, else ``max_position_embeddings``.
  ``default``, ``linear`` and ``yarn`` are implemented (:mod:`lasp.models.rope`); any other rope
  type, a quantized checkpoint and any other model type are one-line ``ValueError`` s.
- The experts as transformers builds them (:func:`moe_fields`): Qwen3.5-MoE makes every layer's
  MLP the sparse block with a shared expert and always renormalises the top-k weights (its config
  has no ``norm_topk_prob``, ``decoder_sparse_step`` or ``mlp_only_layers``); Qwen3-Next reads
  ``norm_topk_prob``, ``decoder_sparse_step`` and ``mlp_only_layers`` (dense layers of
  ``intermediate_size``), and ``num_experts: 0`` is a dense model.
- :func:`config_to_hf`: the config transformers' ``save_pretrained`` writes for the model's class
  (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM`` or ``Qwen3NextForCausalLM``);
  :func:`config_like`: lasp's text settings written into another checkpoint's ``config.json`` (its
  nesting, vision config and multimodal RoPE keys kept), for ``--like`` exports.
"""
from __future__ import annotations

import copy

from .config import ModelConfig
from .rope import HF_ROPE_KEYS, ROPE_SCALING_KEYS, ROPE_TYPES

SOURCE = "config.json"
#: text model_type -> (lasp architecture, sparse MoE)
TEXT_TYPES = {"qwen3_5_text": ("qwen3_5", False), "qwen3_5_moe_text": ("qwen3_5", True), "qwen3_next": ("qwen3_next", True)}
#: the top-level model_type of a ConditionalGeneration config whose text_config has no model_type
NESTED_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
#: (architecture, mlp) -> (the class transformers builds, its model_type)
HF_CLASSES = {("qwen3_5", "dense"): ("Qwen3_5ForCausalLM", "qwen3_5_text"),
              ("qwen3_5", "moe"): ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
              ("qwen3_next", "moe"): ("Qwen3NextForCausalLM", "qwen3_next"),
              ("qwen3_next", "dense"): ("Qwen3NextForCausalLM", "qwen3_next")}
#: config.json keys of the text decoder lasp reads from rope_parameters instead (removed by config_like)
LEGACY_ROPE_KEYS = ("rope_scaling", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings")


def text_config(hf: dict) -> tuple[dict, str]:
    """``(text decoder's config mapping, its model_type)`` of a config.json mapping. A nested
    ``text_config`` without a ``model_type`` takes its parent's (``qwen3_5`` -> ``qwen3_5_text``)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{SOURCE}: expected a JSON object, got {type(hf).__name__}")
    top = hf.get("model_type")
    if "text_config" in hf:
        text = hf["text_config"]
        if not isinstance(text, dict):
            raise ValueError(f"{SOURCE}: text_config must be an object, got {type(text).__name__}")
        kind = text.get("model_type") or NESTED_TYPES.get(top) or (f"{top}_text" if isinstance(top, str) and not top.endswith("_text") else top)
    else:
        text, kind = hf, top
    return text, kind or "qwen3_5_text"


def check_model_type(hf: dict, kind: str) -> tuple[str, bool]:
    """``(lasp architecture, whether the text decoder is a sparse MoE)`` of text model_type ``kind``;
    ``ValueError`` naming it for any other model."""
    if kind not in TEXT_TYPES:
        top = hf.get("model_type")
        what = repr(kind) + (f" (model_type {top!r})" if top not in (None, kind) else "")
        raise ValueError(f"{SOURCE}: model_type must be one of qwen3_5 / qwen3_5_text / qwen3_5_moe / qwen3_5_moe_text / qwen3_next "
                         f"(Qwen3.5, Qwen3.5-MoE, Qwen3-Next), got {what}")
    return TEXT_TYPES[kind]


def check_not_quantized(hf: dict, text: dict) -> None:
    """Refuse a quantized checkpoint (``quantization_config``) before any tensor is read."""
    q = hf.get("quantization_config") or text.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else q
        detail = " ".join(str(q[k]) for k in ("fmt", "bits", "weight_block_size") if isinstance(q, dict) and q.get(k) is not None)
        raise ValueError(f"{SOURCE}: quantized checkpoints are not supported (quantization_config: {method}{' ' + detail if detail else ''}); "
                         f"use the unquantized (bf16) release")


def hf_rope(text: dict) -> tuple[float, float, dict | None]:
    """``(rope_theta, partial_rotary_factor, rope_scaling)`` of a Qwen3.5 text config, as
    transformers' ``convert_rope_params_to_dict`` / ``standardize_rope_params`` resolve them."""
    where = "rope_scaling" if text.get("rope_scaling") else "rope_parameters"
    rope = text.get(where) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{SOURCE}: {where} must be an object, got {rope!r}")
    nested = [k for k in rope if k in (text.get("layer_types") or ())]
    if nested:
        raise ValueError(f"{SOURCE}: {where} given per layer type ({', '.join(nested)}) is not supported (Qwen3.5 has one RoPE)")
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    prf = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{SOURCE}: {where}.rope_type {rope_type!r} is not supported (lasp implements {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, prf, None
    spec = ROPE_SCALING_KEYS[rope_type]
    scaling = {"rope_type": rope_type, **{k: rope[k] for k in spec if k in rope}}
    if "factor" not in rope:
        raise ValueError(f"{SOURCE}: {where}.factor is required for rope_type {rope_type!r}")
    if rope_type == "yarn":
        max_pos = text.get("max_position_embeddings", 32768)
        original = text.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", max_pos))
        scaling["original_max_position_embeddings"] = original
        if scaling["factor"] is None:  # transformers: the ratio of the two lengths
            scaling["factor"] = max_pos / original
    return theta, prf, scaling


def _need(text: dict, key: str):
    if text.get(key) is None:
        raise ValueError(f"{SOURCE}: the text config has no {key!r}")
    return text[key]


def moe_fields(text: dict, kind: str) -> dict:
    """The :class:`ModelConfig` MLP keys of a text config of model_type ``kind``, as transformers
    builds the layers (see the module docstring); ``{}`` for a dense model."""
    if kind == "qwen3_5_text":
        return {}
    if kind == "qwen3_next":
        sparse_step = text.get("decoder_sparse_step", 1)
        dense_layers = text.get("mlp_only_layers") or []
        n, experts = _need(text, "num_hidden_layers"), text.get("num_experts", 512)
        if not experts or not any(i not in dense_layers and (i + 1) % sparse_step == 0 for i in range(n)):
            return {}  # transformers builds the dense MLP in every layer
        extra = dict(norm_topk_prob=bool(text.get("norm_topk_prob", True)), decoder_sparse_step=sparse_step,
                     mlp_only_layers=list(dense_layers))
    else:  # qwen3_5_moe_text: every layer sparse, the top-k weights always renormalised
        extra = {}
    shared = _need(text, "shared_expert_intermediate_size")
    if shared < 1:
        raise ValueError(f"{SOURCE}: shared_expert_intermediate_size={shared} is not supported (transformers builds a shared expert of "
                         f"that width in every MoE layer; lasp needs a positive width)")
    return dict(mlp="moe", num_experts=_need(text, "num_experts"), num_experts_per_tok=_need(text, "num_experts_per_tok"),
                moe_intermediate_size=_need(text, "moe_intermediate_size"), shared_expert_intermediate_size=shared,
                router_aux_loss_coef=float(text.get("router_aux_loss_coef", 0.001)), **extra)


def config_from_hf(hf: dict) -> ModelConfig:
    """``ModelConfig`` (architecture ``qwen3_5`` or ``qwen3_next``) from a Qwen3.5, Qwen3.5-MoE or
    Qwen3-Next ``config.json`` mapping."""
    text, kind = text_config(hf)
    architecture, _ = check_model_type(hf, kind)
    check_not_quantized(hf, text)
    for key, want in (("hidden_act", "silu"), ("attention_bias", False)):
        if text.get(key, want) != want:
            raise ValueError(f"{SOURCE}: {key}={text[key]!r} is not supported (lasp implements {key}={want!r})")
    theta, prf, scaling = hf_rope(text)
    # a Qwen3_5ForConditionalGeneration ties (or not) by its top-level flag, whatever text_config says
    tie = hf.get("tie_word_embeddings", False) if "text_config" in hf else text.get("tie_word_embeddings", False)
    n = _need(text, "num_hidden_layers")
    types = text.get("layer_types") or [
        "full_attention" if (i + 1) % text.get("full_attention_interval", 4) == 0 else "linear_attention" for i in range(n)
    ]
    moe = moe_fields(text, kind)
    if kind == "qwen3_5_moe_text":  # no dense MLP anywhere: the unused intermediate_size mirrors the experts'
        intermediate = text.get("intermediate_size") or moe["moe_intermediate_size"]
    elif kind == "qwen3_next":
        intermediate = text.get("intermediate_size", 5632)  # transformers' default
    else:
        intermediate = _need(text, "intermediate_size")
    fields = dict(
        architecture=architecture,
        vocab_size=_need(text, "vocab_size"),
        hidden_size=_need(text, "hidden_size"),
        intermediate_size=intermediate,
        num_layers=n,
        num_heads=_need(text, "num_attention_heads"),
        num_kv_heads=_need(text, "num_key_value_heads"),
        attention_head_dim=text.get("head_dim") or _need(text, "hidden_size") // _need(text, "num_attention_heads"),
        layer_types=list(types),
        linear_variant="gated_deltanet",
        conv_size=text.get("linear_conv_kernel_dim", 4),
        linear_num_key_heads=_need(text, "linear_num_key_heads"),
        linear_num_value_heads=_need(text, "linear_num_value_heads"),
        linear_key_head_dim=_need(text, "linear_key_head_dim"),
        linear_value_head_dim=_need(text, "linear_value_head_dim"),
        partial_rotary_factor=prf,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(tie),
        initializer_range=text.get("initializer_range", 0.02),
        max_seq_len=text.get("max_position_embeddings", 32768),
        **moe,
    )
    try:
        return ModelConfig(**fields)
    except ValueError as e:  # "ModelConfig: rope_scaling.factor ..." -> "config.json: rope_scaling.factor ..."
        raise ValueError(f"{SOURCE}: {str(e).removeprefix('ModelConfig: ')}") from None


def rope_parameters(cfg: ModelConfig) -> dict:
    """Hugging Face's ``rope_parameters`` mapping of ``cfg``."""
    scaling = dict(cfg.rope_scaling or {"rope_type": "default"})
    return {"rope_type": scaling.pop("rope_type"), "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor, **scaling}


def hf_class(cfg: ModelConfig) -> tuple[str, str]:
    """``(transformers class, model_type)`` a ``cfg`` model exports as; ``ValueError`` naming the
    first setting that class cannot hold."""
    if (cfg.architecture, cfg.mlp) not in HF_CLASSES:
        raise ValueError(f"model: only architecture qwen3_5 / qwen3_next models export to Hugging Face format, got {cfg.architecture!r}")
    if cfg.architecture == "qwen3_5" and cfg.mlp == "moe":  # Qwen3_5MoeForCausalLM: fixed MoE shape
        fixed = (("decoder_sparse_step", 1), ("mlp_only_layers", []), ("norm_topk_prob", True))
        bad = [(k, v) for k, v in fixed if getattr(cfg, k) != v]
        if bad:
            raise ValueError(f"model: {bad[0][0]}={getattr(cfg, bad[0][0])!r} has no place in a Qwen3_5MoeForCausalLM (it has "
                             f"{bad[0][0]}={bad[0][1]!r}); use architecture: qwen3_next for that MoE layout")
    if cfg.mlp == "moe" and cfg.shared_expert_intermediate_size < 1:
        raise ValueError(f"model: shared_expert_intermediate_size=0 (no shared expert) has no place in a "
                         f"{HF_CLASSES[cfg.architecture, cfg.mlp][0]} (every MoE layer has one)")
    return HF_CLASSES[cfg.architecture, cfg.mlp]


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The ``config.json`` mapping transformers writes for ``cfg``'s class (:func:`hf_class`)."""
    cls, model_type = hf_class(cfg)
    nk, nv, dk, dv = cfg.linear_dims
    out = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_parameters(cfg),
        "attention_bias": False,
        "linear_conv_kernel_dim": cfg.conv_size,
        "linear_key_head_dim": dk,
        "linear_value_head_dim": dv,
        "linear_num_key_heads": nk,
        "linear_num_value_heads": nv,
        "layer_types": ["linear_attention" if k == "linear" else "full_attention" for k in cfg.layer_types],
        "dtype": dtype,
    }
    if model_type == "qwen3_5_moe_text":
        del out["intermediate_size"]  # Qwen3_5MoeTextConfig has none
    if cfg.mlp == "moe":
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.expert_intermediate_size, shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                   router_aux_loss_coef=cfg.router_aux_loss_coef)
    if model_type == "qwen3_next":
        out.update(num_experts=cfg.num_experts if cfg.mlp == "moe" else 0, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers))
    return out


#: what decides the tensors' names and shapes: two configs that agree on these share a layout
LAYOUT_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "kv_heads", "head_dim",
                 "layer_types", "linear_dims", "conv_size", "tie_embeddings", "mlp", "moe_layers", "num_experts",
                 "expert_intermediate_size", "shared_expert_intermediate_size")


def check_same_layout(cfg: ModelConfig, like: ModelConfig, where: str) -> None:
    """``ValueError`` naming the first field on which ``cfg`` and ``like`` (read from ``where``) differ."""
    for name in LAYOUT_FIELDS:
        a, b = getattr(cfg, name), getattr(like, name)
        if a != b:
            raise ValueError(f"--like: {where} is another model ({name} {b!r}, this one {a!r}); give the checkpoint this model came from")


def config_like(like: dict, cfg: ModelConfig, dtype: str, token_ids: dict | None = None) -> dict:
    """``like`` (a Qwen3.5 ``config.json`` mapping) with its text decoder's settings replaced by
    ``cfg``'s: nesting, architectures, the vision config and every other key kept; RoPE written
    as one ``rope_parameters`` (legacy ``rope_scaling`` / top-level rope keys dropped, the
    multimodal keys such as ``mrope_section`` kept); ``dtype`` at the top; ``token_ids`` where
    transformers' text config holds them (and at the top where the top has them)."""
    out = copy.deepcopy(like)
    text, _ = text_config(out)
    nested = text is not out
    ours = config_to_hf(cfg, dtype)
    for key in ("architectures", "model_type", "dtype") + (("tie_word_embeddings",) if nested else ()):
        ours.pop(key)
    old_rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    ours["rope_parameters"].update({k: v for k, v in old_rope.items() if k not in HF_ROPE_KEYS})
    text_dtype = nested and ("dtype" in text or "torch_dtype" in text)
    for key in LEGACY_ROPE_KEYS + ("full_attention_interval", "torch_dtype"):
        text.pop(key, None)
    text.update(ours)
    out.pop("torch_dtype", None)
    out["dtype"] = dtype
    if text_dtype:
        text["dtype"] = dtype
    if nested:
        out["tie_word_embeddings"] = cfg.tie_embeddings
    for key, value in (token_ids or {}).items():
        if value is not None:
            text[key] = value
            if nested and key in out:
                out[key] = value
    return out
