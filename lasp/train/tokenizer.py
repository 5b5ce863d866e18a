"""Tokenizers of the training data: the built-in byte tokenizer (vocab 256) and ``tokenizers``
JSON files (imported lazily; ``pip install tokenizers``), and the separator written between
documents (byte tokenizer: NUL; a tokenizers file: its end-of-text token)."""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np

BYTES_VOCAB = 256
#: separator between documents (byte tokenizer): a NUL byte never occurs in source text
DOC_SEPARATOR = b"\x00"


class ByteTokenizer:
    """The built-in tokenizer: a token is a UTF-8 byte (vocab 256)."""

    name = "bytes"
    vocab_size = BYTES_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


#: special tokens tried, in order, as the end-of-text separator of a tokenizers file
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


class HFTokenizer:
    """A ``tokenizers`` JSON file (imported lazily; ``pip install tokenizers``)."""

    def __init__(self, path: str, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ValueError(
                f"tokenizer {path!r} is a tokenizers JSON, but the 'tokenizers' package is not installed "
                "(pip install tokenizers, or use --tokenizer bytes)"
            ) from e
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer: no such tokenizers JSON file {path!r}")
        self.name = os.path.abspath(path)
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token
        self.eos_id: int | None = None
        for name in [eos_token] if eos_token else EOS_CANDIDATES:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                self.eos_token, self.eos_id = name, tid
                break
        if eos_token and self.eos_id is None:
            raise ValueError(f"--eos-token: {eos_token!r} is not a token of {path}")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str | None, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """``"bytes"``/``None`` -> :class:`ByteTokenizer`; a path -> :class:`HFTokenizer`."""
    if spec in (None, "bytes"):
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token)


def separator(tok: ByteTokenizer | HFTokenizer) -> np.ndarray:
    """The token(s) written between documents: NUL for bytes, the EOS token of a tokenizers file."""
    if isinstance(tok, ByteTokenizer):
        return tok.encode_bytes(DOC_SEPARATOR)
    if tok.eos_id is None:
        raise ValueError(
            f"tokenizer {tok.name}: no end-of-text token found to separate documents (tried {', '.join(EOS_CANDIDATES)}); "
            "name it with --eos-token"
        )
    return np.asarray([tok.eos_id], dtype=np.int64)
