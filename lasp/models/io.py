"""Save and load a model as a directory: ``model.yaml`` (the ModelConfig) + ``model.safetensors``
(or shards ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``, as
Hugging Face lays them out), written and read one tensor at a time (:mod:`lasp.models.shards`).

A tied LM head has no weight of its own (the model reuses ``embed_tokens.weight``), so the
files hold every tensor exactly once.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from .config import ModelConfig
from .model import LinearLlamaForCausalLM
from .shards import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, TensorSource, TensorSpec, WrittenWeights, model_sources, write_weights

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"


def write_pretrained(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    sources: Mapping[str, TensorSource],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> WrittenWeights:
    """Write ``out_dir/model.yaml`` + the weights of ``{name: TensorSource}``, one tensor at a time,
    each cast to ``dtype`` (None: its own). Replaces the weights (and a ``config.json``) already in
    ``out_dir``, keeps other files."""
    specs = [TensorSpec(n, tuple(s.shape), dtype or s.dtype) for n, s in sources.items()]
    written = write_weights(out_dir, specs, lambda n: sources[n].read(), max_shard_size, stale=("config.json",))
    cfg.to_yaml(os.path.join(out_dir, CONFIG_FILE))
    return written


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> WrittenWeights:
    """Write ``out_dir/model.yaml`` and the weights (creates ``out_dir``); see :func:`write_pretrained`.

    Accepts wrapped models (DDP / DeepSpeed engines expose the model as ``.module``).
    """
    model = getattr(model, "module", model)
    if not isinstance(model, LinearLlamaForCausalLM):
        raise ValueError(f"model must be a LinearLlamaForCausalLM, got {type(model).__name__}")
    return write_pretrained(out_dir, model.config, model_sources(model), dtype=dtype, max_shard_size=max_shard_size)


def load_pretrained(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LinearLlamaForCausalLM:
    """Build the model from ``path/model.yaml`` on the meta device and fill it from the weights
    (strict), one tensor at a time, each cast to ``dtype`` (None: the file's) on ``device``."""
    from .weights import load_weights_

    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"path: {os.fspath(path)!r} is not a save_pretrained directory ({cfg_path} is missing)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS_FILE, INDEX_FILE)):
        raise ValueError(f"path: {os.fspath(path)!r} is not a save_pretrained directory (neither {WEIGHTS_FILE} nor {INDEX_FILE})")
    model = LinearLlamaForCausalLM(ModelConfig.from_yaml(cfg_path), device="meta")
    return load_weights_(model, path, dtype=dtype, device=device)
