"""The chunked torch path vs the naive recurrent oracle, single process."""
import pytest
import torch

from lasp.ops import chunk, reference
from lasp.ops.segment import TorchSegment
from lasp.testing import assert_close, linear_inputs

GATES = ["none", "g", "g_gamma", "both"]


def _grads(out, inputs, seed=1):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    req = [x for x in inputs if x is not None]
    return torch.autograd.grad(out, req, do)


@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("T,chunk_size", [(37, 8), (64, 16), (100, 64)], ids=lambda x: str(x))
def test_chunk_matches_oracle(gates, T, chunk_size):
    q, k, v, g, gg = linear_inputs(2, T, 3, 16, 24, gates=gates, seed=T)
    ins = [x.double().requires_grad_() if x is not None else None for x in (q, k, v, g, gg)]
    ref = reference.naive_recurrent_linear_attention(*ins)
    ref_g = _grads(ref, ins)
    ins32 = [x.detach().float().requires_grad_() if x is not None else None for x in ins]
    out = chunk.chunk_linear_attention(*ins32, chunk_size=chunk_size)
    assert_close(ref, out, name="o")
    for i, (a, b) in enumerate(zip(ref_g, _grads(out, ins32))):
        assert_close(a, b, name=f"grad{i}")


def test_initial_and_final_state():
    q, k, v, g, gg = linear_inputs(1, 40, 2, 8, 8, gates="both", seed=3)
    S0 = torch.randn(1, 2, 8, 8)
    ref, ref_S = reference.naive_recurrent_linear_attention(q, k, v, g, gg, initial_state=S0, output_final_state=True)
    out, S = chunk.chunk_linear_attention(q, k, v, g, gg, chunk_size=16, initial_state=S0, output_final_state=True)
    assert_close(ref, out, name="o")
    assert_close(ref_S, S, name="final_state")


@pytest.mark.parametrize("gates", GATES)
def test_segment_summary_composes(gates):
    """S_out = e^logA S_in + M: the summary of a segment equals its final state from zero."""
    q, k, v, g, gg = linear_inputs(2, 30, 2, 8, 4, gates=gates, seed=5)
    logA, M = TorchSegment(q, k, v, g, gg, 8**-0.5, chunk_size=8).summary()
    _, S = reference.naive_recurrent_linear_attention(q, k, v, g, gg, output_final_state=True)
    assert_close(S, M, name="M")
    S0 = torch.randn(2, 2, 8, 4)
    _, S1 = reference.naive_recurrent_linear_attention(q, k, v, g, gg, initial_state=S0, output_final_state=True)
    assert_close(S1, logA.exp()[..., None, None] * S0 + M, name="S_out")


def test_noncausal_matches_oracle():
    q, k, v, _, _ = linear_inputs(2, 33, 2, 8, 12, seed=7)
    assert_close(reference.naive_noncausal_linear_attention(q.double(), k.double(), v.double()), chunk.noncausal_linear_attention(q, k, v))


def test_segment_summary_keeps_fp32_precision_on_long_segments():
    """The LASP-2 summary of a long gated segment (here 4000 tokens) stays within the fp32
    contract: composed chunk by chunk, not as differences of one running sum over the segment
    (which gave 2.9e-5 here)."""
    q, k, v, g, gg = linear_inputs(1, 4000, 2, 16, 32, gates="both", seed=1)
    _, S = reference.naive_recurrent_linear_attention(q.double(), k.double(), v.double(), g.double(), gg.double(), output_final_state=True)
    logA, M = TorchSegment(q, k, v, g, gg, 16**-0.5).summary()
    assert_close(S, M, name="M")
    assert_close((g.double().sum(1) + 4000 * gg.double()), logA, name="logA")
