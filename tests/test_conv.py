"""Causal short convolution across ranks (halo exchange) vs torch's conv1d on the whole sequence."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp
from lasp import comm
from lasp.ops.conv import causal_conv1d_with_state
from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close, seed_for, value_error_and_collectives


def conv_inputs(B, T, D, W, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen)
    w = torch.randn(D, W, generator=gen) * 0.5
    b = torch.randn(D, generator=gen) if bias else None
    dy = torch.randn(B, T, D, generator=gen)
    return x, w, b, dy


def reference(x, w, b, dy, activation):
    """nn.Conv1d(D, D, W, groups=D, padding=W-1) cut to T outputs, in float64; output and grads."""
    ins = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    xd, wd, bd = ins
    y = F.conv1d(xd.transpose(1, 2), wd[:, None, :], bd, padding=w.shape[1] - 1, groups=w.shape[0])[..., : x.shape[1]]
    y = y.transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    y.backward(dy.double())
    return y, [None if t is None else t.grad for t in ins]


def run_conv(rank, world, x, w, b, dy, activation, layout):
    ins = [None if t is None else t.clone().requires_grad_() for t in (shard_sequence(x, rank, world, layout), w, b)]
    with comm.record() as log:
        y = lasp.causal_conv1d(*ins, activation=activation, group=dist.group.WORLD, layout=layout)
        n_fwd = len(log.events)
        y.backward(shard_sequence(dy, rank, world, layout))
    return y.detach(), [None if t is None else t.grad for t in ins], log.events[:n_fwd], log.events[n_fwd:]


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [2, 4])
def test_conv_across_ranks_matches_conv1d(spawn, P, layout, W):
    B, T, D = 2, 8 * P, 5
    act = "silu" if W == 4 else None
    x, w, b, dy = conv_inputs(B, T, D, W, seed_for("conv", P, layout, W), bias=(W == 4))
    y_ref, (dx_ref, dw_ref, db_ref) = reference(x, w, b, dy, act)
    results = spawn(P).run(run_conv, x, w, b, dy, act, layout)
    assert_close(y_ref, unshard_sequence([r[0] for r in results], layout), name="y")
    assert_close(dx_ref, unshard_sequence([r[1][0] for r in results], layout), name="dx")
    assert_close(dw_ref, sum(r[1][1] for r in results), name="dweight")  # replicated: ranks' shares sum
    if b is not None:
        assert_close(db_ref, sum(r[1][2] for r in results), name="dbias")
    n_seg = 2 if layout == "zigzag" else 1
    for _, _, fwd, bwd in results:  # one all-gather each way, of every segment's W-1 tail
        assert [e.kind for e in fwd] == ["all_gather"] and [e.kind for e in bwd] == ["all_gather"]
        assert fwd[0].bytes == bwd[0].bytes == n_seg * B * (W - 1) * D * 4


def test_conv_single_process_and_stateful_steps():
    x, w, b, _ = conv_inputs(2, 13, 3, 4, seed=5)
    y_ref, _ = reference(x, w, b, torch.zeros_like(x), "silu")
    y = lasp.causal_conv1d(x, w, b, activation="silu")
    assert_close(y_ref, y, name="y")
    state, steps = None, []
    for t in range(0, 13, 3):  # pieces of 3 (and a last one of 1) continue from the state
        out, state = causal_conv1d_with_state(x[:, t : t + 3], w, b, activation="silu", state=state)
        steps.append(out)
    assert_close(y_ref, torch.cat(steps, 1), name="stateful y")
    assert state.shape == (2, 3, 3)


def bad_conv_calls(rank, world):
    group = dist.group.WORLD
    x, w = torch.randn(1, 6, 4), torch.randn(4, 3)
    calls = [
        dict(x=x, weight=torch.randn(5, 3)),  # D differs
        dict(x=x, weight=w, bias=torch.randn(3)),
        dict(x=x, weight=w, activation="gelu"),
        dict(x=torch.randn(1, 5, 4), weight=w, layout="zigzag"),  # odd T_local
        dict(x=torch.randn(1, 4, 4), weight=torch.randn(4, 4), layout="zigzag"),  # W-1 > T_segment
        dict(x=torch.randn(6, 4), weight=w),
    ]
    return [value_error_and_collectives(lambda kw=kw: lasp.causal_conv1d(**kw, group=group))[0] for kw in calls]


def test_conv_validation_on_every_rank(spawn):
    results = spawn(2).run(bad_conv_calls)
    assert results[0] == results[1] and len(results[0]) == 6
    for word, msg in zip(["weight", "bias", "activation", "T_local", "W-1", "x"], results[0]):
        assert word in msg, msg
