"""Packed documents (``cu_seqlens``) for the linear operators vs the oracle run on each document alone.

``lasp.linear_attention``, ``lasp.gated_delta_rule`` (every method, both layouts, P in {2, 4}) and
``lasp.causal_conv1d``: outputs, final state and every gradient against the float64 oracles applied to
each document separately; LASP-2's bytes unchanged; bad ``cu_seqlens`` -> ValueError on every rank.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp
from lasp import comm
from lasp.ops.delta_reference import naive_gated_delta_rule
from lasp.ops.documents import check_cu_seqlens, document_offsets, reset_gate
from lasp.ops.reference import naive_recurrent_linear_attention
from lasp.parallel import num_chunks, shard_sequence, unshard_sequence
from lasp.testing import assert_close, delta_inputs, linear_inputs, no_host_sync, seed_for, value_error_and_collectives


def doc_cuts(T: int, P: int, layout: str, seed: int) -> torch.Tensor:
    """``cu_seqlens`` with a length-1 document first, a start exactly at a segment (rank) edge,
    another length-1 document, one document spanning three segments, chunk edges (64) where a
    segment is longer than a chunk, and random starts in the rest."""
    Ts = T // num_chunks(P, layout)
    span_end = min(3 * Ts + 1, T)  # [Ts + 4, 3 Ts + 1): segments 1, 2 and 3 (ranks 1-3 for P = 4)
    cuts = {1, Ts, Ts + 3, Ts + 4}
    cuts |= {c for c in (64, Ts + 64) if c < T and c % Ts != 0 and not Ts + 4 < c < span_end}
    rng = random.Random(seed)
    cuts |= set(rng.sample(range(span_end, T), k=min(3, max(0, T - span_end))))
    cuts |= set(rng.sample(range(2, Ts), k=min(2, Ts - 2)))
    cuts.discard(0), cuts.discard(T)
    return torch.tensor([0, *sorted(cuts), T], dtype=torch.int64)


def per_document(fn, cu: torch.Tensor, token_inputs, initial_state):
    """Run ``fn(tokens, s0) -> (o, S)`` on each document alone: ``(o, final states [N, H, K, V])``.
    ``initial_state``: ``[N, H, K, V]`` (one per document) or ``[1, H, K, V]`` (the first's)."""
    outs, finals = [], []
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        toks = [None if x is None else x[:, a:b] for x in token_inputs]
        per_doc = initial_state is not None and initial_state.shape[0] == len(bounds) - 1
        s0 = initial_state[i : i + 1] if per_doc else initial_state if i == 0 else None
        o, S = fn(toks, s0)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, dim=1), torch.cat(finals)


def leaves64(xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]


# ----------------------------------------------------------------------------- distributed runs


def run_op(rank, world, op, xs, shared, s0, cu, do, dF, kw, layout, final):
    """Shard ``xs`` (per-token), call ``op`` with ``cu_seqlens``, backprop (backward under
    no_host_sync); returns (o, final_state, per-token grads, shared grads, s0 grad, comm events)."""
    group = dist.group.WORLD
    local = [None if x is None else shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in xs]
    sh = [None if x is None else x.clone().requires_grad_() for x in shared]
    s = None if s0 is None else s0.clone().requires_grad_()
    states = dict(initial_state=s, output_final_state=final) if op != "conv" else {}
    fn = {"linear": lasp.linear_attention, "delta": lasp.gated_delta_rule, "conv": lasp.causal_conv1d}[op]
    with comm.record() as log:
        res = fn(*local, *sh, group=group, layout=layout, cu_seqlens=cu, **states, **kw)
        o, S = res if final else (res, None)
        loss = (o.float() * shard_sequence(do, rank, world, layout)).sum()
        if final:
            loss = loss + (S * (dF if rank == 0 else torch.zeros_like(dF))).sum()
        with no_host_sync():
            loss.backward()
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return (o.detach(), None if S is None else S.detach(), [grad(x) for x in local], [grad(x) for x in sh],
            grad(s), list(log.events))


def check(results, layout, o_ref, S_ref, tok64, sh64, s064, tol):
    assert_close(o_ref, unshard_sequence([r[0] for r in results], layout), rtol=tol, name="o")
    if S_ref is not None:
        for r in results:
            assert_close(S_ref, r[1], rtol=tol, name="final_state")
    for i, x in enumerate(tok64):
        if x is not None:
            assert_close(x.grad, unshard_sequence([r[2][i] for r in results], layout), rtol=tol, name=f"token input {i} grad")
    for i, x in enumerate(sh64):
        if x is not None:
            assert_close(x.grad, sum(r[3][i] for r in results), rtol=tol, name=f"shared input {i} grad")
    if s064 is not None:
        assert_close(s064.grad, sum(r[4] for r in results), rtol=tol, name="initial_state grad")


LINEAR_CASES = [  # method, layout, P, gates, init, final
    (m, lay, P, gates, init, final)
    for P in (2, 4)
    for lay in ("contiguous", "zigzag")
    for m, gates, init, final in (("lasp2", "both", True, True), ("lasp1", "none", True, True), ("ulysses", "g", True, True))
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}-{c[1]}-P{c[2]}-{c[3]}")
def test_linear_attention_documents(spawn, case):
    method, layout, P, gates, init, final = case
    B, T, H, K, V = 1, 16 * P, 4, 8, 4
    q, k, v, g, gg = linear_inputs(B, T, H, K, V, gates=gates, seed=seed_for("docs", *case))
    cu = doc_cuts(T, P, layout, seed_for("cuts", *case))
    N = len(cu) - 1  # fla's per-document states (every method)
    s0 = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(3)) if init else None
    gen = torch.Generator().manual_seed(1)
    do, dF = torch.randn(B, T, H, V, generator=gen), torch.randn(N, H, K, V, generator=gen)
    tok64, sh64, s064 = leaves64([q, k, v, g]), leaves64([gg]), (None if s0 is None else s0.double().requires_grad_())

    def doc(toks, s):
        return naive_recurrent_linear_attention(*toks, sh64[0], initial_state=s, output_final_state=True)

    o_ref, S_ref = per_document(doc, cu, tok64, s064)
    ((o_ref * do.double()).sum() + ((S_ref * dF.double()).sum() if final else 0)).backward()
    results = spawn(P).run(run_op, "linear", [q, k, v, g], [gg], s0, cu, do, dF, dict(method=method, backend="torch"), layout, final)
    check(results, layout, o_ref, S_ref if final else None, tok64, sh64, s064, 1e-5)


DELTA_CASES = [  # method, layout, P, gates, init, final, l2
    (m, lay, P, gates, init, final, l2)
    for P in (2, 4)
    for lay in ("contiguous", "zigzag")
    for m, gates, init, final, l2 in (("lasp2", "g", True, True, False), ("lasp1", "none", True, True, True),
                                      ("ulysses", "g", True, True, False))
]


@pytest.mark.parametrize("case", DELTA_CASES, ids=lambda c: f"{c[0]}-{c[1]}-P{c[2]}-{c[3]}")
def test_gated_delta_rule_documents(spawn, case):
    method, layout, P, gates, init, final, l2 = case
    B, T, H, K, V = 1, 16 * P, 4, 6, 5
    xs = delta_inputs(B, T, H, K, V, gates=gates, l2norm=l2, init=init, seed=seed_for("ddocs", *case))
    cu = doc_cuts(T, P, layout, seed_for("dcuts", *case))
    N = len(cu) - 1
    if init:  # fla's per-document initial states
        xs[5] = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(1)
    do, dF = torch.randn(B, T, H, V, generator=gen), torch.randn(N, H, K, V, generator=gen)
    tok64 = leaves64(xs[:5])
    s064 = None if xs[5] is None else xs[5].double().requires_grad_()

    def doc(toks, s):
        return naive_gated_delta_rule(*toks, initial_state=s, output_final_state=True, use_qk_l2norm=l2)

    o_ref, S_ref = per_document(doc, cu, tok64, s064)
    ((o_ref * do.double()).sum() + ((S_ref * dF.double()).sum() if final else 0)).backward()
    kw = dict(method=method, use_qk_l2norm_in_kernel=l2)
    results = spawn(P).run(run_op, "delta", xs[:5], [], xs[5], cu, do, dF, kw, layout, final)
    check(results, layout, o_ref, S_ref if final else None, tok64, [], s064, 1e-5)
    if method == "lasp2":  # the bytes of the delta rule without documents: (A, M) per segment each way, and the
        n_seg = 2 if layout == "zigzag" else 1  # per-document final states (and their gradients) in one all-reduce
        per_dir = n_seg * B * H * (K * K + K * V) * 4
        finals = [("all_reduce", N * H * K * V * 4)] * final
        for r in results:
            ops = [(e.kind, e.bytes) for e in r[-1] if e.tag != "documents.check"]
            assert ops == [("all_gather", per_dir), *finals, *finals, ("all_gather", per_dir)], ops


def test_gated_delta_rule_documents_gva_without_gates(spawn):
    """GVA (v, beta on HV = 2 H heads) DeltaNet (g None) with packed documents and no states: the
    reset gate is made per value head (it was made on q's heads: a RuntimeError), one process and
    LASP-2 on P = 2, zigzag."""
    P, layout, B, T, H, HV, K, V = 2, "zigzag", 1, 16, 1, 2, 4, 3
    xs = delta_inputs(B, T, H, K, V, gates="none", hv=HV, seed=seed_for("gva-docs"))
    cu = doc_cuts(T, P, layout, seed_for("gva-cuts"))
    do = torch.randn(B, T, HV, V, generator=torch.Generator().manual_seed(1))
    tok64 = leaves64(xs[:5])
    o_ref, _ = per_document(lambda t, s: naive_gated_delta_rule(*t, initial_state=s, output_final_state=True), cu, tok64, None)
    (o_ref * do.double()).sum().backward()
    assert_close(o_ref, lasp.gated_delta_rule(*xs[:5], cu_seqlens=cu), rtol=1e-5, name="o (one process)")
    results = spawn(P).run(run_op, "delta", xs[:5], [], None, cu, do, None, {}, layout, False)
    check(results, layout, o_ref, None, tok64, [], None, 1e-5)


def test_gated_delta_rule_documents_at_chunk_edges(spawn):
    """Delta rule, segments longer than a chunk (64): starts at chunk edges, one process and P = 2."""
    P, layout, B, T, H, K, V = 2, "contiguous", 1, 192, 2, 6, 5
    cu = torch.tensor([0, 1, 64, 65, 96, 160, 161, 192])
    xs = delta_inputs(B, T, H, K, V, gates="g", init=True, seed=15)  # lasp's single-state form: the first document's
    gen = torch.Generator().manual_seed(1)
    do, dF = torch.randn(B, T, H, V, generator=gen), torch.randn(len(cu) - 1, H, K, V, generator=gen)
    tok64, s064 = leaves64(xs[:5]), xs[5].double().requires_grad_()
    o_ref, S_ref = per_document(lambda t, s: naive_gated_delta_rule(*t, initial_state=s, output_final_state=True), cu, tok64, s064)
    ((o_ref * do.double()).sum() + (S_ref * dF.double()).sum()).backward()
    results = spawn(P).run(run_op, "delta", xs[:5], [], xs[5], cu, do, dF, dict(method="lasp2"), layout, True)
    check(results, layout, o_ref, S_ref, tok64, [], s064, 1e-5)
    one = [x.clone().requires_grad_() for x in xs]
    o, S = lasp.gated_delta_rule(*one[:5], initial_state=one[5], output_final_state=True, cu_seqlens=cu)
    ((o * do).sum() + (S * dF).sum()).backward()
    assert_close(o_ref, o, name="o (one process)")
    assert_close(S_ref, S, name="final_state (one process)")
    for x, y in zip([*tok64, s064], one):
        assert_close(x.grad, y.grad, name="grad (one process)")


def test_documents_at_chunk_edges_one_process_and_two_ranks(spawn):
    """Segments longer than a chunk (64): starts exactly at chunk edges, the one-process path too."""
    P, layout, B, T, H, K, V = 2, "contiguous", 1, 192, 2, 8, 4
    cu = torch.tensor([0, 1, 64, 65, 96, 160, 161, 192])
    q, k, v, g, gg = linear_inputs(B, T, H, K, V, gates="g", seed=5)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen)
    tok64 = leaves64([q, k, v, g])
    o_ref, _ = per_document(lambda t, s: naive_recurrent_linear_attention(*t, output_final_state=True), cu, tok64, None)
    (o_ref * do.double()).sum().backward()
    results = spawn(P).run(run_op, "linear", [q, k, v, g], [], None, cu, do, None, dict(method="lasp2"), layout, False)
    check(results, layout, o_ref, None, tok64, [], None, 1e-5)
    one = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o = lasp.linear_attention(*one, cu_seqlens=cu)
    (o * do).sum().backward()
    assert_close(o_ref, o, name="o (one process)")
    for x, y in zip(tok64, one):
        assert_close(x.grad, y.grad, name="grad (one process)")


def test_lasp2_bytes_unchanged_with_documents(spawn):
    P, layout, B, T, H, K, V = 2, "zigzag", 1, 32, 2, 8, 4
    q, k, v, g, gg = linear_inputs(B, T, H, K, V, gates="none", seed=9)
    do = torch.randn(B, T, H, V)
    with_docs = spawn(P).run(run_op, "linear", [q, k, v, g], [gg], None, doc_cuts(T, P, layout, 1), do, None,
                             dict(method="lasp2"), layout, False)
    without = spawn(P).run(run_bytes_plain, q, k, v, do, layout)
    for r, plain in zip(with_docs, without):
        events = r[-1]
        assert [(e.kind, e.tag) for e in events if e.tag == "documents.check"] == [("all_gather", "documents.check")]
        lasp2 = [(e.kind, e.bytes, e.tag) for e in events if e.tag != "documents.check"]
        assert lasp2 == plain and len(lasp2) == 2


def run_bytes_plain(rank, world, q, k, v, do, layout):
    local = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in (q, k, v)]
    with comm.record() as log:
        o = lasp.linear_attention(*local, group=dist.group.WORLD, layout=layout)
        (o * shard_sequence(do, rank, world, layout)).sum().backward()
    return [(e.kind, e.bytes, e.tag) for e in log.events]


# ----------------------------------------------------------------------------- convolution


def conv_per_document(x, weight, bias, cu, activation):
    D, W = weight.shape
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        y = F.conv1d(x[:, a:b].transpose(1, 2), weight[:, None, :], bias, padding=W - 1, groups=D)[..., : b - a]
        outs.append(y.transpose(1, 2))
    y = torch.cat(outs, dim=1)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("P,layout", [(2, "contiguous"), (2, "zigzag"), (4, "contiguous"), (4, "zigzag")], ids=str)
def test_causal_conv1d_documents(spawn, P, layout):
    B, T, D, W = 1, 16 * P, 6, 4
    gen = torch.Generator().manual_seed(seed_for("conv", P, layout))
    x, weight, bias = torch.randn(B, T, D, generator=gen), torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    do = torch.randn(B, T, D, generator=gen)
    cu = doc_cuts(T, P, layout, seed_for("convcuts", P, layout))
    x64, w64, b64 = leaves64([x, weight, bias])
    y_ref = conv_per_document(x64, w64, b64, cu, "silu")
    (y_ref * do.double()).sum().backward()
    results = spawn(P).run(run_op, "conv", [x], [weight, bias], None, cu, do, None, dict(activation="silu"), layout, False)
    check(results, layout, y_ref, None, [x64], [w64, b64], None, 1e-5)
    one = [t.clone().requires_grad_() for t in (x, weight, bias)]  # one process
    y = lasp.causal_conv1d(*one, activation="silu", cu_seqlens=cu)
    (y * do).sum().backward()
    assert_close(y_ref, y, name="y (one process)")
    for ref, got in zip((x64, w64, b64), one):
        assert_close(ref.grad, got.grad, name="grad (one process)")


# ----------------------------------------------------------------------------- no host sync, validation


def test_document_tensors_need_no_host_sync():
    cu = check_cu_seqlens(torch.tensor([0, 3, 8, 9, 16]), 16, 1, None)
    g = torch.randn(1, 8, 2, requires_grad=True)
    with no_host_sync():
        gate = reset_gate(g, cu, (1, 8, 2), None, "contiguous", torch.float32)
        offs = document_offsets(cu, 16, None, "contiguous")
        gate.sum().backward()
    assert torch.equal(torch.isinf(gate[0, :, 0]), torch.tensor([False, False, False, True] + [False] * 4))
    assert torch.equal(g.grad[0, :, 0], torch.tensor([1.0, 1, 1, 0, 1, 1, 1, 1]))
    assert offs.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6]


BAD = {  # name -> (cu_seqlens on rank 0, on rank 1, B, expected message part)
    "c0-not-0": ([1, 4, 16], [1, 4, 16], 1, "start at 0"),
    "cN-not-T": ([0, 4, 15], [0, 4, 15], 1, "end at"),
    "not-increasing": ([0, 9, 4, 16], [0, 9, 4, 16], 1, "strictly increasing"),
    "repeated": ([0, 4, 4, 16], [0, 4, 4, 16], 1, "strictly increasing"),
    "float": ([0.0, 4.0, 16.0], [0.0, 4.0, 16.0], 1, "integer"),
    "batch-2": ([0, 4, 16], [0, 4, 16], 2, "B = 1"),
    "differs": ([0, 4, 16], [0, 5, 16], 1, "identical on every rank"),
    "bad-on-one-rank": ([0, 4, 16], [0, 4, 17], 1, "cu_seqlens"),
}


def run_bad(rank, world, op, cus, B):
    group = dist.group.WORLD
    cu = torch.tensor(cus[rank])
    gen = torch.Generator().manual_seed(rank)
    T = 8
    q, k, v = (torch.randn(B, T, 2, 4, generator=gen) for _ in range(3))
    beta = torch.rand(B, T, 2, generator=gen)
    call = {"linear": lambda: lasp.linear_attention(q, k, v, group=group, cu_seqlens=cu),
            "delta": lambda: lasp.gated_delta_rule(q, k, v, None, beta, group=group, cu_seqlens=cu),
            "conv": lambda: lasp.causal_conv1d(q[..., 0, :], torch.randn(4, 3), group=group, cu_seqlens=cu)}[op]
    return value_error_and_collectives(call)


@pytest.mark.parametrize("op", ["linear", "delta", "conv"])
@pytest.mark.parametrize("bad", BAD, ids=str)
def test_bad_cu_seqlens(spawn, bad, op):
    if op != "linear" and bad not in ("cN-not-T", "differs", "bad-on-one-rank"):
        pytest.skip("one validator: the other operators share it (a few cases each)")
    cu0, cu1, B, part = BAD[bad]
    for msg, tags in spawn(2).run(run_bad, op, [cu0, cu1], B):
        assert msg is not None and "cu_seqlens" in msg and part in msg, msg
        assert set(tags) <= {"documents.check"}, tags  # nothing of the operator ran


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_linear_attention_documents_triton(spawn, layout):
    """The Triton segments (interpreter on the CPU) take the document resets too."""
    P, B, T, H, K, V = 2, 1, 32, 2, 16, 16
    q, k, v, g, gg = linear_inputs(B, T, H, K, V, gates="g_gamma", seed=seed_for("triton-docs", layout))
    cu = doc_cuts(T, P, layout, 7)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(2))
    tok64, sh64 = leaves64([q, k, v, g]), leaves64([gg])
    o_ref, _ = per_document(lambda t, s: naive_recurrent_linear_attention(*t, sh64[0], output_final_state=True), cu, tok64, None)
    (o_ref * do.double()).sum().backward()
    results = spawn(P).run(run_op, "linear", [q, k, v, g], [gg], None, cu, do, None, dict(method="lasp2", backend="triton"), layout, False)
    check(results, layout, o_ref, None, tok64, sh64, None, 1e-5)


def test_bad_cu_seqlens_one_process():
    q, k, v, _, _ = linear_inputs(1, 8, 2, 4, 4)
    with pytest.raises(ValueError, match="causal=True"):
        lasp.linear_attention(q, k, v, causal=False, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(ValueError, match="1-D"):
        lasp.linear_attention(q, k, v, cu_seqlens=torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="end at"):
        lasp.causal_conv1d(q[:, :, 0], torch.randn(4, 2), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="torch.Tensor"):
        lasp.gated_delta_rule(q, k, v, None, torch.rand(1, 8, 2), cu_seqlens=[0, 8])
    assert check_cu_seqlens(torch.tensor([0, 8], dtype=torch.int32), 8, 1, None).dtype == torch.int64


@pytest.mark.parametrize("op", ["linear", "delta"])
def test_documents_bf16(spawn, op):
    """bf16 inputs (the created reset gate is bf16: 0 and -inf are exact): DESIGN's 1e-2."""
    P, layout, B, T, H, K, V = 2, "zigzag", 1, 32, 2, 8, 4
    cu = doc_cuts(T, P, layout, 11)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen)
    if op == "linear":
        xs, shared = list(linear_inputs(B, T, H, K, V, gates="none", dtype=torch.bfloat16, seed=21)[:4]), []
        oracle = lambda t, s: naive_recurrent_linear_attention(*t, output_final_state=True)  # noqa: E731
    else:
        xs, shared = delta_inputs(B, T, H, K, V, gates="none", dtype=torch.bfloat16, seed=22)[:5], []
        oracle = lambda t, s: naive_gated_delta_rule(*t, output_final_state=True)  # noqa: E731
    tok64 = leaves64(xs)
    o_ref, _ = per_document(oracle, cu, tok64, None)
    (o_ref * do.double()).sum().backward()
    results = spawn(P).run(run_op, op, xs, shared, None, cu, do, None, dict(method="lasp2"), layout, False)
    check(results, layout, o_ref, None, tok64, [], None, 1e-2)


@pytest.mark.parametrize("layout,states", [("contiguous", False), ("zigzag", True)])
def test_gated_delta_rule_documents_triton(spawn, layout, states):
    """The Triton delta-rule segments (interpreter on the CPU) take the document resets too (no
    states), and the per-document pieces with lasp's single initial state and the per-document
    final states (fla's varlen form with GVA: tests/test_gdn_fla_recipe.py), LASP-2 on 2 ranks."""
    P, B, T, H, K, V = 2, 1, 32, 2, 16, 16
    xs = delta_inputs(B, T, H, K, V, gates="g", l2norm=True, init=states, seed=seed_for("triton-ddocs", layout))
    cu = doc_cuts(T, P, layout, 11)
    gen = torch.Generator().manual_seed(3)
    do, dF = torch.randn(B, T, H, V, generator=gen), torch.randn(len(cu) - 1, H, K, V, generator=gen)
    tok64, s064 = leaves64(xs[:5]), None if xs[5] is None else xs[5].double().requires_grad_()
    o_ref, S_ref = per_document(
        lambda t, s: naive_gated_delta_rule(*t, initial_state=s, output_final_state=True, use_qk_l2norm=True), cu, tok64, s064
    )
    ((o_ref * do.double()).sum() + ((S_ref * dF.double()).sum() if states else 0)).backward()
    kw = dict(method="lasp2", backend="triton", use_qk_l2norm_in_kernel=True)
    results = spawn(P).run(run_op, "delta", xs[:5], [], xs[5], cu, do, dF, kw, layout, states)
    check(results, layout, o_ref, S_ref if states else None, tok64, [], s064, 1e-5)


@pytest.mark.parametrize("op", ["linear", "delta"])
def test_single_state_form_is_the_first_documents(op):
    """``initial_state [1, H, K, V]`` with ``cu_seqlens``: the first document's state, the others
    start from zeros (the same as fla's ``[N, ...]`` with zeros after the first)."""
    B, T, H, K, V = 1, 24, 2, 4, 3
    cu = torch.tensor([0, 7, 15, 24])
    s1 = torch.randn(1, H, K, V, generator=torch.Generator().manual_seed(5))
    sN = torch.cat([s1, torch.zeros(2, H, K, V)])
    if op == "linear":
        q, k, v, g, _ = linear_inputs(B, T, H, K, V, gates="g", seed=seed_for("single", op))
        call = lambda s: lasp.linear_attention(q, k, v, g, cu_seqlens=cu, initial_state=s, output_final_state=True)  # noqa: E731
    else:
        xs = delta_inputs(B, T, H, K, V, gates="g", seed=seed_for("single", op))
        call = lambda s: lasp.gated_delta_rule(*xs[:5], cu_seqlens=cu, initial_state=s, output_final_state=True)  # noqa: E731
    (o1, S1), (oN, SN) = call(s1), call(sN)
    assert S1.shape == (3, H, K, V)
    assert_close(oN, o1, rtol=1e-6, name="o")
    assert_close(SN, S1, rtol=1e-6, name="final states")
    o0 = call(None)[0]  # the state is used: the first document's outputs move, the others' do not
    assert (o0[:, :7] - o1[:, :7]).abs().max() > 1e-3 and torch.equal(o0[:, 7:], o1[:, 7:])
