"""``lasp generate --checkpoint DIR --prompt TEXT``: sample from a saved model, streaming.

``DIR`` is a :func:`lasp.models.save_pretrained` directory (``model.yaml`` +
``model.safetensors``; ``lasp export`` writes one from a training checkpoint). Text is
tokenised at the byte level: token ids are the bytes of the UTF-8 text (vocab 256), the
tokenizer of the tiny configs and the trainer's built-in data pipeline.
"""
from __future__ import annotations

import argparse
import codecs
import sys

import torch

BYTE_VOCAB = 256


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lasp generate", description="generate text from a save_pretrained directory")
    ap.add_argument("--checkpoint", required=True, help="directory with model.yaml and model.safetensors")
    ap.add_argument("--prompt", required=True, help="prompt text (byte-level tokens)")
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

    try:
        _check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        if not args.prompt:
            raise ValueError("--prompt must not be empty")
        model = load_pretrained(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
        if model.config.vocab_size < BYTE_VOCAB:
            raise ValueError(f"the byte-level tokenizer needs vocab_size >= 256; {args.checkpoint} has {model.config.vocab_size}")
    except (ValueError, OSError) as e:
        print(f"lasp generate: {e}", file=sys.stderr)
        return 2
    if model.config.vocab_size > BYTE_VOCAB:
        print(f"lasp generate: warning: vocab_size={model.config.vocab_size} > 256; ids >= 256 print as U+FFFD", file=sys.stderr)
    prompt = encode_bytes(args.prompt)
    ids = torch.tensor([prompt], dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = ByteStreamer()
    sys.stdout.write(decode_bytes(prompt))  # invalid bytes print as U+FFFD
    sys.stdout.flush()
    generate(
        model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, on_token=streamer, generator=gen,
    )
    streamer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
