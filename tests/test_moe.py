"""The sparse-MoE block (``mlp: moe``, one process): outputs and gradients against a float64
per-token loop, transformers' Qwen3.5-MoE / Qwen3-Next blocks with the same state dict, the router
losses against their formulas and transformers' ``load_balancing_loss_func``, grouped matmuls,
no host synchronisation, config errors and parameter counts."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.models.info import count_flops, count_params
from lasp.models.moe import SparseMoeBlock, router_losses
from lasp.ops.grouped_mm import grouped_linear
from lasp.testing import assert_close, no_host_sync

ROOT = os.path.join(os.path.dirname(__file__), "..")
H, E, K, I, S = 16, 8, 3, 12, 10  # hidden, experts, top-k, expert width, shared expert width


def moe_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=H, intermediate_size=24, num_layers=2, num_heads=2, mlp="moe", num_experts=E,
                num_experts_per_tok=K, moe_intermediate_size=I, shared_expert_intermediate_size=S, router_z_loss_coef=0.01)
    return ModelConfig(**{**base, **kw})


def make_block(cfg: ModelConfig, seed: int = 0) -> SparseMoeBlock:
    torch.manual_seed(seed)
    block = SparseMoeBlock(cfg)
    block.reset_moe_parameters(0.3)
    for m in block.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    return block


def reference_block(x: torch.Tensor, p: dict, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """The MoE block token by token in float64, straight from the definition."""
    out = []
    for t in x.double():
        probs = torch.softmax(p["gate.weight"] @ t, dim=-1)
        weights, experts = torch.topk(probs, top_k)
        if norm_topk_prob:
            weights = weights / weights.sum()
        y = torch.zeros_like(t)
        for w, e in zip(weights, experts):
            gate, up = (p["experts.gate_up_proj"][e] @ t).chunk(2)
            y = y + w * (p["experts.down_proj"][e] @ (F.silu(gate) * up))
        if "shared_expert_gate.weight" in p:
            gate, up = p["shared_expert.gate_proj.weight"] @ t, p["shared_expert.up_proj.weight"] @ t
            shared = p["shared_expert.down_proj.weight"] @ (F.silu(gate) * up)
            y = y + torch.sigmoid(p["shared_expert_gate.weight"] @ t) * shared
        out.append(y)
    return torch.stack(out)


CASES = [("fp32-norm-shared", torch.float32, True, S), ("fp32-nonorm-noshared", torch.float32, False, 0),
         ("fp64-norm-shared", torch.float64, True, S), ("bf16-norm-shared", torch.bfloat16, True, S)]


@pytest.mark.parametrize("dtype,norm,shared", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_block_matches_float64_reference(dtype, norm, shared):
    cfg = moe_config(norm_topk_prob=norm, shared_expert_intermediate_size=shared)
    block = make_block(cfg).to(dtype)
    ref_params = {n: p.detach().double().requires_grad_() for n, p in block.named_parameters()}
    x = torch.randn(2, 13, H, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(2, 13, H, generator=torch.Generator().manual_seed(2))
    xr = x.double().requires_grad_()
    ref = reference_block(xr.view(-1, H), ref_params, K, norm).view(2, 13, H)
    ref.backward(dy.double())
    xo = x.to(dtype).requires_grad_()
    out, stats = block(xo)
    out.backward(dy.to(dtype))
    assert out.dtype == dtype and stats.counts.sum().item() == 2 * 13 * K
    assert_close(ref, out, name="y")
    assert_close(xr.grad, xo.grad, name="dx")
    for n, p in block.named_parameters():
        assert_close(ref_params[n].grad, p.grad, name=f"d{n}")


def test_block_and_router_losses_equal_transformers():
    """Our state dict loads into transformers' Qwen3.5-MoE block (the shared expert always on) and
    Qwen3-Next block (norm_topk_prob off) by name; outputs equal, and the aux loss equals
    ``load_balancing_loss_func`` over two layers' router logits."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock, load_balancing_loss_func
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    shape = dict(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I, shared_expert_intermediate_size=S)
    for norm, hf_cls, hf_cfg in ((True, Qwen3_5MoeSparseMoeBlock, transformers.Qwen3_5MoeTextConfig(**shape)),
                                 (False, Qwen3NextSparseMoeBlock, transformers.Qwen3NextConfig(norm_topk_prob=False, **shape))):
        block = make_block(moe_config(norm_topk_prob=norm))
        theirs = hf_cls(hf_cfg)
        theirs.load_state_dict(block.state_dict(), strict=True)
        x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(3))
        x2 = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            (y, s1), (_, s2) = block(x), block(x2)
            assert_close(theirs(x), y, name=f"y vs {hf_cls.__name__}")
            aux = load_balancing_loss_func((theirs.gate(x)[0], theirs.gate(x2)[0]), E, K)
        assert_close(aux.double(), router_losses([s1, s2]).aux, name="aux loss")


def test_router_losses_formula_and_gradient():
    cfg = moe_config()
    block = make_block(cfg).double()
    xs = [torch.randn(2, 9, H, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    stats = [block(x)[1] for x in xs]
    losses = router_losses(stats)
    logits = torch.cat([F.linear(x.view(-1, H), block.gate.weight) for x in xs])  # [L*N, E]
    probs = logits.softmax(-1)
    hits = F.one_hot(probs.topk(K, dim=-1).indices, E).sum(1).double()
    aux = E * (hits.mean(0) * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    assert_close(aux.detach(), losses.aux, name="aux")
    assert_close(z.detach(), losses.z, name="z")
    assert_close(aux.detach(), losses.aux_share.detach(), name="aux share (one rank)")
    (g_ref,) = torch.autograd.grad(aux + 0.1 * z, block.gate.weight)
    (g,) = torch.autograd.grad(losses.aux_share + 0.1 * losses.z_share, block.gate.weight)
    assert_close(g_ref, g, name="d(aux + 0.1 z)/dW_router")


def test_grouped_matmul_paths_agree():
    """torch._grouped_mm and the loop, empty groups included, outputs and gradients."""
    counts = torch.tensor([3, 0, 5, 2, 0])
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(5, 4, 8, requires_grad=True)
    results = []
    for method in ("grouped_mm", "loop"):
        y = grouped_linear(x, w, counts, method=method)
        results.append((y, *torch.autograd.grad(y.sum() + y.square().sum(), (x, w))))
    for name, a, b in zip(("y", "dx", "dw"), *results):
        assert_close(b, a, name=name)
    with pytest.raises(ValueError, match="method must be one of"):
        grouped_linear(x, w, counts, method="bmm")


def test_no_host_sync_without_expert_parallelism():
    block = make_block(moe_config())
    x = torch.randn(2, 8, H, requires_grad=True)
    with no_host_sync():
        y, stats = block(x)
        (y.sum() + router_losses([stats]).aux_share).backward()
    assert x.grad is not None and block.experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("bad,key", [
    (dict(mlp="dense", num_experts=4), "num_experts"), (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(mlp="sparse"), "mlp"), (dict(mlp_only_layers=[0, 1]), "mlp_only_layers"),
    (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef"), (dict(shared_expert_intermediate_size=-2), "shared_expert_intermediate_size"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict({**moe_config().to_dict(), **bad}, source="test.yaml")


def test_moe_layers_and_counts():
    """transformers' decoder_sparse_step / mlp_only_layers rule; the closed-form total and active
    counts equal the built model's; Qwen3.5-35B-A3B's shape has transformers' count."""
    cfg = moe_config(num_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], shared_expert_intermediate_size=0)
    assert cfg.moe_layers == [False, True, False, False]
    model = LinearLlamaForCausalLM(cfg)
    assert count_params(cfg) == model.num_parameters()
    experts = model.layers[1].mlp.experts
    routed = experts.gate_up_proj.numel() + experts.down_proj.numel()
    assert count_params(cfg, active=True) == model.num_parameters() - routed * (E - K) // E
    big = ModelConfig.from_yaml(os.path.join(ROOT, "configs", "models", "qwen3_5-moe-35b-a3b.yaml"))
    assert count_params(big) == 34_660_610_688  # sum(p.numel()) of transformers' Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig())
    assert count_params(big, active=True) == 3_454_988_928
    assert count_flops(big, 4096) < count_flops(ModelConfig.from_dict({**big.to_dict(), "num_experts_per_tok": 16}), 4096)
