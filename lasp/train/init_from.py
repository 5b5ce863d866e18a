"""``model.init_from: PATH``: start training from pretrained weights (fine-tuning).

``PATH`` is a lasp directory (``lasp export`` / ``lasp convert`` output: ``model.yaml`` +
``model.safetensors``) or a Hugging Face Qwen3.5 directory (``config.json`` + safetensors). The
model config comes from ``PATH``; other keys of the run config's ``model`` section override it
(e.g. ``linear_method``, ``softmax_method``; changing a shape makes the load fail by name).

No rank materialises more than its share plus one tensor:

- ZeRO 0/1/2 (every rank holds the whole fp32 model anyway): the model is built on the meta
  device and the loaded tensors become its parameters (no random init first);
- ZeRO-3: the model is built under ``deepspeed.zero.Init`` (each rank allocates only its
  partition), then each parameter in turn is gathered, filled on rank 0 from the file, and
  re-partitioned (``GatheredParameters(modifier_rank=0)``).
"""
from __future__ import annotations

import os

import torch

INIT_KEY = "init_from"


def split_model_section(section: dict, source: str):
    """``(ModelConfig, init_from path or None)`` from a run config's ``model`` mapping."""
    from lasp.models import ModelConfig
    from lasp.models.weights import source_config

    section = dict(section)
    path = section.pop(INIT_KEY, None)
    if path is None:
        return ModelConfig.from_dict(section, source=f"{source}:model"), None
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ValueError(f"{source}: model.init_from: no such directory {path!r}")
    base = source_config(path).to_dict()
    base.update(section)
    return ModelConfig.from_dict(base, source=f"{source}:model (init_from {path})"), path


def build_initial_model(mcfg, path: str | None, zero_stage: int, ds_config: dict, load: bool = True, ep_group=None):
    """The model to hand to ``deepspeed.initialize``: random init (``path`` None, as before), or
    ``path``'s weights (``load=False``: only the structure, e.g. when a checkpoint is resumed).
    ``ep_group``: an MoE model's expert-parallel group (random init or resume only)."""
    from lasp.models import LinearLlamaForCausalLM
    from lasp.models.weights import load_weights_, tensor_readers

    if path is None or (zero_stage < 3 and not load):
        return LinearLlamaForCausalLM(mcfg, ep_group=ep_group)
    if zero_stage < 3:
        return load_weights_(LinearLlamaForCausalLM(mcfg, device="meta"), path).float()
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LinearLlamaForCausalLM(mcfg)
    if load:
        readers = tensor_readers(path, mcfg)  # every rank checks the names (same error everywhere)
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if rank == 0:
                    p.copy_(readers[name]())
    return model
