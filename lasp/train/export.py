"""``lasp export --checkpoint DIR --output DIR``: a DeepSpeed checkpoint (any ZeRO stage) to one
consolidated ``model.safetensors`` + ``model.yaml`` (the ``save_pretrained`` format, loadable
with ``lasp.models.load_pretrained`` and ``lasp generate``).

``--checkpoint`` is either a checkpoint directory (its ``latest`` checkpoint is exported) or
one checkpoint's tag directory (``.../checkpoints/step00000200``). Runs in one process, no
launcher: ZeRO-1/2/3 shards are merged by DeepSpeed's ``zero_to_fp32`` consolidation; under
ZeRO-0 the fp32 master copy is read from the optimizer state (a bf16/fp16 run's module holds
rounded weights); an expert-parallel checkpoint (fp32 runs) is its module copy plus every EP
rank's experts (``lasp.train.expert_parallel``). The checkpoint is verified against its manifest first: a damaged one is one
clear error.
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import sys

import torch

from lasp.config_loader import read_yaml

from .checkpoint import read_latest, verify
from .expert_parallel import merged_experts

MODEL_YAML = "model.yaml"


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """``(checkpoint_dir, tag)`` for a checkpoint root or a tag directory (ValueError otherwise)."""
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint: no such directory {path!r}")
    tag = read_latest(path)
    if tag is not None:
        return path, tag
    if os.path.isfile(os.path.join(path, MODEL_YAML)):
        path = os.path.abspath(path)
        return os.path.dirname(path), os.path.basename(path)
    raise ValueError(f"--checkpoint: {path!r} is neither a checkpoint directory (with a 'latest' file) nor a checkpoint tag directory (with {MODEL_YAML})")


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for item in obj for t in _flat_tensors(item)]


def _zero0_fp32_master(saved: dict, model: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The fp32 master copy of a ZeRO-0 bf16/fp16 checkpoint (the optimizer's ``fp32_groups``, in
    ``model.parameters()`` order), by parameter name; {} when the checkpoint has none."""
    optim = saved.get("optimizer")
    groups = (optim.get("fp32_groups") or optim.get("fp32_groups_flat")) if isinstance(optim, dict) else None
    if model is None or not groups:
        return {}
    params = list(model.parameters())
    tensors = _flat_tensors(groups)
    if len(tensors) != len(params):  # one flat buffer per group: split it by the parameters' sizes
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if flat.numel() != sum(p.numel() for p in params):
            return {}
        tensors = list(torch.split(flat, [p.numel() for p in params]))
    by_id = {id(p): t.reshape(p.shape) for p, t in zip(params, tensors)}
    return {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def consolidated_state_dict(ckpt_dir: str, tag: str, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of checkpoint ``tag`` (merging ZeRO shards if any; the fp32
    master weights, never the bf16/fp16 module copy). ``model`` (meta device is fine) gives the
    parameter order of a ZeRO-0 checkpoint's optimizer state."""
    tag_dir = os.path.join(ckpt_dir, tag)
    experts = merged_experts(tag_dir)
    if experts is not None:  # expert parallel: the module copy (= the fp32 master in fp32) and each EP rank's experts
        dtype = (read_yaml(os.path.join(tag_dir, "run.yaml"), "run config").get("train") or {}).get("dtype", "fp32")
        if dtype != "fp32":
            raise ValueError(f"--checkpoint: {tag_dir!r} is an expert-parallel {dtype} checkpoint; export reads expert-parallel "
                             "checkpoints of fp32 runs only (their module copy is the master) for now")
        files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
        state = {**torch.load(files[0], map_location="cpu", weights_only=False)["module"], **experts}
    elif glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:  # ZeRO-0: whole weights in the model-states file, the fp32 master copy in its optimizer state
        files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")))
        if not files:
            raise ValueError(f"--checkpoint: {tag_dir!r} holds no DeepSpeed model states")
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        state = dict(saved["module"])
        state.update(_zero0_fp32_master(saved, model))
    return {k: v.float().contiguous() for k, v in state.items()}


def export(checkpoint: str, output: str, fmt: str = "lasp") -> str:
    """Write ``output/model.yaml`` + ``output/model.safetensors`` from ``checkpoint`` (``fmt="hf"``:
    ``config.json`` + ``model.safetensors`` that transformers loads, qwen3_5 models); returns ``output``."""
    from lasp.models import LinearLlamaForCausalLM, ModelConfig, save_pretrained, to_hf

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    cfg_path = os.path.join(ckpt_dir, tag, MODEL_YAML)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--checkpoint: {cfg_path!r} is missing (not a checkpoint written by lasp train)")
    problem = verify(os.path.join(ckpt_dir, tag))
    if problem is not None:
        raise ValueError(f"--checkpoint: checkpoint {os.path.join(ckpt_dir, tag)} is damaged: {problem}; export an intact one (another stepN directory)")
    model = LinearLlamaForCausalLM(ModelConfig.from_yaml(cfg_path), device="meta")
    try:
        state = consolidated_state_dict(ckpt_dir, tag, model)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"--checkpoint: cannot read checkpoint {os.path.join(ckpt_dir, tag)}: {type(e).__name__}: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"--checkpoint: weights of {tag!r} do not match {cfg_path}: missing {missing}, unexpected {unexpected}")
    (to_hf if fmt == "hf" else save_pretrained)(model, output)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lasp export", description="export a training checkpoint to safetensors + model YAML")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (uses 'latest') or one checkpoint's tag directory")
    p.add_argument("--output", required=True, help="output directory (model.yaml + model.safetensors)")
    p.add_argument("--format", choices=("lasp", "hf"), default="lasp",
                   help="lasp: model.yaml + model.safetensors; hf: config.json + model.safetensors for transformers (qwen3_5 models)")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        out = export(args.checkpoint, args.output, args.format)
    except ValueError as err:
        print(f"lasp export: error: {err}", file=sys.stderr)
        return 2
    files = "config.json" if args.format == "hf" else "model.yaml"
    print(f"exported {args.checkpoint} -> {out}/{files}, {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
