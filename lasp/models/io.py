"""Save and load a model as a directory: ``model.yaml`` (the ModelConfig) + ``model.safetensors``.

A tied LM head has no weight of its own (the model reuses ``embed_tokens.weight``), so the
file holds every tensor exactly once.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import LinearLlamaForCausalLM

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike) -> None:
    """Write ``out_dir/model.yaml`` and ``out_dir/model.safetensors`` (creates ``out_dir``).

    Accepts wrapped models (DDP / DeepSpeed engines expose the model as ``.module``).
    """
    model = getattr(model, "module", model)
    if not isinstance(model, LinearLlamaForCausalLM):
        raise ValueError(f"model must be a LinearLlamaForCausalLM, got {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    model.config.to_yaml(os.path.join(out_dir, CONFIG_FILE))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})


def load_pretrained(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LinearLlamaForCausalLM:
    """Build the model from ``path/model.yaml`` and load ``path/model.safetensors`` (strict)."""
    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"path: {os.fspath(path)!r} is not a save_pretrained directory ({p} is missing)")
    model = LinearLlamaForCausalLM(ModelConfig.from_yaml(cfg_path), device="meta")
    state = load_file(w_path, device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{w_path}: weights do not match {cfg_path}: missing {missing}, unexpected {unexpected}")
    return model.to(dtype=dtype) if dtype is not None else model
