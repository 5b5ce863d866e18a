"""Safetensors weight directories, written and read one tensor at a time.

Writing (:func:`write_weights`, the one writer behind ``save_pretrained``, ``to_hf``, ``lasp export``
and ``lasp convert``): the tensors' names, shapes and dtypes are known first, so the shards are
planned before any data exists; each shard's header is written, then each tensor is asked for
(``read(name)``), cast to its planned dtype (the only rounding) and written 64 MiB at a time, and
dropped. No state dict is ever held, nor a cast copy of a whole tensor. Files follow Hugging Face's layout: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` of at most ``max_shard_size`` bytes each (a tensor larger than
that gets a shard of its own) listed by ``model.safetensors.index.json`` (``metadata.total_size``,
``weight_map``).

A write replaces the model in the directory and nothing else: shards are written as
``*.partial`` files; once all are complete, the weight files and indexes the new write does not
own (``model*.safetensors``, ``model.safetensors.index.json``, ``pytorch_model*.bin`` and its
index, and the caller's ``stale`` names, e.g. the other format's config) are deleted and the new
files renamed into place. Tokenizer files and anything else in the directory are kept.

Reading (:func:`weight_map`, :func:`weight_entries`): ``{name in the files: file}`` (with dtype
and shape) from the headers of the shards the index lists (so a stray file is never read; a
listed shard that is missing is one error naming it) or of ``model.safetensors``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
CHUNK_BYTES = 64 * 2**20  # a tensor is cast and written in pieces of at most this many source bytes
# weight files a model directory may hold besides the new ones: removed by a write
_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", INDEX_FILE, "model*.safetensors.partial",
                    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_SAFETENSORS = {v: k for k, v in _DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, name: str = "max_shard_size") -> int:
    """Bytes of ``value``: an int, or ``"500MB"``, ``"5GB"`` (powers of 10), ``"2GiB"`` (powers of 2),
    ``"1000"`` (bytes). ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{name}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes, got {value!r}")
        size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{name}: must be at least 1 byte, got {value!r}")
    return size


def dtype_from_safetensors(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    return _FROM_SAFETENSORS[name]


@dataclass(frozen=True)
class TensorSpec:
    """What will be written under ``name``: its shape and (target) dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of ``specs`` of at most ``max_bytes`` each (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards (Hugging Face's)."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write, read only when its turn comes: ``shape``, ``dtype`` (before any cast), ``read()``;
    ``rows(first, count)``, when given, reads only ``[first:first + count]`` of the first dim (one
    rank's experts, one expert), else :meth:`read_rows` slices ``read()``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    rows: Callable[[int, int], torch.Tensor] | None = None

    def read_rows(self, first: int, count: int) -> torch.Tensor:
        """``[first:first + count]`` of the first dim."""
        return self.rows(first, count) if self.rows is not None else self.read()[first:first + count]


def model_sources(model: torch.nn.Module) -> dict[str, TensorSource]:
    """``{state-dict name: TensorSource}`` of a materialised model (no copies: each ``read`` hands
    the detached parameter itself; the writer casts and moves it one at a time)."""
    return {n: TensorSource(tuple(t.shape), t.dtype, lambda t=t: t) for n, t in model.state_dict().items()}


@dataclass
class WrittenWeights:
    """What :func:`write_weights` did: files written (in ``out_dir``), bytes, files removed; and
    the tensors a ``--like`` export copied unchanged from its model (set by the caller)."""

    files: list[str]
    total_size: int
    removed: list[str]
    copied_through: list[str] = field(default_factory=list)


def write_weights(
    out_dir: str | os.PathLike,
    specs: list[TensorSpec],
    read: Callable[[str], torch.Tensor],
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    stale: Iterable[str] = (),
) -> WrittenWeights:
    """Write the tensors of ``specs`` (``read(name)`` gives each, called once, in file order) into
    ``out_dir`` as one file or shards with an index; see the module docstring for what is replaced.

    ``read``'s tensor must have the spec's shape; it is cast to the spec's dtype here.
    """
    max_bytes = parse_size(max_shard_size, "max_shard_size")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names must be unique, got duplicates {sorted({n for n in names if names.count(n) > 1})}")
    for s in specs:
        if s.dtype not in _DTYPES:
            raise ValueError(f"dtype of {s.name!r}: safetensors has no {s.dtype}")
    os.makedirs(out_dir, exist_ok=True)
    shards = plan_shards(specs, max_bytes)
    files = shard_names(len(shards))
    partial = [os.path.join(out_dir, f + ".partial") for f in files]
    try:
        for shard, path in zip(shards, partial):
            _write_file(path, shard, read)
    except BaseException:
        for path in partial:
            if os.path.exists(path):
                os.remove(path)
        raise
    removed = _remove_stale(out_dir, keep=set(files), stale=stale)
    for f, path in zip(files, partial):
        os.replace(path, os.path.join(out_dir, f))
    total = sum(s.nbytes for s in specs)
    if len(files) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {s.name: f for f, shard in zip(files, shards) for s in shard}}
        tmp = os.path.join(out_dir, INDEX_FILE + ".partial")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
        os.replace(tmp, os.path.join(out_dir, INDEX_FILE))
    return WrittenWeights(files, total, removed)


def _write_file(path: str, shard: list[TensorSpec], read: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file, streamed: header (data sorted by element size, so every tensor stays
    aligned), then each tensor's bytes as it is read."""
    order = sorted(shard, key=lambda s: -torch.empty((), dtype=s.dtype).element_size())  # stable
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in order:
        header[s.name] = {"dtype": _DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in order:
            t = read(s.name)
            if tuple(t.shape) != s.shape:
                raise ValueError(f"tensor {s.name!r}: expected shape {list(s.shape)}, got {list(t.shape)}")
            flat = t.detach().reshape(-1)
            step = max(1, CHUNK_BYTES // flat.element_size())
            for i in range(0, flat.numel(), step):  # cast and copy to the host a chunk at a time
                piece = flat[i:i + step].to(device="cpu", dtype=s.dtype).contiguous()
                f.write(memoryview(piece.view(torch.uint8).numpy()))
            del t, flat


def _remove_stale(out_dir: str | os.PathLike, keep: set[str], stale: Iterable[str]) -> list[str]:
    removed = []
    candidates = {os.path.basename(p) for pat in _WEIGHT_PATTERNS for p in glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), pat))}
    candidates |= {n for n in stale if os.path.isfile(os.path.join(out_dir, n))}
    for name in sorted(candidates - keep):
        if name.endswith(".partial") and name[: -len(".partial")] in keep:
            continue  # this write's own files
        os.remove(os.path.join(out_dir, name))
        removed.append(name)
    return removed


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor of a weight directory is: its ``file``, safetensors ``dtype`` string
    (``"BF16"``, ``"F8_E4M3"``, ...) and ``shape``, from the file's header (no data read)."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def read_header(file: str) -> dict[str, StoredTensor]:
    """``{name: StoredTensor}`` of safetensors ``file`` from its JSON header alone."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        return {k: StoredTensor(file, v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, MemoryError, OverflowError):
        raise ValueError(f"{file}: not a safetensors file (its header cannot be read)") from None


def weight_entries(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """``{tensor name: StoredTensor}`` of directory ``path``: the shards its
    ``model.safetensors.index.json`` lists (each file's own keys), or ``model.safetensors``.
    A shard the index lists but the directory lacks is a ``ValueError`` naming it."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (no weight_map of tensor names to files)") from None
        missing = [name for name in files if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise ValueError(f"{os.fspath(path)}: {INDEX_FILE} lists shard(s) that are missing: {', '.join(missing)}")
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"path: {os.fspath(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    out: dict[str, StoredTensor] = {}
    for name in files:
        out.update(read_header(os.path.join(path, name)))
    return out


def has_weights(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds safetensors weights (an index or ``model.safetensors``)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in (INDEX_FILE, SINGLE_FILE))


def weight_map(path: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of directory ``path`` (see :func:`weight_entries`)."""
    return {name: t.file for name, t in weight_entries(path).items()}
