"""Hugging Face Qwen3.5 checkpoints in and out (no ``transformers`` import needed).

- :func:`config_from_hf` / :func:`config_to_hf`: ``config.json`` (``Qwen3_5TextConfig``, or the
  ``text_config`` of a ``Qwen3_5ForConditionalGeneration``) <-> :class:`ModelConfig`
  (``architecture: qwen3_5``);
- :func:`hf_to_lasp_name` / :func:`lasp_to_hf_name`: tensor names (the only reshaped tensor is the
  GDN convolution: HF ``conv1d.weight [C, 1, W]`` <-> lasp ``conv_weight [C, W]``);
- :func:`from_hf` / :func:`to_hf` / :func:`write_hf`: whole directories (``model.safetensors`` or
  shards listed in ``model.safetensors.index.json``), read and written one tensor at a time
  (:mod:`lasp.models.shards`). The vision tower (``model.visual.*``) and the multi-token
  prediction head (``mtp.*``) are skipped; any other unknown or missing tensor is an error that
  lists them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import torch

from .config import ModelConfig
from .shards import DEFAULT_MAX_SHARD_SIZE, TensorSource, TensorSpec, WrittenWeights, model_sources, weight_map, write_weights

SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")
_TEXT_PREFIXES = ("model.language_model.", "model.")
# lasp name (after "layers.N.") <-> HF name (after "layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_LASP_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}  # HF name -> lasp name


def config_from_hf(hf: dict) -> ModelConfig:
    """``ModelConfig`` (architecture ``qwen3_5``) from a Qwen3.5 ``config.json`` mapping."""
    text = hf.get("text_config", hf)
    if text.get("model_type", "qwen3_5_text") not in ("qwen3_5_text", "qwen3_5"):
        raise ValueError(f"config.json: model_type must be qwen3_5 / qwen3_5_text, got {text.get('model_type')!r}")
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_parameters.rope_type must be 'default', got {rope.get('rope_type')!r}")
    if text.get("hidden_act", "silu") != "silu" or text.get("attention_bias", False):
        raise ValueError("config.json: only hidden_act='silu' and attention_bias=false are supported")
    # a Qwen3_5ForConditionalGeneration ties (or not) by its top-level flag, whatever text_config says
    tie = hf.get("tie_word_embeddings", False) if "text_config" in hf else text.get("tie_word_embeddings", False)
    n = text["num_hidden_layers"]
    types = text.get("layer_types") or [
        "full_attention" if (i + 1) % text.get("full_attention_interval", 4) == 0 else "linear_attention" for i in range(n)
    ]
    return ModelConfig(
        architecture="qwen3_5",
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=n,
        num_heads=text["num_attention_heads"],
        num_kv_heads=text["num_key_value_heads"],
        attention_head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        layer_types=list(types),
        linear_variant="gated_deltanet",
        conv_size=text.get("linear_conv_kernel_dim", 4),
        linear_num_key_heads=text["linear_num_key_heads"],
        linear_num_value_heads=text["linear_num_value_heads"],
        linear_key_head_dim=text["linear_key_head_dim"],
        linear_value_head_dim=text["linear_value_head_dim"],
        partial_rotary_factor=rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)),
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(tie),
        initializer_range=text.get("initializer_range", 0.02),
        max_seq_len=text.get("max_position_embeddings", 32768),
    )


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """A ``Qwen3_5ForCausalLM`` ``config.json`` mapping for a ``qwen3_5`` :class:`ModelConfig`."""
    if cfg.architecture != "qwen3_5":
        raise ValueError(f"model: only architecture='qwen3_5' exports to Hugging Face format, got {cfg.architecture!r}")
    nk, nv, dk, dv = cfg.linear_dims
    return {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
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
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor},
        "attention_bias": False,
        "linear_conv_kernel_dim": cfg.conv_size,
        "linear_key_head_dim": dk,
        "linear_value_head_dim": dv,
        "linear_num_key_heads": nk,
        "linear_num_value_heads": nv,
        "layer_types": ["linear_attention" if k == "linear" else "full_attention" for k in cfg.layer_types],
        "dtype": dtype,
    }


def _mixer_hf(kind: str) -> str:
    return "linear_attn" if kind == "linear" else "self_attn"


def lasp_to_hf_name(name: str, cfg: ModelConfig) -> str:
    """HF (``Qwen3_5ForCausalLM``) name of lasp parameter ``name``."""
    if name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    if name == "lm_head.weight":
        return name
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        raise ValueError(f"no Hugging Face name for lasp tensor {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    if rest in _LAYER_NAMES:
        rest = _LAYER_NAMES[rest]
    elif rest.startswith("attn."):
        rest = _mixer_hf(cfg.layer_types[i]) + "." + rest[len("attn."):].replace("conv_weight", "conv1d.weight")
    return f"model.layers.{i}.{rest}"


def hf_to_lasp_name(name: str, cfg: ModelConfig) -> str | None:
    """lasp name of HF tensor ``name``; None for skipped tensors (vision tower, MTP head)."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name == "lm_head.weight":
        return name
    for p in _TEXT_PREFIXES:
        if name.startswith(p):
            rest = name[len(p):]
            break
    else:
        return "?" + name
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if m is None:
        return rest
    i, tail = int(m.group(1)), m.group(2)
    if tail in _LASP_LAYER_NAMES:
        return f"layers.{i}.{_LASP_LAYER_NAMES[tail]}"
    for mixer in ("linear_attn.", "self_attn."):
        if tail.startswith(mixer):
            return f"layers.{i}.attn." + tail[len(mixer):].replace("conv1d.weight", "conv_weight")
    return f"layers.{i}.{tail}"


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of HF directory ``path`` (its ``config.json``)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"path: {os.fspath(path)!r} is not a Hugging Face model directory (no config.json)")
    with open(cfg_file, encoding="utf-8") as f:
        return config_from_hf(json.load(f))


def hf_tensor_index(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """``{lasp name: (safetensors file, HF name)}`` of HF directory ``path`` for a ``cfg`` model.

    ``ValueError`` listing the unknown and the missing tensor names when they do not match.
    """
    expected = set(expected_names(cfg))
    index, unknown = {}, []
    for hf_name, file in weight_map(path).items():
        name = hf_to_lasp_name(hf_name, cfg)
        if name is None:
            continue  # vision tower / MTP head
        if name in expected:
            index[name] = (file, hf_name)
        else:
            unknown.append(hf_name)
    missing = sorted(expected - set(index))
    if unknown or missing:
        raise ValueError(f"{os.fspath(path)}: tensors do not match config.json: unknown {sorted(unknown)}, missing {[lasp_to_hf_name(n, cfg) for n in missing]}")
    return index


def read_hf_tensor(f, hf_name: str) -> torch.Tensor:
    """Tensor ``hf_name`` of the open safetensors file ``f`` in lasp's shape (the GDN conv loses
    its middle dim)."""
    t = f.get_tensor(hf_name)
    return t[:, 0].contiguous() if hf_name.endswith("conv1d.weight") else t


def expected_names(cfg: ModelConfig) -> list[str]:
    """The lasp state-dict names of a ``cfg`` model (built on the meta device)."""
    from .model import LinearLlamaForCausalLM

    return list(LinearLlamaForCausalLM(cfg, device="meta").state_dict().keys())


def from_hf(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A :class:`~lasp.models.LinearLlamaForCausalLM` (``architecture: qwen3_5``) from HF directory
    ``path``, built on the meta device and filled one tensor at a time, each cast to ``dtype``
    (None: the file's) and put on ``device`` as it is read (never a second copy of the model)."""
    from .model import LinearLlamaForCausalLM
    from .weights import load_tensors_

    cfg = read_hf_config(path)
    return load_tensors_(LinearLlamaForCausalLM(cfg, device="meta"), hf_tensor_index(path, cfg), dtype=dtype, device=device)


def write_hf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    sources: Mapping[str, TensorSource],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    token_ids: dict | None = None,
) -> WrittenWeights:
    """Write ``path/config.json`` + safetensors (shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json`` when more than one) that ``transformers`` loads, from
    ``{lasp name: TensorSource}``, one tensor at a time, each cast to ``dtype`` (None: its own).
    ``token_ids`` (``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``) go into config.json.
    Replaces the weights (and a ``model.yaml``) already in ``path``, keeps other files."""
    main = dtype or sources["embed_tokens.weight"].dtype
    config = config_to_hf(cfg, str(main).replace("torch.", ""))  # refuses other architectures before writing
    config.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    specs, readers = [], {}
    for name, src in sources.items():
        hf_name, conv = lasp_to_hf_name(name, cfg), name.endswith("conv_weight")
        shape = (src.shape[0], 1, *src.shape[1:]) if conv else tuple(src.shape)
        specs.append(TensorSpec(hf_name, shape, dtype or src.dtype))
        readers[hf_name] = (lambda src=src, conv=conv: src.read()[:, None, :] if conv else src.read())
    written = write_weights(path, specs, lambda n: readers[n](), max_shard_size, stale=("model.yaml",))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return written


def to_hf(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    token_ids: dict | None = None,
) -> WrittenWeights:
    """Write ``path/config.json`` + safetensors that ``transformers`` loads
    (``AutoModelForCausalLM.from_pretrained(path)`` -> ``Qwen3_5ForCausalLM``); see :func:`write_hf`."""
    model = getattr(model, "module", model)
    return write_hf(path, model.config, model_sources(model), dtype=dtype, max_shard_size=max_shard_size, token_ids=token_ids)
