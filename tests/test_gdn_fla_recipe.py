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
Head dims that are not powers of two (fla's D=60, 100) and HV != H (GVA) are not taken by lasp's
kernels and are left out.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lasp
from lasp.ops.delta_reference import naive_gated_delta_rule

#: fla's tolerances in test_chunk (ratio of RMS error to RMS reference).
TOL = {"o": 0.005, "ht": 0.005, "dq": 0.008, "dk": 0.008, "dv": 0.008, "db": 0.02, "dg": 0.02, "dh0": 0.008}

CASES = [  # B, T, H, D, scale, gate_logit_normalizer, mask_p, use_qk_l2norm_in_kernel, dtype, random h0
    (1, 75, 2, 64, 1.0, 0.01, 0.0, False, torch.float16, False),  # fla's (2, 75, 4, 4, 64, 1, 0.01), B and H halved
    (1, 100, 2, 32, 0.1, 1.0, 0.5, False, torch.float16, False),  # fla: (2, 1000, 3, 3, 64, 0.1, 1, 0.5)
    (1, 70, 1, 128, 0.1, 1.0, 0.0, True, torch.float16, False),  # fla: (4, 1024, 4, 4, 128, 0.1, 1, 0, True)
    (1, 50, 2, 32, 1.0, 0.1, 0.0, True, torch.float16, False),  # fla: (2, 512, 2, 8, 64, 1, 0.1, 0, True)
    (1, 63, 1, 64, 1.0, 1.0, 0.0, False, torch.float32, True),  # fla's test_fused_recurrent (1, 63, 1, 1, 64, 1, 1)
]


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


@pytest.mark.parametrize(
    "case", CASES, ids=["B{}-T{}-H{}-D{}-scale{}-norm{}-mask{}-l2{}-{}-h0{}".format(*c[:8], str(c[8])[6:], c[9]) for c in CASES]
)
def test_fla_chunk_recipe(case):
    B, T, H, D, scale, normalizer, mask_p, l2, dtype, rand_h0 = case
    gen = torch.Generator().manual_seed(42)
    q, k, v = (torch.rand(B, T, H, D, generator=gen).to(dtype) for _ in range(3))
    beta = torch.rand(B, T, H, generator=gen).sigmoid()
    g = F.logsigmoid(torch.rand(B, T, H, generator=gen)) / normalizer
    g = g * (torch.rand(B, T, H, generator=gen) > mask_p)
    h0 = torch.randn(B, H, D, D, generator=gen) if rand_h0 else torch.zeros(B, H, D, D)
    do = torch.randn(B, T, H, D, generator=gen).to(dtype)
    dht = torch.randn(B, H, D, D, generator=gen)

    results = []
    for backend in ("oracle", "triton"):
        xs = [x.clone().requires_grad_() for x in (q, k, v, beta, g, h0)]
        qq, kk = (xs[0], xs[1]) if l2 else (F.normalize(xs[0], p=2, dim=-1), F.normalize(xs[1], p=2, dim=-1))
        bb = xs[3].to(dtype)  # lasp takes beta in the input dtype; its gradient flows back to the fp32 leaf
        if backend == "oracle":
            o, ht = naive_gated_delta_rule(qq, kk, xs[2], bb, xs[4], scale, initial_state=xs[5],
                                           output_final_state=True, use_qk_l2norm=l2)
        else:
            o, ht = lasp.gated_delta_rule(qq, kk, xs[2], bb, xs[4], scale=scale, initial_state=xs[5],
                                          output_final_state=True, use_qk_l2norm_in_kernel=l2, backend="triton")
        ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
        results.append(dict(o=o, ht=ht, **{n: x.grad for n, x in zip(("dq", "dk", "dv", "db", "dg", "dh0"), xs)}))
    ref, tri = results
    for name, ratio in TOL.items():
        fla_close(name, ref[name], tri[name], ratio)
