"""The model's loss path (``model(input_ids, labels=...)``, issue 21 item 1): the fused loss on the
final hidden states equals the logits + ``F.cross_entropy`` on one process (tied and untied LM
head, every reduction) and, summed over the ranks, under SP = 2 with packed documents in the
zigzag layout; bad labels are a ValueError before any collective."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp.models import LinearLlamaForCausalLM, ModelConfig
from lasp.parallel import shard_sequence
from lasp.testing import assert_close

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1,
            layer_pattern="LS", linear_variant="lightning", initializer_range=0.15, linear_backend="torch")
T = 32


def make(tie: bool, seed: int = 0, batch: int = 2):
    cfg = ModelConfig(**BASE, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = LinearLlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (batch, T), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (batch, T), generator=gen)
    labels[:, 5:9] = -100
    return cfg, model, ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_labels_path_equals_logits_and_cross_entropy(tie, reduction):
    _, model, ids, labels = make(tie)
    upstream = torch.randn(labels.shape) if reduction == "none" else torch.tensor(1.0)
    ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction=reduction)
    ref = ref.view(labels.shape) if reduction == "none" else ref
    ref.backward(upstream)
    ref_grads = grads(model)
    loss = model(ids, labels=labels, loss_reduction=reduction)
    loss.backward(upstream)
    assert loss.dtype == torch.float32
    assert_close(ref.detach(), loss.detach(), name="loss")
    for n, g in grads(model).items():
        assert_close(ref_grads[n], g, name=f"d{n}")


def test_bad_labels_are_value_errors():
    _, model, ids, labels = make(True)
    with pytest.raises(ValueError, match="^labels must be an integer tensor shaped like input_ids"):
        model(ids, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="^labels must be"):
        model(ids, labels=labels.float())
    with pytest.raises(ValueError, match="^loss_reduction must be one of"):
        model(ids, labels=labels, loss_reduction="avg")


def sp_loss_worker(rank, world, cfg_dict, state, ids, labels, cu_seqlens):
    torch.set_num_threads(1)
    model = LinearLlamaForCausalLM(ModelConfig.from_dict(cfg_dict))
    model.load_state_dict(state)
    loss = model(shard_sequence(ids, rank, world, "zigzag"), group=dist.group.WORLD, layout="zigzag", cu_seqlens=cu_seqlens,
                 labels=shard_sequence(labels, rank, world, "zigzag"))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_sp2_zigzag_documents_loss_sums_to_single_process(spawn):
    """Each rank's summed loss over its zigzag shard of packed documents adds up to the one-process
    ``F.cross_entropy`` sum on the logits; so do the parameter gradients."""
    cfg, model, ids, labels = make(False, seed=3, batch=1)
    cu = torch.tensor([0, 7, 20, T])
    ref = F.cross_entropy(model(ids, cu_seqlens=cu).flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    results = spawn(2).run(sp_loss_worker, cfg.to_dict(), model.state_dict(), ids, labels, cu)
    assert_close(ref.detach(), sum(r[0] for r in results), name="loss")
    for n, p in model.named_parameters():
        assert_close(p.grad, sum(r[1][n] for r in results), name=f"d{n}")
