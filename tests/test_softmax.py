"""Sequence-parallel softmax attention (LASP-2H all-gather, ring, Ulysses) on P gloo ranks vs the
single-process float64 oracle on the whole sequence: outputs and dq/dk/dv."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.ops import reference
from lasp.ops.softmax_local import block_backward, block_forward, group_queries, merge_partial, ungroup_queries
from lasp.ops.ring import block_work, ring_schedule
from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close

METHODS = ("allgather", "ring", "ulysses")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = {"mha": (8, 8), "gqa": (8, 4)}  # (H, H_kv): divisible by P=4 for Ulysses


def softmax_inputs(B, T, H, H_kv, D, dtype, seed):
    """Random q, k, v and an output gradient for softmax attention (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    q, do = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, D, generator=gen)
    k, v = torch.randn(B, T, H_kv, D, generator=gen), torch.randn(B, T, H_kv, D, generator=gen)
    return [x.to(dtype) for x in (q, k, v)], do.to(dtype)


def run_softmax(rank, world, full, do, *, causal, layout, method):
    """Worker: this rank's shard forward + backward; local output, grads and comm events (fwd, bwd)."""
    ins = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in full]
    with comm.record() as log:
        o = lasp.softmax_attention(*ins, causal=causal, group=dist.group.WORLD, method=method, layout=layout)
        n_fwd = len(log.events)
        o.backward(shard_sequence(do, rank, world, layout))
    return o.detach(), [x.grad for x in ins], log.events[:n_fwd], log.events[n_fwd:]


def check_softmax(results, full, do, causal, layout):
    ins = [x.detach().double().requires_grad_() for x in full]
    ref = reference.softmax_attention_reference(*ins, causal=causal)
    ref.backward(do.double())
    rtol = 1e-5 if full[0].dtype == torch.float32 else 1e-2
    assert_close(ref, unshard_sequence([r[0] for r in results], layout), rtol=rtol, name="o")
    for i, name in enumerate("qkv"):
        assert_close(ins[i].grad, unshard_sequence([r[1][i] for r in results], layout), rtol=rtol, name=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_softmax_matches_oracle(spawn, P, method, layout, causal, heads, dtype):
    H, H_kv = heads
    full, do = softmax_inputs(2, 32, H, H_kv, 8, dtype, seed=hash((P, method, layout, causal, H_kv)) % 1000)
    results = spawn(P).run(run_softmax, full, do, causal=causal, layout=layout, method=method)
    check_softmax(results, full, do, causal, layout)


@pytest.mark.parametrize("method", METHODS)
def test_softmax_long_local_shard(spawn, method):
    """Uneven work per block (T_local=24, zigzag halves of 12) with a non-default scale."""
    full, do = softmax_inputs(1, 96, 8, 4, 16, torch.float32, seed=7)
    results = spawn(4).run(run_softmax_scaled, full, do, method=method)
    ins = [x.detach().double().requires_grad_() for x in full]
    ref = reference.softmax_attention_reference(*ins, causal=True, scale=0.3)
    ref.backward(do.double())
    assert_close(ref, unshard_sequence([r[0] for r in results], "zigzag"), name="o")
    for i, name in enumerate("qkv"):
        assert_close(ins[i].grad, unshard_sequence([r[1][i] for r in results], "zigzag"), name=f"d{name}")


def run_softmax_scaled(rank, world, full, do, *, method):
    ins = [shard_sequence(x, rank, world, "zigzag").clone().requires_grad_() for x in full]
    o = lasp.softmax_attention(*ins, scale=0.3, group=dist.group.WORLD, method=method, layout="zigzag")
    o.backward(shard_sequence(do, rank, world, "zigzag"))
    return o.detach(), [x.grad for x in ins]


def test_blockwise_merge_equals_full_attention():
    """The ring's building blocks on one process: two key blocks merged by LSE == one softmax."""
    (q, k, v), do = softmax_inputs(1, 12, 4, 2, 8, torch.float64, seed=3)
    qg = group_queries(q, 2).double()
    kh, vh = (x.transpose(1, 2) for x in (k, v))
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    o1, l1 = block_forward(qg, kh[:, :, :5], vh[:, :, :5], 0.5, mask[:, :5])
    o2, l2 = block_forward(qg, kh[:, :, 5:], vh[:, :, 5:], 0.5, mask[:, 5:])  # rows 0..4 see nothing here
    o, lse = merge_partial(o1, l1, o2, l2)
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference.softmax_attention_reference(*ins, causal=True, scale=0.5)
    assert_close(ref, ungroup_queries(o), name="o")
    ref.backward(do)
    dog = group_queries(do, 2).double()
    delta = (dog * o).sum(-1)
    dq, dk, dv = block_backward(qg, kh, vh, dog, lse, delta, 0.5, mask)
    assert_close(ins[0].grad, ungroup_queries(dq), name="dq")
    assert_close(ins[1].grad, dk.transpose(1, 2), name="dk")
    assert_close(ins[2].grad, dv.transpose(1, 2), name="dv")


@pytest.mark.parametrize("P", [2, 4, 8], ids=lambda p: f"P{p}")
def test_ring_zigzag_balances_causal_work(P):
    """Zigzag: every rank computes the same number of query-key pairs (its masked diagonal block,
    then half a block per step); contiguous: rank r computes r full blocks plus its diagonal."""
    T_local = 16
    T = P * T_local
    zig = [sum(block_work(p, T_local) for p in ring_schedule(r, P, T, "zigzag", True)) for r in range(P)]
    assert len(set(zig)) == 1
    assert zig[0] == T_local * T_local + (P - 1) * T_local * T_local // 2  # masked diagonal + half blocks
    cont = [sum(block_work(p, T_local) for p in ring_schedule(r, P, T, "contiguous", True)) for r in range(P)]
    assert cont == [(r + 1) * T_local * T_local for r in range(P)]
    for r in range(P):  # off-diagonal zigzag blocks need no mask at all
        plans = ring_schedule(r, P, T, "zigzag", True)
        assert all(p is not None and p.mask is None for p in plans[1:])
