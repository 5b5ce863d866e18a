"""``lasp generate --checkpoint DIR --prompt TEXT [--tokenizer bytes|PATH]``: sample from a saved
model, streaming.

``DIR`` is a :func:`lasp.models.save_pretrained` directory (``model.yaml`` +
``model.safetensors``; ``lasp export`` writes one from a training checkpoint, ``lasp convert``
from a Hugging Face model). Text is tokenised with the model's tokenizer: ``--tokenizer PATH``
(a ``tokenizers`` JSON, e.g. a dataset's ``tokenizer.json``), else ``DIR/tokenizer.json`` when
the directory has one (``lasp convert`` copies it, BPE models), else the byte level: token ids
are the bytes of the UTF-8 text (vocab 256), the tokenizer of the tiny configs and of the
trainer's built-in data pipeline. ``--tokenizer bytes`` forces the byte level.
"""
from __future__ import annotations

import argparse
import codecs
import os
import sys

import torch

BYTE_VOCAB = 256
#: the tokenizers JSON a model directory may hold
TOKENIZER_FILE = "tokenizer.json"


def encode_bytes(text: str) -> list[int]:
    """Byte-level tokenisation: the UTF-8 bytes of ``text``. Bytes that were not valid UTF-8 on
    the command line (Python keeps them as surrogate escapes) are tokenised as those bytes."""
    return list(text.encode("utf-8", errors="surrogateescape"))


def decode_bytes(ids: list[int]) -> str:
    """Inverse of :func:`encode_bytes` (ids >= 256 and broken UTF-8 become U+FFFD)."""
    return bytes(i if i < BYTE_VOCAB else 0xFF for i in ids).decode("utf-8", errors="replace")


class ByteStreamer:
    """An ``on_token`` callback that writes each new byte to a stream as soon as it forms text."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens: torch.Tensor) -> None:
        tok = int(tokens[0])
        text = self.decoder.decode(bytes([tok if tok < BYTE_VOCAB else 0xFF]))
        if text:
            self.stream.write(text)
            self.stream.flush()

    def finish(self) -> None:
        self.stream.write(self.decoder.decode(b"", final=True) + "\n")
        self.stream.flush()


class TextStreamer:
    """An ``on_token`` callback for a ``tokenizers`` tokenizer: decodes the tokens so far and
    writes what is new, holding back an incomplete character (U+FFFD at the end)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stream=None):
        self.tok, self.stream = tokenizer, stream if stream is not None else sys.stdout
        self.ids = list(prompt_ids)
        self.shown = tokenizer.decode(self.ids)

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.stream.write(text[len(self.shown):])
        self.stream.flush()
        self.shown = text

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        self.stream.write((text[len(self.shown):] if text.startswith(self.shown) else "") + "\n")
        self.stream.flush()


def resolve_tokenizer(spec: str | None, checkpoint: str) -> str:
    """``"bytes"`` or a tokenizers JSON path: ``spec`` when given, else the checkpoint's own
    ``tokenizer.json``, else bytes."""
    if spec:
        return spec
    own = os.path.join(checkpoint, TOKENIZER_FILE)
    return own if os.path.isfile(own) else "bytes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lasp generate", description="generate text from a save_pretrained directory")
    ap.add_argument("--checkpoint", required=True, help="directory with model.yaml and model.safetensors")
    ap.add_argument("--prompt", required=True, help="prompt text")
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes' or a tokenizers JSON (default: the checkpoint's tokenizer.json when it has one, else bytes)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args(argv)

    from .generate import _check_sampling, generate
    from .io import load_pretrained

    tok = None
    try:
        _check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        if not args.prompt:
            raise ValueError("--prompt must not be empty")
        model = load_pretrained(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
        spec = resolve_tokenizer(args.tokenizer, args.checkpoint)
        if spec != "bytes":
            from lasp.train.tokenizer import load_tokenizer

            tok = load_tokenizer(spec)
            if tok.vocab_size > model.config.vocab_size:
                raise ValueError(f"--tokenizer: {spec} has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
        elif model.config.vocab_size < BYTE_VOCAB:
            raise ValueError(f"the byte-level tokenizer needs vocab_size >= 256; {args.checkpoint} has {model.config.vocab_size}")
    except (ValueError, OSError) as e:
        print(f"lasp generate: {e}", file=sys.stderr)
        return 2
    if tok is None and model.config.vocab_size > BYTE_VOCAB:
        print(f"lasp generate: warning: byte-level tokens for a model with vocab_size={model.config.vocab_size} "
              "(no tokenizer.json in the checkpoint; pass --tokenizer PATH); ids >= 256 print as U+FFFD", file=sys.stderr)
    prompt = encode_bytes(args.prompt) if tok is None else tok.encode(args.prompt)
    if not prompt:
        print("lasp generate: --prompt encodes to no tokens", file=sys.stderr)
        return 2
    ids = torch.tensor([prompt], dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = ByteStreamer() if tok is None else TextStreamer(tok, prompt)
    sys.stdout.write(decode_bytes(prompt) if tok is None else streamer.shown)  # invalid bytes print as U+FFFD
    sys.stdout.flush()
    generate(
        model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, on_token=streamer, generator=gen,
    )
    streamer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
