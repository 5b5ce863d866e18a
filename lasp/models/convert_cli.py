"""``lasp convert``: Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoints <-> lasp's ``save_pretrained`` directories.

    lasp convert --from-hf HF_DIR --output DIR      # config.json + safetensors (sharded or not)
                                                    #   -> model.yaml + safetensors
    lasp convert --from-lasp DIR --output HF_DIR    # the reverse (what transformers loads)
        [--like ORIGINAL_HF_DIR]                    #   in the layout of the checkpoint DIR came from
        [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]

One tensor at a time, file to file (no model is built): each tensor is read, renamed, cast to
``--dtype`` (default: kept as stored) and written into shards of at most ``--max-shard-size``.
Every tokenizer / chat-template / generation / processor file of the source
(:data:`lasp.models.companions.COMPANION_PATTERNS`) is copied along, so ``lasp data prepare
--tokenizer DIR/tokenizer.json`` tokenises data for the converted model. The bos/eos/pad token
ids travel too: an HF source's config.json ids missing from its generation_config.json are added
to the lasp directory's copy (a lasp directory has no config.json), and HF output's config.json
gets the source's ids. Weights already in ``--output`` (old shards, an index, the
other format's config) are replaced; other files there are kept.

``--like ORIGINAL_HF_DIR`` (with ``--from-lasp``): write the model in the layout of the Hugging
Face checkpoint it came from (its routed experts' layout: per expert or fused 3-D; without
``--like``: per expert, as transformers' ``save_pretrained`` writes them), e.g. a
``Qwen3_5ForConditionalGeneration``: the text weights as
``model.language_model.*``, ``config.json`` that checkpoint's own (``text_config`` nesting,
``vision_config``, multimodal RoPE keys) with the text settings replaced, and the tensors lasp
does not hold (the vision tower ``model.visual.*``, the MTP head ``mtp.*``) copied through
unchanged from ORIGINAL_HF_DIR's shards, tensor by tensor. The output can replace that
repository's weights (``--output`` may be ORIGINAL_HF_DIR itself); its companion files are
copied too, the lasp directory's taking precedence.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from .shards import DEFAULT_MAX_SHARD_SIZE, WrittenWeights, parse_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Converted:
    """What :func:`convert` wrote: the weights (files, bytes, files replaced) and the companions copied."""

    output: str
    weights: WrittenWeights
    companions: list[str]


def convert(src: str, output: str, from_hf: bool = True, *, dtype: torch.dtype | None = None,
            max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, like: str | None = None) -> Converted:
    """Convert directory ``src`` (HF if ``from_hf`` else lasp) into ``output`` (lasp -> HF: in
    ``like``'s layout when given, see the module docstring)."""
    from .companions import copy_companions, keep_token_ids, token_ids
    from .config import ModelConfig
    from .hf import read_hf_config, write_hf
    from .io import CONFIG_FILE, write_pretrained
    from .weights import file_sources

    if os.path.realpath(src) == os.path.realpath(output):
        raise ValueError(f"--output: {output!r} is the source directory; write the conversion elsewhere")
    if like is not None and from_hf:
        raise ValueError("--like: only with --from-lasp (it gives the Hugging Face layout to write)")
    if from_hf:
        cfg = read_hf_config(src)
        written = write_pretrained(output, cfg, file_sources(src, cfg), dtype=dtype, max_shard_size=max_shard_size)
    else:
        cfg_path = os.path.join(src, CONFIG_FILE)
        if not os.path.isfile(cfg_path):
            raise ValueError(f"--from-lasp: {src!r} is not a lasp model directory ({cfg_path} is missing)")
        cfg = ModelConfig.from_yaml(cfg_path)
        written = write_hf(output, cfg, file_sources(src, cfg), dtype=dtype, max_shard_size=max_shard_size,
                           token_ids=token_ids(src), like=like)
    copied = sorted(set(copy_companions(like, output) if like is not None else []) | set(copy_companions(src, output)))
    if from_hf:
        keep_token_ids(output, token_ids(src))
    return Converted(output, written, copied)


def describe(out: str, weights: WrittenWeights, companions: list[str], like: str | None = None) -> str:
    """The lines ``lasp convert`` / ``lasp export`` print about what they wrote."""
    lines = [f"  weights: {len(weights.files)} file(s), {weights.total_size / 1e6:,.1f} MB: {', '.join(weights.files)}"]
    if like is not None:
        groups: dict[str, int] = {}
        for name in weights.copied_through:
            head = ".".join(name.split(".")[:2] if name.startswith("model.") else name.split(".")[:1]) + ".*"
            groups[head] = groups.get(head, 0) + 1
        kept = ", ".join(f"{g} ({n})" for g, n in groups.items()) or "none"
        lines.append(f"  layout of {like}; tensors copied through unchanged: {kept}")
    if weights.removed:
        lines.append(f"  replaced (removed) in {out}: {', '.join(weights.removed)}")
    if companions:
        lines.append(f"  copied: {', '.join(companions)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lasp convert", description="convert Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next checkpoints to lasp and back")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="a Hugging Face Qwen3.5 / Qwen3.5-MoE / Qwen3-Next directory (config.json + *.safetensors)")
    src.add_argument("--from-lasp", metavar="DIR", help="a lasp directory (model.yaml + safetensors) to write in HF format")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (its old weights are replaced)")
    p.add_argument("--like", metavar="HF_DIR", default=None,
                   help="with --from-lasp: write in the layout of the Hugging Face checkpoint the model came from (e.g. a "
                        "Qwen3_5ForConditionalGeneration: model.language_model.*, its config.json nesting), its vision tower "
                        "and MTP weights copied through unchanged")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as stored)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                   help="largest safetensors file, e.g. 5GB (default), 500MB, 2GiB or bytes; more than one gets an index")
    args = p.parse_args(argv)
    try:
        parse_size(args.max_shard_size, "--max-shard-size")
        res = convert(args.from_hf or args.from_lasp, args.output, from_hf=args.from_hf is not None,
                      dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size, like=args.like)
    except ValueError as err:
        print(f"lasp convert: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. no space left on the output's filesystem
        print(f"lasp convert: error: {err.filename or args.output}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"converted {args.from_hf or args.from_lasp} -> {res.output}\n{describe(res.output, res.weights, res.companions, args.like)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
