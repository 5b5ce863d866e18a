"""The Hugging Face tensors that are not one lasp tensor each: routed experts and Qwen3-Next's fused
GDN projections, read (into :class:`~lasp.models.shards.TensorSource` s) and written back.

Routed experts. lasp holds each MoE layer's experts as transformers' modules do, 3-D
``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``mlp.experts.down_proj
[E, H, I]``. A checkpoint stores them in one of two layouts:

- ``per_expert``: ``mlp.experts.N.gate_proj.weight [I, H]``, ``up_proj [I, H]``, ``down_proj [H, I]``
  for every expert N. What transformers 5.24's ``save_pretrained`` writes for ``Qwen3_5MoeFor*`` and
  ``Qwen3NextForCausalLM`` (its ``conversion_mapping`` merges them into the 3-D parameters on load
  and splits them again on save);
- ``fused``: the 3-D tensors themselves (transformers loads those as they are).

Reading assembles ``[first, first + count)`` experts only (an expert-parallel rank's share: one
expert's pieces read at a time, or the rows of a fused tensor sliced from the file). Writing
follows the layout asked for (``--like``'s, default ``per_expert``).

Qwen3-Next's Gated DeltaNet (``architecture: qwen3_next``). Its checkpoints fuse the input
projections per key head: ``in_proj_qkvz`` rows are, for each of the ``nk`` key heads, ``[q (dk) |
k (dk) | v (r dv) | z (r dv)]`` (``r = nv / nk`` value heads per key head), and ``in_proj_ba`` rows
``[b (r) | a (r)]``; transformers' ``fix_query_key_value_ordering`` regroups them into Qwen3.5's
``[q | k | v]``, ``z``, ``b``, ``a``. lasp holds Qwen3.5's four tensors: each is a fixed set of
rows of the fused one (:func:`fused_gdn_rows`), so reading gathers rows and writing scatters them
back, bit for bit.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from .config import ModelConfig
from .shards import StoredTensor, TensorSource, TensorSpec, dtype_from_safetensors

EXPERT_LAYOUTS = ("per_expert", "fused")
DEFAULT_EXPERT_LAYOUT = "per_expert"  # transformers 5.24's save_pretrained
#: an expert piece of the per-expert layout, after the decoder prefix ("layers.N.mlp.experts.K.gate_proj.weight")
EXPERT_PIECE = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
#: lasp GDN tensor -> the Qwen3-Next tensor it is a set of rows of
GDN_FUSED = {"in_proj_qkv.weight": "in_proj_qkvz.weight", "in_proj_z.weight": "in_proj_qkvz.weight",
             "in_proj_b.weight": "in_proj_ba.weight", "in_proj_a.weight": "in_proj_ba.weight"}


def expert_layout(names) -> str:
    """The expert layout of a checkpoint holding tensors ``names`` (``per_expert`` when it has no experts)."""
    return "fused" if any(n.endswith(FUSED_EXPERTS[0]) for n in names) else "per_expert"


def read_stored(file: str, name: str, first: int | None = None, count: int | None = None) -> torch.Tensor:
    """Tensor ``name`` of safetensors ``file`` (open only meanwhile); with ``first``/``count`` only
    those rows of its first dim are read."""
    with safe_open(file, framework="pt") as f:
        if first is None:
            return f.get_tensor(name)
        return f.get_slice(name)[first:first + count]


def stored_source(t: StoredTensor, name: str) -> TensorSource:
    """The stored tensor ``name`` as it is (rows readable alone)."""
    return TensorSource(t.shape, dtype_from_safetensors(t.dtype), lambda: read_stored(t.file, name),
                        lambda first, count: read_stored(t.file, name, first, count))


def conv_source(t: StoredTensor, name: str) -> TensorSource:
    """HF's ``conv1d.weight [C, 1, W]`` as lasp's ``conv_weight [C, W]``."""
    return TensorSource((t.shape[0], *t.shape[2:]), dtype_from_safetensors(t.dtype), lambda: read_stored(t.file, name)[:, 0].contiguous())


def per_expert_source(pieces: list[list[tuple[StoredTensor, str]]]) -> TensorSource:
    """lasp's 3-D experts tensor from per-expert pieces: ``pieces[e]`` is ``[gate, up]`` (-> ``gate_up_proj``,
    rows concatenated) or ``[down]`` of expert e. Each expert's pieces are read one at a time into
    the output."""
    first_t = pieces[0][0][0]
    rows = sum(p[0].shape[0] for p in pieces[0])
    shape, dtype = (len(pieces), rows, *first_t.shape[1:]), dtype_from_safetensors(first_t.dtype)

    def read_rows(first: int, count: int) -> torch.Tensor:
        out = torch.empty((count, *shape[1:]), dtype=dtype)
        for j in range(count):
            at = 0
            for t, name in pieces[first + j]:
                out[j, at:at + t.shape[0]] = read_stored(t.file, name)
                at += t.shape[0]
        return out

    return TensorSource(shape, dtype, lambda: read_rows(0, shape[0]), read_rows)


def fused_gdn_rows(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``{lasp GDN tensor name (after "attn."): the rows of its Qwen3-Next fused tensor}`` (see the module docstring)."""
    nk, nv, dk, dv = cfg.linear_dims
    r = nv // nk
    group = 2 * dk + 2 * r * dv
    heads = torch.arange(nk)[:, None]

    def take(start: int, width: int, size: int) -> torch.Tensor:
        return (heads * size + start + torch.arange(width)[None, :]).reshape(-1)

    qkv = torch.cat([take(0, dk, group), take(dk, dk, group), take(2 * dk, r * dv, group)])
    return {"in_proj_qkv.weight": qkv, "in_proj_z.weight": take(2 * dk + r * dv, r * dv, group),
            "in_proj_b.weight": take(0, r, 2 * r), "in_proj_a.weight": take(r, r, 2 * r)}


def gdn_rows_source(t: StoredTensor, name: str, rows: torch.Tensor) -> TensorSource:
    """The ``rows`` of stored tensor ``name`` (a Qwen3-Next fused GDN projection)."""
    return TensorSource((rows.numel(), *t.shape[1:]), dtype_from_safetensors(t.dtype), lambda: read_stored(t.file, name)[rows])


class OneTensorCache:
    """Reads rows of sources that cannot read rows alone (``rows`` None) from one full read, keeping
    the last source's tensor only: a writer that asks for all the experts of one tensor, then of
    the next, reads each once."""

    def __init__(self):
        self.src, self.tensor = None, None

    def rows(self, src: TensorSource, first: int, count: int) -> torch.Tensor:
        if src.rows is not None:
            return src.rows(first, count)
        if self.src is not src:
            self.src, self.tensor = None, None  # drop the last one before reading the next
            self.src, self.tensor = src, src.read()
        return self.tensor[first:first + count]


def hf_write_entries(cfg: ModelConfig, sources: Mapping[str, TensorSource], name_of: Callable[[str], str],
                     experts: str = DEFAULT_EXPERT_LAYOUT, dtype: torch.dtype | None = None
                     ) -> tuple[list[TensorSpec], dict[str, Callable[[], torch.Tensor]]]:
    """``(specs, {HF name: read()})`` that write lasp ``sources`` as an HF checkpoint: ``name_of``
    gives a plain tensor's HF name; experts in layout ``experts``; Qwen3-Next's GDN projections
    re-fused; the GDN conv reshaped. ``dtype``: the written dtype (None: each source's)."""
    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"experts layout must be one of {EXPERT_LAYOUTS}, got {experts!r}")
    specs, readers, cache = [], {}, OneTensorCache()
    fused_rows = fused_gdn_rows(cfg) if cfg.architecture == "qwen3_next" else {}

    def add(hf_name: str, shape, src_dtype, read) -> None:
        specs.append(TensorSpec(hf_name, tuple(shape), dtype or src_dtype))
        readers[hf_name] = read

    for name, src in sources.items():
        tail = name.rsplit(".attn.", 1)[-1] if ".attn." in name else None
        if tail in fused_rows:
            if tail not in ("in_proj_qkv.weight", "in_proj_b.weight"):
                continue  # written with its partner
            partner = name[: -len(tail)] + ("in_proj_z.weight" if tail == "in_proj_qkv.weight" else "in_proj_a.weight")
            parts = [(src, fused_rows[tail]), (sources[partner], fused_rows[partner.rsplit(".attn.", 1)[1]])]
            add(name_of(name), (sum(r.numel() for _, r in parts), *src.shape[1:]), src.dtype,
                lambda parts=parts: _scatter_rows(parts))
        elif name.endswith("conv_weight"):
            add(name_of(name), (src.shape[0], 1, *src.shape[1:]), src.dtype, lambda src=src: src.read()[:, None, :])
        elif name.endswith(FUSED_EXPERTS[0]) and experts == "per_expert":
            half = src.shape[1] // 2
            base = name_of(name)[: -len("gate_up_proj")]
            for e in range(src.shape[0]):
                for part, lo in (("gate_proj", 0), ("up_proj", half)):
                    add(f"{base}{e}.{part}.weight", (half, *src.shape[2:]), src.dtype,
                        lambda src=src, e=e, lo=lo: cache.rows(src, e, 1)[0, lo:lo + half])
        elif name.endswith(FUSED_EXPERTS[1]) and experts == "per_expert":
            base = name_of(name)[: -len("down_proj")]
            for e in range(src.shape[0]):
                add(f"{base}{e}.down_proj.weight", src.shape[1:], src.dtype, lambda src=src, e=e: cache.rows(src, e, 1)[0])
        else:
            add(name_of(name), src.shape, src.dtype, src.read)
    return specs, readers


def _scatter_rows(parts: list[tuple[TensorSource, torch.Tensor]]) -> torch.Tensor:
    """The fused tensor whose ``rows`` are each part's tensor."""
    out = None
    with torch.no_grad():
        for src, rows in parts:
            t = src.read()
            if out is None:
                out = torch.empty((sum(r.numel() for _, r in parts), *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[rows.to(t.device)] = t.to(out.dtype)
    return out
