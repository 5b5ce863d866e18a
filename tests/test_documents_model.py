"""Packed documents in the model (issue 15): ``model(ids, cu_seqlens=...)`` gives every document
exactly the logits and gradients it gets alone, at SP = 1 and across ranks; RoPE positions restart
at each document start; B must be 1."""
from __future__ import annotations

import pytest
import torch

from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.models.layers import positions_in_documents
from lasp.parallel import global_positions, shard_sequence, unshard_sequence
from lasp.testing import assert_close

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=2, num_kv_heads=1, initializer_range=0.15,
            gate_low_rank_dim=4, linear_backend="torch")
MODELS = {
    "hybrid-LS-simple_gla-rope": dict(layer_pattern="LS", num_layers=2, linear_variant="simple_gla", linear_rope=True),
    "hybrid-LS-gated_deltanet": dict(layer_pattern="LS", num_layers=2, linear_variant="gated_deltanet", conv_size=4),
    "qwen3_5": dict(architecture="qwen3_5", layer_types=["linear_attention", "full_attention"], num_layers=2,
                    linear_variant="gated_deltanet", conv_size=4, attention_head_dim=16, partial_rotary_factor=0.5,
                    linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
}
T = 48
# one-token documents, a boundary at the 2-rank / 4-rank edges (24, 12, 36), one spanning three quarters
CU = torch.tensor([0, 1, 2, 12, 13, 24, 29, 47, 48])


def build(name: str) -> LinearLlamaForCausalLM:
    torch.manual_seed(0)
    return LinearLlamaForCausalLM(ModelConfig(**BASE, **MODELS[name]))


def inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (1, T), generator=gen), torch.randn(1, T, 64, generator=gen)


def per_document(model, ids, dlogits):
    """Logits and parameter gradients with every document run alone."""
    model.zero_grad()
    pieces = []
    for a, b in zip(CU[:-1].tolist(), CU[1:].tolist()):
        out = model(ids[:, a:b])
        (out * dlogits[:, a:b]).sum().backward()
        pieces.append(out.detach())
    return torch.cat(pieces, dim=1), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_positions_restart_at_document_starts():
    pos = positions_in_documents(torch.arange(T), CU)
    want = torch.cat([torch.arange(b - a) for a, b in zip(CU[:-1].tolist(), CU[1:].tolist())])
    assert torch.equal(pos, want)
    for layout in ("contiguous", "zigzag"):  # a shard's global positions map the same way
        for r in range(4):
            g = global_positions(T, r, 4, layout)
            assert torch.equal(positions_in_documents(g, CU), want[g])


def test_rope_uses_positions_within_documents(monkeypatch):
    import lasp.models.model as M

    class Seen(Exception):
        pass

    def record(positions, *args):
        raise Seen(positions)

    monkeypatch.setattr(M, "rope_cos_sin", record)
    with pytest.raises(Seen) as seen:
        build("hybrid-LS-simple_gla-rope")(inputs()[0], cu_seqlens=CU)
    assert torch.equal(seen.value.args[0], positions_in_documents(torch.arange(T), CU))


def test_batch_must_be_one_with_documents():
    model = build("hybrid-LS-simple_gla-rope")
    with pytest.raises(ValueError, match="B = 1"):
        model(torch.zeros(2, T, dtype=torch.long), cu_seqlens=CU)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        model(torch.zeros(1, T, dtype=torch.long), cu_seqlens=CU.double())


@pytest.mark.parametrize("name", list(MODELS))
def test_documents_equal_separate_runs_sp1(name):
    model = build(name)
    ids, dlogits = inputs()
    ref, ref_grads = per_document(model, ids, dlogits)
    model.zero_grad()
    out = model(ids, cu_seqlens=CU)
    (out * dlogits).sum().backward()
    assert_close(ref, out, rtol=1e-5, name="logits")
    for n, p in model.named_parameters():
        assert_close(ref_grads[n], p.grad, rtol=1e-5, name=n)


def _sp_job(rank: int, world: int, name: str, layout: str):
    import torch.distributed as dist

    model = build(name)
    ids, dlogits = inputs()
    out = model(shard_sequence(ids, rank, world, layout), group=dist.group.WORLD, layout=layout, cu_seqlens=CU)
    (out * shard_sequence(dlogits, rank, world, layout)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # each rank holds its tokens' share of the gradient
    return out.detach(), grads


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", list(MODELS))
def test_documents_across_ranks_equal_separate_runs(spawn, name, layout):
    ref, ref_grads = per_document(build(name), *inputs())
    results = spawn(2).run(_sp_job, name, layout)
    assert_close(ref, unshard_sequence([r[0] for r in results], layout), rtol=1e-5, name="logits")
    for n in ref_grads:
        assert_close(ref_grads[n], results[0][1][n], rtol=1e-5, name=n)
