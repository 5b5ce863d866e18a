"""Sequence-parallel softmax attention (LASP-2H all-gather, ring, Ulysses) on P gloo ranks vs the
single-process float64 oracle on the whole sequence: outputs and dq/dk/dv."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.ops import reference, softmax_kernels, softmax_local
from lasp.ops.ring import step_blocks
from lasp.ops.softmax_local import (
    attend,
    attend_backward,
    block_backward,
    block_forward,
    lower_right_blocks,
    merge_partial,
    sdpa_attention,
)
from lasp.parallel import global_positions, shard_sequence, unshard_sequence
from lasp.testing import assert_close, seed_for, softmax_inputs

def attend_blocks(q, k, v, scale: float, blocks):
    """``q`` against the ``blocks`` ``(k0, k1, causal)`` of ``k, v``, merged by log-sum-exp: ``(o float32, lse)``."""
    o = lse = None
    for k0, k1, causal in blocks:
        ob, lb = attend(q, k[:, :, k0:k1], v[:, :, k0:k1], scale, causal)
        o, lse = (ob.float(), lb) if o is None else merge_partial(o, lse, ob, lb)
    return o, lse


METHODS = ("allgather", "ring", "ulysses")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = {"mha": (8, 8), "gqa": (8, 4)}  # (H, H_kv): divisible by P=4 for Ulysses


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


def _grad_check(ref_ins, outs, grads, ref, names="qkv", rtol=1e-5):
    assert_close(ref, outs, rtol=rtol, name="o")
    for x, g, name in zip(ref_ins, grads, names):
        assert_close(x.grad, g, rtol=rtol, name=f"d{name}")


@pytest.mark.parametrize("kernel", ["flash", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(12, 12), (5, 13), (1, 9)], ids=["square", "5x13", "1x9"])
def test_lower_right_causal_matches_oracle(monkeypatch, shape, dtype, kernel):
    """Single-process path with more keys than queries (decoding cache, LASP-2H spans): causal is
    bottom-right aligned, computed mask-free (prefix block + diagonal block merged by LSE); also
    through the float32 reference blocks that devices without the CPU flash kernel use (in row
    tiles of 4 queries here: ragged tiles, tiles across the diagonal)."""
    if kernel == "reference":
        monkeypatch.setattr(softmax_kernels, "select_kernel", lambda q, k, v, mask: None)
        monkeypatch.setattr(softmax_local, "REFERENCE_TILE_ROWS", 4)
    Tq, Tk = shape
    (_, k, v), _ = softmax_inputs(2, Tk, 4, 2, 8, dtype, seed=seed_for("lr", Tq, Tk, str(dtype)))
    (q, _, _), do = softmax_inputs(2, Tq, 4, 2, 8, dtype, seed=seed_for("lrq", Tq, Tk, str(dtype)))
    ins = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sdpa_attention(*ins, causal=True, scale=0.3)
    o.backward(do)
    ref_ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    q_pad = torch.cat([torch.zeros(2, Tk - Tq, 4, 8, dtype=torch.float64), ref_ins[0]], 1)  # queries at the end
    ref = reference.softmax_attention_reference(q_pad, ref_ins[1], ref_ins[2], causal=True, scale=0.3)[:, Tk - Tq :]
    ref.backward(do.double())
    _grad_check(ref_ins, o, [x.grad for x in ins], ref, rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_blocks_merge_equals_full_attention():
    """The block pieces on one process: a causal sequence as (full prefix, diagonal) blocks merged
    by LSE, and its backward through the final (o, lse), equal one softmax; the float32 reference
    (used off the CPU) gives the same blocks."""
    (q, k, v), do = softmax_inputs(1, 12, 4, 2, 8, torch.float64, seed=3)
    q, k, v, do = (x.float().transpose(1, 2) for x in (q, k, v, do))  # heads first
    ins = [x.detach().double().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    ref = reference.softmax_attention_reference(*ins, causal=True, scale=0.5)
    ref.backward(do.double().transpose(1, 2))
    rows = slice(7, 12)  # queries 7..11: keys [0, 7) fully visible, [7, 12) the diagonal
    blocks = lower_right_blocks(5, 12)
    assert blocks == [(0, 7, False), (7, 12, True)]
    o, lse = attend_blocks(q[:, :, rows], k, v, 0.5, blocks)
    assert_close(ref[:, rows].transpose(1, 2), o, name="o")
    dq = torch.zeros_like(q[:, :, rows])
    for k0, k1, diag in blocks:
        dq_b, _, _ = attend_backward(do[:, :, rows], q[:, :, rows], k[:, :, k0:k1], v[:, :, k0:k1], o, lse, 0.5, diag)
        dq += dq_b
    assert_close(ins[0].grad[:, rows].transpose(1, 2), dq, name="dq")
    # float32 reference blocks (grouped heads [B, H_kv, R, T, D]) against the kernel's
    qg = q[:, :, rows].reshape(1, 2, 2, 5, 8)
    o1, l1 = block_forward(qg, k[:, :, :7], v[:, :, :7], 0.5)
    o2, l2 = block_forward(qg, k[:, :, 7:], v[:, :, 7:], 0.5, torch.ones(5, 5, dtype=torch.bool).tril())
    og, lg = merge_partial(o1, l1, o2, l2)
    assert_close(o, og.reshape(o.shape), name="o (reference blocks)")
    assert_close(lse, lg.reshape(lse.shape), name="lse (reference blocks)")
    dog = do[:, :, rows].reshape(qg.shape)
    dq1, _, _ = block_backward(qg, k[:, :, :7], v[:, :, :7], dog, lg, (dog * og).sum(-1), 0.5)
    dq2, _, _ = block_backward(qg, k[:, :, 7:], v[:, :, 7:], dog, lg, (dog * og).sum(-1), 0.5, torch.ones(5, 5, dtype=torch.bool).tril())
    assert_close(dq, (dq1 + dq2).reshape(dq.shape), name="dq (reference blocks)")


@pytest.mark.parametrize("P", [2, 4, 8], ids=lambda p: f"P{p}")
def test_ring_blocks_cover_the_causal_pairs_and_balance(P):
    """Per ring step, the (rows, cols) blocks, full or the square diagonal, cover exactly the
    causally visible (query, key) pairs once; zigzag gives every rank the same work (its
    diagonal block, then half a block per step in one call), contiguous gives rank r r+1 blocks."""
    T_local = 16
    T = P * T_local
    for layout in ("contiguous", "zigzag"):
        work = []
        for rank in range(P):
            q_pos = global_positions(T, rank, P, layout)
            pairs = 0
            for step in range(P):
                src = (rank - step) % P
                k_pos = global_positions(T, src, P, layout)
                cover = torch.zeros(T_local, T_local, dtype=torch.int64)
                for rows, cols, diag in step_blocks(rank, src, P, layout, T_local, True):
                    n = rows.stop - rows.start
                    assert n == cols.stop - cols.start or not diag
                    box = torch.ones(n, cols.stop - cols.start, dtype=torch.int64)
                    box = box.tril() if diag else box
                    cover[rows, cols] += box
                    pairs += int(box.sum())
                assert torch.equal(cover, (k_pos[None, :] <= q_pos[:, None]).long())
                if layout == "zigzag" and step > 0:  # half a block, one kernel call
                    assert len(step_blocks(rank, src, P, layout, T_local, True)) == 1
            work.append(pairs)
        if layout == "zigzag":
            assert len(set(work)) == 1
        else:
            assert work == [r * T_local * T_local + T_local * (T_local + 1) // 2 for r in range(P)]
