"""Hugging Face Qwen3.5, Qwen3.5-MoE and Qwen3-Next checkpoints in and out (no ``transformers`` import needed).

- ``config.json`` <-> :class:`ModelConfig`: :mod:`lasp.models.hf_config` (:func:`read_hf_config`
  reads a directory's, and settles a tied checkpoint that still ships ``lm_head.weight``);
- :func:`hf_to_lasp_name` / :func:`lasp_to_hf_name`: tensor names (the only reshaped tensor is the
  GDN convolution: HF ``conv1d.weight [C, 1, W]`` <-> lasp ``conv_weight [C, W]``); routed experts
  in either layout (per expert or fused 3-D) and Qwen3-Next's fused GDN projections are assembled
  and split by :mod:`lasp.models.hf_tensors`;
- :func:`from_hf` / :func:`to_hf` / :func:`write_hf`: whole directories (``model.safetensors`` or
  shards listed in ``model.safetensors.index.json``), read and written one tensor at a time
  (:mod:`lasp.models.shards`). The vision tower (``model.visual.*``) and the multi-token
  prediction head (``mtp.*``) are skipped on reading; any other unknown or missing tensor is an
  error that lists them, quantized weights one error line. ``like=HF_DIR`` writes in the layout
  of the checkpoint the model came from (e.g. ``model.language_model.*`` and the nested config of
  a ``Qwen3_5ForConditionalGeneration``, its expert layout), its vision tower and MTP head copied
  through unchanged; without it, what transformers' ``save_pretrained`` writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from safetensors import safe_open

from .config import ModelConfig
from .hf_config import check_same_layout, config_from_hf, config_like, config_to_hf
from .hf_tensors import (DEFAULT_EXPERT_LAYOUT, EXPERT_PIECE, GDN_FUSED, conv_source, expert_layout, fused_gdn_rows, gdn_rows_source,
                         hf_write_entries, per_expert_source, read_stored, stored_source)
from .shards import (DEFAULT_MAX_SHARD_SIZE, StoredTensor, TensorSource, TensorSpec, WrittenWeights, dtype_from_safetensors,
                     has_weights, model_sources, weight_entries, write_weights)

SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")
TEXT_PREFIXES = ("model.language_model.", "model.")  # Qwen3_5ForConditionalGeneration's, Qwen3_5ForCausalLM's
#: name endings and safetensors dtypes of quantized weights (FP8 block scales, GPTQ/AWQ packing, ...)
QUANT_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".qweight", ".qzeros", ".scales", ".g_idx",
                  ".weight_packed", ".weight_zero_point")
QUANT_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "I4", "U4")
# lasp name (after "layers.N.") <-> HF name (after "layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_LASP_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}  # HF name -> lasp name


def _mixer_hf(kind: str) -> str:
    return "linear_attn" if kind == "linear" else "self_attn"


def lasp_to_hf_name(name: str, cfg: ModelConfig, prefix: str = "model.") -> str:
    """HF name of lasp parameter ``name``: ``Qwen3_5ForCausalLM``'s, or with the text decoder under
    ``prefix`` (``model.language_model.`` in a ``Qwen3_5ForConditionalGeneration``). The fused
    layout's name for routed experts; for Qwen3-Next's GDN projections, the fused tensor holding them."""
    if name in ("embed_tokens.weight", "norm.weight"):
        return prefix + name
    if name == "lm_head.weight":
        return name
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        raise ValueError(f"no Hugging Face name for lasp tensor {name!r}")
    i, rest = int(m.group(1)), m.group(2)
    if rest in _LAYER_NAMES:
        rest = _LAYER_NAMES[rest]
    elif rest.startswith("attn."):
        tail = rest[len("attn."):]
        if cfg.architecture == "qwen3_next":
            tail = GDN_FUSED.get(tail, tail)
        rest = _mixer_hf(cfg.layer_types[i]) + "." + tail.replace("conv_weight", "conv1d.weight")
    return f"{prefix}layers.{i}.{rest}"


def hf_to_lasp_name(name: str, cfg: ModelConfig) -> str | None:
    """lasp name of HF tensor ``name``; None for skipped tensors (vision tower, MTP head). A per-expert
    piece keeps its expert number (``layers.N.mlp.experts.K.gate_proj.weight``) and a Qwen3-Next fused
    GDN projection its name (``layers.N.attn.in_proj_qkvz.weight``): :func:`hf_tensor_index` assembles them."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name == "lm_head.weight":
        return name
    for p in TEXT_PREFIXES:
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
    """The :class:`ModelConfig` of HF directory ``path`` (its ``config.json``).

    A tied checkpoint (``tie_word_embeddings: true``) that still ships ``lm_head.weight`` is
    what transformers makes of it: tied (the copy ignored) when the copy equals the embedding,
    else untied, both tensors loaded, with a warning (transformers warns the same way)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"path: {os.fspath(path)!r} is not a Hugging Face model directory (no config.json)")
    with open(cfg_file, encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except ValueError as e:
            raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
    try:
        cfg = config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}/{e}") from None
    if cfg.tie_embeddings and has_weights(path):
        entries = weight_entries(path)
        embed = next((n for n in entries if hf_to_lasp_name(n, cfg) == "embed_tokens.weight"), None)
        if "lm_head.weight" in entries and embed is not None and not same_values(entries["lm_head.weight"], entries[embed], "lm_head.weight", embed):
            warnings.warn(f"{os.fspath(path)}: config.json ties the embeddings (tie_word_embeddings: true) but lm_head.weight "
                          f"differs from {embed}: loaded untied, as transformers does", stacklevel=2)
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
    return cfg


def same_values(a: StoredTensor, b: StoredTensor, name_a: str, name_b: str, rows: int = 4096) -> bool:
    """Whether stored tensors ``a`` and ``b`` hold the same dtype, shape and values (read a block
    of ``rows`` rows at a time; the first differing block ends it)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    with safe_open(a.file, framework="pt") as fa, safe_open(b.file, framework="pt") as fb:
        sa, sb = fa.get_slice(name_a), fb.get_slice(name_b)
        for i in range(0, a.shape[0] if a.shape else 1, rows):
            if not torch.equal(sa[i:i + rows], sb[i:i + rows]):
                return False
    return True


def hf_tensor_index(path: str | os.PathLike, cfg: ModelConfig, entries: dict[str, StoredTensor] | None = None) -> dict[str, TensorSource]:
    """``{lasp name: TensorSource}`` of HF directory ``path`` for a ``cfg`` model (``entries``: its
    :func:`~lasp.models.shards.weight_entries`, if already read): plain tensors as stored, the GDN
    conv reshaped, routed experts from either layout and Qwen3-Next's GDN projections from their
    fused tensors (:mod:`lasp.models.hf_tensors`). Nothing is read until a source is.

    ``ValueError`` listing the unknown and the missing tensor names when they do not match; one
    line for quantized weights. A tied ``cfg`` ignores an ``lm_head.weight`` copy
    (:func:`read_hf_config` decided it equals the embedding)."""
    entries = weight_entries(path) if entries is None else entries
    quantized = [n for n, t in entries.items() if n.endswith(QUANT_SUFFIXES) or t.dtype in QUANT_DTYPES]
    if quantized:
        t = entries[quantized[0]]
        raise ValueError(f"{os.fspath(path)}: quantized weights are not supported ({len(quantized)} tensors such as "
                         f"{quantized[0]!r}, dtype {t.dtype}); use the unquantized (bf16) release")
    expected = set(expected_names(cfg))
    gdn_rows = fused_gdn_rows(cfg) if cfg.architecture == "qwen3_next" else {}
    index: dict[str, TensorSource] = {}
    pieces: dict[str, dict[tuple[int, str], tuple[StoredTensor, str]]] = {}  # lasp experts name -> {(expert, part): stored}
    unknown = []
    for hf_name, t in entries.items():
        name = hf_to_lasp_name(hf_name, cfg)
        if name is None or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # vision tower / MTP head / the tied head's copy
        piece = EXPERT_PIECE.fullmatch(name)
        if name in expected:
            index[name] = conv_source(t, hf_name) if hf_name.endswith("conv1d.weight") else stored_source(t, hf_name)
        elif piece is not None and f"layers.{piece.group(1)}.mlp.experts.gate_up_proj" in expected:
            target = "down_proj" if piece.group(3) == "down_proj" else "gate_up_proj"
            pieces.setdefault(f"layers.{piece.group(1)}.mlp.experts.{target}", {})[int(piece.group(2)), piece.group(3)] = (t, hf_name)
        elif gdn_rows and name.endswith(tuple(f".attn.{f}" for f in set(GDN_FUSED.values()))):
            base = name.rsplit(".", 2)[0]  # layers.N.attn
            for tail, fused in GDN_FUSED.items():
                if name.endswith(fused) and f"{base}.{tail}" in expected:
                    index[f"{base}.{tail}"] = gdn_rows_source(t, hf_name, gdn_rows[tail])
        else:
            unknown.append(hf_name)
    for name, got in pieces.items():
        parts = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
        n_experts = cfg.num_experts
        prefix = next(iter(got.values()))[1].split("mlp.experts.")[0] + "mlp.experts."
        lacking = [f"{prefix}{e}.{p}.weight" for e in range(n_experts) for p in parts if (e, p) not in got]
        unknown += [h for (e, _), (_, h) in got.items() if e >= n_experts]
        if lacking:
            raise ValueError(f"{os.fspath(path)}: tensors do not match config.json (num_experts={n_experts}): missing {lacking[:8]}"
                             f"{f' and {len(lacking) - 8} more' if len(lacking) > 8 else ''}")
        index[name] = per_expert_source([[got[e, p] for p in parts] for e in range(n_experts)])
    missing = sorted(expected - set(index))
    if unknown or missing:
        raise ValueError(f"{os.fspath(path)}: tensors do not match config.json: unknown {sorted(unknown)}, missing {[lasp_to_hf_name(n, cfg) for n in missing]}")
    return index


def expected_names(cfg: ModelConfig) -> list[str]:
    """The lasp state-dict names of a ``cfg`` model (built on the meta device)."""
    from .model import LinearLlamaForCausalLM

    return list(LinearLlamaForCausalLM(cfg, device="meta").state_dict().keys())


def from_hf(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A :class:`~lasp.models.LinearLlamaForCausalLM` (``architecture: qwen3_5`` / ``qwen3_next``) from HF directory
    ``path``, built on the meta device and filled one tensor at a time, each cast to ``dtype``
    (None: the file's) and put on ``device`` as it is read (never a second copy of the model)."""
    from .model import LinearLlamaForCausalLM
    from .weights import load_tensors_

    cfg = read_hf_config(path)
    return load_tensors_(LinearLlamaForCausalLM(cfg, device="meta"), hf_tensor_index(path, cfg), dtype=dtype, device=device)


@dataclass
class LikeLayout:
    """The layout of the checkpoint a model came from (``like=HF_DIR``): its ``config.json``
    mapping, the prefix of its text decoder's tensors, its routed experts' layout (``per_expert``
    or ``fused``), and the tensors lasp does not hold (vision tower, MTP head), copied through unchanged."""

    path: str
    config: dict
    prefix: str
    others: dict[str, StoredTensor]
    experts: str = DEFAULT_EXPERT_LAYOUT


def like_layout(like: str | os.PathLike, cfg: ModelConfig) -> LikeLayout:
    """:class:`LikeLayout` of HF directory ``like``, which must be a readable Qwen3.5 / Qwen3.5-MoE /
    Qwen3-Next checkpoint of ``cfg``'s shapes (``ValueError`` naming ``--like`` otherwise)."""
    like = os.fspath(like)
    if not os.path.isdir(like):
        raise ValueError(f"--like: no such directory {like!r}")
    try:
        like_cfg = read_hf_config(like)
        entries = weight_entries(like)
        hf_tensor_index(like, like_cfg, entries)
    except ValueError as e:
        raise ValueError(f"--like: {e}") from None
    check_same_layout(cfg, like_cfg, like)
    with open(os.path.join(like, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    embed = next(n for n in entries if hf_to_lasp_name(n, like_cfg) == "embed_tokens.weight")
    prefix = embed[: -len("embed_tokens.weight")]
    others = {n: t for n, t in entries.items() if hf_to_lasp_name(n, like_cfg) is None}
    return LikeLayout(like, config, prefix, others, expert_layout(entries))


def write_hf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    sources: Mapping[str, TensorSource],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    token_ids: dict | None = None,
    like: str | os.PathLike | None = None,
) -> WrittenWeights:
    """Write ``path/config.json`` + safetensors (shards of at most ``max_shard_size`` with
    ``model.safetensors.index.json`` when more than one) that ``transformers`` loads, from
    ``{lasp name: TensorSource}``, one tensor at a time, each cast to ``dtype`` (None: its own).
    ``token_ids`` (``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``) go into config.json.
    Replaces the weights (and a ``model.yaml``) already in ``path``, keeps other files.

    ``like``: an HF directory this model came from (same shapes): the output takes its layout
    (:func:`like_layout`): its config.json with the text settings replaced
    (:func:`~lasp.models.hf_config.config_like`), the text tensors under its prefix, and its
    other tensors (vision tower, MTP head) streamed through unchanged, in their stored dtype, so
    the output replaces that repository's weights, its routed experts in its layout (per expert or
    fused). Without ``like``: what transformers 5.24's ``save_pretrained`` writes (experts per
    expert, Qwen3-Next's GDN projections fused). ``path`` may be ``like`` itself (the old files are
    read before they are replaced)."""
    main = str(dtype or sources["embed_tokens.weight"].dtype).replace("torch.", "")
    config_to_hf(cfg, main)  # refuses other architectures before anything is read or written
    layout = like_layout(like, cfg) if like is not None else None
    if layout is None:
        config = config_to_hf(cfg, main)
        config.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    else:
        config = config_like(layout.config, cfg, main, token_ids)
    prefix = layout.prefix if layout else "model."
    specs, readers = hf_write_entries(cfg, sources, lambda n: lasp_to_hf_name(n, cfg, prefix),
                                      layout.experts if layout else DEFAULT_EXPERT_LAYOUT, dtype)
    others = layout.others if layout else {}
    for name, t in others.items():
        specs.append(TensorSpec(name, t.shape, dtype_from_safetensors(t.dtype)))
        readers[name] = (lambda t=t, name=name: read_stored(t.file, name))
    written = write_weights(path, specs, lambda n: readers[n](), max_shard_size, stale=("model.yaml",))
    written.copied_through = sorted(others)
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
    like: str | os.PathLike | None = None,
) -> WrittenWeights:
    """Write ``path/config.json`` + safetensors that ``transformers`` loads
    (``AutoModelForCausalLM.from_pretrained(path)`` -> ``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM``
    or ``Qwen3NextForCausalLM``; with ``like``, the
    class and layout of that checkpoint, e.g. ``Qwen3_5ForConditionalGeneration``); see :func:`write_hf`."""
    model = getattr(model, "module", model)
    return write_hf(path, model.config, model_sources(model), dtype=dtype, max_shard_size=max_shard_size, token_ids=token_ids,
                    like=like)
