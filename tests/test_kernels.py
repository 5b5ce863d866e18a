"""Triton kernels under the interpreter (TRITON_INTERPRET=1, set in conftest) vs the float64
oracle and the torch chunk path: every step of the segment protocol, every gate variant, fp32
and bf16, T not a multiple of the chunk; the public op with backend="triton" for P = 1 and
LASP-2 on 2 ranks; clear errors where the kernels cannot run."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.ops import reference
from lasp.ops.recurrence import log_gates
from lasp.ops.segment import TorchSegment
from lasp.parallel import shard_sequence, unshard_sequence
from lasp.testing import assert_close, drive_segment, linear_inputs

import lasp.kernels.utils as kernel_utils
from lasp.kernels.segment import TritonSegment

GATES = ["none", "g", "g_gamma", "both"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = ("q", "k", "v", "g", "g_gamma")
# d(g_gamma) sums over B*T tokens terms that cancel: fp32 rounding of dq, dk is amplified (the
# torch chunk path reaches ~1.4e-5 on some such inputs too), so its fp32 bound is looser than the
# contract's 1e-5; bf16 keeps 1e-2.
DGAMMA_FP32_RTOL = 5e-5


def rtol_for(name: str, dtype: torch.dtype) -> float | None:
    if name == "g_gamma" and dtype == torch.float32:
        return DGAMMA_FP32_RTOL
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else None  # by input dtype: dg is fp32


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def segment_oracle(full, state, do, dM, dlogA):
    """float64 oracle of one segment: outputs, summary and the gradients of
    ``L = <dO, o(S_in)> + <dM, M> + <dlogA, logA>`` w.r.t. inputs, and ``dL/dS_in`` from ``dO`` only."""
    ins = [None if x is None else x.detach().double().requires_grad_() for x in full]
    s_in = state.double().requires_grad_()
    o = reference.naive_recurrent_linear_attention(*ins, initial_state=s_in)
    _, M = reference.naive_recurrent_linear_attention(*ins, output_final_state=True)
    B, T, H = full[0].shape[:3]
    a = log_gates(ins[3], ins[4], B, T, H, dtype=torch.float64)
    logA = torch.zeros(B, H, dtype=torch.float64) if a is None else a.sum(-1)  # [B, H]
    (ds,) = torch.autograd.grad(o, s_in, do.double(), retain_graph=True)
    loss = (o * do.double()).sum() + (M * dM.double()).sum() + (logA * dlogA.double()).sum()
    loss.backward()
    return dict(logA=logA, M=M, o=o, dS_in=ds), [None if x is None else x.grad for x in ins]


def run_segment(cls, full, state, do, dM, dlogA, **kw):
    """Drive one segment through the protocol exactly as LASP-2 does."""
    full = [None if x is None else x.detach().clone().requires_grad_() for x in full]  # leaves, as in autograd
    out, grads = drive_segment(lambda: cls(*full, scale=full[0].shape[-1] ** -0.5, **kw), state, do, dM, dlogA)
    return dict(logA=out.pop("A"), **out), grads


SEGMENT_CASES = [  # (id, B, T, H, K, V): T never a multiple of the 64-token chunk
    ("T150-K16-V32", 1, 150, 2, 16, 32),  # batch > 1 is covered by the public-op tests
    ("T70-K128-V64", 1, 70, 1, 128, 64),  # two K tiles: exercises the tile loops
]


def _segment_inputs(B, T, H, K, V, gates, dtype, seed):
    full = linear_inputs(B, T, H, K, V, gates=gates, dtype=dtype, seed=seed)
    state = randn(B, H, K, V, seed=seed + 1) * 0.5
    do = randn(B, T, H, V, seed=seed + 2, dtype=dtype)
    dM = randn(B, H, K, V, seed=seed + 3) * 0.1
    dlogA = randn(B, H, seed=seed + 4)
    return full, state, do, dM, dlogA


def _compare(ref_out, ref_grads, out, grads, full, dtype, what, skip=()):
    errs = {}
    for name, ref in ref_out.items():
        if name == "logA" and full[3] is None and full[4] is None:
            assert torch.all(out[name] == 0), f"{what}: logA must be 0 without gates"
            continue
        rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        errs[name] = assert_close(ref, out[name], rtol=rtol, name=f"{what} {name}")
    for i, name in enumerate(NAMES):
        if full[i] is None:
            assert grads[i] is None, f"{what}: d{name} must be None without {name}"
            continue
        if name in skip:
            continue
        errs["d" + name] = assert_close(ref_grads[i], grads[i], rtol=rtol_for(name, dtype), name=f"{what} d{name}")
    return errs


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("gates", GATES)
def test_segment_kernels_match_oracle_and_torch_path(gates, dtype):
    """Each kernel step (summary, local output, inter output, state gradient, backward from dO
    and from the summary's gradient, gate gradients) with a non-zero incoming state and dM."""
    _, B, T, H, K, V = SEGMENT_CASES[0]
    args = _segment_inputs(B, T, H, K, V, gates, dtype, seed=GATES.index(gates) * 10)
    ref_out, ref_grads = segment_oracle(*args)
    out, grads = run_segment(TritonSegment, *args)
    for x in (*out.values(), *[gr for gr in grads if gr is not None]):
        assert torch.isfinite(x).all()
    assert out["o"].dtype == torch.float32 and out["M"].dtype == torch.float32
    assert grads[0].dtype == dtype and grads[2].dtype == dtype
    _compare(ref_out, ref_grads, out, grads, args[0], dtype, "triton vs oracle")
    # the torch chunk path on the same inputs (fp32 compute; for 16-bit inputs the kernels keep
    # 16-bit snapshots of the chunk states, as their GPU dots read them, hence the bf16 bound)
    t_out, t_grads = run_segment(TorchSegment, *args)
    for name in out:
        assert_close(t_out[name], out[name], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, name=f"triton vs torch {name}")
    for i, name in enumerate(NAMES):
        if t_grads[i] is not None:
            assert_close(t_grads[i], grads[i], rtol=rtol_for(name, dtype), name=f"triton vs torch d{name}")


@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"C{c}")
def test_segment_kernels_large_head_dims(chunk_size):
    """K = 128 (two K tiles), V = 64, T = 70: tile loops and partial last chunk."""
    _, B, T, H, K, V = SEGMENT_CASES[1]
    args = _segment_inputs(B, T, H, K, V, "both", torch.float32, seed=7)
    ref_out, ref_grads = segment_oracle(*args)
    out, grads = run_segment(TritonSegment, *args, chunk_size=chunk_size)
    _compare(ref_out, ref_grads, out, grads, args[0], torch.float32, f"C{chunk_size}")


def test_long_segment_keeps_fp32_precision():
    """T = 1100 (18 chunks), both gates: the summary is built by the chunk recurrence and the
    gate gradients by chunk-local sums, so errors do not grow with the segment's length."""
    args = _segment_inputs(1, 1100, 1, 16, 16, "both", torch.float32, seed=3)
    ref_out, ref_grads = segment_oracle(*args)
    out, grads = run_segment(TritonSegment, *args)
    _compare(ref_out, ref_grads, out, grads, args[0], torch.float32, "T1100", skip=("g_gamma",))
    # dg_gamma = sum over tokens of dg: it can cancel to far below the terms it sums (here
    # -24.5 from terms of total size ~5500), so bound its error by the size of those terms
    err = (grads[4].double() - ref_grads[4]).abs()
    assert (err <= 1e-6 * ref_grads[3].abs().sum((0, 1))).all(), err


def _oracle(full, do, causal=True):
    ins = [None if x is None else x.detach().double().requires_grad_() for x in full]
    ref = reference.linear_attention_reference(*ins, causal=causal)
    ref.backward(do.double())
    return ref, [None if x is None else x.grad for x in ins]


P1_CASES = [  # (id, gates, dtype, B, T, H, K, V)
    ("nogate-fp32", "none", torch.float32, 2, 130, 2, 32, 16),
    ("both-bf16", "both", torch.bfloat16, 2, 130, 2, 32, 16),
    ("g-fp16", "g", torch.float16, 1, 100, 2, 16, 16),
]


@pytest.mark.parametrize("case", P1_CASES, ids=[c[0] for c in P1_CASES])
def test_linear_attention_triton_backend_p1(case):
    """The public op, group=None, backend='triton': LASP2Causal driving TritonSegment."""
    _, gates, dtype, B, T, H, K, V = case
    full = linear_inputs(B, T, H, K, V, gates=gates, dtype=dtype, seed=5)
    do = randn(B, T, H, V, seed=6, dtype=dtype)
    ins = [None if x is None else x.clone().requires_grad_() for x in full]
    o = lasp.linear_attention(*ins, backend="triton")
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    o.backward(do)
    ref, ref_grads = _oracle(full, do)
    assert_close(ref, o, name="o")
    for i, name in enumerate(NAMES):
        if full[i] is not None:
            assert_close(ref_grads[i], ins[i].grad, rtol=rtol_for(name, dtype), name=f"d{name}")


def run_triton_lasp2(rank, world, full, do, layout):
    """Worker: this rank's shard through lasp.linear_attention(backend='triton') on the WORLD group."""
    torch.set_num_threads(1)
    local = [None if x is None else shard_sequence(x, rank, world, layout) for x in full[:4]]
    ins = [None if x is None else x.clone().requires_grad_() for x in (*local, full[4])]
    o = lasp.linear_attention(*ins, group=dist.group.WORLD, layout=layout, backend="triton")
    o.backward(shard_sequence(do, rank, world, layout))
    return o.detach(), [None if x is None else x.grad for x in ins]


LASP2_CASES = [  # (id, gates, layout, dtype)
    ("both-contiguous-fp32", "both", "contiguous", torch.float32),
    ("g-zigzag-fp32", "g", "zigzag", torch.float32),
    ("both-zigzag-bf16", "both", "zigzag", torch.bfloat16),
]


@pytest.mark.parametrize("case", LASP2_CASES, ids=[c[0] for c in LASP2_CASES])
def test_lasp2_triton_two_ranks_matches_oracle(spawn, case):
    _, gates, layout, dtype = case
    B, T, H, K, V = 1, 168, 2, 16, 32  # 84 tokens per rank (42 per zigzag chunk): partial chunks
    full = linear_inputs(B, T, H, K, V, gates=gates, dtype=dtype, seed=13)
    do = randn(B, T, H, V, seed=14, dtype=dtype)
    results = spawn(2).run(run_triton_lasp2, full, do, layout)
    ref, ref_grads = _oracle(full, do)
    assert_close(ref, unshard_sequence([r[0] for r in results], layout), name="o")
    for i, name in enumerate(NAMES):
        if full[i] is None:
            continue
        if name == "g_gamma":  # replicated parameter: each rank holds its contribution
            got = sum(r[1][i] for r in results)
        else:
            got = unshard_sequence([r[1][i] for r in results], layout)
        assert_close(ref_grads[i], got, rtol=rtol_for(name, dtype), name=f"d{name}")


def test_noncausal_triton_backend_matches_oracle():
    full = linear_inputs(1, 40, 2, 16, 16, seed=3)
    do = randn(1, 40, 2, 16, seed=4)
    ins = [x.clone().requires_grad_() for x in full[:3]]
    o = lasp.linear_attention(*ins, causal=False, backend="triton")
    o.backward(do)
    ref, ref_grads = _oracle(full, do, causal=False)
    assert_close(ref, o, name="o")
    for i in range(3):
        assert_close(ref_grads[i], ins[i].grad, name=f"d{NAMES[i]}")


def test_kernels_on_cpu_without_interpreter_are_a_clear_error(monkeypatch):
    """The kernels' own entry point refuses CPU tensors when Triton is not interpreting."""
    monkeypatch.setattr(kernel_utils, "INTERPRET", False)
    q, k, v, g, gg = linear_inputs(1, 20, 2, 16, 16, gates="both")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        TritonSegment(q, k, v, g, gg, scale=0.25)


@pytest.mark.parametrize("K,V,what", [(8, 16, "K"), (16, 48, "V")], ids=["K8", "V48"])
def test_unsupported_head_dims_are_a_clear_error(K, V, what):
    q, k, v, _, _ = linear_inputs(1, 20, 2, K, V)
    with pytest.raises(ValueError, match=f"{what} .*power of two"):
        lasp.linear_attention(q, k, v, backend="triton")


def _no_interpreter_env():
    import os

    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_compile_check_quick_passes_and_reports_per_arch():
    """The interpreter never compiles: ``compile_check`` builds the launches the launchers really
    make (captured from the segments, with the runtime's specialisation) for sm_80 and sm_90 with the
    wheel's ptxas, in a process without TRITON_INTERPRET. Here a representative subset (the
    sequential state-gradient kernel at its launch configs, K = V = 128 bf16); the whole set is
    ``python -m lasp.kernels.compile_check``."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "lasp.kernels.compile_check", "--quick", "--op", "gated_delta", "--kernels", "state_bwd_kernel"],
        env=_no_interpreter_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for arch in (80, 90):
        assert f"0 failing variant(s) for sm_{arch}" in proc.stdout, proc.stdout
    assert "state_bwd_kernel[bf16 K=128" in proc.stdout and "smem KiB" in proc.stdout


def test_compile_check_flags_an_over_limit_config():
    """``check_config`` on the state-gradient kernel at the config it was launched with before
    (Triton's defaults: 4 warps, 3 stages; 64-column tiles): over an H100's 227 KiB."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from lasp.kernels.compile_check import check_config\n"
        "from lasp.kernels.gated_delta.bwd import state_bwd_kernel\n"
        "B, H, T, K, V, N = 1, 16, 1024, 128, 128, 16\n"
        "f = lambda *s, dt=torch.float32: torch.empty(*s, dtype=dt)\n"
        "args = (f(B, H, T, K), f(B, H, T, K), f(B, H, T, K), f(B, H, T), f(B, H, T), f(B, H, T),\n"
        "        f(B, T, H, V, dt=torch.bfloat16), f(B, H, T, V), f(B, H, K, V), f(B, H, N, K, V, dt=torch.bfloat16),\n"
        "        f(B, H, T, V), f(B, H, K, V), 0.1, T, V)\n"
        "c = dict(H=H, K=K, BT=64, BV=64, HAS_DO=True, HAS_T=False, STORE_DU=True, ACC_DU=False, LOWP=True, G=1)\n"
        "print(check_config(state_bwd_kernel, args, c, num_warps=4, num_stages=3, arch=90))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_no_interpreter_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "shared memory" in proc.stdout and "> 227 KiB (sm_90)" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- hard resets (g = -inf)

RESETS = {  # T = 70, chunk 16: chunks start at 0, 16, 32, 48, 64
    "single": (23,),
    "several": (3, 4, 40, 41, 52),
    "chunk-edges": (0, 15, 16, 47, 48, 64, 69),
}


@pytest.mark.parametrize("gates", ["g", "both"])
@pytest.mark.parametrize("resets", RESETS.values(), ids=RESETS.keys())
def test_segment_hard_resets_match_oracle(resets, gates):
    """Both segment backends, every protocol step, with g = -inf at the given tokens (in all but
    one (batch, head) row): everything finite and equal to the float64 oracle; logA = -inf."""
    B, T, H, K, V = 2, 70, 2, 16, 32
    full = linear_inputs(B, T, H, K, V, gates=gates, seed=21, resets=resets)
    state = randn(B, H, K, V, seed=22) * 0.5
    do, dM, dlogA = randn(B, T, H, V, seed=23), randn(B, H, K, V, seed=24) * 0.1, randn(B, H, seed=25)
    ref_out, ref_grads = segment_oracle(full, state, do, dM, dlogA)
    ref_logA = ref_out.pop("logA")
    assert all(torch.isfinite(x).all() for x in (*ref_out.values(), *[gr for gr in ref_grads if gr is not None]))
    for cls in (TorchSegment, TritonSegment):
        out, grads = run_segment(cls, full, state, do, dM, dlogA, chunk_size=16)
        logA = out.pop("logA")
        assert torch.equal(torch.isneginf(logA), torch.isneginf(ref_logA)) and torch.isneginf(logA).any()
        fin = torch.isfinite(ref_logA)
        assert_close(ref_logA[fin], logA[fin], name=f"{cls.__name__} logA")
        for x in (*out.values(), *[gr for gr in grads if gr is not None]):
            assert torch.isfinite(x).all(), cls.__name__
        _compare(ref_out, ref_grads, out, grads, full, torch.float32, cls.__name__)


@pytest.mark.parametrize("api", ["lasp2", "lasp1"])
def test_driver_backward_launches_no_output_kernel(monkeypatch, api):
    """The drivers' backward rebuilds each TritonSegment with ``prepare_backward``: the forward's
    output kernels (local and inter) run in forward only (two segments, one entered by a non-zero
    state, so forward launches both kernels)."""
    import lasp.kernels.simple_gla as sg
    from lasp.ops.lasp1 import lasp1_apply
    from lasp.ops.lasp2 import lasp2_apply

    calls = {"chunk_fwd_o": 0, "chunk_fwd_inter": 0}
    for name in calls:
        def counted(*args, _f=getattr(sg, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(sg, name, counted)
    B, T, H, K, V = 1, 32, 1, 16, 16
    full = [x.requires_grad_() for x in linear_inputs(B, T, H, K, V, gates="g", seed=51)[:4]]
    apply = {"lasp2": lasp2_apply, "lasp1": lasp1_apply}[api]
    o = apply(TritonSegment, full, [None], scale=K**-0.5, group=None, layout="zigzag", chunk_size=16)
    assert calls == {"chunk_fwd_o": 2, "chunk_fwd_inter": 1}
    o.backward(randn(B, T, H, V, seed=52))
    assert calls == {"chunk_fwd_o": 2, "chunk_fwd_inter": 1}, "backward ran an output kernel"
    assert all(x.grad is not None for x in full)


def test_linear_attention_triton_p1_hard_resets():
    """The public op (P = 1, Triton) with resets at a chunk's first and last token and mid-chunk."""
    B, T, H, K, V = 1, 100, 2, 16, 16
    full = linear_inputs(B, T, H, K, V, gates="both", seed=31, resets=(0, 37, 63, 64))
    do = randn(B, T, H, V, seed=32)
    ins = [x.clone().requires_grad_() for x in full]
    o = lasp.linear_attention(*ins, backend="triton")
    o.backward(do)
    ref, ref_grads = _oracle(full, do)
    assert_close(ref, o, name="o")
    for i, name in enumerate(NAMES):
        assert_close(ref_grads[i], ins[i].grad, rtol=rtol_for(name, torch.float32), name=f"d{name}")


def test_lasp2_triton_two_ranks_hard_resets(spawn):
    """LASP-2 over 2 ranks with resets inside a segment and at the rank edge (token 42 starts
    rank 1's shard): a segment summary with logA = -inf in the fold."""
    B, T, H, K, V = 1, 84, 2, 16, 16
    full = linear_inputs(B, T, H, K, V, gates="g", seed=33, resets=(10, 42))
    do = randn(B, T, H, V, seed=34)
    results = spawn(2).run(run_triton_lasp2, full, do, "contiguous")
    ref, ref_grads = _oracle(full, do)
    assert_close(ref, unshard_sequence([r[0] for r in results], "contiguous"), name="o")
    for i in range(4):
        assert_close(ref_grads[i], unshard_sequence([r[1][i] for r in results], "contiguous"), name=f"d{NAMES[i]}")


def test_fp16_states_past_fp16_range_stay_finite():
    """fp16 inputs whose state entries pass 65504 (weak decay, large k and v): the incoming state
    and the per-chunk snapshots are not stored in fp16, so the output stays finite and exact."""
    from lasp.kernels.simple_gla.fwd import snapshot_dtype

    assert snapshot_dtype(torch.float16) == torch.bfloat16 and snapshot_dtype(torch.float32) == torch.float32
    B, T, H, K, V = 1, 150, 1, 16, 16
    q = randn(B, T, H, K, seed=41) * 1e-3
    k, v = randn(B, T, H, K, seed=42).abs() * 30 + 10, randn(B, T, H, V, seed=43).abs() * 30 + 10
    g = torch.full((B, T, H), -1e-4)
    full = [x.half() for x in (q, k, v)] + [g, None]
    state = torch.full((B, H, K, V), 1e5)  # past fp16's 65504 already
    seg = TritonSegment(*full, scale=K**-0.5, chunk_size=16)
    _, M = seg.summary()
    seg.compute_local()
    o = seg.output(state)
    ref, ref_M = reference.naive_recurrent_linear_attention(
        *(x.double() for x in full[:4]), initial_state=state.double(), output_final_state=True
    )
    assert ref_M.max() > 65504 and M.max() > 65504
    assert_close(ref, o, rtol=1e-2, name="o")
    _, ref_M0 = reference.naive_recurrent_linear_attention(*(x.double() for x in full[:4]), output_final_state=True)
    assert_close(ref_M0, M, rtol=1e-5, name="M")
