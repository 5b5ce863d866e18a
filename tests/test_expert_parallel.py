"""Expert parallelism (4 gloo ranks): a tiny MoE hybrid under SP in {1, 2} x EP in {1, 2, 4} gives
the single-process model's logits, router losses and gradients of the whole objective (summed
cross-entropy / global tokens + aux + z); the all-to-all bytes match the formula; bad sizes are
errors before any collective."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp import comm
from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.models.moe import router_losses
from lasp.ops.expert_parallel import ep_bytes_per_layer
from lasp.parallel import init_parallel, shard_sequence
from lasp.testing import assert_close, value_error_and_collectives

WORLD, T = 4, 16
MODEL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
             layer_pattern="LS", linear_variant="lightning", initializer_range=0.2, linear_backend="torch",
             mlp="moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
             router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
CASES = [(sp, ep, False) for sp in (1, 2) for ep in (1, 2, 4)] + [(2, 2, True)]  # + activation checkpointing


def objective(model, ids, labels, n_tokens, group, sp_group, cfg, layout="contiguous"):
    """This rank's share of the training objective: CE sum / global labelled tokens + router losses."""
    stats = []
    logits = model(ids, group=sp_group, layout=layout, router_stats=stats)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_tokens
    losses = router_losses(stats, group)
    return logits, ce + cfg.router_aux_loss_coef * losses.aux_share + cfg.router_z_loss_coef * losses.z_share, losses


def reference(cfg: ModelConfig, sp: int):
    """The single-process model on the whole global batch (DP ranks' sequences stacked)."""
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (WORLD // sp, T + 1), generator=gen)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    logits, loss, losses = objective(model, ids, labels, labels.numel(), None, None, cfg)
    loss.backward()
    return model, ids, labels, logits.detach(), losses


def ep_worker(rank: int, world: int, sp: int, ep: int, ckpt: bool):
    torch.set_num_threads(1)
    cfg = ModelConfig(**MODEL)
    ref_model, ids, labels, ref_logits, ref_losses = reference(cfg, sp)
    state = init_parallel(sp, ep_size=ep)
    torch.manual_seed(0)
    model = LinearLlamaForCausalLM(cfg, ep_group=state.ep_group)  # the same draws, this rank's experts kept
    model.set_activation_checkpointing(ckpt)
    my_ids, my_labels = (shard_sequence(t[state.dp_rank:state.dp_rank + 1], state.sp_rank, sp) for t in (ids, labels))
    with comm.record() as log:
        logits, loss, losses = objective(model, my_ids, my_labels, labels.numel(), dist.group.WORLD, state.sp_group, cfg)
        loss.backward()
    errors = {"logits": (shard_sequence(ref_logits[state.dp_rank:state.dp_rank + 1], state.sp_rank, sp), logits.detach()),
              "aux": (ref_losses.aux, losses.aux), "z": (ref_losses.z, losses.z)}
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        expert = ".experts." in name
        dist.all_reduce(p.grad, group=state.edp_group if expert and ep > 1 else None)  # the gradient of the whole objective
        ref = ref_params[name].grad
        if expert:
            ref = ref.chunk(ep)[state.ep_rank]
        errors["d" + name] = (ref, p.grad)
    moe_bytes = log.total_bytes("moe.", kinds=("all_to_all",))
    return errors, moe_bytes, my_ids.numel()


@pytest.mark.parametrize("sp,ep,ckpt", CASES, ids=[f"sp{sp}-ep{ep}" + ("-ckpt" if c else "") for sp, ep, c in CASES])
def test_expert_parallel_matches_single_process(spawn, sp, ep, ckpt):
    results = spawn(WORLD).run(ep_worker, sp, ep, ckpt)
    for errors, _, _ in results:
        for name, (ref, out) in errors.items():
            assert_close(ref, out, name=name)
    cfg = ModelConfig(**MODEL)
    tokens = results[0][2]  # per rank
    per_rank = ep_bytes_per_layer(tokens, cfg.num_experts_per_tok, cfg.hidden_size, cfg.num_experts, 4, ep) * sum(cfg.moe_layers)
    if not ckpt:  # the rows a rank receives vary; over the whole world the bytes are exactly the formula's
        assert sum(r[1] for r in results) == WORLD * per_rank


def bad_sizes_worker(rank: int, world: int):
    state = init_parallel(1, ep_size=2)
    cfg = ModelConfig(**{**MODEL, "num_experts": 3, "num_experts_per_tok": 1})
    build = value_error_and_collectives(lambda: LinearLlamaForCausalLM(cfg, ep_group=state.ep_group))
    world_err = value_error_and_collectives(lambda: init_parallel(1, ep_size=3))
    from lasp.ops.expert_parallel import dispatch

    routing = value_error_and_collectives(lambda: dispatch(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), 4, state.ep_group))
    return build, world_err, routing


def test_bad_sizes_fail_before_any_collective(spawn):
    for build, world_err, routing in spawn(WORLD).run(bad_sizes_worker):
        assert "num_experts=3 must be divisible by the expert-parallel size 2" in build[0] and not build[1]
        assert "ep_size=3 must divide the world size 4" in world_err[0] and not world_err[1]
        assert "topk_idx must be int64" in routing[0] and not routing[1]
