"""Run configuration: typed sections loaded from YAML, ``--set dotted.key=value`` overrides.

A run config has the sections ``model`` (an inline mapping, or the path of a model YAML),
``parallel``, ``train``, ``data``, ``checkpoint``, ``sample`` and the top-level keys
``out_dir``, ``deepspeed`` (optional path of an explicit DeepSpeed JSON) and ``tensorboard``.
Every key is checked: an unknown one is a ValueError that names it and the file it came from.
The model section is kept as a plain dict here and validated by ``lasp.models.ModelConfig``
when the trainer builds the model (so this module does not import torch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lasp.config_loader import build, read_yaml

DTYPES = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
EP_ZERO_STAGES = (0, 1, 2)  # the ZeRO stages DeepSpeed runs with expert (MoE) parameter groups


@dataclass
class ParallelConfig:
    """Sequence parallelism: ``sp_size`` ranks per SP group, the token ``layout``, ``nproc``
    (processes ``lasp train`` starts by itself when not run under a launcher; default sp_size),
    and the collective timeout ``timeout_s`` (a lost peer ends the run with an error, not a hang).
    ``ep_size``: expert parallelism of an ``mlp: moe`` model (ranks per EP group, carved from the
    same ranks as SP x DP: :mod:`lasp.parallel`)."""

    sp_size: int = 1
    ep_size: int = 1
    layout: str = "contiguous"
    nproc: int | None = None
    #: seconds a collective waits for a lost peer before failing (None: $LASP_COLLECTIVE_TIMEOUT, else 600)
    timeout_s: float | None = None


@dataclass
class TrainConfig:
    """Optimisation. ``steps`` counts optimizer steps; one step sees
    ``micro_batch_size * grad_accum * dp_size`` windows of ``seq_len`` tokens."""

    steps: int = 100
    seq_len: int = 256
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int = 10
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    zero_stage: int = 1
    dtype: str = "fp32"
    activation_checkpointing: bool = False
    #: keep the checkpointed layer inputs in host memory until backward (implies activation_checkpointing)
    activation_offload: bool = False
    log_every: int = 1


@dataclass
class DataConfig:
    """Training tokens. ``path``: a directory written by ``lasp data prepare``; ``None`` uses the
    embedded corpus (the Python standard library's sources, one document per file, prepared on
    first use into ``cache_dir``, default ``~/.cache/lasp``). ``pack_documents``: train on packed
    documents (``cu_seqlens`` per window, no attention, state or label across a document
    boundary); ``null`` (default) = yes when the dataset has a document index; ``true`` on a
    dataset without one is an error."""

    path: str | None = None
    cache_dir: str | None = None
    pack_documents: bool | None = None


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints every ``every`` steps and at the end, under ``dir``
    (default ``<out_dir>/checkpoints``); ``every: 0`` saves only at the end. ``keep_last``: once
    a new checkpoint is complete, only the newest ``keep_last`` are kept (``null``: keep all)."""

    dir: str | None = None
    every: int = 100
    keep_last: int | None = 3


@dataclass
class SampleConfig:
    """The short text generated at the end of a run (rank 0, single process)."""

    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 40


@dataclass
class RunConfig:
    """A whole training run (see the module docstring)."""

    model: dict = field(default_factory=dict)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    out_dir: str = "runs/default"
    deepspeed: str | None = None
    tensorboard: bool = False
    #: where the config came from (for error messages); not a config key
    source: str = field(default="<dict>", compare=False, repr=False)

    # ------------------------------------------------------------------ derived paths
    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")

    @property
    def world_size(self) -> int:
        """Processes a self-launched run starts (``parallel.nproc``, default ``sp_size``)."""
        return self.parallel.nproc or self.parallel.sp_size

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>", base_dir: str | None = None, world: int | None = None) -> "RunConfig":
        """Build and validate a run config. ``model`` may be a mapping or a model-YAML path
        (relative paths are tried against the working directory, then ``base_dir``). ``world``:
        the world size the run will have, when known (checked against ``parallel.sp_size``
        before anything else; default ``parallel.nproc``)."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a run config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        model = d.pop("model", None)
        cfg = build(cls, d, source=source, skip=("model", "source"), what="run config")
        cfg.model = _load_model_section(model, source, base_dir)
        cfg.source = source
        cfg.validate(world)
        cfg.adopt_deepspeed_json(world)
        return cfg

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None, world: int | None = None) -> "RunConfig":
        """Load ``path`` and apply ``overrides`` (``dotted.key=value`` strings, values in YAML);
        ``world``: as :meth:`from_dict`."""
        if not os.path.isfile(path):
            raise ValueError(f"config: no such run config file {path!r}")
        d = read_yaml(path, "run config")
        base_dir = str(Path(path).resolve().parent)
        if overrides:
            d["model"] = _load_model_section(d.get("model"), path, base_dir)
            for item in overrides:
                apply_override(d, item)
        return cls.from_dict(d, source=path, base_dir=base_dir, world=world)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def adopt_deepspeed_json(self, world: int | None = None) -> None:
        """With ``deepspeed: FILE``, that JSON's values win: copy the ones the run config also has
        (ZeRO stage, precision, gradient clipping, optimizer lr / weight decay) into ``train`` so
        the banner, ``run.yaml`` and the checkpoints record what actually runs."""
        if not self.deepspeed:
            return
        try:
            with open(self.deepspeed, encoding="utf-8") as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.source}: deepspeed: {self.deepspeed} is not a readable JSON file: {e}") from None
        if not isinstance(ds, dict):
            raise ValueError(f"{self.source}: deepspeed: {self.deepspeed} must hold a JSON object")
        t = self.train
        stage = (ds.get("zero_optimization") or {}).get("stage")
        if stage is not None:
            t.zero_stage = int(stage)
        if (ds.get("bf16") or {}).get("enabled"):
            t.dtype = "bf16"
        elif (ds.get("fp16") or {}).get("enabled"):
            t.dtype = "fp16"
        elif "bf16" in ds or "fp16" in ds:
            t.dtype = "fp32"
        if "gradient_clipping" in ds:
            t.grad_clip = float(ds["gradient_clipping"])
        params = (ds.get("optimizer") or {}).get("params") or {}
        if "lr" in params:
            t.lr = float(params["lr"])
        if "weight_decay" in params:
            t.weight_decay = float(params["weight_decay"])
        try:
            self.validate(world)
        except ValueError as e:
            raise ValueError(f"{e} (after adopting the values of the DeepSpeed JSON {self.deepspeed})") from None

    # ------------------------------------------------------------------ validation
    def validate(self, world: int | None = None) -> None:
        """Checks that need no data, model or processes (ValueError naming the key). ``world``:
        the run's world size when known (else ``parallel.nproc``, when set): ``sp_size`` must
        divide it, checked before the shapes that depend on ``sp_size``."""
        from lasp.parallel import LAYOUTS, check_shardable

        p, t, src = self.parallel, self.train, self.source
        if p.sp_size < 1:
            raise ValueError(f"{src}: parallel.sp_size must be >= 1, got {p.sp_size}")
        if p.ep_size < 1:
            raise ValueError(f"{src}: parallel.ep_size must be >= 1, got {p.ep_size}")
        if p.nproc is not None and p.nproc < 1:
            raise ValueError(f"{src}: parallel.nproc must be >= 1, got {p.nproc}")
        check_world(p.sp_size, world if world is not None else p.nproc, src)
        check_world(p.ep_size, world if world is not None else p.nproc, src, key="ep_size")
        if p.layout not in LAYOUTS:
            raise ValueError(f"{src}: parallel.layout must be one of {LAYOUTS}, got {p.layout!r}")
        if p.timeout_s is not None and not p.timeout_s > 0:
            raise ValueError(f"{src}: parallel.timeout_s must be > 0, got {p.timeout_s}")
        for name in ("steps", "seq_len", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(t, name) < 1:
                raise ValueError(f"{src}: train.{name} must be >= 1, got {getattr(t, name)}")
        if t.warmup < 0:
            raise ValueError(f"{src}: train.warmup must be >= 0, got {t.warmup}")
        if not (math.isfinite(t.lr) and t.lr > 0):
            raise ValueError(f"{src}: train.lr must be finite and > 0, got {t.lr}")
        if not (math.isfinite(t.min_lr) and 0 <= t.min_lr <= t.lr):
            raise ValueError(f"{src}: train.min_lr must be finite with 0 <= train.min_lr <= train.lr, got lr={t.lr}, min_lr={t.min_lr}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(t, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{src}: train.{name} must be finite and >= 0 (0 = off), got {v}")
        if not 0 <= t.seed < 2**63:
            raise ValueError(f"{src}: train.seed must be an integer in [0, 2**63), got {t.seed}")
        sm = self.sample
        if not (math.isfinite(sm.temperature) and sm.temperature >= 0):
            raise ValueError(f"{src}: sample.temperature must be finite and >= 0 (0 = greedy), got {sm.temperature}")
        if sm.max_new_tokens < 0:
            raise ValueError(f"{src}: sample.max_new_tokens must be >= 0 (0 = no sample), got {sm.max_new_tokens}")
        if sm.max_new_tokens > 0 and not sm.prompt:
            raise ValueError(f"{src}: sample.prompt must not be empty (or set sample.max_new_tokens: 0)")
        if sm.top_k is not None and sm.top_k < 1:
            raise ValueError(f"{src}: sample.top_k must be >= 1 or null, got {sm.top_k}")
        if t.zero_stage not in ZERO_STAGES:
            raise ValueError(f"{src}: train.zero_stage must be one of {ZERO_STAGES}, got {t.zero_stage}")
        if p.ep_size > 1 and t.zero_stage not in EP_ZERO_STAGES:
            raise ValueError(
                f"{src}: train.zero_stage={t.zero_stage} does not support expert parallelism (parallel.ep_size={p.ep_size}): "
                f"DeepSpeed reduces and partitions expert parameters over their expert-data-parallel group only in ZeRO stages "
                f"{EP_ZERO_STAGES} (its stage 3 refuses MoE layers); use one of those, or parallel.ep_size: 1"
            )
        if t.dtype not in DTYPES:
            raise ValueError(f"{src}: train.dtype must be one of {DTYPES}, got {t.dtype!r}")
        check_shardable(t.seq_len, p.sp_size, p.layout, name="train.seq_len")
        if self.checkpoint.every < 0:
            raise ValueError(f"{src}: checkpoint.every must be >= 0, got {self.checkpoint.every}")
        if self.checkpoint.keep_last is not None and self.checkpoint.keep_last < 1:
            raise ValueError(f"{src}: checkpoint.keep_last must be >= 1 or null (keep every checkpoint), got {self.checkpoint.keep_last}")
        if self.deepspeed is not None and not os.path.isfile(self.deepspeed):
            raise ValueError(f"{src}: deepspeed: no such DeepSpeed JSON file {self.deepspeed!r}")
        if not self.model:
            raise ValueError(f"{src}: the model section is missing (a mapping or a model YAML path)")


# ---------------------------------------------------------------------------- helpers


def check_world(sp_size: int, world: int | None, source: str, key: str = "sp_size") -> None:
    """ValueError unless ``sp_size`` (``parallel.<key>``) divides ``world`` (nothing to check when ``world`` is None)."""
    if world is not None and world % sp_size != 0:
        raise ValueError(f"{source}: parallel.{key}={sp_size} must divide the world size {world} ({sp_size} does not divide {world})")


def _load_model_section(model: Any, source: str, base_dir: str | None) -> dict:
    if model is None or isinstance(model, dict):
        return dict(model or {})
    if not isinstance(model, str):
        raise ValueError(f"{source}: model must be a mapping or the path of a model YAML, got {type(model).__name__}")
    candidates = [model] + ([os.path.join(base_dir, model)] if base_dir and not os.path.isabs(model) else [])
    for path in candidates:
        if os.path.isfile(path):
            return read_yaml(path, "model config")
    raise ValueError(f"{source}: model: no such model YAML {model!r}")


def apply_override(d: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override to the raw config mapping ``d`` in place.

    The value is parsed as YAML (``8``, ``3.0e-4``, ``true``, ``null``, ``[1, 2]``); key
    checks happen when the config is built, so an unknown key names the override."""
    if "=" not in item:
        raise ValueError(f"--set: expected dotted.key=value, got {item!r}")
    key, _, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ValueError(f"--set: bad key {key!r} in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--set: {'.'.join(parts[: i + 1])} is not a section (in {item!r})")
        node = child
    node[parts[-1]] = value
