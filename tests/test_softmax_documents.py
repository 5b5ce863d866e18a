"""Packed documents (``cu_seqlens``) for ``lasp.softmax_attention``: every method x layout x P vs
the float64 oracle run on each document alone (outputs and dq/dk/dv), the pieces cover exactly
the visible (query, key) pairs, and bad ``cu_seqlens`` is a ValueError on every rank before the
operator's collectives."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.ops import reference, softmax_documents, softmax_kernels, softmax_local
from lasp.ops.ring import step_pieces
from lasp.ops.softmax_allgather import rank_pieces
from lasp.parallel import global_positions, shard_sequence, unshard_sequence
from lasp.testing import HostSyncError, assert_close, no_host_sync, seed_for, softmax_inputs, value_error_and_collectives

METHODS = ("allgather", "ring", "ulysses")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
T = 48  # P=2: T_local 24, zigzag halves of 12; P=4: T_local 12, halves of 6

#: Hand-made document starts (length-1 documents, boundaries at zigzag-half and rank edges, a
#: document over three ranks at P=4: [13, 40)) and random ones (drawn in :func:`cu_for`).
FIXED = {2: [0, 1, 12, 24, 25, 29, 47, 48], 4: [0, 1, 6, 12, 13, 40, 41, 47, 48]}


def cu_for(kind: str, P: int, t: int = T) -> torch.Tensor:
    if kind == "fixed":
        return torch.tensor(FIXED[P], dtype=torch.int32)
    if kind == "one":
        return torch.tensor([0, t])
    gen = torch.Generator().manual_seed(seed_for("cu", P, t))
    cuts = torch.randperm(t - 1, generator=gen)[:9] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([t])])


def oracle(full, do, cu, causal, scale=None):
    """float64 oracle on each document alone; returns (o, [dq, dk, dv])."""
    ins = [x.detach().double().requires_grad_() for x in full]
    b = cu.tolist()
    o = torch.cat([
        reference.softmax_attention_reference(*(x[:, s:f] for x in ins), causal=causal, scale=scale)
        for s, f in zip(b[:-1], b[1:])
    ], dim=1)
    o.backward(do.double())
    return o, [x.grad for x in ins]


def check(results, full, do, cu, causal, layout):
    ref, grads = oracle(full, do, cu, causal)
    rtol = 1e-5 if full[0].dtype == torch.float32 else 1e-2
    assert_close(ref, unshard_sequence([r[0] for r in results], layout), rtol=rtol, name="o")
    for i, name in enumerate("qkv"):
        assert_close(grads[i], unshard_sequence([r[1][i] for r in results], layout), rtol=rtol, name=f"d{name}")


def run_docs(rank, world, full, do, cu, *, causal, layout, method, small=softmax_documents.SMALL_DOCUMENT):
    ins = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in full]
    saved, softmax_documents.SMALL_DOCUMENT = softmax_documents.SMALL_DOCUMENT, small  # 0: no groups
    try:
        o = lasp.softmax_attention(*ins, causal=causal, group=dist.group.WORLD, method=method, layout=layout, cu_seqlens=cu)
        o.backward(shard_sequence(do, rank, world, layout))
    finally:
        softmax_documents.SMALL_DOCUMENT = saved
    return o.detach(), [x.grad for x in ins]


@pytest.mark.parametrize("docs", ["fixed", "random", "ungrouped"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_documents_match_per_document_oracle(spawn, P, method, layout, dtype, docs):
    """``ungrouped``: the fixed documents, each its own kernel call (no small-document groups)."""
    if docs == "ungrouped" and dtype != torch.float32:
        pytest.skip("fp32 covers the ungrouped pieces")
    full, do = softmax_inputs(1, T, 8, 4, 8, dtype, seed=seed_for("docs", P, method, layout, str(dtype), docs))
    cu = cu_for("fixed" if docs == "ungrouped" else docs, P)
    small = 0 if docs == "ungrouped" else softmax_documents.SMALL_DOCUMENT
    res = spawn(P).run(run_docs, full, do, cu, causal=True, layout=layout, method=method, small=small)
    check(res, full, do, cu, True, layout)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", METHODS)
def test_documents_noncausal(spawn, method, layout):
    full, do = softmax_inputs(1, T, 4, 2, 8, torch.float32, seed=seed_for("nc", method, layout))
    cu = cu_for("fixed", 2)
    check(spawn(2).run(run_docs, full, do, cu, causal=False, layout=layout, method=method), full, do, cu, False, layout)


@pytest.mark.parametrize("method", METHODS)
def test_one_document_equals_no_documents(spawn, method):
    full, do = softmax_inputs(1, T, 4, 2, 8, torch.float32, seed=5)
    res = spawn(2).run(run_docs, full, do, cu_for("one", 2), causal=True, layout="zigzag", method=method)
    check(res, full, do, cu_for("one", 2), True, "zigzag")


@pytest.mark.parametrize("kernel", ["flash", "reference"])
@pytest.mark.parametrize("docs", ["random", "tiny", "long"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_single_process_documents(monkeypatch, dtype, causal, docs, kernel):
    """group=None (and so P=1): one kernel call per document, small ones grouped (``tiny``: 300
    tokens of documents of 1-5 tokens, several groups of at most GROUP_ROWS; ``long``: documents
    longer than SMALL_DOCUMENT); ``reference``: the float32 blocks devices without the CPU flash
    kernel use (in row tiles of 4 queries)."""
    if kernel == "reference":
        monkeypatch.setattr(softmax_kernels, "select_kernel", lambda q, k, v, mask: None)
        monkeypatch.setattr(softmax_local, "REFERENCE_TILE_ROWS", 4)
    t = {"random": T, "tiny": 300, "long": 160}[docs]
    full, do = softmax_inputs(1, t, 4, 2, 8, dtype, seed=seed_for("p1", str(dtype), causal, docs))
    if docs == "random":
        cu = cu_for("random", 1)
    elif docs == "tiny":
        lengths = torch.randint(1, 6, (300,), generator=torch.Generator().manual_seed(1))
        cu = torch.cat([torch.tensor([0]), lengths.cumsum(0)])
        cu = torch.cat([cu[cu < t], torch.tensor([t])])
    else:
        cu = torch.tensor([0, 3, 50, 90, 91, 160])
    ins = [x.clone().requires_grad_() for x in full]
    o = lasp.softmax_attention(*ins, causal=causal, cu_seqlens=cu)
    o.backward(do)
    check([(o.detach(), [x.grad for x in ins])], full, do, cu, causal, "contiguous")


def box(rows: slice, cols: slice, kind) -> torch.Tensor:
    """The (query, key) pairs a piece computes, as 0/1 ``[rows, cols]``."""
    if isinstance(kind, torch.Tensor):
        return kind.long()
    full = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.int64)
    return full.tril() if kind else full


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_pieces_cover_exactly_the_visible_pairs(P, layout):
    """allgather's pieces per rank and ring's per step: every visible (query, key) pair of the
    same document once, nothing else."""
    cu = FIXED[P]
    doc = torch.bucketize(torch.arange(T), torch.tensor(cu), right=True)
    t_local = T // P
    for rank in range(P):
        q_pos = global_positions(T, rank, P, layout)
        want = (q_pos[:, None] >= torch.arange(T)[None]) & (doc[q_pos][:, None] == doc[None])
        cover = torch.zeros(t_local, T, dtype=torch.int64)  # natural-order keys for allgather
        for rows, cols, kind in rank_pieces(rank, P, layout, t_local, True, tuple(cu)):
            cover[rows, cols] += box(rows, cols, kind)
        assert torch.equal(cover, want.long())
        ring = torch.zeros(t_local, T, dtype=torch.int64)
        for step in range(P):
            src = (rank - step) % P
            k_pos = global_positions(T, src, P, layout)
            for rows, cols, kind in step_pieces(rank, src, P, layout, t_local, True, tuple(cu)):
                ring[torch.arange(rows.start, rows.stop)[:, None], k_pos[cols][None]] += box(rows, cols, kind)
        assert torch.equal(ring, want.long())


BAD = {
    "not_from_0": lambda t: torch.tensor([1, 5, t]),
    "not_to_T": lambda t: torch.tensor([0, 5, t - 1]),
    "not_increasing": lambda t: torch.tensor([0, 9, 9, t]),
    "float": lambda t: torch.tensor([0.0, 5.0, float(t)]),
    "2d": lambda t: torch.tensor([[0, t]]),
}


def run_bad(rank, world, cu_per_rank, B):
    full, _ = softmax_inputs(1, T, 4, 2, 8, torch.float32, seed=1)
    ins = [shard_sequence(x, rank, world).expand(B, -1, -1, -1) for x in full]
    return value_error_and_collectives(lambda: lasp.softmax_attention(*ins, group=dist.group.WORLD, cu_seqlens=cu_per_rank[rank]))


@pytest.mark.parametrize("bad", [*BAD, "differs", "batch2"])
def test_bad_cu_seqlens_raise_before_collectives(spawn, bad):
    if bad == "differs":
        cus, B = [torch.tensor([0, 5, T]), torch.tensor([0, 6, T])], 1
    elif bad == "batch2":
        cus, B = [torch.tensor([0, 5, T])] * 2, 2
    else:
        cus, B = [BAD[bad](T)] * 2, 1
    for msg, tags in spawn(2).run(run_bad, cus, B):
        assert msg is not None and "cu_seqlens" in msg
        assert all(t.startswith("documents.check") for t in tags), tags  # only the validation's all-gather


def test_one_rank_bad_others_raise_too(spawn):
    """A rank whose own cu_seqlens is bad must not leave the others waiting in a collective."""
    results = spawn(2).run(run_bad, [torch.tensor([0, 5, T]), torch.tensor([0, 5, T - 1])], 1)
    assert all(msg is not None and "cu_seqlens" in msg for msg, _ in results)


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_cu_seqlens_single_process(bad):
    full, _ = softmax_inputs(1, T, 4, 2, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lasp.softmax_attention(*full, cu_seqlens=BAD[bad](T))


def run_bytes(rank, world, full, do, cu, method, layout):
    ins = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in full]
    with comm.record() as log:
        o = lasp.softmax_attention(*ins, group=dist.group.WORLD, method=method, layout=layout, cu_seqlens=cu)
        o.backward(shard_sequence(do, rank, world, layout))
    return [(e.kind, e.bytes, e.tag) for e in log.events]


@pytest.mark.parametrize("method", METHODS)
def test_documents_send_the_same_bytes(spawn, method):
    """Documents change the compute, not the communication: the same collectives and bytes, plus
    the validation's one all-gather of 3 int64 (tag ``documents.check``)."""
    full, do = softmax_inputs(1, T, 4, 4, 8, torch.float32, seed=9)
    plain = spawn(2).run(run_bytes, full, do, None, method, "zigzag")
    docs = spawn(2).run(run_bytes, full, do, cu_for("fixed", 2), method, "zigzag")
    for a, b in zip(plain, docs):
        assert [e for e in b if not e[2].startswith("documents.check")] == a
        assert [e[:2] for e in b if e[2].startswith("documents.check")] == [("all_gather", 24)]


def run_no_sync(rank, world, full, do, bounds, method):
    """The operator itself (validated inputs, ``bounds`` already ints) under no_host_sync."""
    impl = lasp.attention.SOFTMAX_METHODS[method]
    ins = [shard_sequence(x, rank, world, "zigzag").clone().requires_grad_() for x in full]
    try:
        with no_host_sync():
            o = impl(*ins, causal=True, scale=0.3, group=dist.group.WORLD, layout="zigzag", bounds=bounds)
            o.backward(shard_sequence(do, rank, world, "zigzag"))
    except HostSyncError as e:
        return str(e)
    return None


@pytest.mark.parametrize("method", METHODS)
def test_documents_forward_backward_have_no_host_sync(spawn, method):
    """cu_seqlens is read on the host once, by the wrapper's validation; forward and backward
    (pieces, small-document masks) never synchronise."""
    full, do = softmax_inputs(1, T, 4, 2, 8, torch.float32, seed=11)
    assert spawn(2).run(run_no_sync, full, do, tuple(FIXED[2]), method) == [None, None]
    ins = [x.clone().requires_grad_() for x in full]
    with no_host_sync():
        softmax_documents.document_attention(*ins, tuple(FIXED[2]), causal=True, scale=0.3).backward(do)
