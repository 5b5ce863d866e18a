"""flash-linear-attention's ``tests/ops/test_gdn.py::test_chunk`` recipe on lasp's Triton gated delta
kernels (``backend="triton"``, P = 1, under the interpreter set in conftest), at fla's tolerances.

The recipe (fla's, re-stated): q, k, v uniform in [0, 1) in the test dtype; q, k L2-normalised by
the caller (or inside the op with ``use_qk_l2norm_in_kernel``); beta = sigmoid(uniform); log gates
g = logsigmoid(uniform) / gate_logit_normalizer (a normaliser of 0.01 gives -69..-31 per token, so
the cumulative gate of a chunk is far below -88), a fraction mask_p of them zeroed; an initial
state with a gradient; the loss ``<o, do> + <ht, dht>``. Every output and gradient is compared to
the float64 oracle by fla's metric (the RMS of the error over the RMS of the reference; a max
absolute error <= 1e-6 passes outright, as in fla's ``assert_close``), at fla's ratios.

Cases: fla's T=75 / normaliser 0.01 case (T, D, scale, normaliser, dtype as fla's; B and H halved:
the interpreter is slow; it returned inf/NaN dk, dv, dbeta, dg, dh0 before the partial-chunk row
mask); the other ``test_chunk`` settings (scale 0.1, normaliser 1 and 0.1, mask_p 0.5, L2 norm in
the op, head dim 128) at shorter T and fewer heads, each T not a multiple of the chunk; fla's fp32
recurrent case with a random initial state. (Normaliser 10, weak gates, is what the segment tests
use.)
GVA (``HV`` value heads, a multiple of the ``H`` q/k heads) and fla's varlen case (``cu_seqlens``
with one initial and one final state per document) run on one process and under LASP-2 on P = 2
ranks in both layouts (spawned gloo processes, the Triton kernels under the interpreter).
Head dims that are not powers of two (fla's D=60, 100) are not taken by lasp's kernels and are left
out.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp
from lasp.ops.delta_reference import naive_gated_delta_rule
from lasp.parallel import shard_sequence, unshard_sequence

#: fla's tolerances in test_chunk (ratio of RMS error to RMS reference).
TOL = {"o": 0.005, "ht": 0.005, "dq": 0.008, "dk": 0.008, "dv": 0.008, "db": 0.02, "dg": 0.02, "dh0": 0.008}

CASES = [  # B, T, H, HV, D, scale, gate_logit_normalizer, mask_p, use_qk_l2norm_in_kernel, dtype, random h0, cu_seqlens
    (1, 75, 2, 2, 64, 1.0, 0.01, 0.0, False, torch.float16, False, None),  # fla's (2, 75, 4, 4, 64, 1, 0.01), B and H halved
    (1, 100, 2, 2, 32, 0.1, 1.0, 0.5, False, torch.float16, False, None),  # fla: (2, 1000, 3, 3, 64, 0.1, 1, 0.5)
    (1, 70, 1, 1, 128, 0.1, 1.0, 0.0, True, torch.float16, False, None),  # fla: (4, 1024, 4, 4, 128, 0.1, 1, 0, True)
    (1, 50, 2, 2, 32, 1.0, 0.1, 0.0, True, torch.float16, False, None),  # fla: (2, 512, 2, 8, 64, 1, 0.1, 0, True)
    (1, 63, 1, 1, 64, 1.0, 1.0, 0.0, False, torch.float32, True, None),  # fla's test_fused_recurrent (1, 63, 1, 1, 64, 1, 1)
    (1, 60, 1, 3, 32, 1.0, 1.0, 0.0, False, torch.float16, False, None),  # GVA: fla's HV = 3 H (Qwen3.5-like)
    (1, 64, 1, 2, 32, 1.0, 1.0, 0.0, True, torch.float16, True, (0, 5, 20, 21, 50, 64)),  # fla's varlen, GVA, h0 per doc
]
VARLEN_GVA = CASES[-1]


def fla_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """fla's ``assert_close``: pass if the max abs error <= 1e-6, else RMS(err) / RMS(ref) < ratio."""
    ref, out = ref.detach().double(), out.detach().double()
    if not bool(torch.isfinite(out).all()):
        raise AssertionError(f"{name}: not finite")
    diff = (out - ref).abs().max().item()
    if diff <= 1e-6:
        return
    err = (out - ref).square().mean().sqrt().item() / ((ref.square().mean().sqrt().item()) + 1e-8)
    assert err < ratio, f"{name}: error ratio {err:.3e} >= {ratio} (max abs error {diff:.2e})"


def recipe_inputs(case):
    """fla's inputs: (q, k, v, g, beta, h0, do, dht); h0, dht ``[N, HV, D, D]`` per document with cu_seqlens."""
    B, T, H, HV, D, scale, normalizer, mask_p, l2, dtype, rand_h0, cu = case
    N = B if cu is None else len(cu) - 1
    gen = torch.Generator().manual_seed(42)
    q, k = (torch.rand(B, T, H, D, generator=gen).to(dtype) for _ in range(2))
    v = torch.rand(B, T, HV, D, generator=gen).to(dtype)
    beta = torch.rand(B, T, HV, generator=gen).sigmoid()
    g = F.logsigmoid(torch.rand(B, T, HV, generator=gen)) / normalizer
    g = g * (torch.rand(B, T, HV, generator=gen) > mask_p)
    h0 = torch.randn(N, HV, D, D, generator=gen) if rand_h0 else torch.zeros(N, HV, D, D)
    do = torch.randn(B, T, HV, D, generator=gen).to(dtype)
    dht = torch.randn(N, HV, D, D, generator=gen)
    return [q, k, v, g, beta, h0], do, dht


def call(xs, case, fn, **kw):
    """fla's call: q, k L2-normalised by the caller unless in the op, beta in the input dtype."""
    l2, dtype = case[8], case[9]
    qq, kk = (xs[0], xs[1]) if l2 else (F.normalize(xs[0], p=2, dim=-1), F.normalize(xs[1], p=2, dim=-1))
    return fn(qq, kk, xs[2], xs[3], xs[4].to(dtype), **kw)


def oracle(case, ins, do, dht):
    """float64 per document (naive recurrence): outputs, final states and every gradient."""
    xs = [x.clone().requires_grad_() for x in ins]
    cu = case[11] or (0, case[1])
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        piece = [x[:, a:b] for x in xs[:5]]
        o, ht = call(piece, case, naive_gated_delta_rule, scale=case[5], initial_state=xs[5][i : i + 1],
                     output_final_state=True, use_qk_l2norm=case[8])
        outs.append(o)
        finals.append(ht)
    o, ht = torch.cat(outs, 1), torch.cat(finals)
    ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
    return dict(o=o, ht=ht, **{n: x.grad for n, x in zip(("dq", "dk", "dv", "dg", "db", "dh0"), xs)})


def lasp_call(xs, case, **kw):
    cu = case[11]
    return call(xs, case, lasp.gated_delta_rule, scale=case[5], initial_state=xs[5], output_final_state=True,
                use_qk_l2norm_in_kernel=case[8], backend="triton", cu_seqlens=None if cu is None else torch.tensor(cu), **kw)


def compare(ref, got):
    for name, ratio in TOL.items():
        fla_close(name, ref[name], got[name], ratio)


def case_id(c):
    return "B{}-T{}-H{}-HV{}-D{}-scale{}-norm{}-mask{}-l2{}-{}-h0{}".format(*c[:9], str(c[9])[6:], c[10]) + ("-varlen" if c[11] else "")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fla_chunk_recipe(case):
    ins, do, dht = recipe_inputs(case)
    ref = oracle(case, ins, do, dht)
    xs = [x.clone().requires_grad_() for x in ins]
    o, ht = lasp_call(xs, case)
    ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
    compare(ref, dict(o=o, ht=ht, **{n: x.grad for n, x in zip(("dq", "dk", "dv", "dg", "db", "dh0"), xs)}))


def recipe_rank(rank, world, case, ins, do, dht, layout):
    """This rank's shard through LASP-2 (Triton kernels); the final states' gradient fed on rank 0."""
    local = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in ins[:5]]
    h0 = ins[5].clone().requires_grad_()
    o, ht = lasp_call([*local, h0], case, group=dist.group.WORLD, method="lasp2", layout=layout)
    ((o.float() * shard_sequence(do, rank, world, layout).float()).sum() + (ht * dht * (rank == 0)).sum()).backward()
    return o.detach(), ht.detach(), [x.grad for x in local], h0.grad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_fla_varlen_gva_recipe_lasp2_two_ranks(spawn, layout):
    """fla's varlen + GVA case with per-document states under LASP-2 on P = 2, at fla's tolerances
    (documents cross the ranks' boundaries in both layouts)."""
    ins, do, dht = recipe_inputs(VARLEN_GVA)
    ref = oracle(VARLEN_GVA, ins, do, dht)
    results = spawn(2).run(recipe_rank, VARLEN_GVA, ins, do, dht, layout, timeout=240)
    got = dict(o=unshard_sequence([r[0] for r in results], layout), ht=results[0][1], dh0=sum(r[3] for r in results))
    for i, n in enumerate(("dq", "dk", "dv", "dg", "db")):
        got[n] = unshard_sequence([r[2][i] for r in results], layout)
    for r in results:  # the final states are the same on every rank
        fla_close("ht (every rank)", ref["ht"], r[1], TOL["ht"])
    compare(ref, got)
