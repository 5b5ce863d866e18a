"""Communication accounting: what every method sends, counted by lasp.comm, against the formulas in
the operators' docstrings; and bad input failing on every rank before any communication."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.parallel import shard_sequence
from lasp.testing import linear_inputs, softmax_inputs
from test_lasp2 import run_linear
from test_softmax import run_softmax

FP32 = 4


def kinds(events) -> list[str]:
    return [e.kind for e in events]


def sends(events, tag: str = "") -> list[int]:
    return [e.bytes for e in events if e.kind == "send" and e.tag.startswith(tag)]


# ----------------------------------------------------------------------------- linear methods


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("layout,n_seg", [("contiguous", 1), ("zigzag", 2)])
def test_lasp2_one_collective_each_way_independent_of_T(spawn, layout, n_seg, causal):
    B, H, K, V, P = 1, 2, 8, 16, 4
    seen = set()
    for T in (32, 64):
        full = linear_inputs(B, T, H, K, V, gates="both" if causal else "none", seed=T)
        for _, _, fwd, bwd in spawn(P).run(run_linear, full, torch.randn(B, T, H, V), causal=causal, layout=layout):
            assert kinds(fwd) == ["all_gather"] and kinds(bwd) == ["all_gather"], (fwd, bwd)
            # lasp/ops/lasp2.py: fwd and bwd n_seg*B*H*(1+K*V)*4 (scalar A); non-causal B*H*K*V*4 both
            want = (n_seg * B * H * (K * V + 1) * FP32,) * 2 if causal else (B * H * K * V * FP32,) * 2
            assert (fwd[0].bytes, bwd[0].bytes) == want
            seen.add((fwd[0].bytes, bwd[0].bytes))
    assert len(seen) == 1  # the same bytes for T=32 and T=64


@pytest.mark.parametrize("layout,hops", [("contiguous", lambda P: P - 1), ("zigzag", lambda P: 2 * (P - 1))], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_lasp1_sequential_state_hops(spawn, P, layout, hops):
    B, H, K, V, T = 1, 2, 8, 16, 32
    full = linear_inputs(B, T, H, K, V, gates="both", seed=1)
    results = spawn(P).run(run_linear, full, torch.randn(B, T, H, V), causal=True, layout=layout, method="lasp1")
    state = B * H * K * V * FP32
    fwd = [b for r in results for b in sends(r[2], "lasp1.fwd")]
    bwd = [b for r in results for b in sends(r[3], "lasp1.bwd")]
    # one state per hop of the chain, each hop waits for the one before: 2(P-1) steps contiguous
    assert fwd == [state] * hops(P) and bwd == [state] * hops(P)
    assert all(e.kind in ("send", "recv") for r in results for e in r[2] + r[3])
    recvs = sum(1 for r in results for e in r[2] + r[3] if e.kind == "recv")
    assert recvs == 2 * hops(P)
    if layout == "contiguous":  # the chain: rank r sends forward iff r < P-1, backward iff r > 0
        assert [len(sends(r[2])) for r in results] == [1] * (P - 1) + [0]
        assert [len(sends(r[3])) for r in results] == [0] + [1] * (P - 1)


def run_lasp1_on_new_group(rank, world, full, do):
    """Worker: LASP-1 twice (forward + backward) on a group created here, logging every
    torch.distributed call the operator makes on it; returns (calls, outputs, recorded events)."""
    group = dist.new_group(list(range(world)))
    calls, saved = [], {n: getattr(dist, n) for n in ("all_reduce", "batch_isend_irecv")}

    def logged(name):
        def call(*args, **kwargs):
            grp = kwargs.get("group", args[1] if len(args) > 1 else None) if name == "all_reduce" else args[0][0].group
            if grp is group:
                calls.append(name)
            return saved[name](*args, **kwargs)
        return call

    outs, events = [], []
    try:
        for name in saved:
            setattr(dist, name, logged(name))
        for _ in range(2):
            ins = [None if x is None else shard_sequence(x, rank, world, "contiguous").clone().requires_grad_() for x in full[:4]]
            with comm.record() as log:
                o = lasp.linear_attention(*ins, full[4], group=group, method="lasp1")
                o.backward(shard_sequence(do, rank, world, "contiguous"))
            outs.append((o.detach(), [x.grad for x in ins[:3]]))
            events.append(kinds(log.events))
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    return calls, outs, events


def test_lasp1_first_collective_on_a_group_is_a_full_group_one(spawn):
    """LASP-1's chain posts one-sided P2P batches, which NCCL defines only after a collective of the
    whole group: on a fresh group every rank first takes part in one all-reduce (once: not on the
    second call), which the accounting does not record; results are the same both times."""
    B, H, K, V, T, P = 1, 2, 8, 16, 32, 4
    full = linear_inputs(B, T, H, K, V, gates="g", seed=4)
    results = spawn(P).run(run_lasp1_on_new_group, full, torch.randn(B, T, H, V))
    for rank, (calls, outs, events) in enumerate(results):
        assert calls[0] == "all_reduce" and calls.count("all_reduce") == 1, (rank, calls)
        assert calls.count("batch_isend_irecv") == 2 * 2 * (1 if rank in (0, P - 1) else 2)  # 2 calls x (fwd + bwd)
        assert events[0] == events[1] and set(events[0]) == {"send", "recv"}
        (o1, g1), (o2, g2) = outs
        assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_lasp1_noncausal_ring_sum(spawn):
    B, H, K, V, T, P = 1, 2, 8, 16, 32, 4
    full = linear_inputs(B, T, H, K, V, seed=2)
    results = spawn(P).run(run_linear, full, torch.randn(B, T, H, V), causal=False, layout="contiguous", method="lasp1")
    for _, _, fwd, bwd in results:  # P-1 sends of B*H*K*V*4 bytes per rank each way
        assert sends(fwd) == [B * H * K * V * FP32] * (P - 1) and sends(bwd) == [B * H * K * V * FP32] * (P - 1)


@pytest.mark.parametrize("gates", ["none", "g"])
def test_ulysses_linear_two_all_to_alls_each_way(spawn, gates):
    B, H, K, V, T, P = 1, 4, 8, 16, 32, 2
    full = linear_inputs(B, T, H, K, V, gates=gates, seed=3)
    results = spawn(P).run(run_linear, full, torch.randn(B, T, H, V), causal=True, layout="zigzag", method="ulysses")
    T_local, n_gate = T // P, (gates == "g")
    for _, _, fwd, bwd in results:  # lasp/ops/ulysses.py: B*T_local*H*(2K+V+[g])*e in, B*T_local*H*V*e out
        packed, out = B * T_local * H * (2 * K + V + n_gate) * FP32, B * T_local * H * V * FP32
        assert [(e.kind, e.bytes) for e in fwd] == [("all_to_all", packed), ("all_to_all", out)]
        assert [(e.kind, e.bytes) for e in bwd] == [("all_to_all", out), ("all_to_all", packed)]


# ----------------------------------------------------------------------------- softmax methods


def softmax_events(spawn, P, T, method, layout, dtype=torch.float32, H=4, H_kv=2, D=8):
    full, do = softmax_inputs(1, T, H, H_kv, D, dtype, seed=T)
    return spawn(P).run(run_softmax, full, do, causal=True, layout=layout, method=method)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_allgather_softmax_one_collective_each_way(spawn, layout, dtype):
    P, H_kv, D, e = 2, 2, 8, dtype.itemsize
    per_T = {}
    for T in (16, 32):
        for _, _, fwd, bwd in softmax_events(spawn, P, T, "allgather", layout, dtype, H_kv=H_kv, D=D):
            kv = 2 * (T // P) * H_kv * D * e  # lasp/ops/softmax_allgather.py, B=1: the KV heads only
            assert [(x.kind, x.bytes) for x in fwd] == [("all_gather", kv)]
            assert [(x.kind, x.bytes) for x in bwd] == [("reduce_scatter", P * kv * FP32 // e)]  # dK/dV in float32
            per_T[T] = fwd[0].bytes
    assert per_T[32] == 2 * per_T[16]  # linear in T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_ring_kv_bytes_linear_in_T(spawn, P, layout, dtype):
    H_kv, D, e = 2, 8, dtype.itemsize
    totals = {}
    for T in (32, 64):
        block = 2 * (T // P) * H_kv * D  # elements of one packed K/V block (B=1)
        for _, _, fwd, bwd in softmax_events(spawn, P, T, "ring", layout, dtype, H_kv=H_kv, D=D):
            # lasp/ops/ring.py: fwd P-1 K/V sends; bwd P-1 K/V sends + P float32 dK/dV sends
            assert sends(fwd, "ring.fwd") == [block * e] * (P - 1)
            assert sends(bwd, "ring.bwd.kv") == [block * e] * (P - 1)
            assert sends(bwd, "ring.bwd.dkv") == [block * FP32] * P
            assert set(kinds(fwd + bwd)) == {"send", "recv"}
            totals[T] = sum(sends(fwd)) + sum(sends(bwd))
    assert totals[64] == 2 * totals[32]


def test_ulysses_softmax_two_all_to_alls_each_way(spawn):
    P, T, H, H_kv, D = 2, 16, 4, 2, 8
    for _, _, fwd, bwd in softmax_events(spawn, P, T, "ulysses", "zigzag", H=H, H_kv=H_kv, D=D):
        qkv, out = (T // P) * (H + 2 * H_kv) * D * FP32, (T // P) * H * D * FP32  # lasp/ops/ulysses.py, B=1
        assert [(e.kind, e.bytes) for e in fwd] == [("all_to_all", qkv), ("all_to_all", out)]
        assert [(e.kind, e.bytes) for e in bwd] == [("all_to_all", out), ("all_to_all", qkv)]


# ----------------------------------------------------------------------------- bad input


def _bad_softmax(H, H_kv, T_local, layout, method):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T_local, H, 8, generator=gen)
    kv = torch.randn(1, T_local, H_kv, 8, generator=gen)
    return lambda group: lasp.softmax_attention(q, kv, kv, group=group, method=method, layout=layout)


def _bad_linear(H, T_local, layout, method):
    q, k, v, _, _ = linear_inputs(1, T_local, H, 8, 8, seed=0)
    return lambda group: lasp.linear_attention(q, k, v, group=group, method=method, layout=layout, backend="torch")


def _bad_states(method, *, causal=True, state_shape=(1, 2, 8, 8), final=True):
    q, k, v, _, _ = linear_inputs(1, 4, 2, 8, 8, seed=0)
    s0 = torch.zeros(state_shape)
    return lambda group: lasp.linear_attention(
        q, k, v, causal=causal, group=group, method=method, backend="torch", initial_state=s0, output_final_state=final
    )


BAD = {  # id: (call, words the message must contain)
    "ulysses-softmax-H": (_bad_softmax(3, 3, 4, "contiguous", "ulysses"), "H=3 divisible"),
    "ulysses-softmax-Hkv": (_bad_softmax(4, 1, 4, "contiguous", "ulysses"), "H_kv=1 divisible"),
    "ulysses-linear-H": (_bad_linear(3, 4, "contiguous", "ulysses"), "H=3 divisible"),
    **{f"gqa-{m}": (_bad_softmax(4, 3, 4, "contiguous", m), "multiple of k/v's heads") for m in ("allgather", "ring", "ulysses")},
    **{f"zigzag-odd-{m}": (_bad_softmax(4, 2, 5, "zigzag", m), "must be even") for m in ("allgather", "ring", "ulysses")},
    **{f"zigzag-odd-{m}": (_bad_linear(2, 5, "zigzag", m), "must be even") for m in ("lasp1",)},
    **{f"initial-state-shape-{m}": (_bad_states(m, state_shape=(1, 2, 8, 4)), "initial_state must have shape") for m in ("lasp2", "lasp1", "ulysses")},
    "states-noncausal": (_bad_states("lasp2", causal=False), "need causal=True"),
    "final-state-not-bool": (_bad_states("lasp2", final=1), "output_final_state must be a bool"),
}


def bad_input_worker(rank, world, case):
    """Worker: the ValueError message and the number of communication calls made (must be 0)."""
    call, _ = BAD[case]
    with comm.record() as log:
        try:
            call(dist.group.WORLD)
        except ValueError as e:
            return str(e), len(log.events)
    return None, len(log.events)


@pytest.mark.parametrize("case", BAD.keys())
def test_bad_input_raises_on_every_rank_before_any_communication(spawn, case):
    results = spawn(2).run(bad_input_worker, case, timeout=60)
    for msg, n_calls in results:
        assert msg is not None and BAD[case][1] in msg, results
        assert n_calls == 0


def test_only_calls_inside_record_are_recorded(spawn):
    assert spawn(2).run(_record_scope_worker) == [[("all_reduce", 12, 2, "inside")]] * 2


def _record_scope_worker(rank, world):
    t = torch.ones(3)
    comm.all_reduce(t, dist.group.WORLD, tag="before")
    with comm.record() as log:
        comm.all_reduce(t, dist.group.WORLD, tag="inside")
    comm.all_reduce(t, dist.group.WORLD, tag="after")
    return [(e.kind, e.bytes, e.group_size, e.tag) for e in log.events]
