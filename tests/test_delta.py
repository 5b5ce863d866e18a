"""The gated delta rule: chunked WY form and the protocol-v2 segment vs the float64 oracle."""
from __future__ import annotations

import pytest
import torch

from lasp.ops.delta_chunk import chunk_gated_delta_rule, recurrent_gated_delta_step
from lasp.ops.delta_reference import naive_gated_delta_rule
from lasp.ops.delta_segment import DeltaTorchSegment
from lasp.testing import assert_close, delta_inputs, seed_for, value_error_and_collectives

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def leaves(xs, dtype=None):
    return [None if x is None else x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in xs]


def oracle(xs, scale=None, final=True, l2norm=False):
    ys = leaves(xs, torch.float64)
    o, S = naive_gated_delta_rule(*ys[:5], scale=scale, initial_state=ys[5], output_final_state=True, use_qk_l2norm=l2norm)
    return ys, o, S


def backprop(outs_grads, inputs):
    loss = sum((o.double() * g.double()).sum() for o, g in outs_grads)
    loss.backward()
    return [None if x is None else x.grad for x in inputs]


CASES = {
    "fp32-g-init": dict(gates="g", init=True),
    "fp32-deltanet": dict(gates="none"),
    "fp32-reset-l2": dict(gates="reset", l2norm=True, init=True),
    "bf16-g-init-l2": dict(gates="g", init=True, l2norm=True, dtype=torch.bfloat16),
    "bf16-deltanet": dict(gates="none", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_matches_oracle(case):
    """T=37 with chunk 16 (a padded tail), K != V: outputs, final state, all gradients."""
    kw = dict(CASES[case])
    dtype, l2 = kw.pop("dtype", torch.float32), kw.get("l2norm", False)
    xs = delta_inputs(2, 37, 2, 8, 6, dtype=dtype, seed=seed_for("chunk", case), **kw)
    ys, o_ref, S_ref = oracle(xs, l2norm=l2)
    xl = leaves(xs)
    o, S = chunk_gated_delta_rule(*xl[:5], initial_state=xl[5], output_final_state=True, use_qk_l2norm=l2, chunk_size=16)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_close(o_ref, o, name="o")
    assert_close(S_ref, S, rtol=1e-5 if dtype == torch.float32 else 1e-2, name="final_state")
    gen = torch.Generator().manual_seed(1)
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    ref = backprop([(o_ref, do), (S_ref, dS)], ys)
    got = backprop([(o, do), (S, dS)], xl)
    for name, r, x in zip(NAMES, ref, got):
        assert (r is None) == (x is None), name
        if r is not None:
            assert_close(r, x, rtol=1e-5 if dtype == torch.float32 else 1e-2, name=f"d{name}")


def test_scale_single_chunk_and_no_final_state():
    xs = delta_inputs(1, 5, 3, 4, 4, seed=3)
    o = chunk_gated_delta_rule(*xs[:5], scale=0.3)
    assert isinstance(o, torch.Tensor)
    assert_close(naive_gated_delta_rule(*[x.double() for x in xs[:5]], scale=0.3), o, name="o")


def test_recurrent_step_matches_oracle():
    xs = delta_inputs(2, 9, 2, 4, 6, init=True, l2norm=True, seed=4)
    q, k, v, g, beta, S = xs
    ref, S_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=S, output_final_state=True, use_qk_l2norm=True)
    outs = []
    for t in range(9):
        o, S = recurrent_gated_delta_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], beta[:, t : t + 1], S, use_qk_l2norm=True)
        outs.append(o)
    assert_close(ref, torch.cat(outs, 1), name="o")
    assert_close(S_ref, S, name="state")


# ----------------------------------------------------------------------------- segments


def drive_segments(xs, bounds, scale, l2norm, output_final_state=True, dO=None, dF=None):
    """Drive DeltaTorchSegments exactly as LASP-2 does, in one process: forward prefix fold,
    backward with REBUILT segments, state gradients, suffix fold, summary gradients."""
    q, k, v, g, beta, s0 = xs
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    pieces = [[cut(x, a, b) for x in (q, k, v, g, beta)] for a, b in bounds]
    B, H, K, V = q.shape[0], q.shape[2], q.shape[3], v.shape[3]
    # forward
    S = torch.zeros(B, H, K, V) if s0 is None else s0.float()
    states, outs, summaries = [], [], []
    for p, piece in enumerate(pieces):
        seg = DeltaTorchSegment(*piece, scale, use_qk_l2norm=l2norm, chunk_size=8)
        A, M = seg.summary()
        assert A.shape == (B, H, K, K) and M.shape == (B, H, K, V) and A.dtype == M.dtype == torch.float32
        seg.compute_local()
        outs.append(seg.output(S, state_is_zero=(p == 0 and s0 is None)))
        states.append(S)
        summaries.append((A, M))
        S = A @ S + M
    o = torch.cat(outs, dim=1)
    if dO is None:
        return o, S
    # backward: rebuild, local state gradients, suffix fold G_p = dS_in_p + A_p^T G_{p+1}
    segs = [DeltaTorchSegment(*piece, scale, use_qk_l2norm=l2norm, chunk_size=8) for piece in pieces]
    dOs = [dO[:, a:b] for a, b in bounds]
    dS_in = []
    for p, seg in enumerate(segs):
        dS_in.append(seg.state_grad(dOs[p]))
        seg.prepare_backward(states[p], state_is_zero=(p == 0 and s0 is None))
    G = dF.float() if output_final_state else torch.zeros(B, H, K, V)
    grads = [None] * len(segs)
    for p in reversed(range(len(segs))):
        seg = segs[p]
        seg.backward_output(dOs[p])
        if output_final_state or p < len(segs) - 1:
            seg.backward_summary(G, G @ states[p].transpose(-1, -2))
        grads[p] = seg.grads()
        G = dS_in[p] + summaries[p][0].transpose(-1, -2) @ G
    cat = lambda i: None if grads[0][i] is None else torch.cat([gr[i] for gr in grads], dim=1)  # noqa: E731
    return o, S, [cat(i) for i in range(5)] + [G if s0 is not None else None]


SEG_CASES = {
    "2seg-g-init": dict(bounds=[(0, 20), (20, 37)], gates="g", init=True),
    "3seg-deltanet-l2": dict(bounds=[(0, 9), (9, 24), (24, 37)], gates="none", l2norm=True),
    "4seg-reset-init-nofinal": dict(bounds=[(0, 5), (5, 16), (16, 30), (30, 37)], gates="reset", init=True, final=False),
    "2seg-bf16": dict(bounds=[(0, 16), (16, 37)], gates="g", init=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(SEG_CASES))
def test_segments_driven_like_lasp2_match_oracle(case):
    kw = dict(SEG_CASES[case])
    bounds, final, dtype = kw.pop("bounds"), kw.pop("final", True), kw.pop("dtype", torch.float32)
    l2 = kw.get("l2norm", False)
    xs = delta_inputs(2, 37, 2, 6, 5, dtype=dtype, seed=seed_for("seg", case), **kw)
    ys, o_ref, S_ref = oracle(xs, scale=0.4, l2norm=l2)
    gen = torch.Generator().manual_seed(2)
    dO, dF = torch.randn(o_ref.shape, generator=gen), torch.randn(S_ref.shape, generator=gen)
    ref = backprop([(o_ref, dO)] + ([(S_ref, dF)] if final else []), ys)
    o, S, got = drive_segments(leaves(xs), bounds, 0.4, l2, final, dO, dF)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(o_ref, o.to(dtype), name="o")
    assert_close(S_ref, S, rtol=tol, name="final_state")
    for name, r, x in zip(NAMES, ref, got):
        assert (r is None) == (x is None), name
        if r is not None:
            assert_close(r, x, rtol=tol, name=f"d{name}")


def test_segment_summary_is_the_affine_map():
    """S_out = A S_in + M for an arbitrary S_in, and A = prod exp(g_t)(I - b_t k_t k_t^T)."""
    q, k, v, g, beta, _ = delta_inputs(1, 11, 2, 4, 3, seed=7)
    seg = DeltaTorchSegment(q, k, v, g, beta, 0.5, chunk_size=4)
    A, M = seg.summary()
    ref = torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4)
    for t in range(11):
        kt = k[:, t].double()  # [B, H, K]
        f = g[:, t].double().exp()[..., None, None] * (torch.eye(4, dtype=torch.float64) - beta[:, t].double()[..., None, None] * kt[..., :, None] * kt[..., None, :])
        ref = f @ ref
    assert_close(ref, A, name="A")
    S_in = torch.randn(1, 2, 4, 3)
    _, S_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=S_in, output_final_state=True)
    assert_close(S_ref, A @ S_in + M, name="A S_in + M")


def test_against_fla_naive_if_installed():
    fla = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    xs = delta_inputs(1, 12, 2, 4, 4, init=True, seed=8)
    o, S = chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, chunk_size=4)
    q, k, v, g, beta, s0 = xs
    o_f, S_f = fla.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True)
    assert_close(o_f, o, name="o vs fla")
    assert_close(S_f, S, name="state vs fla")


# ----------------------------------------------------------------------------- public wrapper


def test_public_operator_one_process():
    import lasp

    xs = delta_inputs(1, 20, 2, 4, 3, init=True, l2norm=True, seed=9)
    o, S = lasp.gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, S_ref = naive_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, use_qk_l2norm=True)
    assert_close(o_ref, o, name="o")
    assert_close(S_ref, S, name="final_state")
    assert isinstance(lasp.gated_delta_rule(*xs[:3], None, xs[4]), torch.Tensor)  # DeltaNet, no final state
    with pytest.raises(ValueError, match="backend='triton' needs head dims"):  # K=4, V=3: no kernels
        lasp.gated_delta_rule(*xs[:5], backend="triton")


def fla_naive_recurrent(q, k, v, beta, g, scale, initial_state):
    """float64 restatement of fla's ``naive_recurrent_gated_delta_rule`` (its semantics, step by
    step: decay the state by ``exp(g)``, ``v' = beta (v - S^T k)``, ``S += k v'^T``, ``o = (scale q)
    S``), called by keyword below so that no argument order can hide a swap."""
    q, k, v, beta, g = (x.double().transpose(1, 2) for x in (q, k, v, beta, g))  # [B, H, T, ...]
    S, outs = initial_state.double(), []
    for t in range(q.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        u = (v[:, :, t] - (S * k[:, :, t, :, None]).sum(-2)) * beta[:, :, t, None]
        S = S + k[:, :, t, :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    return torch.stack(outs, 2).transpose(1, 2), S


def test_positional_call_in_fla_order_equals_fla_reference():
    """``lasp.gated_delta_rule(q, k, v, g, beta)`` positionally, as fla's ``chunk_gated_delta_rule``
    is called, equals fla's naive recurrence (keywords); everything after beta is keyword-only."""
    import lasp

    q, k, v, g, beta, s0 = delta_inputs(1, 13, 2, 4, 3, init=True, seed=17)
    o, S = lasp.gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=s0, output_final_state=True)
    o_ref, S_ref = fla_naive_recurrent(q=q, k=k, v=v, beta=beta, g=g, scale=0.7, initial_state=s0)
    assert_close(o_ref, o, name="o")
    assert_close(S_ref, S, name="final_state")
    o_net = lasp.gated_delta_rule(q, k, v, None, beta)  # DeltaNet: g = None in g's place
    assert_close(naive_gated_delta_rule(q=q, k=k, v=v, g=None, beta=beta), o_net, name="o (DeltaNet)")
    with pytest.raises(TypeError):
        lasp.gated_delta_rule(q, k, v, g, beta, 0.7)  # scale is keyword-only, as fla's after beta


def bad_delta_calls(rank, world):
    import torch.distributed as dist

    import lasp

    q, k, v, g, beta, s0 = delta_inputs(1, 6, 2, 4, 3, init=True, seed=rank)
    calls = [
        dict(beta=beta[:, :, :1]),
        dict(g=g[:, :-1]),
        dict(initial_state=s0[..., :2]),
        dict(k=torch.randn(1, 6, 2, 5)),
        dict(q=torch.randn(1, 5, 2, 4), k=torch.randn(1, 5, 2, 4), v=torch.randn(1, 5, 2, 3), beta=beta[:, :5], g=g[:, :5], layout="zigzag"),
        dict(method="ring"),
        dict(backend="cuda"),
    ]
    errors = []
    for kw in calls:
        args = {**dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=None), **kw}
        pos = [args.pop(n) for n in ("q", "k", "v", "g", "beta")]
        errors.append(value_error_and_collectives(lambda: lasp.gated_delta_rule(*pos, group=dist.group.WORLD, **args))[0])
    return errors


def test_public_operator_validation_on_every_rank(spawn):
    results = spawn(2).run(bad_delta_calls)
    assert results[0] == results[1] and len(results[0]) == 7
    for word, msg in zip(["beta", "g", "initial_state", "head dim", "zigzag", "method", "backend"], results[0]):
        assert word in msg, msg
