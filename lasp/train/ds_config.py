"""The DeepSpeed config a run uses, and its learning-rate schedule.

DeepSpeed owns the optimizer (torch AdamW), ZeRO stage, precision, gradient accumulation
and clipping. Its data-parallel group is the WHOLE world: every rank of an SP group holds the
same replica and computes the gradient of the global loss with respect to it (the attention
operators route the other shards' contributions back in their backward). DeepSpeed averages
over all ``sp_size * dp_size`` ranks and divides by ``grad_accum``; the trainer scales each
rank's sum of token losses by ``world * grad_accum / (counted tokens of the step)``
(:func:`lasp.train.trainer.backward_scale`), so the gradient is exactly that of the mean over
the global batch's counted tokens, however they are spread over the ranks (packed documents).
"""
from __future__ import annotations

import json
import math

from .config import RunConfig


def lr_lambda(step: int, *, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup from ``lr / warmup``
    to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(cfg: RunConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under the run's schedule."""
    t = cfg.train
    return t.lr * lr_lambda(step, steps=t.steps, warmup=t.warmup, lr=t.lr, min_lr=t.min_lr)


def make_scheduler(cfg: RunConfig):
    """A callable ``optimizer -> LambdaLR`` for ``deepspeed.initialize(lr_scheduler=...)``."""
    import functools

    import torch

    t = cfg.train
    fn = functools.partial(lr_lambda, steps=t.steps, warmup=t.warmup, lr=t.lr, min_lr=t.min_lr)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks.

    With ``cfg.deepspeed`` set, that JSON is the base (its keys win, except the batch sizes,
    which must agree with the run config and are filled in when missing).
    """
    t = cfg.train
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed counts every rank as a data-parallel rank (see the module docstring).
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": t.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16", "initial_scale_power": 12},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if t.zero_stage == 3:
        # gather parameters eagerly and keep nothing resident between steps: tiny models, many ranks
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    if cfg.deepspeed:
        with open(cfg.deepspeed, encoding="utf-8") as f:
            try:
                user = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"deepspeed: {cfg.deepspeed} is not valid JSON: {e}") from None
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user and user[key] != ds[key]:
                raise ValueError(
                    f"deepspeed: {cfg.deepspeed} sets {key}={user[key]}, but the run config implies {ds[key]} "
                    "(set train.micro_batch_size / train.grad_accum instead)"
                )
        ds = {**ds, **user}
    if trainer_clips(cfg):
        ds["gradient_clipping"] = 0.0
    return ds


def trainer_clips(cfg: RunConfig) -> bool:
    """Whether the trainer clips the gradients instead of DeepSpeed: expert parallelism in fp32
    ZeRO-0, where DeepSpeed's clipping averages the per-rank norms while the expert-parallel ranks
    hold different experts (:func:`lasp.train.expert_parallel.clip_grad_norm_` takes the whole
    model's norm)."""
    t = cfg.train
    return cfg.parallel.ep_size > 1 and t.zero_stage == 0 and t.dtype == "fp32" and t.grad_clip > 0
