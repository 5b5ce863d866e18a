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
from lasp.ops.ring import block_work, ring_schedule, ring_softmax_attention, ring_step_tiles
from lasp.parallel import global_positions, shard_sequence, unshard_sequence
from lasp.testing import assert_close, seed_for

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
    full, do = softmax_inputs(2, 32, H, H_kv, 8, dtype, seed=seed_for(P, method, layout, causal, H_kv, str(dtype)))
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


def run_ring_tiled(rank, world, full, do, *, causal, layout, tile_rows):
    """Worker: ring attention with ``tile_rows`` query rows per tile; also the comm events of the
    same call with the default tile, which must be identical (tiling is local compute only)."""
    torch.set_num_threads(1)
    events = []
    for tiles in (tile_rows, None):
        ins = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in full]
        with comm.record() as log:
            o = ring_softmax_attention(*ins, causal=causal, scale=full[0].shape[-1] ** -0.5,
                                       group=dist.group.WORLD, layout=layout, tile_rows=tiles)
            o.backward(shard_sequence(do, rank, world, layout))
        events.append([(e.kind, e.bytes, e.tag) for e in log.events])
        if tiles == tile_rows:
            result = (o.detach(), [x.grad for x in ins])
    return (*result, events[0] == events[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_ring_row_tiles_match_oracle(spawn, P, layout, causal, dtype):
    """Ring attention with tiles of 5 query rows (T_local = 24 or 12: several tiles per block,
    a ragged last tile, tiles that straddle the zigzag halves and the causal diagonal), GQA,
    vs the float64 oracle: output and dq/dk/dv; communication identical to the default tile."""
    full, do = softmax_inputs(1, 48, 8, 4, 8, dtype, seed=11 + P)
    results = spawn(P).run(run_ring_tiled, full, do, causal=causal, layout=layout, tile_rows=5)
    check_softmax([r[:2] for r in results], full, do, causal, layout)
    assert all(r[2] for r in results), "tiling changed the communication"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_row_tiles_cover_the_visible_pairs_once(P, layout):
    """Per ring step, the row tiles' (rows x cols, mask) boxes cover exactly the causally visible
    (query, key) pairs, each once, and no tile is taller than tile_rows."""
    T_local, tile = 16, 3
    T = P * T_local
    for rank in range(P):
        q_pos = global_positions(T, rank, P, layout)
        for step in range(P):
            k_pos = global_positions(T, (rank - step) % P, P, layout)
            cover = torch.zeros(T_local, T_local, dtype=torch.int64)
            for t in ring_step_tiles(rank, step, P, T, layout, True, tile):
                rows = range(T_local)[t.rows]
                assert 0 < len(rows) <= tile
                box = torch.ones(len(rows), len(range(T_local)[t.cols]), dtype=torch.int64)
                cover[t.rows, t.cols] += box if t.mask is None else t.mask.long()
            assert torch.equal(cover, (k_pos[None, :] <= q_pos[:, None]).long())


def test_ring_rejects_bad_tile_rows():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="tile_rows"):
        ring_softmax_attention(q, q, q, causal=True, scale=1.0, group=None, layout="contiguous", tile_rows=0)
