"""The fp32 master weights of a DeepSpeed checkpoint (any ZeRO stage), one tensor at a time, for
``lasp export``.

Every file is opened with ``torch.load(mmap=True)``: nothing is read until a tensor is asked
for, and then only that tensor's bytes (Adam moments and the other ranks' states stay on disk).

- ZeRO-0: the model-states file holds the module (in the training dtype) and, for bf16 / fp16,
  the optimizer's flat fp32 master groups; each parameter is a view of them.
- ZeRO-1/2: each rank's optimizer file holds its partition of every flat fp32 group; a
  parameter is the range of the virtual concatenation of the ranks' partitions given by the
  group's parameter shapes and alignment paddings (DeepSpeed's own ``zero_to_fp32``
  concatenates all partitions first, i.e. the whole model in fp32; here only a parameter that
  straddles two partitions is copied, one at a time).
- ZeRO-3: DeepSpeed's ``zero_to_fp32`` in ``lazy_mode`` (its ``GatheredTensor``: each
  parameter gathered from the ranks' flat partitions when read).
- expert parallelism: fp32 runs: the module of the model-states file (there the fp32 master),
  each routed expert tensor the concatenation of the EP ranks' ``experts-ep{r}.pt``
  (:mod:`lasp.train.expert_parallel`); bf16 / fp16 runs: the fp32 masters from the optimizer
  files: ZeRO-0's per-EP-rank ``expp_rank_{r}`` files (the replicated parameters, then that EP
  rank's experts), ZeRO-1/2's per-rank partitions located by their ``param_slice_mappings``. An
  expert tensor's experts are read EP rank by EP rank (one expert at a time for a per-expert
  Hugging Face export).
"""
from __future__ import annotations

import glob
import math
import os

import torch

from lasp.models.shards import TensorSource

from ..models.moe import expert_parameters
from .expert_parallel import expert_files


def checkpoint_sources(ckpt_dir: str, tag: str, model: torch.nn.Module) -> dict[str, TensorSource]:
    """``{name: TensorSource}`` (fp32) of checkpoint ``tag`` for ``model``'s state dict (the meta
    device is fine; it gives the names, the shapes and a ZeRO-0 checkpoint's parameter order).

    ``ValueError`` naming missing / unexpected tensors; OSError / RuntimeError / KeyError from
    unreadable files are the caller's to report.
    """
    tag_dir = os.path.join(ckpt_dir, tag)
    optim_files = sorted(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")))
    if expert_files(tag_dir):
        readers = _expert_parallel_readers(tag_dir, expert_files(tag_dir), model)
    elif optim_files:
        stage = _load(optim_files[0])["optimizer_state_dict"]["zero_stage"]
        readers = _zero3_readers(ckpt_dir, tag) if stage == 3 else _zero12_readers(tag_dir, optim_files)
    else:
        readers = _zero0_readers(tag_dir, model)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(readers)), sorted(set(readers) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights of {tag!r} do not match the model: missing {missing}, unexpected {unexpected}")
    return {n: TensorSource(tuple(t.shape), torch.float32, lambda r=readers[n], s=tuple(t.shape), n=n: _check(r(), s, n),
                            readers[n].rows if isinstance(readers[n], ExpertRows) else None)
            for n, t in expected.items()}


def _check(t: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {list(t.shape)}, the model {list(shape)}")
    return t.float()


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def split_flat(flats: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor] | None:
    """Consecutive pieces of ``sizes`` elements of the concatenation of the 1-D ``flats``, as views
    (a piece that straddles two of them is copied); None if they hold fewer elements than that."""
    if sum(f.numel() for f in flats) < sum(sizes):
        return None
    out, i, off = [], 0, 0
    for n in sizes:
        pieces = []
        while n > 0:
            while off == flats[i].numel():
                i, off = i + 1, 0
            take = min(n, flats[i].numel() - off)
            pieces.append(flats[i][off:off + take])
            n, off = n - take, off + take
        out.append(flats[0][:0] if not pieces else pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    return out


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj.reshape(-1)]
    return [t for item in obj for t in _flat_tensors(item)]


def _zero0_readers(tag_dir: str, model: torch.nn.Module) -> dict:
    """ZeRO-0: the module's tensors, replaced by the optimizer's fp32 master copy (``fp32_groups``,
    in ``model.parameters()`` order) when the checkpoint has one (bf16 / fp16 runs)."""
    files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if not files:
        raise ValueError(f"--checkpoint: {tag_dir!r} holds no DeepSpeed model states")
    saved = _load(files[0])
    tensors = dict(saved["module"])
    optim = saved.get("optimizer")
    groups = (optim.get("fp32_groups") or optim.get("fp32_groups_flat")) if isinstance(optim, dict) else None
    params = list(model.parameters())
    views = split_flat(_flat_tensors(groups), [p.numel() for p in params]) if groups else None
    if views is not None and sum(v.numel() for v in views) == sum(f.numel() for f in _flat_tensors(groups)):
        by_id = {id(p): v.view(p.shape) for p, v in zip(params, views)}
        tensors.update({name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False)})
    return {n: (lambda t=t: t) for n, t in tensors.items()}


def _zero12_readers(tag_dir: str, optim_files: list[str]) -> dict:
    """ZeRO-1/2: each parameter from the ranks' fp32 partitions (see the module docstring)."""
    model_files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
    if not model_files:
        raise ValueError(f"--checkpoint: {tag_dir!r} holds no DeepSpeed model states")
    saved = _load(model_files[0])
    states = [_load(f)["optimizer_state_dict"] for f in optim_files]
    partition_count = states[0]["partition_count"]
    world = max(partition_count) if isinstance(partition_count, list) else partition_count
    if world != len(states):
        raise ValueError(f"--checkpoint: {tag_dir!r} has {len(states)} optimizer files for {world} ranks")
    paddings = states[0].get("param_alignment_paddings")
    readers = {}
    for g, shapes in enumerate(saved["param_shapes"]):
        numels = [math.prod(s) for s in shapes.values()]
        pads = paddings[g] if paddings is not None else [0] * len(numels)
        sizes = [x for n, p in zip(numels, pads) for x in (n, p)]
        views = split_flat([s["single_partition_of_fp32_groups"][g] for s in states], sizes)
        if views is None:
            raise ValueError(f"--checkpoint: {tag_dir!r}: parameter group {g} holds fewer elements than its parameters")
        for (name, shape), v in zip(shapes.items(), views[::2]):
            readers[name] = lambda v=v, shape=tuple(shape): v.view(shape)
    for alias, target in (saved.get("shared_params") or {}).items():
        if target in readers:
            readers[alias] = readers[target]
    return readers


def _expert_parallel_readers(tag_dir: str, files: list[str], model: torch.nn.Module) -> dict:
    """An expert-parallel checkpoint (see the module docstring): every tensor's fp32 master, a
    routed-expert tensor the concatenation of the EP ranks' experts (:class:`ExpertRows`: read EP
    rank by EP rank, only the ranks a ``rows`` read spans)."""
    ep = len(files)
    shapes = {n: tuple(p.shape) for n, p in expert_parameters(model)}
    saved = _load(sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))[0])
    if all(t.dtype == torch.float32 for t in saved["module"].values()):  # fp32 run: the module copy is the master
        shards = [_load(f) for f in files]
        readers = {n: (lambda t=t: t) for n, t in saved["module"].items()}
        readers.update({n: ExpertRows(lambda r, n=n: shards[r][n], ep, shapes[n]) for n in shards[0]})
        return readers
    optim_files = _by_rank(glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")))
    if optim_files:
        return _sliced_master_readers(optim_files, ep, shapes, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return _zero0_expert_readers(_by_rank(glob.glob(os.path.join(tag_dir, "expp_rank_*_optim_states.pt")), "expp_rank_"), model, shapes)


class ExpertRows:
    """A routed-expert tensor of shape ``shape`` held by ``ep`` EP ranks: ``read_ep(r)`` gives EP rank
    r's experts (any shape of ``shape[0] / ep`` experts' elements). Called: the whole tensor;
    ``rows(first, count)``: those experts, reading only the EP ranks they lie on."""

    def __init__(self, read_ep, ep: int, shape: tuple):
        self.read_ep, self.ep, self.shape = read_ep, ep, shape
        self.local = shape[0] // ep

    def _rank(self, r: int) -> torch.Tensor:
        return self.read_ep(r).reshape(self.local, *self.shape[1:])

    def __call__(self) -> torch.Tensor:
        return torch.cat([self._rank(r) for r in range(self.ep)])

    def rows(self, first: int, count: int) -> torch.Tensor:
        ranks = range(first // self.local, (first + count - 1) // self.local + 1)
        part = torch.cat([self._rank(r) for r in ranks]) if len(ranks) > 1 else self._rank(ranks[0])
        return part[first - ranks[0] * self.local:][:count]


def _by_rank(paths: list[str], marker: str = "zero_pp_rank_") -> list[str]:
    """``paths`` in the numeric order of the rank after ``marker`` (``..._rank_10_...`` after ``_rank_9_``)."""
    return sorted(paths, key=lambda p: int(os.path.basename(p).split(marker)[1].split("_")[0]))


def _sliced_master_readers(optim_files: list[str], ep: int, expert_shapes: dict, shapes: dict) -> dict:
    """ZeRO-1/2 with expert parallelism (bf16 / fp16 runs): each rank's optimizer file holds its
    partition of every fp32 group and, per group, where each parameter's fragment lies in it
    (``param_slice_mappings``). A parameter is its fragments in rank order: over all ranks for a
    replicated parameter, over EP rank r's expert-data-parallel ranks (``r, r + P, ...``) for its experts."""
    states = [_load(f)["optimizer_state_dict"] for f in optim_files]
    where: dict[str, list[tuple[int, int, int, int]]] = {}
    for rank, st in enumerate(states):
        for g, mapping in enumerate(st["param_slice_mappings"]):
            for name, frag in mapping.items():
                where.setdefault(name, []).append((rank, g, frag.start, frag.numel))

    def read(name: str, ep_rank: int | None = None) -> torch.Tensor:
        pieces = [states[r]["single_partition_of_fp32_groups"][g][a:a + n] for r, g, a, n in where[name]
                  if ep_rank is None or r % ep == ep_rank]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    return {name: ExpertRows(lambda r, name=name: read(name, r), ep, expert_shapes[name]) if name in expert_shapes
            else (lambda name=name: read(name).view(shapes[name])) for name in where}


def _zero0_expert_readers(files: list[str], model: torch.nn.Module, expert_shapes: dict) -> dict:
    """ZeRO-0 with expert parallelism (bf16 / fp16 runs): EP rank r's ``expp_rank_{r}`` optimizer file
    holds the fp32 masters as one list per parameter group, in the module's parameter order: the
    replicated parameters in the first groups, this EP rank's experts in DeepSpeed's MoE group (``moe: True``)."""
    states = [_load(f)["optimizer"] for f in files]
    moe = [bool(g.get("moe")) for g in states[0]["optimizer_state_dict"]["param_groups"]]

    def masters(r: int, is_moe: bool) -> list[torch.Tensor]:
        return [t for g, ts in enumerate(states[r]["fp32_groups"]) if moe[g] == is_moe for t in ts]

    readers = {}
    for is_moe in (False, True):
        names = [n for n, _ in model.named_parameters() if (n in expert_shapes) == is_moe]
        if len(masters(0, is_moe)) != len(names):
            raise ValueError(f"--checkpoint: {files[0]!r} holds {len(masters(0, is_moe))} fp32 {'expert' if is_moe else 'replicated'} "
                             f"tensors, the model has {len(names)}")
        for i, name in enumerate(names):
            readers[name] = (ExpertRows(lambda r, i=i: masters(r, True)[i], len(files), expert_shapes[name]) if is_moe
                             else (lambda t=masters(0, False)[i], shape=tuple(model.get_parameter(name).shape): t.view(shape)))
    return readers


def _zero3_readers(ckpt_dir: str, tag: str) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag, lazy_mode=True)
    return {n: (lambda t=t: t.contiguous()) for n, t in lazy.items()}
