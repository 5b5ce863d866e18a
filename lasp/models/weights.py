"""Pretrained weights from a directory, one tensor at a time: a lasp ``save_pretrained`` /
``lasp export`` directory (``model.yaml`` + ``model.safetensors``) or a Hugging Face Qwen3.5
directory (``config.json`` + safetensors, sharded or not). Used by ``model.init_from`` to start
fine-tuning without materialising more than one tensor beyond the model itself.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from safetensors import safe_open

from .config import ModelConfig
from .hf import expected_names, hf_tensor_index, read_hf_config, read_hf_tensor
from .io import CONFIG_FILE, WEIGHTS_FILE


def source_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a lasp directory (``model.yaml``) or an HF one (``config.json``)."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return ModelConfig.from_yaml(os.path.join(path, CONFIG_FILE))
    if os.path.isfile(os.path.join(path, "config.json")):
        return read_hf_config(path)
    raise ValueError(f"init_from: {os.fspath(path)!r} is neither a lasp model directory ({CONFIG_FILE}) nor a Hugging Face one (config.json)")


def tensor_locations(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """``{lasp parameter name: (safetensors file, name in the file)}`` for every tensor of a ``cfg``
    model in ``path``. Both kinds are read by :func:`~lasp.models.hf.read_hf_tensor` (its reshape
    is for HF's ``conv1d.weight``, a name lasp files never hold).

    ``ValueError`` listing unknown and missing names when the files do not match ``cfg``.
    """
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        file = os.path.join(path, WEIGHTS_FILE)
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
        expected = set(expected_names(cfg))
        if names != expected:
            raise ValueError(f"{file}: tensors do not match the model: unknown {sorted(names - expected)}, missing {sorted(expected - names)}")
        return {n: (file, n) for n in sorted(names)}
    return hf_tensor_index(path, cfg)


def tensor_readers(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """``{lasp parameter name: () -> tensor}`` for every tensor of a ``cfg`` model in ``path``
    (each call opens the file: one tensor at a time).

    ``ValueError`` listing unknown and missing names when the files do not match ``cfg``.
    """

    def read(file: str, key: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as f:
            return read_hf_tensor(f, key)

    return {n: (lambda loc=loc: read(*loc)) for n, loc in tensor_locations(path, cfg).items()}


def load_weights_(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Fill ``model`` (built on any device, ``meta`` included) from ``path``; returns it.

    Meta tensors are replaced by the loaded ones (``assign``), others are copied into. Each
    safetensors file is opened once.
    """
    return load_tensors_(model, tensor_locations(path, model.config))


def load_tensors_(model: torch.nn.Module, locations: dict[str, tuple[str, str]]) -> torch.nn.Module:
    """Fill ``model`` from ``{lasp name: (safetensors file, name in the file)}`` (as :func:`load_weights_`)."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (file, key) in locations.items():
        by_file.setdefault(file, []).append((name, key))
    state = {}
    for file, items in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, key in items:
                state[name] = read_hf_tensor(f, key)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model
