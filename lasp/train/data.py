"""Training data: token memmaps, the embedded corpus, deterministic batches (the tokenizers are
in :mod:`lasp.train.tokenizer`).

On disk a dataset is a directory with three files (four with a tokenizers file):

- ``tokens.bin``: every token id, back to back, in the smallest unsigned type that holds the
  vocab: ``uint8`` (byte tokens, vocab 256), ``uint16`` (vocab <= 65536) or ``uint32``
  (datasets written before uint8 existed store byte tokens as ``uint16``: still read as such);
- ``documents.bin``: the document index, the offset in ``tokens.bin`` of every document start
  (``uint64``, ``D`` of them, the first is 0). A document is one input file followed by its
  separator token, so document ``d`` is ``tokens[start_d : start_{d+1}]`` (never empty);
- ``tokenizer.json``: a copy of the tokenizers file the data was prepared with (none for bytes),
  so the dataset can move without losing its tokenizer;
- ``header.json``: ``{"format": "lasp-tokens", "version": 2, "dtype": "uint8",
  "num_tokens": N, "vocab_size": V, "max_token_id": M, "tokenizer": "bytes" | "tokenizer.json",
  "documents": D, "separator": S, "document_index": "documents.bin",
  "document_index_dtype": "uint64", "skipped_files": K}``. A relative ``tokenizer`` is relative
  to the dataset directory (older datasets hold the absolute path of the original file; when it
  is gone, the dataset's own ``tokenizer.json`` is used). Documents are separated by one token
  ``S`` (byte tokenizer: NUL; a tokenizers file: its end-of-text token). Binary input files
  (a NUL byte, or not UTF-8) are skipped and counted. The token ids are checked against the
  model's vocab before training starts by a scan of ``tokens.bin`` (a vectorised max, done once
  per file version: the result is cached in ``.scan.json`` next to it, keyed by size and mtime),
  so a file changed after ``lasp data prepare`` cannot pass on its header's ``max_token_id``.
  Datasets written before the index (version 1) have no ``document_index``: they train as one
  token stream (``data.pack_documents`` must then be false or unset).

Batches are sampled, not iterated: optimizer step ``s`` of a run with seed ``seed`` draws the
start offsets of its ``grad_accum * dp_size * micro_batch_size`` windows from a generator
seeded by ``(seed, s)``, so a resumed run sees exactly the batches the uninterrupted one saw.
Micro-step ``m`` of DP rank ``d`` takes windows ``[(m * dp_size + d) * B, ... + B)``: the global
batch of a step does not depend on how it is split over DP ranks. Every window has
``seq_len + 1`` tokens; inputs and next-token labels are cut from the FULL window and only
then sharded over the SP group in the run's layout (so the label of a shard's last token is
the first token of the next shard).
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, separator

FORMAT = "lasp-tokens"
VERSION = 2
HEADER = "header.json"
TOKENS = "tokens.bin"
DOCUMENTS = "documents.bin"
INDEX_DTYPE = np.uint64
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}
#: the copy of a tokenizers file inside a dataset directory
TOKENIZER_FILE = "tokenizer.json"
#: the cached result of the token-id scan (:meth:`TokenDataset.max_token_id`)
SCAN_CACHE = ".scan.json"


# ---------------------------------------------------------------------------- prepare


def _iter_files(inputs: list[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .venv, ...
                found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and fnmatch.fnmatch(f, pattern)]
            files += sorted(f for f in found if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"--input: no such file or directory {item!r}")
    if not files:
        raise ValueError(f"--input: no files matching {pattern!r} under {inputs}")
    return files


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocab."""
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "uint32"


def is_binary(data: bytes) -> bool:
    """A file that is not text: it holds a NUL byte or is not valid UTF-8."""
    if b"\x00" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def prepare(
    inputs: list[str], output: str, tokenizer: str | None = "bytes", *, pattern: str = "*", files: list[Path] | None = None,
    overwrite: bool = False, eos_token: str | None = None, log: Callable[[str], None] | None = None, progress_every_s: float = 5.0,
) -> dict:
    """Tokenize text files (directories are walked for ``pattern``, hidden ones skipped) into a
    token memmap.

    Documents are separated by a separator token (byte tokenizer: NUL; a tokenizers file: its
    EOS). Binary files (:func:`is_binary`) are skipped. A non-empty ``output`` is refused unless
    ``overwrite``. The directory is written to a temporary sibling and renamed into place, so a
    crash never leaves a half dataset behind and concurrent preparers do not collide. ``log``
    gets a progress line (files, tokens) every ``progress_every_s`` seconds and one line about
    the skipped files. Returns the header dict.
    """
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--output: {output!r} already exists and is not empty (pass --overwrite to replace it)")
    tok = load_tokenizer(tokenizer, eos_token)
    files = files if files is not None else _iter_files(inputs, pattern)
    dtype = token_dtype(tok.vocab_size)
    sep = separator(tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    num_tokens, max_id, starts, skipped = 0, -1, [], []
    start = last_report = time.monotonic()
    try:
        with open(tmp / TOKENS, "wb") as f:
            for i, path in enumerate(files):
                raw = path.read_bytes()
                if is_binary(raw):
                    skipped.append(path)
                    continue
                starts.append(num_tokens)
                ids = tok.encode_bytes(raw)
                for chunk in (ids, sep):
                    if len(chunk):
                        max_id = max(max_id, int(np.max(chunk)))
                    f.write(np.ascontiguousarray(chunk, dtype=DTYPES[dtype]).tobytes())
                    num_tokens += len(chunk)
                now = time.monotonic()
                if log is not None and now - last_report >= progress_every_s:
                    last_report = now
                    log(f"{i + 1:,}/{len(files):,} files, {num_tokens:,} tokens, {now - start:.0f} s")
        if skipped and log is not None:
            shown = ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            log(f"warning: skipped {len(skipped):,} binary file(s) (a NUL byte or not UTF-8): {shown}")
        if not starts:
            raise ValueError(f"--input: every one of the {len(files):,} files is binary (a NUL byte or not UTF-8): nothing to tokenize")
        header = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype,
            "num_tokens": num_tokens,
            "vocab_size": tok.vocab_size,
            "max_token_id": max_id,
            "tokenizer": "bytes" if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE,
            "documents": len(starts),
            "separator": int(sep[0]),
            "document_index": DOCUMENTS,
            "document_index_dtype": np.dtype(INDEX_DTYPE).name,
            "skipped_files": len(skipped),
        }
        if isinstance(tok, HFTokenizer):
            shutil.copyfile(tok.name, tmp / TOKENIZER_FILE)
        np.asarray(starts, dtype=INDEX_DTYPE).tofile(tmp / DOCUMENTS)
        (tmp / HEADER).write_text(json.dumps(header, indent=2) + "\n")
    except BaseException:
        _rmtree(tmp)
        raise
    old = None
    if out.exists() and overwrite:  # keep the old dataset until the new one is complete
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
        if old is not None:
            _rmtree(old)
    except OSError:
        if (out / HEADER).is_file():  # somebody else finished first (or it already existed)
            _rmtree(tmp)
            return read_header(str(out))
        raise
    return header


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def stdlib_sources() -> list[Path]:
    """The Python standard library's own ``.py`` files (no site-packages, no test suites)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)  # prune: never walk site-packages
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def default_cache_dir() -> str:
    return os.environ.get("LASP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lasp")


def embedded_corpus(cache_dir: str | None = None) -> str:
    """Path of the embedded corpus (stdlib sources, byte tokens), prepared on first use."""

    cache = cache_dir or default_cache_dir()
    out = os.path.join(cache, f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-bytes")
    ready = lambda: os.path.isfile(os.path.join(out, HEADER)) and os.path.isfile(os.path.join(out, DOCUMENTS))  # noqa: E731
    if ready():
        return out
    import fcntl

    os.makedirs(cache, exist_ok=True)
    with open(out + ".lock", "w") as lock:  # concurrent ranks: one prepares, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():  # missing, or written before the document index: (re)write it
            files = stdlib_sources()
            if not files:
                raise ValueError(f"embedded corpus: no .py files under {sysconfig.get_paths()['stdlib']!r}")
            print(f"lasp: preparing the embedded corpus ({len(files)} Python stdlib sources) in {out}", file=sys.stderr, flush=True)
            header = prepare([], out, "bytes", files=files, overwrite=True)
            print(f"lasp: {header['num_tokens']:,} byte tokens ready ({header['documents']:,} documents)", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------- reading


def read_header(path: str) -> dict:
    """Read and check ``path/header.json`` against ``path/tokens.bin`` (ValueError naming the file)."""
    header_path = os.path.join(path, HEADER)
    tokens_path = os.path.join(path, TOKENS)
    if not os.path.isdir(path):
        raise ValueError(f"data.path: no such dataset directory {path!r} (write one with `lasp data prepare`)")
    if not os.path.isfile(header_path):
        raise ValueError(f"data.path: {header_path!r} is missing (write the dataset with `lasp data prepare`)")
    try:
        with open(header_path, encoding="utf-8") as f:
            header = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{header_path}: corrupt data header (not JSON: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{header_path}: corrupt data header (expected format {FORMAT!r})")
    for key in ("dtype", "num_tokens", "vocab_size"):
        if key not in header:
            raise ValueError(f"{header_path}: corrupt data header (missing {key!r})")
    if header["dtype"] not in DTYPES:
        raise ValueError(f"{header_path}: corrupt data header (dtype must be one of {list(DTYPES)}, got {header['dtype']!r})")
    n = header["num_tokens"]
    if not isinstance(n, int) or n < 0 or not isinstance(header["vocab_size"], int) or header["vocab_size"] < 1:
        raise ValueError(f"{header_path}: corrupt data header (num_tokens/vocab_size must be non-negative ints)")
    if not os.path.isfile(tokens_path):
        raise ValueError(f"data.path: {tokens_path!r} is missing")
    expected = n * np.dtype(DTYPES[header["dtype"]]).itemsize
    actual = os.path.getsize(tokens_path)
    if actual != expected:
        raise ValueError(
            f"{header_path}: corrupt data header (num_tokens={n} x {header['dtype']} = {expected} bytes, "
            f"but {tokens_path} has {actual} bytes)"
        )
    check_document_index(path, header)
    return header


def check_document_index(path: str, header: dict) -> None:
    """ValueError unless the header's document index (if it names one) has ``documents`` uint64 entries."""
    name = header.get("document_index")
    if name is None:
        return
    index_path = os.path.join(path, str(name))
    header_path = os.path.join(path, HEADER)
    if header.get("document_index_dtype", "uint64") != np.dtype(INDEX_DTYPE).name or not isinstance(header.get("documents"), int):
        raise ValueError(f"{header_path}: corrupt data header (document_index needs documents: int and document_index_dtype: uint64)")
    if not os.path.isfile(index_path):
        raise ValueError(f"data.path: {index_path!r} (the document index named in {header_path}) is missing")
    expected = header["documents"] * np.dtype(INDEX_DTYPE).itemsize
    if os.path.getsize(index_path) != expected:
        raise ValueError(
            f"{header_path}: corrupt document index ({header['documents']} documents x 8 bytes = {expected} bytes, "
            f"but {index_path} has {os.path.getsize(index_path)} bytes)"
        )


class TokenDataset:
    """A read-only memmap of a prepared dataset directory."""

    def __init__(self, path: str):
        self.path = path
        self.header = read_header(path)
        self.num_tokens: int = self.header["num_tokens"]
        self.vocab_size: int = self.header["vocab_size"]
        self.tokens = np.memmap(os.path.join(path, TOKENS), dtype=DTYPES[self.header["dtype"]], mode="r", shape=(self.num_tokens,))
        self._max_token_id: int | None = None
        #: ``[D]`` int64 document starts (strictly increasing from 0), or None (a dataset without an index)
        self.doc_starts: np.ndarray | None = None
        if self.header.get("document_index") is not None:
            starts = np.fromfile(os.path.join(path, self.header["document_index"]), dtype=INDEX_DTYPE).astype(np.int64)
            if len(starts) and (starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= max(self.num_tokens, 1)):
                raise ValueError(f"{path}/{self.header['document_index']}: corrupt document index (starts must rise strictly from 0 below num_tokens)")
            self.doc_starts = starts

    @property
    def has_documents(self) -> bool:
        """Whether the dataset records document boundaries (``documents.bin``)."""
        return self.doc_starts is not None

    @property
    def max_token_id(self) -> int:
        """The largest token id IN ``tokens.bin`` (scanned, not read from the header: see the
        module docstring; the scan is cached per file size and mtime)."""
        if self._max_token_id is None:
            self._max_token_id = scan_max_token_id(self.path, self.tokens)
        return self._max_token_id

    def tokenizer(self) -> "ByteTokenizer | HFTokenizer":
        """The tokenizer the data was prepared with (see the module docstring for where it is found)."""
        return load_tokenizer(dataset_tokenizer_path(self.path, self.header))

    def check_fits(self, seq_len: int, model_vocab_size: int | None = None) -> None:
        """ValueError unless a ``seq_len + 1`` window fits and token ids fit the model's vocab."""
        if self.num_tokens < seq_len + 1:
            raise ValueError(f"data.path: {self.path!r} has {self.num_tokens} tokens, fewer than train.seq_len + 1 = {seq_len + 1}")
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            raise ValueError(
                f"data.path: the dataset's vocab_size {self.vocab_size} exceeds the model's vocab_size {model_vocab_size}"
            )
        if model_vocab_size is not None and self.max_token_id >= model_vocab_size:
            first = int(np.argmax(np.asarray(self.tokens) >= model_vocab_size))
            claimed = self.header.get("max_token_id")
            changed = (f"; its {HEADER} says max_token_id {claimed}: {TOKENS} was changed after `lasp data prepare`"
                       if isinstance(claimed, int) and claimed != self.max_token_id else "")
            raise ValueError(
                f"data.path: {self.path!r} holds token id {self.max_token_id}, but the model's vocab_size is "
                f"{model_vocab_size} (ids must be < vocab_size; the first such id is at offset {first:,} of "
                f"{os.path.join(self.path, TOKENS)}{changed})"
            )


def scan_max_token_id(path: str, tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """The largest id in ``tokens`` (the memmap of ``path/tokens.bin``; -1 when empty), cached in
    ``path/.scan.json`` by the file's size and mtime (best effort: a read-only dataset is
    scanned every time; the max is vectorised, chunked so memory stays bounded)."""
    tokens_path, cache_path = os.path.join(path, TOKENS), os.path.join(path, SCAN_CACHE)
    st = os.stat(tokens_path)
    key = {"tokens_size": st.st_size, "tokens_mtime_ns": st.st_mtime_ns}
    try:
        with open(cache_path, encoding="utf-8") as f:
            cached = json.load(f)
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("max_token_id"), int):
            return cached["max_token_id"]
    except (OSError, ValueError, AttributeError):
        pass
    m = -1
    for lo in range(0, len(tokens), chunk):
        m = max(m, int(np.max(tokens[lo : lo + chunk])))
    try:
        fd, tmp = tempfile.mkstemp(prefix=SCAN_CACHE + ".", dir=path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**key, "max_token_id": m}, f)
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return m


def dataset_tokenizer_path(path: str, header: dict) -> str:
    """``"bytes"`` or the path of the dataset's tokenizers file: ``header["tokenizer"]`` relative to
    the dataset directory; an absolute path that no longer exists falls back to the dataset's own
    ``tokenizer.json`` (ValueError naming both when neither exists)."""
    spec = header.get("tokenizer", "bytes")
    if spec in (None, "bytes"):
        return "bytes"
    full = spec if os.path.isabs(spec) else os.path.join(path, spec)
    if os.path.isfile(full):
        return full
    own = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(own):
        return own
    raise ValueError(
        f"data.path: the tokenizer of {path!r} is gone: {HEADER} names {spec!r} and there is no {own!r} "
        f"(copy the tokenizers JSON there, or prepare the data again)"
    )


# ---------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class BatchSpec:
    """How a run cuts its global batches (see the module docstring)."""

    seq_len: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int
    seed: int

    @property
    def windows_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.seq_len


def window_starts(spec: BatchSpec, step: int, num_tokens: int) -> np.ndarray:
    """Start offsets of the ``windows_per_step`` windows of optimizer step ``step`` (0-based)."""
    rng = np.random.Generator(np.random.PCG64([spec.seed, step]))
    return rng.integers(0, num_tokens - spec.seq_len, size=spec.windows_per_step, dtype=np.int64)


def micro_batch_windows(data: TokenDataset, spec: BatchSpec, step: int, micro_step: int, dp_rank: int) -> list[tuple[int, np.ndarray]]:
    """``(start, window [seq_len + 1] int64)`` of DP rank ``dp_rank``'s ``micro_batch_size``
    windows for ``(step, micro_step)``."""
    starts = window_starts(spec, step, data.num_tokens)
    first = (micro_step * spec.dp_size + dp_rank) * spec.micro_batch_size
    return [(int(s), np.asarray(data.tokens[s : s + spec.seq_len + 1], dtype=np.int64)) for s in starts[first : first + spec.micro_batch_size]]


def micro_batch(
    data: TokenDataset, spec: BatchSpec, step: int, micro_step: int, dp_rank: int, sp_rank: int, sp_size: int, layout: str
):
    """``(input_ids, labels)``, each ``[micro_batch_size, seq_len / sp_size]`` int64: this rank's
    SP shard (in ``layout`` order) of its DP rank's windows for ``(step, micro_step)``."""
    import torch

    from lasp.parallel import shard_sequence

    windows = torch.from_numpy(np.stack([w for _, w in micro_batch_windows(data, spec, step, micro_step, dp_rank)]))
    inputs, labels = windows[:, :-1], windows[:, 1:]  # shift on the full window, THEN shard
    return (
        shard_sequence(inputs, sp_rank, sp_size, layout).contiguous(),
        shard_sequence(labels, sp_rank, sp_size, layout).contiguous(),
    )
