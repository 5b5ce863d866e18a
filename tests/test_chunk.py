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


RESETS = {  # T = 37, chunk 8: chunks start at 0, 8, 16, 24, 32
    "single": (13,),
    "several": (3, 4, 20, 30),
    "chunk-edges": (0, 7, 8, 23, 24, 36),
}


@pytest.mark.parametrize("gates", ["g", "both"])
@pytest.mark.parametrize("resets", RESETS.values(), ids=RESETS.keys())
def test_chunk_hard_resets_match_oracle(resets, gates):
    """g = -inf resets the state: outputs, final state and all gradients finite and equal to the
    float64 oracle (which stays finite), with an initial state."""
    q, k, v, g, gg = linear_inputs(2, 37, 2, 8, 16, gates=gates, seed=11, resets=resets)
    S0 = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(2))
    ins = [x.double().requires_grad_() if x is not None else None for x in (q, k, v, g, gg, S0)]
    ref, ref_S = reference.naive_recurrent_linear_attention(*ins[:5], initial_state=ins[5], output_final_state=True)
    ref_g = _grads(ref * 1 + ref_S.sum() * 0.01, ins)
    assert torch.isfinite(ref).all() and all(torch.isfinite(x).all() for x in ref_g)
    ins32 = [x.detach().float().requires_grad_() if x is not None else None for x in ins]
    out, S = chunk.chunk_linear_attention(*ins32[:5], chunk_size=8, initial_state=ins32[5], output_final_state=True)
    assert_close(ref, out, name="o")
    assert_close(ref_S, S, name="final_state")
    for i, (a, b) in enumerate(zip(ref_g, _grads(out + S.sum() * 0.01, ins32))):
        assert_close(a, b, name=f"grad{i}")


@pytest.mark.parametrize("resets", [(), (5,), (29,)], ids=["none", "reset5", "reset29"])
def test_torch_segment_summary_with_resets(resets):
    """A segment's summary: logA = -inf after a reset, M its state from zero; S_out composes."""
    q, k, v, g, gg = linear_inputs(2, 30, 2, 8, 4, gates="both", seed=5, resets=resets)
    logA, M = TorchSegment(q, k, v, g, gg, 8**-0.5, chunk_size=8).summary()
    _, S = reference.naive_recurrent_linear_attention(*(x.double() for x in (q, k, v, g, gg)), output_final_state=True)
    assert_close(S, M, name="M")
    if resets:
        assert torch.isneginf(logA.flatten()[:-1]).all() and torch.isfinite(logA[-1, -1])  # see linear_inputs
    S0 = torch.randn(2, 2, 8, 4)
    _, S1 = reference.naive_recurrent_linear_attention(q, k, v, g, gg, initial_state=S0, output_final_state=True)
    assert_close(S1, logA.exp()[..., None, None] * S0 + M, name="S_out")


def test_recurrent_step_matches_oracle_with_resets():
    """The decoding step (lasp.ops.recurrence.recurrent_step), token by token, from an initial state."""
    from lasp.ops.recurrence import recurrent_step

    q, k, v, g, gg = linear_inputs(2, 9, 2, 8, 4, gates="both", seed=4, resets=(3,))
    S = S0 = torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(1))
    ref, ref_S = reference.naive_recurrent_linear_attention(q, k, v, g, gg, initial_state=S0.double(), output_final_state=True, compute_dtype=torch.float64)
    outs = []
    for t in range(9):
        o, S = recurrent_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], gg, S)
        outs.append(o)
    assert_close(ref, torch.cat(outs, 1), name="o")
    assert_close(ref_S, S, name="state")
