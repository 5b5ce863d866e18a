"""``lasp export --checkpoint DIR --output DIR``: a DeepSpeed checkpoint (any ZeRO stage) to a model
directory: ``model.yaml`` + safetensors (the ``save_pretrained`` format, for
``lasp.models.load_pretrained``, ``lasp generate`` and ``model.init_from``) or, with ``--format hf``,
``config.json`` + safetensors that transformers loads (qwen3_5 / qwen3_next models, dense or MoE).

    lasp export --checkpoint runs/x/checkpoints --output OUT [--format lasp|hf [--like HF_DIR]]
                [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

``--checkpoint`` is either a checkpoint directory (its ``latest`` checkpoint is exported) or
one checkpoint's tag directory (``.../checkpoints/step00000200``). Runs in one process, no
launcher. The weights are the fp32 master copy (never a bf16/fp16 module copy), written in the
run's training dtype by default (``train.dtype`` of the checkpoint's ``run.yaml``; ``--dtype``
chooses), each tensor rounded once, one tensor at a time (:mod:`lasp.train.consolidate` reads
them, :mod:`lasp.models.shards` writes them) into shards of at most ``--max-shard-size`` with
``model.safetensors.index.json`` when there is more than one.

Beside the weights: the tokenizer, chat-template, generation and processor files of the run's
``model.init_from`` directory (or, without one, the tokenizers JSON the checkpoint carries, else
the dataset's, as ``tokenizer.json``); the HF ``config.json`` carries the bos/eos/pad token ids of the init_from
directory (``config.json``, ``generation_config.json``), else the dataset's document separator
as eos. Weights already in ``--output`` are replaced (see :mod:`lasp.models.shards`). The
checkpoint is verified against its manifest first: a damaged one is one clear error.

``--format hf --like HF_DIR``: the layout of the Hugging Face checkpoint the run started from
(e.g. a ``Qwen3_5ForConditionalGeneration``: ``model.language_model.*``, its ``config.json``
with ``text_config`` nesting and ``vision_config``), the vision tower and MTP weights copied
through unchanged from HF_DIR (see :mod:`lasp.models.convert_cli`); HF_DIR's companion files and
token ids are used (the ``init_from`` directory's take precedence for the files).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, field

import torch
import yaml

from lasp.models.shards import DEFAULT_MAX_SHARD_SIZE, WrittenWeights, parse_size

from .checkpoint import read_latest, verify

MODEL_YAML = "model.yaml"
RUN_YAML = "run.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``(checkpoint_dir, tag)`` for a checkpoint root or a tag directory (ValueError otherwise)."""
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint: no such directory {path!r}")
    tag = read_latest(path)
    if tag is not None:
        return path, tag
    if os.path.isfile(os.path.join(path, MODEL_YAML)):
        path = os.path.abspath(path)
        return os.path.dirname(path), os.path.basename(path)
    raise ValueError(f"--checkpoint: {path!r} is neither a checkpoint directory (with a 'latest' file) nor a checkpoint tag directory (with {MODEL_YAML})")


def read_run(tag_dir: str) -> dict:
    """The run config saved with the checkpoint (``run.yaml``), {} if it has none."""
    path = os.path.join(tag_dir, RUN_YAML)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        run = yaml.safe_load(f)
    return run if isinstance(run, dict) else {}


def dataset_tokenizer(run: dict, tag_dir: str) -> tuple[str | None, dict]:
    """``(tokenizers JSON path or None, {"eos_token_id": separator})`` of the run: the tokenizer
    the checkpoint carries (``tokenizer.json`` beside its weights), else the dataset's (if its
    header can be read); the separator ends every document: the model's end-of-text."""
    from .data import HEADER, TOKENIZER_FILE, dataset_tokenizer_path

    own = os.path.join(tag_dir, TOKENIZER_FILE)
    data = (run.get("data") or {}).get("path")
    header_path = os.path.join(data, HEADER) if isinstance(data, str) else None
    header = {}
    if header_path is not None and os.path.isfile(header_path):
        try:
            with open(header_path, encoding="utf-8") as f:
                header = json.load(f)
        except (OSError, ValueError):
            header = {}
    ids = {"eos_token_id": header["separator"]} if isinstance(header.get("separator"), int) else {}
    if os.path.isfile(own):
        return own, ids
    try:
        tok = dataset_tokenizer_path(data, header) if header else "bytes"
    except ValueError:
        tok = "bytes"
    return (None if tok == "bytes" else tok), ids


@dataclass
class Exported:
    """What :func:`export` wrote."""

    output: str
    tag: str
    dtype: torch.dtype
    weights: WrittenWeights
    companions: list[str] = field(default_factory=list)
    token_ids: dict = field(default_factory=dict)


def export(checkpoint: str, output: str, fmt: str = "lasp", *, dtype: torch.dtype | None = None,
           max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, like: str | None = None) -> Exported:
    """Write checkpoint ``checkpoint`` into ``output`` (see the module docstring); ``dtype`` None is
    the run's training dtype; ``like``: an HF directory whose layout the ``hf`` format takes."""
    from lasp.models import LinearLlamaForCausalLM, ModelConfig
    from lasp.models.config import QWEN_ARCHITECTURES
    from lasp.models.companions import copy_companions, token_ids
    from lasp.models.hf import write_hf
    from lasp.models.io import write_pretrained

    from .consolidate import checkpoint_sources

    if like is not None and fmt != "hf":
        raise ValueError("--like: only with --format hf (it gives the Hugging Face layout to write)")
    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    tag_dir = os.path.join(ckpt_dir, tag)
    cfg_path = os.path.join(tag_dir, MODEL_YAML)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--checkpoint: {cfg_path!r} is missing (not a checkpoint written by lasp train)")
    problem = verify(tag_dir)
    if problem is not None:
        raise ValueError(f"--checkpoint: checkpoint {tag_dir} is damaged: {problem}; export an intact one (another stepN directory)")
    cfg = ModelConfig.from_yaml(cfg_path)
    if fmt == "hf" and cfg.architecture not in QWEN_ARCHITECTURES:
        raise ValueError(f"--format hf: only architecture qwen3_5 / qwen3_next models export to Hugging Face format, this one is {cfg.architecture!r}")
    run = read_run(tag_dir)
    if dtype is None:
        dtype = DTYPES.get((run.get("train") or {}).get("dtype"), torch.float32)
    init_from = (run.get("model") or {}).get("init_from")
    init_dir = init_from if isinstance(init_from, str) and os.path.isdir(init_from) else None
    tokenizer, ids = dataset_tokenizer(run, tag_dir)
    ids = {**ids, **(token_ids(init_dir) if init_dir else {}), **(token_ids(like) if like else {})} if fmt == "hf" else {}
    try:
        sources = checkpoint_sources(ckpt_dir, tag, LinearLlamaForCausalLM(cfg, device="meta"))
        if fmt == "hf":
            written = write_hf(output, cfg, sources, dtype=dtype, max_shard_size=max_shard_size, token_ids=ids, like=like)
        else:
            written = write_pretrained(output, cfg, sources, dtype=dtype, max_shard_size=max_shard_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise ValueError(f"--output: cannot write {output}: {e.strerror}") from None
        raise ValueError(f"--checkpoint: cannot read checkpoint {tag_dir}: {type(e).__name__}: {e}") from None
    except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"--checkpoint: cannot read checkpoint {tag_dir}: {type(e).__name__}: {e}") from None
    companions = sorted(set(copy_companions(like, output) if like else []) | set(copy_companions(init_dir, output) if init_dir else []))
    if "tokenizer.json" not in companions and tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(output, "tokenizer.json"))
        companions.append("tokenizer.json")
    return Exported(output, tag, dtype, written, companions, ids)


def main(argv: list[str] | None = None) -> int:
    from lasp.models.convert_cli import describe

    p = argparse.ArgumentParser(prog="lasp export", description="export a training checkpoint to safetensors + model config")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (uses 'latest') or one checkpoint's tag directory")
    p.add_argument("--output", required=True, help="output directory (its old weights are replaced, other files kept)")
    p.add_argument("--format", choices=("lasp", "hf"), default="lasp",
                   help="lasp: model.yaml + safetensors; hf: config.json + safetensors for transformers (qwen3_5 / qwen3_next models)")
    p.add_argument("--like", metavar="HF_DIR", default=None,
                   help="with --format hf: write in the layout of the Hugging Face checkpoint the run started from (e.g. a "
                        "Qwen3_5ForConditionalGeneration: model.language_model.*, its config.json nesting), its vision tower "
                        "and MTP weights copied through unchanged")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the run's train.dtype; the fp32 master copy is rounded once)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest safetensors file, e.g. 5GB (default), 500MB, 2GiB or bytes; more than one gets model.safetensors.index.json")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        parse_size(args.max_shard_size, "--max-shard-size")
        res = export(args.checkpoint, args.output, args.format, dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                     like=args.like)
    except ValueError as err:
        print(f"lasp export: error: {err}", file=sys.stderr)
        return 2
    config = "config.json" if args.format == "hf" else MODEL_YAML
    ids = "".join(f", {k}={v}" for k, v in res.token_ids.items())
    print(f"exported {args.checkpoint} ({res.tag}) -> {res.output}/{config}, {str(res.dtype).replace('torch.', '')}{ids}\n"
          f"{describe(res.output, res.weights, res.companions, args.like)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
