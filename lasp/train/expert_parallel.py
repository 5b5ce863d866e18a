"""Expert parallelism under DeepSpeed: lasp's MoE experts as DeepSpeed expert parameters.

With ``parallel.ep_size = P > 1`` every rank holds ``E / P`` experts of each MoE layer (the EP
layout of :mod:`lasp.parallel`). DeepSpeed must then treat those tensors as expert parameters:
reduce their gradients over their expert-data-parallel (EDP) group only, not the world, and in
ZeRO-1/2 partition their optimizer state over that group. DeepSpeed does this when

1. the parameter is marked (``allreduce = False``, ``group_name = "ep_size_P"``:
   ``deepspeed.moe.utils.is_moe_param``), so that ``split_params_into_different_moe_groups_for_optimizer``
   puts it in an MoE parameter group;
2. its expert groups (``deepspeed.utils.groups``) hold the EP / EDP groups under that name: lasp's
   own groups are registered there (the same rank layout DeepSpeed would build);
3. the engine sees an MoE layer (``has_moe_layers``: a ``deepspeed.moe.layer.MoE`` in the model).
   lasp's blocks are not DeepSpeed's, so :func:`prepare` attaches :class:`ExpertParallelMarker`, a
   parameter-free ``MoE`` subclass (no state-dict entries, never called).

DeepSpeed divides the EDP-summed expert gradients by the WORLD size, like every other gradient,
which is what the trainer's loss scaling (:func:`lasp.train.trainer.backward_scale`) needs. ZeRO-3
refuses MoE parameter groups (``_validate_zero3_moe_compatibility``): the run config refuses
``train.zero_stage: 3`` with ``ep_size > 1`` first. Gradient clipping: ZeRO-1/2 take the norm over
every rank's partition (each expert counted once); ZeRO-0's ``clip_grad_norm_`` averages per-rank
norms instead, so for ZeRO-0 the trainer clips itself (:func:`clip_grad_norm_`) with the norm of
the whole model.

Checkpoints: DeepSpeed writes the module state of data-parallel rank 0 only; each EP rank's
experts go to ``experts-ep{r}.pt`` next to it (:func:`save_experts` / :func:`load_experts`;
``lasp export`` merges them: :mod:`lasp.train.consolidate`).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .. import comm
from ..models.moe import expert_parameters

MARKER = "deepspeed_moe_marker"


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells the DeepSpeed engine that the model has expert parameters (see the module docstring)."""

        def __init__(self, ep_size: int, num_experts: int):
            torch.nn.Module.__init__(self)  # not MoE.__init__: no experts, no gate, no parameters
            self.ep_size, self.num_experts, self.num_local_experts = ep_size, num_experts, 0
            self.expert_group_name = group_name(ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups are lasp's (register_groups)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker is a flag for DeepSpeed, not a layer")

    return ExpertParallelMarker


def register_groups(state) -> None:
    """Put lasp's EP / EDP groups into ``deepspeed.utils.groups`` (any earlier run's removed)."""
    from deepspeed.utils import groups

    from lasp.parallel import expert_parallel_ranks

    for d in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, groups._EXPERT_DATA_PARALLEL_GROUP,
              groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        d.clear()
    ep_ranks, edp_ranks = expert_parallel_ranks(state.world_size, state.ep_size)
    name = group_name(state.ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = state.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = next(r for r in ep_ranks if state.rank in r)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = state.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = next(r for r in edp_ranks if state.rank in r)


def prepare(model: torch.nn.Module, state, num_experts: int) -> None:
    """Mark the experts, register the groups, attach the marker (call before ``deepspeed.initialize``)."""
    for _, p in expert_parameters(model):
        p.allreduce, p.group_name = False, group_name(state.ep_size)
    register_groups(state)
    model.add_module(MARKER, _marker_class()(state.ep_size, num_experts))


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, ep_group) -> torch.Tensor:
    """Clip the (reduced, full) gradients of a ZeRO-0 run to ``max_norm`` by the norm of the WHOLE
    model: the replicated parameters once, every expert once (summed over the EP group)."""
    experts = {id(p) for _, p in expert_parameters(model)}
    grads = [(p.grad, id(p) in experts) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros(2, dtype=torch.float64, device=grads[0][0].device)
    for g, is_expert in grads:
        sq[int(is_expert)] += g.double().square().sum()
    expert_sq = sq[1:].clone()
    comm.all_reduce(expert_sq, ep_group, tag="moe.grad_norm")
    norm = (sq[0] + expert_sq[0]).sqrt()
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g, _ in grads:
        g.mul_(factor.to(g.dtype))
    return norm


def experts_file(tag_dir: str, ep_rank: int) -> str:
    return os.path.join(tag_dir, f"experts-ep{ep_rank}.pt")


def save_experts(model: torch.nn.Module, tag_dir: str, state) -> None:
    """EDP rank 0 of every EP rank writes that rank's experts (fp32) into the checkpoint directory."""
    if dist.get_rank(state.edp_group) == 0:
        torch.save({n: p.detach().float().cpu() for n, p in expert_parameters(model)}, experts_file(tag_dir, state.ep_rank))


def load_experts(model: torch.nn.Module, tag_dir: str, state) -> None:
    """Copy this EP rank's experts back from the checkpoint (DeepSpeed loaded data-parallel rank 0's)."""
    path = experts_file(tag_dir, state.ep_rank)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {tag_dir!r} has no {os.path.basename(path)}: it was not written with parallel.ep_size={state.ep_size}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for n, p in expert_parameters(model):
            p.copy_(saved[n].to(p.dtype))


def expert_files(tag_dir: str) -> list[str]:
    """An expert-parallel checkpoint's ``experts-ep*.pt`` in EP-rank order ([] for another checkpoint)."""
    files = {int(f[len("experts-ep"):-3]): f for f in os.listdir(tag_dir) if f.startswith("experts-ep") and f.endswith(".pt")}
    return [os.path.join(tag_dir, files[r]) for r in range(len(files))]


def gather_expert(p: torch.Tensor, ep_group) -> torch.Tensor:
    """All the experts of an expert parameter ``[E/P, ...]`` (every rank of the EP group calls)."""
    full, _ = comm.all_gather(p.detach(), ep_group, tag="moe.gather_experts")
    return full.flatten(0, 1)
