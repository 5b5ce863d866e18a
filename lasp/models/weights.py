"""Pretrained weights from a directory, one tensor at a time: a lasp ``save_pretrained`` /
``lasp export`` directory (``model.yaml`` + ``model.safetensors`` or shards with an index) or a
Hugging Face Qwen3.5 directory (``config.json`` + safetensors, sharded or not).

Loading (:func:`load_weights_`) builds nothing itself: the caller builds the model on the meta
device, then each tensor is read (its file opened for that tensor alone, so at most one tensor's
pages of the files are mapped at a time), cast to the wanted dtype and moved to the wanted device,
and becomes the parameter. Peak host memory is the model in its final dtype plus one tensor: a
bf16 checkpoint loaded for bf16 training never exists in fp32.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from .config import ModelConfig
from .hf import expected_names, hf_tensor_index, read_hf_config, read_hf_tensor
from .io import CONFIG_FILE
from .shards import TensorSource, dtype_from_safetensors, weight_map


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
        files = weight_map(path)
        expected = set(expected_names(cfg))
        if set(files) != expected:
            raise ValueError(f"{os.fspath(path)}: tensors do not match the model: unknown {sorted(set(files) - expected)}, "
                             f"missing {sorted(expected - set(files))}")
        return {n: (files[n], n) for n in sorted(files)}
    return hf_tensor_index(path, cfg)


def read_tensor(file: str, key: str) -> torch.Tensor:
    """Tensor ``key`` of safetensors ``file`` in lasp's shape (the file is open only meanwhile)."""
    with safe_open(file, framework="pt") as f:
        return read_hf_tensor(f, key)


def tensor_readers(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, Callable[[], torch.Tensor]]:
    """``{lasp parameter name: () -> tensor}`` for every tensor of a ``cfg`` model in ``path``
    (each call opens the file: one tensor at a time).

    ``ValueError`` listing unknown and missing names when the files do not match ``cfg``.
    """
    return {n: (lambda loc=loc: read_tensor(*loc)) for n, loc in tensor_locations(path, cfg).items()}


def file_sources(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, TensorSource]:
    """``{lasp name: TensorSource}`` of the tensors in ``path`` (shapes and dtypes from the file
    headers; nothing is read until a source's ``read()``): for streaming one directory into another."""
    out = {}
    for name, (file, key) in tensor_locations(path, cfg).items():
        with safe_open(file, framework="pt") as f:
            sl = f.get_slice(key)
            shape, dtype = tuple(sl.get_shape()), dtype_from_safetensors(sl.get_dtype())
        if key.endswith("conv1d.weight"):
            shape = (shape[0], *shape[2:])
        out[name] = TensorSource(shape, dtype, lambda file=file, key=key: read_tensor(file, key))
    return out


def load_weights_(
    model: torch.nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """Fill ``model`` (built on any device, ``meta`` included) from ``path``; returns it.

    See :func:`load_tensors_` for ``dtype`` / ``device``."""
    return load_tensors_(model, tensor_locations(path, model.config), dtype=dtype, device=device)


def load_tensors_(
    model: torch.nn.Module,
    locations: dict[str, tuple[str, str]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Fill ``model`` from ``{lasp name: (safetensors file, name in the file)}``, one tensor at a time.

    A meta parameter becomes the tensor read, cast to ``dtype`` (None: the file's) on ``device``
    (None: CPU); a materialised one is copied into (its own dtype and device, unless given). Every
    parameter must be in ``locations`` (``ValueError`` otherwise, naming them).
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(locations))
    unknown = sorted(set(locations) - set(params))
    if missing or unknown:
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {unknown}")
    for name, (file, key) in locations.items():
        put_tensor_(model, name, read_tensor(file, key), dtype=dtype, device=device)
    return model


def put_tensor_(model: torch.nn.Module, name: str, t: torch.Tensor, *, dtype=None, device=None) -> None:
    """Make ``t`` parameter ``name`` of ``model``: assigned (cast, moved) if the parameter is on the
    meta device, else copied into it. ``ValueError`` on a shape mismatch."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    if tuple(t.shape) != tuple(old.shape):
        raise ValueError(f"tensor {name!r}: the model expects shape {list(old.shape)}, the checkpoint has {list(t.shape)}")
    if old.is_meta:
        t = t.to(device=device if device is not None else "cpu", dtype=dtype if dtype is not None else t.dtype)
        setattr(module, leaf, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        if dtype is not None or device is not None:
            old = nn.Parameter(old.detach().to(device=device, dtype=dtype), requires_grad=old.requires_grad)
            setattr(module, leaf, old)
        with torch.no_grad():
            old.copy_(t)
