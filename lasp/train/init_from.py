"""``model.init_from: PATH``: start training from pretrained weights (fine-tuning).

``PATH`` is a lasp directory (``lasp export`` / ``lasp convert`` output: ``model.yaml`` +
``model.safetensors``) or a Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next directory
(``config.json`` + safetensors, routed experts in either layout). The
model config comes from ``PATH``; other keys of the run config's ``model`` section override it
(e.g. ``linear_method``, ``softmax_method``; changing a shape makes the load fail by name).

No rank materialises more than its share plus one tensor:

- ZeRO 0/1/2 (every rank holds the whole model anyway): the model is built on the meta device in
  the training dtype (``train.dtype``) and each tensor, read one at a time and cast, becomes its
  parameter (no random init first, never an fp32 copy of a bf16 run's model; DeepSpeed then makes
  its own fp32 master copy for bf16/fp16, partitioned under ZeRO 1/2); with expert parallelism
  (``parallel.ep_size > 1``) each rank reads only its own experts' rows;
- ZeRO-3: the model is built under ``deepspeed.zero.Init`` (each rank allocates only its
  partition), then each parameter in turn is gathered, filled on rank 0 from the file, and
  re-partitioned (``GatheredParameters(modifier_rank=0)``). ``deepspeed.comm`` is initialised
  first (on the process group already there): ``zero.Init`` reads the batch sizes against the
  world size before ``deepspeed.initialize`` would have done it.
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


def training_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed trains the module in under ``ds_config`` (bf16 / fp16 / fp32)."""
    if (ds_config.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds_config.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def init_deepspeed_comm() -> None:
    """Initialise ``deepspeed.comm`` on the torch.distributed process group already there (what
    ``deepspeed.initialize`` would do later; ``deepspeed.zero.Init`` needs it before)."""
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)


def build_initial_model(mcfg, path: str | None, zero_stage: int, ds_config: dict, load: bool = True, ep_group=None):
    """The model to hand to ``deepspeed.initialize``: random init (``path`` None, as before), or
    ``path``'s weights (``load=False``: only the structure, e.g. when a checkpoint is resumed).
    ``ep_group``: an MoE model's expert-parallel group (each rank reads only its own experts)."""
    from lasp.models import LinearLlamaForCausalLM
    from lasp.models.weights import file_sources, load_weights_

    if path is None or (zero_stage < 3 and not load):
        return LinearLlamaForCausalLM(mcfg, ep_group=ep_group)
    if zero_stage < 3:
        return load_weights_(LinearLlamaForCausalLM(mcfg, device="meta", ep_group=ep_group), path, dtype=training_dtype(ds_config))
    import deepspeed
    import torch.distributed as dist

    init_deepspeed_comm()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LinearLlamaForCausalLM(mcfg)
    if load:
        sources = file_sources(path, mcfg)  # every rank checks the names (same error everywhere)
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if rank == 0:
                    p.copy_(sources[name].read())
    return model
