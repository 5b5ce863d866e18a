"""LASP-2 on P gloo ranks vs the single-process float64 oracle on the whole sequence."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.ops import reference
from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close, assert_close_sum, linear_inputs, seed_for

CASES = [  # (id, causal, gates)
    ("causal-nogate", True, "none"),
    ("causal-g", True, "g"),
    ("causal-ggamma", True, "g_gamma"),
    ("causal-both", True, "both"),
    ("noncausal", False, "none"),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = ("q", "k", "v", "g", "g_gamma")


def run_linear(rank, world, full, do, *, causal, layout, method="lasp2", backend="torch", lengths=None):
    """Worker: shard, run forward+backward on this rank, return local output, grads and comm log."""
    group = dist.group.WORLD
    if lengths is None:
        local = [None if x is None else shard_sequence(x, rank, world, layout) for x in full[:4]]
        do_l = shard_sequence(do, rank, world, layout)
    else:  # uneven contiguous pieces
        start = sum(lengths[:rank])
        local = [None if x is None else x[:, start : start + lengths[rank]] for x in full[:4]]
        do_l = do[:, start : start + lengths[rank]]
    gg = full[4]
    ins = [None if x is None else x.clone().requires_grad_() for x in (*local, gg)]
    with comm.record() as log:
        o = lasp.linear_attention(*ins, causal=causal, group=group, method=method, layout=layout, backend=backend)
        n_fwd = len(log.events)
        o.backward(do_l)
    grads = [None if x is None else x.grad for x in ins]
    return o.detach(), grads, log.events[:n_fwd], log.events[n_fwd:]


def oracle(full, do, causal):
    """Float64 output and gradients on the whole sequence. Where ``g_gamma`` is given, also the
    per-token gradient of the log-decay (via an extra zero ``g``), whose magnitudes summed over
    batch and tokens are the scale of ``dg_gamma``, a sum of such terms."""
    ins = [None if x is None else x.detach().double().requires_grad_() for x in full]
    q, k, v, g, gg = ins
    g_probe = None
    if gg is not None:
        g_probe = torch.zeros(q.shape[:3], dtype=torch.float64, requires_grad=True)
        g = g_probe if g is None else g + g_probe
    ref = reference.linear_attention_reference(q, k, v, g, gg, causal=causal)
    ref.backward(do.double())
    grads = [None if x is None else x.grad for x in ins]
    return ref, grads, (None if g_probe is None else g_probe.grad.abs().sum((0, 1)))


def check_against_oracle(results, full, do, causal, layout, lengths=None):
    ref, ref_grads, dgg_scale = oracle(full, do, causal)
    join = (lambda xs: torch.cat(xs, 1)) if lengths else (lambda xs: unshard_sequence(xs, layout))
    errs = {"o": assert_close(ref, join([r[0] for r in results]), name="o")}
    for i, name in enumerate(NAMES):
        if ref_grads[i] is None:
            continue
        if name == "g_gamma":  # a replicated parameter: each rank holds its contribution
            got = sum(r[1][i] for r in results)
        else:
            got = join([r[1][i] for r in results])
        rtol = 1e-2 if full[0].dtype == torch.bfloat16 else 1e-5
        if name == "g_gamma":
            errs[name] = assert_close_sum(ref_grads[i], got, dgg_scale, rtol=rtol, name="dg_gamma")
        else:
            errs[name] = assert_close(ref_grads[i], got, rtol=rtol, name=f"d{name}")
    return errs


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda p: f"P{p}")
def test_lasp2_matches_oracle(spawn, P, case, layout, dtype):
    _, causal, gates = case
    full = linear_inputs(2, 96, 2, 16, 24, gates=gates, dtype=dtype, seed=seed_for(P, gates, layout, str(dtype)))
    do = torch.randn(2, 96, 2, 24, generator=torch.Generator().manual_seed(11)).to(dtype)
    results = spawn(P).run(run_linear, full, do, causal=causal, layout=layout)
    check_against_oracle(results, full, do, causal, layout)


@pytest.mark.parametrize("method", ["lasp2", "lasp1"])
@pytest.mark.parametrize("gates", ["none", "both"])
def test_uneven_contiguous(spawn, gates, method):
    """Ranks holding different numbers of tokens: summaries (LASP-2) and the states passed along
    the chain (LASP-1) do not depend on T."""
    lengths = [20, 57, 3, 40]
    full = linear_inputs(1, sum(lengths), 2, 8, 16, gates=gates, seed=4)
    do = torch.randn(1, sum(lengths), 2, 16, generator=torch.Generator().manual_seed(2))
    results = spawn(4).run(run_linear, full, do, causal=True, layout="contiguous", method=method, lengths=lengths)
    check_against_oracle(results, full, do, True, "contiguous", lengths=lengths)


@pytest.mark.parametrize("layout,n_seg", [("contiguous", 1), ("zigzag", 2)])
def test_lasp2_one_collective_each_way_bytes_independent_of_T(spawn, layout, n_seg):
    B, H, K, V, P = 2, 3, 8, 16, 2
    bytes_by_T = {}
    for T in (32, 64):
        full = linear_inputs(B, T, H, K, V, gates="both", seed=T)
        do = torch.randn(B, T, H, V)
        results = spawn(P).run(run_linear, full, do, causal=True, layout=layout)
        for _, _, fwd, bwd in results:
            assert [e.kind for e in fwd] == ["all_gather"], fwd
            assert [e.kind for e in bwd] == ["all_gather"], bwd
            # the docstring's formulas (scalar transition, a = 1): fwd and bwd n_seg*B*H*(1+K*V)*4
            assert fwd[0].bytes == n_seg * B * H * (K * V + 1) * 4
            assert bwd[0].bytes == n_seg * B * H * (K * V + 1) * 4
            assert fwd[0].group_size == P
        bytes_by_T[T] = (results[0][2][0].bytes, results[0][3][0].bytes)
    assert bytes_by_T[32] == bytes_by_T[64]
