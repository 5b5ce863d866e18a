"""Forward kernels of chunked gated linear attention, split the way LASP-2 needs them.

For one segment (a rank's tokens) with no incoming state:

1. :func:`chunk_gates`  per-chunk log-decay summaries (:class:`~.common.Gates`);
2. :func:`chunk_fwd_h`  the state entering every chunk and the segment summary ``M``
   (with ``logA`` from step 1 this is what LASP-2 all-gathers);
3. :func:`chunk_fwd_o`  the local output: intra-chunk part plus earlier chunks of the segment
   (runs while the all-gather is in flight);
4. :func:`chunk_fwd_inter`  adds ``scale * (q * e^G) @ S_in`` once the incoming state is known.

Inputs fp32, fp16 or bf16. Incoming states, summaries and outputs are float32; the per-chunk
state snapshots ``h`` float32, or bf16 for 16-bit inputs (:func:`snapshot_dtype`). Gates may
hold hard resets (``-inf``): see :mod:`~.common`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import block, low_precision_dots, maybe_autotune
from .common import RESET, Gates, load_gates, masked_exp, mm, mm_state, n_chunks, to_chunk_end


#: Launch settings of the kernels that are not autotuned (the others: ``utils.GPU_CONFIGS``);
#: compile_check verifies every one fits sm_80 and sm_90 without spills.
CHUNK_GATES = dict(num_warps=1, num_stages=1)  # [BT] vectors, one program per head
CHUNK_FWD_INTER = dict(num_warps=4, num_stages=1)


@triton.jit
def load_a(g_ptr, gg_ptr, i_b, i_h, t, m, T, H: tl.constexpr, BT: tl.constexpr, HAS_G: tl.constexpr, HAS_GG: tl.constexpr):
    """``a = g + g_gamma`` at tokens ``t`` (0 where ``m`` is False)."""
    a = tl.zeros([BT], dtype=tl.float32)
    if HAS_G:
        a += tl.load(g_ptr + (i_b.to(tl.int64) * T + t) * H + i_h, mask=m, other=0.0).to(tl.float32)
    if HAS_GG:
        a += tl.where(m, tl.load(gg_ptr + i_h).to(tl.float32), 0.0)
    return a


@triton.jit
def chunk_total(a):
    """A chunk's total log decay: the sum of its gates, ``-inf`` if one is a reset."""
    reset = a < RESET
    return tl.where(tl.sum(reset.to(tl.float32), axis=0) > 0, float("-inf"), tl.sum(tl.where(reset, 0.0, a), axis=0))


@triton.jit
def chunk_gates_kernel(
    g_ptr, gg_ptr, b_ptr, r_ptr, bt_ptr, gs_ptr, ge_ptr, la_ptr, T, N,
    H: tl.constexpr, BT: tl.constexpr, HAS_G: tl.constexpr, HAS_GG: tl.constexpr,
):
    bh = tl.program_id(0)
    i_b = bh // H
    i_h = bh % H
    o = tl.arange(0, BT)
    carry = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    plain = carry
    for n in range(0, N):
        t = n * BT + o
        m = t < T
        a = load_a(g_ptr, gg_ptr, i_b, i_h, t, m, T, H, BT, HAS_G, HAS_GG)
        reset = a < RESET
        tl.store(b_ptr + bh.to(tl.int64) * T + t, tl.cumsum(tl.where(reset, 0.0, a), axis=0), mask=m)
        tl.store(r_ptr + bh.to(tl.int64) * T + t, tl.cumsum(reset.to(tl.float32), axis=0), mask=m)
        tot = chunk_total(a)
        tl.store(bt_ptr + bh * N + n, tot)
        tl.store(gs_ptr + bh * N + n, carry)
        carry += tot
        plain += tl.sum(a, axis=0)
    tl.store(la_ptr + bh, plain)
    rev = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)  # not carry * 0: carry may be -inf
    for j in range(0, N):  # suffix sums, summed from the end so they stay exact near it
        n = N - 1 - j
        t = n * BT + o
        a = load_a(g_ptr, gg_ptr, i_b, i_h, t, t < T, T, H, BT, HAS_G, HAS_GG)
        tl.store(ge_ptr + bh * N + n, rev)
        rev += chunk_total(a)


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_fwd_h_kernel(
    k_ptr, v_ptr, b_ptr, r_ptr, bt_ptr, h_ptr, m_ptr, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    bh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = bh // H
    i_h = bh % H
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    o = tl.arange(0, BT)
    kv = ok[:, None] * V + ov[None, :]
    h = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(0, N):
        tl.store(h_ptr + (bh.to(tl.int64) * N + n) * (K * V) + kv, h.to(h_ptr.dtype.element_ty))
        t = n * BT + o
        m = t < T
        row = (i_b.to(tl.int64) * T + t) * H + i_h
        kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        vv = tl.load(v_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        if USE_G:
            bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
            kd = kk.to(tl.float32) * to_chunk_end(bb, rr, n, T, BT)[:, None]
            h = h * tl.exp(tl.load(bt_ptr + bh * N + n)) + mm(tl.trans(kd), vv, k_ptr, LOWP)
        else:
            h += mm(tl.trans(kk), vv, k_ptr, LOWP)
    tl.store(m_ptr + bh.to(tl.int64) * K * V + kv, h)


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_fwd_o_kernel(
    q_ptr, k_ptr, v_ptr, b_ptr, r_ptr, h_ptr, o_ptr, scale, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    pid, i_v = tl.program_id(0), tl.program_id(1)  # pid = bh * N + n: no chunk count on a short grid axis
    bh = pid // N
    n = pid % N
    i_b = bh // H
    i_h = bh % H
    ov = i_v * BV + tl.arange(0, BV)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (i_b.to(tl.int64) * T + t) * H + i_h
    h_base = pid.to(tl.int64) * K * V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, K // BK):
        ok = i_k * BK + tl.arange(0, BK)
        qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        s += mm(qq, tl.trans(kk), q_ptr, LOWP)
        hh = tl.load(h_ptr + h_base + ok[:, None] * V + ov[None, :])
        acc += mm_state(qq, hh, LOWP)
    causal = (o[:, None] >= o[None, :]) & m[:, None]
    if USE_G:
        bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
        acc = acc * masked_exp(rr == 0, bb)[:, None]
        s = s * masked_exp(causal & (rr[:, None] == rr[None, :]), bb[:, None] - bb[None, :])
    else:
        s = tl.where(causal, s, 0.0)
    vv = tl.load(v_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
    acc += mm(s, vv, q_ptr, LOWP)
    tl.store(o_ptr + row[:, None] * V + ov[None, :], acc * scale, mask=m[:, None])


@triton.jit
def chunk_fwd_inter_kernel(
    q_ptr, b_ptr, r_ptr, gs_ptr, s_ptr, o_ptr, scale, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    """``o += scale * (q * e^G) @ S_in`` in place (so not autotuned: a re-run would add twice)."""
    pid, i_v = tl.program_id(0), tl.program_id(1)
    bh = pid // N
    n = pid % N
    i_b = bh // H
    i_h = bh % H
    ov = i_v * BV + tl.arange(0, BV)
    t = n * BT + tl.arange(0, BT)
    m = t < T
    row = (i_b.to(tl.int64) * T + t) * H + i_h
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, K // BK):
        ok = i_k * BK + tl.arange(0, BK)
        qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        ss = tl.load(s_ptr + bh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :])
        acc += mm_state(qq, ss, LOWP)
    if USE_G:
        bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
        acc = acc * masked_exp(rr == 0, tl.load(gs_ptr + bh * N + n) + bb)[:, None]
    o_offs = row[:, None] * V + ov[None, :]
    acc = acc * scale + tl.load(o_ptr + o_offs, mask=m[:, None], other=0.0)
    tl.store(o_ptr + o_offs, acc, mask=m[:, None])


def chunk_gates(g: torch.Tensor | None, g_gamma: torch.Tensor | None, B: int, T: int, H: int, BT: int, device) -> Gates | None:
    """Per-chunk log-decay summaries of ``a = g + g_gamma`` (``None`` when both are None).

    g: ``[B, T, H]`` contiguous or None; g_gamma: ``[H]`` or None.
    """
    if g is None and g_gamma is None:
        return None
    N = n_chunks(T, BT)
    f32 = dict(dtype=torch.float32, device=device)
    b, r = torch.empty(B, H, T, **f32), torch.empty(B, H, T, **f32)
    bt, gs, ge = (torch.empty(B, H, N, **f32) for _ in range(3))
    logA = torch.empty(B, H, **f32)
    chunk_gates_kernel[(B * H,)](
        g if g is not None else b, g_gamma if g_gamma is not None else b, b, r, bt, gs, ge, logA, T, N,
        H=H, BT=BT, HAS_G=g is not None, HAS_GG=g_gamma is not None, **CHUNK_GATES,
    )
    return Gates(b, r, bt, gs, ge, logA)


def snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the per-chunk state snapshots ``h``, ``dh``: bf16 for 16-bit inputs (the
    dots that read them take bf16 operands on a GPU; fp16 would overflow past 65504 on long
    sequences with weak decay), else float32. Running sums and incoming states stay fp32."""
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


def gate_args(gates: Gates | None, dummy: torch.Tensor, *names: str) -> list[torch.Tensor]:
    """The named :class:`Gates` tensors, or ``dummy`` (never read: ``USE_G`` is False) without gates."""
    return [dummy if gates is None else getattr(gates, name) for name in names]


def chunk_fwd_h(k: torch.Tensor, v: torch.Tensor, gates: Gates | None, BT: int):
    """States entering each chunk ``h [B, H, N, K, V]`` and the segment summary ``M [B, H, K, V]``.

    k ``[B, T, H, K]``, v ``[B, T, H, V]`` contiguous; zero state entering the segment. ``M`` is
    float32; ``h`` (read only by the output kernels) is in :func:`snapshot_dtype`.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, k.dtype), block(V, k.dtype)
    h = torch.empty(B, H, N, K, V, dtype=snapshot_dtype(k.dtype), device=k.device)
    M = torch.empty(B, H, K, V, dtype=torch.float32, device=k.device)
    chunk_fwd_h_kernel[(B * H, K // BK, V // BV)](
        k, v, *gate_args(gates, M, "b", "r", "bt"), h, M, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(k.dtype),
    )
    return h, M


def chunk_fwd_o(q, k, v, gates: Gates | None, h: torch.Tensor, scale: float, BT: int) -> torch.Tensor:
    """The segment-local output ``[B, T, H, V]`` float32: intra-chunk plus earlier chunks' states."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, q.dtype), block(V, q.dtype)
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    chunk_fwd_o_kernel[(B * H * N, V // BV)](
        q, k, v, *gate_args(gates, o, "b", "r"), h, o, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype),
    )
    return o


def chunk_fwd_inter(q, gates: Gates | None, state: torch.Tensor, o: torch.Tensor, scale: float, BT: int) -> torch.Tensor:
    """``o += scale * (q * e^G) @ state`` in place; returns ``o`` (the full output ``[B, T, H, V]``).

    state: ``[B, H, K, V]`` float32 contiguous, the state entering the segment; o: the local
    output from :func:`chunk_fwd_o` (float32, contiguous).
    """
    B, T, H, K = q.shape
    V = o.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, q.dtype), block(V, q.dtype)
    chunk_fwd_inter_kernel[(B * H * N, V // BV)](
        q, *gate_args(gates, o, "b", "r", "gs"), state, o, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype), **CHUNK_FWD_INTER,
    )
    return o
