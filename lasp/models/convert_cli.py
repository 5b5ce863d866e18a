"""``lasp convert``: Hugging Face Qwen3.5 checkpoints <-> lasp's ``save_pretrained`` directories.

    lasp convert --from-hf HF_DIR --output DIR      # config.json + safetensors (sharded or not)
                                                    #   -> model.yaml + model.safetensors
    lasp convert --from-lasp DIR --output HF_DIR    # the reverse (what transformers loads)

The tokenizer files of an HF directory (``tokenizer.json`` ...) are copied along, so
``lasp data prepare --tokenizer DIR/tokenizer.json`` tokenises data for the converted model.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def convert(src: str, output: str, from_hf: bool = True) -> str:
    """Convert directory ``src`` (HF if ``from_hf`` else lasp) into ``output``; returns ``output``."""
    from . import from_hf as load_hf
    from . import load_pretrained, save_pretrained, to_hf

    if from_hf:
        save_pretrained(load_hf(src), output)
    else:
        to_hf(load_pretrained(src), output)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(output, name))
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lasp convert", description="convert Hugging Face Qwen3.5 checkpoints to lasp and back")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="a Hugging Face Qwen3.5 directory (config.json + *.safetensors)")
    src.add_argument("--from-lasp", metavar="DIR", help="a lasp directory (model.yaml + model.safetensors) to write in HF format")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    args = p.parse_args(argv)
    try:
        out = convert(args.from_hf or args.from_lasp, args.output, from_hf=args.from_hf is not None)
    except ValueError as err:
        print(f"lasp convert: error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.from_hf or args.from_lasp} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
