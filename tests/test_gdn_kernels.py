"""Gated delta rule Triton kernels under the interpreter (TRITON_INTERPRET=1, set in conftest) vs the
float64 oracle: the segment driven exactly as LASP-2 drives it (summary A and M, outputs from a
non-zero incoming state, dS_in, every input gradient through dO, dM and dA), fp32, bf16 and fp16, g None
and given, in-kernel L2 norm, T not a multiple of the chunk, K != V both ways; the public operator
with backend="triton" in one process; LASP-2 (and LASP-1) on 2 ranks with the Triton segment vs the
torch one."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.kernels.delta_segment import TritonDeltaSegment
from lasp.ops.delta_reference import naive_gated_delta_rule
from lasp.parallel import shard_sequence
from lasp.testing import assert_close, delta_inputs, drive_segment

NAMES = ("q", "k", "v", "g", "beta")
CHUNK = 16  # the kernels' smallest chunk: several chunks on short sequences


def rnd(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def segment_oracle(xs, S_in, do, dM, dA, scale, l2):
    """float64: o(S_in), A (the run from I with v = 0), M (from zeros) and the gradients of
    ``<dO, o> + <dM, M> + <dA, A>``; ``dS_in`` from dO only."""
    ins = [None if x is None else x.detach().double().requires_grad_() for x in xs]
    s_in = S_in.double().requires_grad_()
    q, k, v, g, beta = ins
    B, T, H, K = q.shape
    o = naive_gated_delta_rule(q, k, v, g, beta, scale, initial_state=s_in, use_qk_l2norm=l2)
    _, M = naive_gated_delta_rule(q, k, v, g, beta, scale, output_final_state=True, use_qk_l2norm=l2)
    eye = torch.eye(K, dtype=torch.float64).expand(B, H, K, K)
    _, A = naive_gated_delta_rule(q, k, torch.zeros_like(q), g, beta, scale, initial_state=eye,
                                  output_final_state=True, use_qk_l2norm=l2)
    (ds,) = torch.autograd.grad(o, s_in, do.double(), retain_graph=True)
    ((o * do.double()).sum() + (M * dM.double()).sum() + (A * dA.double()).sum()).backward()
    return dict(A=A, M=M, o=o, dS_in=ds), [None if x is None else x.grad for x in ins]


def run_segment(xs, S_in, do, dM, dA, scale, l2):
    ins = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    return drive_segment(lambda: TritonDeltaSegment(*ins, scale, use_qk_l2norm=l2, chunk_size=CHUNK), S_in, do, dM, dA)


SEG_CASES = [  # id, T, K, V, gates, l2, dtype
    ("g-fp32", 20, 16, 32, "g", False, torch.float32),
    ("g-l2-fp32-K32V16", 20, 32, 16, "g", True, torch.float32),
    ("deltanet-fp32", 20, 16, 32, "none", False, torch.float32),
    ("reset-fp32", 37, 16, 32, "reset", False, torch.float32),  # hard resets g = -inf
    ("deltanet-l2-fp32-short", 11, 16, 32, "none", True, torch.float32),  # T < one chunk
    ("g-bf16", 20, 16, 32, "g", False, torch.bfloat16),
    ("g-fp16", 20, 16, 32, "g", False, torch.float16),
    ("deltanet-l2-bf16", 20, 32, 16, "none", True, torch.bfloat16),
    # log gates x 200 (-82..-2 per token): cumulative gates far below -88 inside a chunk, last chunk partly filled
    ("strong-g-fp32", 37, 16, 32, "strong", False, torch.float32),
    ("strong-g-l2-bf16", 21, 32, 16, "strong", True, torch.bfloat16),
]


@pytest.mark.parametrize("case", SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_segment_matches_float64_oracle(case):
    _, T, K, V, gates, l2, dtype = case
    B, H = 1, 2
    xs = delta_inputs(B, T, H, K, V, gates="g" if gates == "strong" else gates, dtype=dtype, l2norm=l2, seed=T + K)[:5]
    if gates == "strong":
        xs[3] = xs[3] * 200
    S_in, do = rnd(B, H, K, V, seed=1) * 0.5, rnd(B, T, H, V, seed=2).to(dtype)
    dM, dA = rnd(B, H, K, V, seed=3) * 0.1, rnd(B, H, K, K, seed=4) * 0.1
    scale = K**-0.5
    ref, ref_grads = segment_oracle(xs, S_in, do, dM, dA, scale, l2)
    out, grads = run_segment(xs, S_in, do, dM, dA, scale, l2)
    rtol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    for name, r in ref.items():
        assert out[name].dtype == torch.float32
        assert_close(r, out[name], rtol=rtol, name=name)
    for name, x, r, gr in zip(NAMES, xs, ref_grads, grads):
        if x is None:
            assert gr is None, f"d{name} must be None without {name}"
            continue
        assert gr.dtype == x.dtype, f"d{name} dtype"
        assert_close(r, gr, rtol=rtol, name=f"d{name}")


def test_public_operator_triton_one_process():
    """backend="triton", group=None: initial state, final state and every gradient incl. dS0."""
    B, T, H, K, V = 2, 21, 2, 16, 32
    xs = delta_inputs(B, T, H, K, V, gates="g", l2norm=True, init=True, seed=5)
    do, dF = rnd(B, T, H, V, seed=6), rnd(B, H, K, V, seed=7)
    res = []
    for backend in ("oracle", "triton"):
        ins = [None if x is None else x.clone().double().requires_grad_() if backend == "oracle" else x.clone().requires_grad_() for x in xs]
        if backend == "oracle":
            o, S = naive_gated_delta_rule(*ins[:5], initial_state=ins[5], output_final_state=True, use_qk_l2norm=True)
        else:
            o, S = lasp.gated_delta_rule(*ins[:5], initial_state=ins[5], output_final_state=True,
                                         use_qk_l2norm_in_kernel=True, backend="triton")
        ((o * do.to(o.dtype)).sum() + (S * dF.to(S.dtype)).sum()).backward()
        res.append([o, S, *[x.grad for x in ins]])
    for name, r, x in zip(("o", "final", "dq", "dk", "dv", "dg", "dbeta", "ds0"), *res):
        assert_close(r, x, name=name)


@pytest.mark.parametrize("api", ["lasp2", "lasp1"])
def test_driver_backward_launches_no_output_kernel(monkeypatch, api):
    """The drivers' backward rebuilds each TritonDeltaSegment with ``prepare_backward``: only the
    state pass runs again, the output kernel runs in forward only (once per segment)."""
    import lasp.kernels.gated_delta as gd
    from lasp.ops.lasp1 import lasp1_apply
    from lasp.ops.lasp2 import lasp2_apply

    calls = []
    chunk_output = gd.chunk_output
    monkeypatch.setattr(gd, "chunk_output", lambda *a, **kw: calls.append(1) or chunk_output(*a, **kw))
    B, T, H, K, V = 1, 32, 1, 16, 16
    xs = [x.clone().requires_grad_() for x in delta_inputs(B, T, H, K, V, gates="g", seed=13)[:5]]
    apply = {"lasp2": lasp2_apply, "lasp1": lasp1_apply}[api]
    o = apply(TritonDeltaSegment, xs, [], scale=K**-0.5, group=None, layout="zigzag", chunk_size=CHUNK)
    assert len(calls) == 2
    o.backward(rnd(B, T, H, V, seed=14))
    assert len(calls) == 2, "backward ran the output kernel"
    assert all(x.grad is not None for x in xs)


@pytest.mark.parametrize("final", [False, True], ids=["o", "o+final"])
def test_one_segment_runs_no_transition_and_three_passes(monkeypatch, final):
    """P = 1, no initial state: the transition A (the trajectory from I) is never computed, forward
    runs one chunk-state pass, backward two (the state pass again and the reverse pass from dO),
    plus one reverse pass from the final state's gradient when it is returned."""
    import lasp.kernels.gated_delta as gd

    calls = []
    for name in ("transition_and_summary", "state_pass", "identity_trajectory", "state_grad_pass"):
        fn = getattr(gd, name)
        monkeypatch.setattr(gd, name, lambda *a, _n=name, _f=fn, **kw: calls.append((_n, kw.get("transition"))) or _f(*a, **kw))
    B, T, H, K, V = 1, 40, 1, 16, 16
    xs = [x.clone().requires_grad_() for x in delta_inputs(B, T, H, K, V, gates="g", seed=21)[:5]]
    out = lasp.gated_delta_rule(*xs, output_final_state=final, backend="triton")
    assert calls == [("transition_and_summary", False)]
    calls.clear()
    loss = (out[0].sum() + out[1].sum()) if final else out.sum()
    loss.backward()
    assert calls == [("transition_and_summary", False), ("state_grad_pass", None)] + [("state_grad_pass", None)] * final
    assert all(torch.isfinite(x.grad).all() for x in xs)


def lasp2_worker(rank, world, xs, do, layout, l2, method="lasp2"):
    """This rank's shard through lasp.gated_delta_rule on both backends (LASP-2, WORLD group)."""
    torch.set_num_threads(1)
    out = {}
    for backend in ("torch", "triton"):
        local = [None if x is None else shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in xs[:5]]
        s0 = xs[5].clone().requires_grad_()
        o, S = lasp.gated_delta_rule(*local, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=l2,
                                     group=dist.group.WORLD, method=method, layout=layout, backend=backend)
        loss = (o.float() * shard_sequence(do, rank, world, layout)).sum() + (S * (1.0 if rank == 0 else 0.0)).sum()
        loss.backward()
        out[backend] = [o.detach(), S.detach()] + [None if x is None else x.grad for x in local] + [s0.grad]
    return out


@pytest.mark.parametrize("method,layout,l2,gates", [
    ("lasp2", "contiguous", True, "g"), ("lasp2", "zigzag", False, "none"), ("lasp1", "contiguous", False, "reset"),
])
def test_two_ranks_triton_equals_torch(spawn, method, layout, l2, gates):
    B, T, H, K, V = 1, 52, 2, 16, 32  # 26 tokens per rank (13 per zigzag chunk): partial chunks
    xs = delta_inputs(B, T, H, K, V, gates=gates, l2norm=l2, init=True, seed=11)
    do = rnd(B, T, H, V, seed=12)
    for rank, res in enumerate(spawn(2).run(lasp2_worker, xs, do, layout, l2, method, timeout=240)):
        for i, (a, b) in enumerate(zip(res["torch"], res["triton"])):
            if a is None:
                assert b is None
                continue
            assert_close(a, b, rtol=1e-5, name=f"rank {rank} item {i}")


def test_triton_gated_delta_has_no_host_sync():
    """Forward and backward of the Triton path read no device value on the host."""
    from lasp.testing import no_host_sync

    xs = delta_inputs(1, 20, 2, 16, 32, gates="g", l2norm=True, seed=13)[:5]
    ins = [x.clone().requires_grad_() for x in xs]
    with no_host_sync():
        o = lasp.gated_delta_rule(*ins, use_qk_l2norm_in_kernel=True, backend="triton")
        o.backward(torch.ones_like(o))
    assert all(torch.isfinite(x.grad).all() for x in ins)


def test_head_dims_the_kernels_cannot_take_are_a_clear_error():
    xs = delta_inputs(1, 4, 1, 256, 256, gates="g", seed=1)[:5]
    with pytest.raises(ValueError, match="K = V = 256"):
        lasp.gated_delta_rule(*[x.to(torch.bfloat16) for x in xs], backend="triton")
    with pytest.raises(ValueError, match="fp32 inputs with a head dim of 256"):
        lasp.gated_delta_rule(*xs[:2], xs[2][..., :64], *xs[3:5], backend="triton")
    assert lasp.gated_delta_rule(*xs[:2], xs[2][..., :32], *xs[3:5], backend="torch").shape == (1, 4, 1, 32)
