"""The linear-attention baselines (LASP-1 state chain, Ulysses all-to-all) on P gloo ranks vs the
single-process float64 oracle on the whole sequence, with the harness of test_lasp2."""
from __future__ import annotations

import pytest
import torch

from lasp.ops import chunk
from lasp.ops.lasp2 import lasp2_apply
from lasp.ops.segment import TorchSegment
from lasp.testing import assert_close, linear_inputs, seed_for
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


def test_single_process_segment_driver_matches_chunked():
    """Ulysses' whole-sequence path for segment backends (Triton): the LASP-2 driver on one
    process (``group=None``), driven here by the torch segment."""
    ins = [None if x is None else x.clone().requires_grad_() for x in linear_inputs(2, 40, 2, 8, 16, gates="both", seed=1)]
    ref_ins = [None if x is None else x.detach().clone().requires_grad_() for x in ins]
    do = torch.randn(2, 40, 2, 16, generator=torch.Generator().manual_seed(4))
    out = lasp2_apply(TorchSegment, ins[:4], ins[4:], scale=0.4, group=None)
    ref = chunk.chunk_linear_attention(*ref_ins, scale=0.4)
    assert_close(ref, out, name="o")
    out.backward(do)
    ref.backward(do)
    for name, a, b in zip(("q", "k", "v", "g", "g_gamma"), ref_ins, ins):
        assert_close(a.grad, b.grad, name=f"d{name}")


@pytest.mark.parametrize("method,layout", [("lasp1", "zigzag"), ("ulysses", "contiguous")])
def test_baseline_triton_backend_two_ranks(spawn, method, layout):
    """The Triton segment (under TRITON_INTERPRET=1, set in conftest) driven by the baselines."""
    full = linear_inputs(1, 32, 2, 16, 16, gates="both", seed=6)
    do = torch.randn(1, 32, 2, 16, generator=torch.Generator().manual_seed(8))
    results = spawn(2).run(run_linear, full, do, causal=True, layout=layout, method=method, backend="triton")
    check_against_oracle(results, full, do, True, layout)
