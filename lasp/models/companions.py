"""The files that travel with a model's weights (tokenizer, chat template, generation and processor
configs) and the special token ids they define. ``lasp convert`` and ``lasp export`` copy them
along, so a converted or exported directory tokenises, chats and generates like its source.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

#: every file of these names (globs) in a model directory is copied beside converted/exported weights
COMPANION_PATTERNS = (
    "tokenizer*",  # tokenizer.json, tokenizer_config.json, tokenizer.model (sentencepiece), ...
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",  # vocab.json (BPE), vocab.txt (WordPiece)
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template*",  # chat_template.jinja, chat_template.json
    "generation_config.json",
    "*preprocessor_config.json",  # preprocessor_config.json, video_preprocessor_config.json
    "processor_config.json",
)
#: directories copied whole (transformers' extra named chat templates)
COMPANION_DIRS = ("additional_chat_templates",)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def companion_files(src: str | os.PathLike) -> list[str]:
    """Names of the companion files and directories in ``src`` (sorted)."""
    src = os.fspath(src)
    found = {os.path.basename(p) for pat in COMPANION_PATTERNS for p in glob.glob(os.path.join(glob.escape(src), pat))
             if os.path.isfile(p)}
    found |= {d for d in COMPANION_DIRS if os.path.isdir(os.path.join(src, d))}
    return sorted(found)


def copy_companions(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy every companion file of ``src`` into ``dst``; returns the names copied."""
    names = companion_files(src)
    if os.path.realpath(src) == os.path.realpath(dst):
        return names
    os.makedirs(dst, exist_ok=True)
    for name in names:
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.copytree(s, d, dirs_exist_ok=True)
        else:
            shutil.copyfile(s, d)
    return names


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def token_ids(src: str | os.PathLike) -> dict:
    """``{bos_token_id, eos_token_id, pad_token_id}`` (those known) of model directory ``src``: its
    ``config.json`` (top level, else ``text_config``), then ``generation_config.json`` for the rest."""
    src = os.fspath(src)
    cfg = _read_json(os.path.join(src, "config.json"))
    sources = [cfg, cfg.get("text_config") or {}, _read_json(os.path.join(src, "generation_config.json"))]
    out: dict = {}
    for source in sources:
        for key in TOKEN_ID_KEYS:
            if key not in out and source.get(key) is not None:
                out[key] = source[key]
    return out


def keep_token_ids(dst: str | os.PathLike, ids: dict) -> None:
    """Add ``ids`` missing from ``dst/generation_config.json`` to it (creating it if need be), as
    transformers derives a generation config from the model config: a lasp directory has no
    config.json, so this is where a converted model's bos/eos/pad ids live."""
    path = os.path.join(dst, "generation_config.json")
    gen = _read_json(path) if os.path.isfile(path) else {}
    missing = {k: v for k, v in ids.items() if k in TOKEN_ID_KEYS and v is not None and gen.get(k) is None}
    if missing:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**gen, **missing}, f, indent=2)
