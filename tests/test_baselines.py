"""The linear-attention baselines (LASP-1 state chain, Ulysses all-to-all) on P gloo ranks vs the
single-process float64 oracle on the whole sequence, with the harness of test_lasp2."""
from __future__ import annotations

import pytest
import torch

from lasp.testing import linear_inputs, seed_for
from test_lasp2 import CASES, DTYPES, check_against_oracle, run_linear


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("method", ["lasp1", "ulysses"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_baseline_matches_oracle(spawn, P, method, case, layout, dtype):
    _, causal, gates = case
    full = linear_inputs(2, 64, 4, 8, 16, gates=gates, dtype=dtype, seed=seed_for(P, method, gates, layout, str(dtype)))
    do = torch.randn(2, 64, 4, 16, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = spawn(P).run(run_linear, full, do, causal=causal, layout=layout, method=method)
    check_against_oracle(results, full, do, causal, layout)


@pytest.mark.parametrize("gates", ["none", "both"])
def test_lasp1_uneven_contiguous(spawn, gates):
    """LASP-1's messages are states: ranks may hold different numbers of tokens."""
    lengths = [20, 57, 3, 40]
    full = linear_inputs(1, sum(lengths), 2, 8, 16, gates=gates, seed=9)
    do = torch.randn(1, sum(lengths), 2, 16, generator=torch.Generator().manual_seed(3))
    results = spawn(4).run(run_linear, full, do, causal=True, layout="contiguous", method="lasp1", lengths=lengths)
    check_against_oracle(results, full, do, True, "contiguous", lengths=lengths)


@pytest.mark.parametrize("method,layout", [("lasp1", "zigzag"), ("ulysses", "contiguous")])
def test_baseline_triton_backend_two_ranks(spawn, method, layout):
    """The Triton segment (under TRITON_INTERPRET=1, set in conftest) driven by the baselines."""
    full = linear_inputs(1, 32, 2, 16, 16, gates="both", seed=6)
    do = torch.randn(1, 32, 2, 16, generator=torch.Generator().manual_seed(8))
    results = spawn(2).run(run_linear, full, do, causal=True, layout=layout, method=method, backend="triton")
    check_against_oracle(results, full, do, True, layout)
