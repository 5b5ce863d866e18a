"""Sparse-MoE Hugging Face checkpoints against transformers (the oracle): tiny random
``Qwen3_5MoeForCausalLM``, ``Qwen3NextForCausalLM`` (with a dense ``mlp_only_layers`` layer) and the text
part of ``Qwen3_5MoeForConditionalGeneration``, built from transformers' own config objects and saved
with ``save_pretrained`` (experts per expert), plus the same weights in the fused 3-D expert layout.
lasp's logits equal transformers' (fp32) at SP = 1 and 2, the round trip HF -> lasp -> HF is bit-exact
in the source's layout, an expert-parallel rank (EP = 2) reads only its experts, ZeRO-3 init fills
every partitioned parameter, a bf16 EP = 2 fine-tuning run exports back into the source's layout, and ``model-info``
counts total / active parameters as transformers builds them (Qwen3-Next-80B-A3B included, on the
meta device). Skipped without transformers.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close

transformers = pytest.importorskip("transformers")

VOCAB, RTOL = 256, 1e-5  # 256: the byte-level dataset of the fine-tuning test
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
            moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
KINDS = ("qwen3_5_moe", "qwen3_next", "qwen3_5_moe_cg")
IGNORED_CONFIG_KEYS = {"transformers_version", "use_cache", "attention_dropout", "output_router_logits"}  # runtime flags


def hf_model(kind: str):
    """A tiny random transformers model of ``kind`` (fp32, eval), norms and biases drawn non-zero."""
    from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeTextConfig,
                              Qwen3NextConfig, Qwen3NextForCausalLM)

    torch.manual_seed(0)
    if kind == "qwen3_5_moe":
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                                      "partial_rotary_factor": 0.5}))
    elif kind == "qwen3_next":  # layer 2 keeps the dense MLP; top-k weights not renormalised
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**TEXT, intermediate_size=40, mlp_only_layers=[2], norm_topk_prob=False,
                                                     tie_word_embeddings=True))
    else:
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, patch_size=4, num_position_embeddings=16)
        model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig(text_config=TEXT, vision_config=vision))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "dt_bias" in name:
                p.normal_(0.0, 0.2)
    return model.float().eval()


def save_fused(model, path) -> None:
    """``model``'s weights in the fused 3-D expert layout (its in-memory state dict), beside its config."""
    from safetensors.torch import save_file

    tied = model.config.get_text_config().tie_word_embeddings
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: (model, {layout: directory})}``."""
    out = {}
    for kind in KINDS:
        model = hf_model(kind)
        per_expert, fused = (str(tmp_path_factory.mktemp(f"{kind}-{layout}")) for layout in ("per_expert", "fused"))
        model.save_pretrained(per_expert)
        save_fused(model, fused)
        out[kind] = (model, {"per_expert": per_expert, "fused": fused})
    return out


def ids_for(T: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def finetune_worker(rank: int, world: int, tmp: str, src: str):
    """One bf16 ZeRO-1 step with EP = 2 from an HF checkpoint (``model.init_from``); rank 0's weights."""
    from lasp.train.config import RunConfig
    from lasp.train.trainer import train

    torch.set_num_threads(1)
    d = {"model": {"init_from": src}, "parallel": {"sp_size": 1, "ep_size": 2},
         "train": {"steps": 1, "seq_len": 32, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-2, "warmup": 1, "seed": 7,
                   "zero_stage": 1, "dtype": "bf16"},
         "data": {"path": os.path.join(tmp, "data")}, "checkpoint": {"every": 1}, "sample": {"max_new_tokens": 0},
         "out_dir": os.path.join(tmp, "run")}
    r = train(RunConfig.from_dict(d, source="test"), progress=False, sample=False, verbose=False, keep_weights=True)
    return r.weights if rank == 0 else None


def test_finetune_with_ep_and_export_like(spawn, checkpoints, tmp_path):
    """A ``Qwen3_5MoeForConditionalGeneration`` fine-tuned with EP = 2 in bf16 (each rank loading its
    experts) exports with ``--format hf --like`` into that class's layout (vision tower copied
    through, experts per expert): transformers loads it, and it holds the run's weights."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    from lasp.models import from_hf
    from lasp.models.shards import weight_entries
    from lasp.train.data import prepare, stdlib_sources
    from lasp.train.export import main as export_main

    src = checkpoints["qwen3_5_moe_cg"][1]["per_expert"]
    prepare([], str(tmp_path / "data"), "bytes", files=stdlib_sources()[:3])
    weights = spawn(2).run(finetune_worker, str(tmp_path), src)[0]
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--output", str(out), "--format", "hf", "--like", src]) == 0
    assert set(weight_entries(out)) == set(weight_entries(src))
    for name, t in from_hf(out).state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t.float(), weights[name]), name
    loaded = Qwen3_5MoeForConditionalGeneration.from_pretrained(out).float().eval()
    with torch.no_grad():
        assert_close(loaded(input_ids=ids_for(12, batch=1)).logits, from_hf(out).float()(ids_for(12, batch=1)), rtol=RTOL, name="logits")


def test_saved_layouts(checkpoints):
    """What transformers 5.24 writes: experts per expert; Qwen3-Next's GDN projections fused."""
    from lasp.models.shards import weight_entries

    for kind, (_, dirs) in checkpoints.items():
        names = set(weight_entries(dirs["per_expert"]))
        prefix = "model.language_model." if kind.endswith("_cg") else "model."
        assert f"{prefix}layers.0.mlp.experts.3.up_proj.weight" in names and f"{prefix}layers.0.mlp.experts.gate_up_proj" not in names
        assert (f"{prefix}layers.0.linear_attn.in_proj_qkvz.weight" in names) == (kind == "qwen3_next")
        assert f"{prefix}layers.0.mlp.experts.gate_up_proj" in set(weight_entries(dirs["fused"]))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers(checkpoints, kind, layout):
    from lasp.models import from_hf

    hf, dirs = checkpoints[kind]
    model = from_hf(dirs[layout])
    cfg = model.config
    assert cfg.architecture == ("qwen3_next" if kind == "qwen3_next" else "qwen3_5") and cfg.mlp == "moe"
    assert cfg.moe_layers == ([True, True, False, True] if kind == "qwen3_next" else [True] * 4)
    assert cfg.norm_topk_prob == (kind != "qwen3_next")
    ids = ids_for(24)
    with torch.no_grad():
        assert_close(hf_logits(hf, ids), model(ids), rtol=RTOL, name=f"{kind} {layout} logits")


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_bit_exact(checkpoints, kind, layout, tmp_path):
    """HF -> lasp -> HF: every tensor equal (name, dtype, values) in the source's layout (``like`` for
    the fused one and the ConditionalGeneration; save_pretrained's by default), config.json equal
    but for transformers' runtime flags and unset (null) token ids; transformers reads it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from lasp.models import from_hf, to_hf

    hf, dirs = checkpoints[kind]
    src = dirs[layout]
    like = src if layout == "fused" or kind.endswith("_cg") else None
    to_hf(from_hf(src), tmp_path, like=like)
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ca, cb = ({k: v for k, v in json.loads(open(os.path.join(d, "config.json")).read()).items()
               if k not in IGNORED_CONFIG_KEYS and v is not None} for d in (src, tmp_path))
    assert ca == cb
    assert AutoConfig.from_pretrained(tmp_path).to_dict()["architectures"] == ca["architectures"]


def test_convert_cli_roundtrip_and_loadable(checkpoints, tmp_path):
    """``lasp convert`` file to file (no model built): HF (per expert) -> lasp -> HF bit-exact; the
    lasp directory -> HF in the fused layout with ``--like``; transformers gives the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lasp.models.convert_cli import main as convert_main

    hf, dirs = checkpoints["qwen3_next"]
    lasp_dir, back, fused = tmp_path / "lasp", tmp_path / "back", tmp_path / "fused"
    assert convert_main(["--from-hf", dirs["per_expert"], "--output", str(lasp_dir), "--max-shard-size", "40KB"]) == 0
    assert convert_main(["--from-lasp", str(lasp_dir), "--output", str(back)]) == 0
    assert convert_main(["--from-lasp", str(lasp_dir), "--output", str(fused), "--like", dirs["fused"]]) == 0
    for src, out in ((dirs["per_expert"], back), (dirs["fused"], fused)):
        a, b = load_file(os.path.join(src, "model.safetensors")), load_file(out / "model.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = ids_for(10, batch=1)
    loaded = AutoModelForCausalLM.from_pretrained(fused).float().eval()
    assert type(loaded).__name__ == "Qwen3NextForCausalLM"
    assert torch.equal(hf_logits(loaded, ids), hf_logits(hf, ids))


def test_missing_expert_is_named(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from lasp.models import from_hf

    shutil.copytree(checkpoints["qwen3_5_moe"][1]["per_expert"], tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"num_experts=4\): missing \['model.layers.1.mlp.experts.2.up_proj.weight'\]"):
        from_hf(tmp_path)


def sp_and_ep_worker(rank: int, world: int, dirs: dict, ids: torch.Tensor):
    """SP = 2 (zigzag) logits of every checkpoint; then EP = 2: ``build_initial_model`` (ZeRO 0 and
    1's path) reads only this rank's experts, and the model gives the SP = 1 logits."""
    from lasp.models import from_hf
    from lasp.models.moe import expert_parameters
    from lasp.models.weights import source_config
    from lasp.parallel import init_parallel
    from lasp.train.init_from import build_initial_model

    torch.set_num_threads(1)
    sp = {kind: from_hf(d)(shard_sequence(ids, rank, world, "zigzag"), group=dist.group.WORLD, layout="zigzag").detach()
          for kind, d in dirs.items()}
    state = init_parallel(1, ep_size=2)
    ep = {}
    for kind, d in dirs.items():
        model = build_initial_model(source_config(d), d, 1, {"bf16": {"enabled": False}}, ep_group=state.ep_group)
        experts = {n: p.detach().clone() for n, p in expert_parameters(model)}
        with torch.no_grad():
            ep[kind] = (model(ids).detach(), experts)
    return sp, ep, state.ep_rank


def test_sp2_logits_and_ep2_init_from(spawn, checkpoints):
    from lasp.models import from_hf
    from lasp.models.moe import expert_parameters

    dirs = {"qwen3_5_moe": checkpoints["qwen3_5_moe"][1]["fused"], "qwen3_next": checkpoints["qwen3_next"][1]["per_expert"]}
    ids = ids_for(32, seed=2)
    results = spawn(2).run(sp_and_ep_worker, dirs, ids)
    for kind in dirs:
        ref = hf_logits(checkpoints[kind][0], ids)
        assert_close(ref, unshard_sequence([r[0][kind] for r in results], "zigzag"), rtol=RTOL, name=f"{kind} SP=2 logits")
        full = dict(expert_parameters(from_hf(dirs[kind])))
        for _, ep, ep_rank in results:
            logits, experts = ep[kind]
            assert_close(ref, logits, rtol=RTOL, name=f"{kind} EP=2 logits")
            for name, local in experts.items():
                assert local.shape[0] == 2 and torch.equal(local, full[name].detach().chunk(2)[ep_rank]), name


def zero3_worker(rank: int, world: int, dirs: dict):
    """ZeRO-3 init: ``build_initial_model`` under ``deepspeed.zero.Init`` fills each partitioned
    parameter from the checkpoint (experts assembled from either layout); returns the names that differ."""
    import deepspeed

    from lasp.models import from_hf
    from lasp.models.weights import source_config
    from lasp.train.init_from import build_initial_model

    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    bad = []
    for d in dirs.values():
        model, ref = build_initial_model(source_config(d), d, 3, ds), from_hf(d).state_dict()
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if not torch.equal(p.detach(), ref[name]):
                    bad.append(name)
    return bad


def test_zero3_init_from(spawn, checkpoints):
    dirs = {"qwen3_5_moe": checkpoints["qwen3_5_moe"][1]["fused"], "qwen3_next": checkpoints["qwen3_next"][1]["per_expert"]}
    assert spawn(2).run(zero3_worker, dirs) == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_model_info_counts(checkpoints, kind, capsys):
    """Total parameters = transformers' model; active = total less the unused routed experts."""
    from lasp.models.info import count_params, main as info_main
    from lasp.models.weights import source_config

    hf, dirs = checkpoints[kind]
    cfg = source_config(dirs["per_expert"])
    params = {n: p.numel() for n, p in hf.named_parameters() if not n.startswith("model.visual.")}
    assert count_params(cfg) == sum(params.values())
    unused = (cfg.num_experts - cfg.num_experts_per_tok) / cfg.num_experts
    assert count_params(cfg, active=True) == sum(params.values()) - unused * sum(n for k, n in params.items() if ".mlp.experts." in k)
    assert info_main([dirs["per_expert"], "--check"]) == 0
    out = capsys.readouterr().out
    assert f"architecture      {cfg.architecture}" in out and "active parameters" in out and "training FLOPs per token" in out


def test_qwen3_next_80b_counts_match_transformers_meta_model():
    """configs/models/qwen3_next-80b-a3b.yaml: lasp's closed-form total and active counts equal a
    transformers ``Qwen3NextForCausalLM`` built on the meta device from the same settings."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from lasp.models import ModelConfig
    from lasp.models.hf_config import config_from_hf, config_to_hf
    from lasp.models.info import count_params

    cfg = ModelConfig.from_yaml("configs/models/qwen3_next-80b-a3b.yaml")
    hf_cfg = Qwen3NextConfig(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "dtype")})
    back = config_from_hf(hf_cfg.to_dict())
    assert back.layer_types == cfg.layer_types
    assert {**back.to_dict(), "layer_pattern": "", "description": ""} == {**cfg.to_dict(), "layer_pattern": "", "description": ""}
    with torch.device("meta"):
        hf = Qwen3NextForCausalLM(hf_cfg)
    total = sum(p.numel() for p in hf.parameters())
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n)
    assert count_params(cfg) == total
    assert count_params(cfg, active=True) == total - experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
    assert 79e9 < total < 82e9 and 2.5e9 < count_params(cfg, active=True) < 4e9
