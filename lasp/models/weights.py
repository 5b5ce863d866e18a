"""Pretrained weights from a directory, one tensor at a time: a lasp ``save_pretrained`` /
``lasp export`` directory (``model.yaml`` + ``model.safetensors`` or shards with an index) or a
Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next directory (``config.json`` + safetensors, sharded or not).

Loading (:func:`load_weights_`) builds nothing itself: the caller builds the model on the meta
device, then each tensor is read (its file opened for that tensor alone, so at most one tensor's
pages of the files are mapped at a time), cast to the wanted dtype and moved to the wanted device,
and becomes the parameter. Peak host memory is the model in its final dtype plus one tensor: a
bf16 checkpoint loaded for bf16 training never exists in fp32.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .config import ModelConfig
from .hf import expected_names, hf_tensor_index, read_hf_config
from .hf_tensors import stored_source
from .io import CONFIG_FILE
from .moe import Experts
from .shards import TensorSource, weight_entries


def source_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a lasp directory (``model.yaml``) or an HF one (``config.json``)."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return ModelConfig.from_yaml(os.path.join(path, CONFIG_FILE))
    if os.path.isfile(os.path.join(path, "config.json")):
        return read_hf_config(path)
    raise ValueError(f"init_from: {os.fspath(path)!r} is neither a lasp model directory ({CONFIG_FILE}) nor a Hugging Face one (config.json)")


def file_sources(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, TensorSource]:
    """``{lasp parameter name: TensorSource}`` for every tensor of a ``cfg`` model in ``path`` (shapes
    and dtypes from the file headers; nothing is read until a source's ``read()``, each read opening
    its file for that tensor alone): for loading, and for streaming one directory into another. An
    HF directory's experts and Qwen3-Next projections are assembled as :func:`~lasp.models.hf.hf_tensor_index` says.

    ``ValueError`` listing unknown and missing names when the files do not match ``cfg``.
    """
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        entries = weight_entries(path)
        expected = set(expected_names(cfg))
        if set(entries) != expected:
            raise ValueError(f"{os.fspath(path)}: tensors do not match the model: unknown {sorted(set(entries) - expected)}, "
                             f"missing {sorted(expected - set(entries))}")
        return {n: stored_source(entries[n], n) for n in sorted(entries)}
    return hf_tensor_index(path, cfg)


def load_weights_(
    model: torch.nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """Fill ``model`` (built on any device, ``meta`` included) from ``path``; returns it.

    See :func:`load_tensors_` for ``dtype`` / ``device``."""
    return load_tensors_(model, file_sources(path, model.config), dtype=dtype, device=device)


def load_tensors_(
    model: torch.nn.Module,
    sources: dict[str, TensorSource],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Fill ``model`` from ``{lasp name: TensorSource}``, one tensor at a time.

    A meta parameter becomes the tensor read, cast to ``dtype`` (None: the file's) on ``device``
    (None: CPU); a materialised one is copied into (its own dtype and device, unless given). Every
    parameter must be in ``sources`` (``ValueError`` otherwise, naming them). The routed experts of
    a model built with an expert-parallel group (``ep_group``) are this rank's alone: only their
    rows are read (:func:`read_local`).
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sources))
    unknown = sorted(set(sources) - set(params))
    if missing or unknown:
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {unknown}")
    for name, src in sources.items():
        put_tensor_(model, name, read_local(model, name, src), dtype=dtype, device=device)
    return model


def read_local(model: torch.nn.Module, name: str, src: TensorSource) -> torch.Tensor:
    """What parameter ``name`` of ``model`` holds of source ``src``: all of it, or, for the routed
    experts of an expert-parallel rank, its experts ``[r E/P, (r+1) E/P)`` alone."""
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(module, Experts) and module.num_local != module.num_experts:
        return src.read_rows(module.ep_rank * module.num_local, module.num_local)
    return src.read()


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
