"""The segment drivers (LASP-2, LASP-1, Ulysses-linear) beyond the plain output: scalar and matrix
transitions through the same code, initial/final states, bytes, recompute (saved-tensor
footprint, retain_graph) and hard resets, against the float64 oracle on the whole sequence."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.ops import reference
from lasp.ops.lasp1 import lasp1_apply
from lasp.ops.lasp2 import lasp2_apply
from lasp.ops.segment import TorchSegment
from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close, assert_close_sum, linear_inputs, seed_for

FP32 = 4
DRIVERS = {"lasp2": lasp2_apply, "lasp1": lasp1_apply}


class MatrixTorchSegment:
    """Test-only: the diagonal TorchSegment presented as a matrix transition ``A = e^logA I``."""

    transition = "matrix"

    def __init__(self, *args, **kwargs):
        self.inner = TorchSegment(*args, **kwargs)

    def summary(self):
        logA, M = self.inner.summary()
        eye = torch.eye(M.shape[-2], dtype=M.dtype, device=M.device)
        return logA.exp()[..., None, None] * eye, M

    def compute_local(self):
        self.inner.compute_local()

    def output(self, state, *, state_is_zero=False):
        return self.inner.output(state, state_is_zero=state_is_zero)

    def prepare_backward(self, state, *, state_is_zero=False):
        self.inner.prepare_backward(state, state_is_zero=state_is_zero)

    def state_grad(self, do):
        return self.inner.state_grad(do)

    def backward_output(self, do):
        self.inner.backward_output(do)

    def backward_summary(self, dM, dA):  # d/dlogA of <dA, e^logA I> = e^logA trace(dA)
        logA = self.inner.summary()[0]
        self.inner.backward_summary(dM, logA.exp() * dA.diagonal(dim1=-2, dim2=-1).sum(-1))

    def grads(self):
        return self.inner.grads()


class RecurrentSegment:
    """Test-only diagonal segment on the token-by-token recurrence (exact at -inf gates without any
    chunking): isolates the drivers' folds in the hard-reset tests."""

    transition = "scalar"

    def __init__(self, q, k, v, g, g_gamma, scale):
        self.ins = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (q, k, v, g, g_gamma)]
        self.scale, self._grads = scale, [None] * 5
        q, k, v, g, gg = self.ins
        with torch.enable_grad():
            _, self.M = reference.naive_recurrent_linear_attention(q, k, v, g, gg, scale, output_final_state=True)
            self.logA = q.new_zeros(q.shape[0], q.shape[2]).float()
            if g is not None:
                self.logA = self.logA + g.float().sum(1)
            if gg is not None:
                self.logA = self.logA + q.shape[1] * gg.float()

    def summary(self):
        return self.logA.detach(), self.M.detach()

    def compute_local(self):
        pass

    def _run(self, state):
        q, k, v, g, gg = self.ins
        return reference.naive_recurrent_linear_attention(q, k, v, g, gg, self.scale, initial_state=state).float()

    def output(self, state, *, state_is_zero=False):
        with torch.enable_grad():
            self.o = self._run(state.detach())
        return self.o.detach()

    def prepare_backward(self, state, *, state_is_zero=False):
        self.output(state, state_is_zero=state_is_zero)

    def state_grad(self, do):
        with torch.enable_grad():
            z = self.M.new_zeros(self.M.shape).requires_grad_()
            return torch.autograd.grad(self._run(z), z, do.float())[0]

    def _acc(self, outs, gouts):
        pairs = [(i, x) for i, x in enumerate(self.ins) if x is not None and x.requires_grad]
        grads = torch.autograd.grad(outs, [x for _, x in pairs], gouts, retain_graph=True, allow_unused=True)
        for (i, _), gr in zip(pairs, grads):
            if gr is not None:
                self._grads[i] = gr if self._grads[i] is None else self._grads[i] + gr

    def backward_output(self, do):
        self._acc([self.o], [do.float()])

    def backward_summary(self, dM, dlogA):
        outs, gouts = [self.M], [dM]
        if self.logA.requires_grad:
            outs, gouts = outs + [self.logA], gouts + [dlogA]
        self._acc(outs, gouts)

    def grads(self):
        return tuple(self._grads)


def state_inputs(B, T, H, K, V, P, *, gates="both", dtype=torch.float32, seed=0):
    """Inputs, ``dO``, one final-state gradient per rank and an initial state (fresh, never zeros)."""
    full = linear_inputs(B, T, H, K, V, gates=gates, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen).to(dtype)
    dfinal = torch.randn(P, B, H, K, V, generator=gen)
    s0 = torch.randn(B, H, K, V, generator=gen)
    return full, do, dfinal, s0


def run_states(rank, world, full, do, dfinal, s0, *, api, layout, matrix=False, backend="torch", recurrent=False):
    """Worker: forward with initial/final state and backward on this rank; returns
    ``(o, final_state, grads of (q, k, v, g, g_gamma), grad of s0, fwd events, bwd events)``."""
    group = dist.group.WORLD
    local = [None if x is None else shard_sequence(x, rank, world, layout) for x in full[:4]]
    ins = [None if x is None else x.clone().requires_grad_() for x in (*local, full[4])]
    s0_r = None if s0 is None else s0.clone().requires_grad_()
    scale = full[0].shape[-1] ** -0.5
    with comm.record() as log:
        if api in DRIVERS:
            seg = RecurrentSegment if recurrent else MatrixTorchSegment if matrix else TorchSegment
            o, fs = DRIVERS[api](seg, ins[:4], ins[4:], scale=scale, group=group, layout=layout, initial_state=s0_r, output_final_state=True)
        else:
            o, fs = lasp.linear_attention(
                *ins, group=group, method=api, layout=layout, backend=backend, initial_state=s0_r, output_final_state=True
            )
        n_fwd = len(log.events)
        torch.autograd.backward([o, fs], [shard_sequence(do, rank, world, layout), dfinal[rank]])
    grads = [None if x is None else x.grad for x in ins]
    return o.detach(), fs.detach(), grads, (None if s0_r is None else s0_r.grad), log.events[:n_fwd], log.events[n_fwd:]


def check_states(results, full, do, dfinal, s0, layout, rtol=1e-5):
    """Every rank's pieces vs the float64 oracle: o, final state (every rank), all gradients.
    The final state's gradient is the sum of the ranks'; shared inputs' gradients sum over ranks."""
    ins = [None if x is None else x.detach().double().requires_grad_() for x in (*full, s0)]
    q, k, v, g, gg, s = ins
    probe = torch.zeros(q.shape[:3], dtype=torch.float64, requires_grad=True)
    g_all = probe if g is None else g + probe
    ref, ref_fs = reference.naive_recurrent_linear_attention(q, k, v, g_all, gg, initial_state=s, output_final_state=True)
    torch.autograd.backward([ref, ref_fs], [do.double(), dfinal.double().sum(0)])
    assert_close(ref, unshard_sequence([r[0] for r in results], layout), rtol=rtol, name="o")
    for r in results:
        assert r[1].dtype == torch.float32
        assert_close(ref_fs, r[1], rtol=rtol, name="final_state")
    for i, name in enumerate(("q", "k", "v", "g")):
        if ins[i] is not None:
            assert_close(ins[i].grad, unshard_sequence([r[2][i] for r in results], layout), rtol=rtol, name=f"d{name}")
    if gg is not None:
        assert_close_sum(gg.grad, sum(r[2][4] for r in results), probe.grad.abs().sum((0, 1)), rtol=rtol, name="dg_gamma")
    if s is not None:
        assert_close(s.grad, sum(r[3] for r in results), rtol=rtol, name="dinitial_state")


# ----------------------------------------------------------------------------- initial / final states


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", ["lasp2", "lasp1", "ulysses"])
@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda p: f"P{p}")
def test_linear_attention_initial_and_final_state(spawn, P, method, layout):
    full, do, dfinal, s0 = state_inputs(1, 32, 4, 8, 8, P, seed=seed_for(P, method, layout))
    results = spawn(P).run(run_states, full, do, dfinal, s0, api=method, layout=layout)
    check_states(results, full, do, dfinal, s0, layout)


@pytest.mark.parametrize("method", ["lasp2", "lasp1"])
def test_final_state_without_initial_state_bf16(spawn, method):
    full, do, dfinal, _ = state_inputs(2, 32, 2, 8, 8, 2, dtype=torch.bfloat16, seed=seed_for(method, "bf16"))
    results = spawn(2).run(run_states, full, do, dfinal, None, api=method, layout="zigzag")
    check_states(results, full, do, dfinal, None, "zigzag", rtol=1e-2)


@pytest.mark.parametrize("method", ["lasp2", "lasp1"])
def test_initial_state_triton_backend(spawn, method):
    """The Triton segment (TRITON_INTERPRET=1) through the same drivers, with states."""
    full, do, dfinal, s0 = state_inputs(1, 32, 2, 16, 16, 2, seed=seed_for(method, "triton"))
    results = spawn(2).run(run_states, full, do, dfinal, s0, api=method, layout="zigzag", backend="triton")
    check_states(results, full, do, dfinal, s0, "zigzag")


def test_single_process_driver_states():
    """``group=None``: the driver on one process (no communication), states included."""
    full, do, dfinal, s0 = state_inputs(2, 24, 2, 8, 8, 1, gates="g", seed=3)
    ins = [None if x is None else x.clone().requires_grad_() for x in full]
    s0_r = s0.clone().requires_grad_()
    o, fs = lasp2_apply(TorchSegment, ins[:4], ins[4:], scale=8**-0.5, group=None, initial_state=s0_r, output_final_state=True)
    torch.autograd.backward([o, fs], [do, dfinal[0]])
    check_states([(o.detach(), fs.detach(), [x if x is None else x.grad for x in ins], s0_r.grad)], full, do, dfinal, s0, "contiguous")


# ----------------------------------------------------------------------------- matrix transitions


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("driver", ["lasp2", "lasp1"])
@pytest.mark.parametrize("P", [1, 2, 4], ids=lambda p: f"P{p}")
def test_matrix_transition_matches_scalar_and_oracle(spawn, P, driver, layout):
    """The same driver code with ``A = e^logA I`` as a K x K matrix: equal to the scalar path and the oracle."""
    full, do, dfinal, s0 = state_inputs(1, 32, 2, 8, 8, P, seed=seed_for(P, driver, layout, "matrix"))
    mat = spawn(P).run(run_states, full, do, dfinal, s0, api=driver, layout=layout, matrix=True)
    check_states(mat, full, do, dfinal, s0, layout)
    sca = spawn(P).run(run_states, full, do, dfinal, s0, api=driver, layout=layout)
    for a, b in zip(mat, sca):
        assert_close(b[0], a[0], name="o matrix vs scalar")
        assert_close(b[1], a[1], name="final_state matrix vs scalar")
        for x, y in zip(b[2], a[2]):
            if x is not None:
                assert_close(x, y, name="grad matrix vs scalar")


@pytest.mark.parametrize("layout,n_seg", [("contiguous", 1), ("zigzag", 2)])
@pytest.mark.parametrize("matrix", [False, True], ids=["scalar", "matrix"])
def test_lasp2_bytes_with_final_state(spawn, layout, n_seg, matrix):
    """lasp/ops/lasp2.py: fwd n_seg*B*H*(a+K*V)*4, bwd the same + B*H*K*V*4 with output_final_state
    (a = 1 scalar, K*K matrix); ONE all-gather each way; independent of T."""
    B, H, K, V, P = 1, 2, 8, 4, 2
    a = K * K if matrix else 1
    seen = set()
    for T in (16, 32):
        full, do, dfinal, s0 = state_inputs(B, T, H, K, V, P, seed=T)
        for r in spawn(P).run(run_states, full, do, dfinal, s0, api="lasp2", layout=layout, matrix=matrix):
            fwd, bwd = r[4], r[5]
            assert [(e.kind, e.bytes) for e in fwd] == [("all_gather", n_seg * B * H * (a + K * V) * FP32)]
            assert [(e.kind, e.bytes) for e in bwd] == [("all_gather", (n_seg * B * H * (a + K * V) + B * H * K * V) * FP32)]
            seen.add((fwd[0].bytes, bwd[0].bytes))
    assert len(seen) == 1


# ----------------------------------------------------------------------------- recompute


def saved_bytes_worker(rank, world, T_local, layout):
    """Bytes LASP-2 saves for backward on this rank (all tensors through saved_tensors_hooks)."""
    full = linear_inputs(1, T_local * world, 2, 8, 8, gates="both", seed=1)
    ins = [None if x is None else shard_sequence(x, rank, world, layout).requires_grad_() if x.dim() > 1 else x.requires_grad_() for x in full]
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = lasp.linear_attention(*ins, group=dist.group.WORLD, layout=layout, backend="torch")
    o.sum().backward()
    return total[0]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_saved_tensors_do_not_grow_with_P(spawn, layout):
    T_local = 16
    two = spawn(2).run(saved_bytes_worker, T_local, layout)
    four = spawn(4).run(saved_bytes_worker, T_local, layout)
    assert len(set(two + four)) == 1, (two, four)
    # inputs (q, k, v [1, 16, 2, 8] fp32, g [1, 16, 2], g_gamma [2]) + n_seg own states [2, 8, 8]
    n_seg = 1 if layout == "contiguous" else 2
    assert two[0] == (3 * 16 * 2 * 8 + 16 * 2 + 2 + n_seg * 2 * 8 * 8) * FP32


def retain_graph_worker(rank, world, full, do, method, layout):
    local = [None if x is None else shard_sequence(x, rank, world, layout) for x in full[:4]]
    ins = [None if x is None else x.clone().requires_grad_() for x in (*local, full[4])]
    s0 = torch.ones(1, 2, 8, 8, requires_grad=True)
    o, fs = lasp.linear_attention(*ins, group=dist.group.WORLD, method=method, layout=layout, backend="torch", initial_state=s0, output_final_state=True)
    d = shard_sequence(do, rank, world, layout)
    torch.autograd.backward([o, fs], [d, torch.ones_like(fs)], retain_graph=True)
    first = [x.grad.clone() for x in ins if x is not None]
    torch.autograd.backward([o, fs], [d, torch.ones_like(fs)])
    return first, [x.grad for x in ins if x is not None]


@pytest.mark.parametrize("method,layout", [("lasp2", "zigzag"), ("lasp1", "contiguous")])
def test_second_backward_with_retain_graph(spawn, method, layout):
    full = linear_inputs(1, 32, 2, 8, 8, gates="both", seed=5)
    do = torch.randn(1, 32, 2, 8, generator=torch.Generator().manual_seed(6))
    for first, second in spawn(2).run(retain_graph_worker, full, do, method, layout):
        for a, b in zip(first, second):
            assert_close(2 * a, b, name="grad after two backwards")


# ----------------------------------------------------------------------------- hard resets


def reset_inputs(P: int, layout: str):
    """Gates with -inf (hard resets) at a rank edge, a zigzag segment edge and mid-segment."""
    T = 8 * P
    full, do, dfinal, s0 = state_inputs(1, T, 2, 8, 8, P, gates="g", seed=seed_for(P, layout, "reset"))
    g = full[3].clone()
    chunk = T // (2 * P) if layout == "zigzag" else T // P
    for pos in (chunk, T - chunk, chunk // 2):  # starts of global segment 1 and the last one, mid-segment 0
        g[:, pos] = float("-inf")
    return (*full[:3], g, full[4]), do, dfinal, s0


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("driver", ["lasp2", "lasp1"])
@pytest.mark.parametrize("P", [2, 4], ids=lambda p: f"P{p}")
def test_hard_resets_in_the_folds(spawn, P, driver, layout):
    """-inf log-decays across segment and rank edges: the drivers' folds stay finite and exact
    (segments on the token recurrence, so only the folds are under test)."""
    full, do, dfinal, s0 = reset_inputs(P, layout)
    results = spawn(P).run(run_states, full, do, dfinal, s0, api=driver, layout=layout, recurrent=True)
    check_states(results, full, do, dfinal, s0, layout)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", ["lasp2", "lasp1"])
def test_hard_resets_match_oracle(spawn, method, layout):
    full, do, dfinal, s0 = reset_inputs(2, layout)
    results = spawn(2).run(run_states, full, do, dfinal, s0, api=method, layout=layout)
    check_states(results, full, do, dfinal, s0, layout)
