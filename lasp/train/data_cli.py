"""``lasp data prepare --input PATH... --output DIR [--tokenizer bytes|PATH]``: text files to a
token memmap (see :mod:`lasp.train.data` for the format). Progress (files, tokens) goes to
stderr every few seconds; binary files are skipped with a warning naming them."""
from __future__ import annotations

import argparse
import sys

from .data import embedded_corpus, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lasp data", description="prepare training data")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text files into DIR/tokens.bin + DIR/documents.bin (document starts) + DIR/header.json")
    p.add_argument("--input", nargs="+", required=True, help="text files and/or directories (walked recursively)")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (built in, vocab 256) or a tokenizers JSON file")
    p.add_argument("--pattern", default="*", help="file glob used inside input directories (default: all files; hidden ones are skipped)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output directory")
    p.add_argument("--eos-token", default=None, help="the tokenizers file's end-of-text token written between documents (default: found by name)")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS", help="seconds between progress lines on stderr (default 5)")
    e = sub.add_parser("embedded", help="prepare the embedded corpus (Python stdlib sources) and print its path")
    e.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            header = prepare(args.input, args.output, args.tokenizer, pattern=args.pattern, overwrite=args.overwrite, eos_token=args.eos_token,
                             log=lambda line: print(f"lasp data: {line}", file=sys.stderr, flush=True), progress_every_s=args.progress_every)
            print(
                f"wrote {args.output}: {header['num_tokens']:,} tokens ({header['dtype']}, vocab {header['vocab_size']}) "
                f"from {header['documents']} files (one document each, index in documents.bin"
                + (f"; {header['skipped_files']} binary files skipped" if header.get("skipped_files") else "") + ")"
            )
        else:
            print(embedded_corpus(args.cache_dir))
    except ValueError as err:
        print(f"lasp data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
