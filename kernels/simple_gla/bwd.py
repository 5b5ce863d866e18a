"""Backward kernels of chunked gated linear attention, split the way LASP-2 needs them.

With ``S_in`` the state that entered the segment in forward and ``dO`` the output gradient:

1. :func:`chunk_bwd_dh`  the gradient of the state leaving every chunk due to ``dO`` of the
   later chunks, and ``dS_in = scale * (q * e^G)^T dO`` (what LASP-2 exchanges);
2. :func:`chunk_bwd_dqk`, :func:`chunk_bwd_dv`  ``dq, dk, dv`` due to ``dO`` (runs while the
   all-gather of step 1 is in flight);
3. :func:`summary_bwd`  adds the part of ``dk, dv`` due to the gradient ``dM`` of the
   segment's own summary ``M = sum_j e^(logA - G_j) k_j^T v_j``;
4. :func:`chunk_bwd_dg`  the log-gate gradient from the final ``dq, dk``:
   ``da_j = c + sum_{i >= j} (<q_i, dq_i> - <k_i, dk_i>)`` with ``c = <dM, M> + dlogA``.

Gradients are accumulated in float32 ``[B, T, H, D]`` buffers.
"""
from __future__ import annotations

import torch
import triton.language as tl
import triton

from ..utils import block, low_precision_dots, maybe_autotune
from .common import Gates, mm, n_chunks


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_bwd_dh_kernel(
    q_ptr, do_ptr, b_ptr, bt_ptr, dh_ptr, ds_ptr, scale, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    i_k, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = bh // H
    i_h = bh % H
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    o = tl.arange(0, BT)
    kv = ok[:, None] * V + ov[None, :]
    h_base = bh.to(tl.int64) * N * K * V
    d = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, N):
        n = N - 1 - j
        tl.store(dh_ptr + h_base + n * K * V + kv, d)
        t = n * BT + o
        m = t < T
        row = (i_b * T + t).to(tl.int64) * H + i_h
        qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        dd = tl.load(do_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        if USE_G:
            bb = tl.load(b_ptr + bh.to(tl.int64) * T + t, mask=m, other=0.0)
            qd = qq.to(tl.float32) * tl.exp(bb)[:, None]
            d = d * tl.exp(tl.load(bt_ptr + bh * N + n)) + mm(tl.trans(qd), dd, q_ptr, LOWP) * scale
        else:
            d += mm(tl.trans(qq), dd, q_ptr, LOWP) * scale
    tl.store(ds_ptr + bh.to(tl.int64) * K * V + kv, d)


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_bwd_dqk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, bt_ptr, gs_ptr, h_ptr, s_ptr, dh_ptr, dq_ptr, dk_ptr, scale, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    i_k, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = bh // H
    i_h = bh % H
    ok = i_k * BK + tl.arange(0, BK)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (i_b * T + t).to(tl.int64) * H + i_h
    h_base = (bh.to(tl.int64) * N + n) * K * V
    s_base = bh.to(tl.int64) * K * V
    if USE_G:
        g0 = tl.exp(tl.load(gs_ptr + bh * N + n))
    else:
        g0 = 1.0
    da = tl.zeros([BT, BT], dtype=tl.float32)
    dqa = tl.zeros([BT, BK], dtype=tl.float32)
    dka = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(0, V // BV):
        ov = i_v * BV + tl.arange(0, BV)
        kv = ok[:, None] * V + ov[None, :]
        dd = tl.load(do_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        vv = tl.load(v_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        da += mm(dd, tl.trans(vv), q_ptr, LOWP)
        state = tl.load(h_ptr + h_base + kv) + g0 * tl.load(s_ptr + s_base + kv)  # full state entering chunk n
        dqa += mm(dd, tl.trans(state), q_ptr, LOWP)
        dka += mm(vv, tl.trans(tl.load(dh_ptr + h_base + kv)), q_ptr, LOWP)
    qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
    kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
    causal = (o[:, None] >= o[None, :]) & m[:, None]
    if USE_G:
        bb = tl.load(b_ptr + bh.to(tl.int64) * T + t, mask=m, other=0.0)
        da = tl.where(causal, da * tl.exp(bb[:, None] - bb[None, :]), 0.0)
        dqa = dqa * tl.exp(bb)[:, None]
        dka = dka * tl.exp(tl.load(bt_ptr + bh * N + n) - bb)[:, None]
    else:
        da = tl.where(causal, da, 0.0)
    dq = (dqa + mm(da, kk, q_ptr, LOWP)) * scale
    dk = mm(tl.trans(da), qq, q_ptr, LOWP) * scale + dka
    offs = row[:, None] * K + ok[None, :]
    tl.store(dq_ptr + offs, dq, mask=m[:, None])
    tl.store(dk_ptr + offs, dk, mask=m[:, None])


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_bwd_dv_kernel(
    q_ptr, k_ptr, do_ptr, b_ptr, bt_ptr, dh_ptr, dv_ptr, scale, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    i_v, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = bh // H
    i_h = bh % H
    ov = i_v * BV + tl.arange(0, BV)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (i_b * T + t).to(tl.int64) * H + i_h
    h_base = (bh.to(tl.int64) * N + n) * K * V
    st = tl.zeros([BT, BT], dtype=tl.float32)  # st[j, i] = k_j . q_i
    dva = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, K // BK):
        ok = i_k * BK + tl.arange(0, BK)
        kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        st += mm(kk, tl.trans(qq), q_ptr, LOWP)
        dva += mm(kk, tl.load(dh_ptr + h_base + ok[:, None] * V + ov[None, :]), q_ptr, LOWP)
    causal_t = (o[None, :] >= o[:, None]) & m[None, :]
    if USE_G:
        bb = tl.load(b_ptr + bh.to(tl.int64) * T + t, mask=m, other=0.0)
        st = tl.where(causal_t, st * tl.exp(bb[None, :] - bb[:, None]), 0.0)
        dva = dva * tl.exp(tl.load(bt_ptr + bh * N + n) - bb)[:, None]
    else:
        st = tl.where(causal_t, st, 0.0)
    dd = tl.load(do_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
    dv = mm(st, dd, q_ptr, LOWP) * scale + dva
    tl.store(dv_ptr + row[:, None] * V + ov[None, :], dv, mask=m[:, None])


@triton.jit
def summary_bwd_kernel(
    k_ptr, v_ptr, b_ptr, bt_ptr, ge_ptr, dm_ptr, dk_ptr, dv_ptr, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    """Program ``i < K/BK`` adds K-block i of ``dk``; the others add V-blocks of ``dv``."""
    i_d, n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = bh // H
    i_h = bh % H
    t = n * BT + tl.arange(0, BT)
    m = t < T
    row = (i_b * T + t).to(tl.int64) * H + i_h
    s_base = bh.to(tl.int64) * K * V
    if USE_G:  # e^(logA - G_j) = e^(ge_n + bt_n - b_j), exact near the segment's end
        bb = tl.load(b_ptr + bh.to(tl.int64) * T + t, mask=m, other=0.0)
        decay = tl.exp(tl.load(ge_ptr + bh * N + n) + tl.load(bt_ptr + bh * N + n) - bb)
    if i_d < K // BK:
        ok = i_d * BK + tl.arange(0, BK)
        acc = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, V // BV):
            ov = i_v * BV + tl.arange(0, BV)
            vv = tl.load(v_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
            acc += mm(vv, tl.trans(tl.load(dm_ptr + s_base + ok[:, None] * V + ov[None, :])), k_ptr, LOWP)
        if USE_G:
            acc = acc * decay[:, None]
        offs = row[:, None] * K + ok[None, :]
        tl.store(dk_ptr + offs, tl.load(dk_ptr + offs, mask=m[:, None], other=0.0) + acc, mask=m[:, None])
    else:
        ov = (i_d - K // BK) * BV + tl.arange(0, BV)
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(0, K // BK):
            ok = i_k * BK + tl.arange(0, BK)
            kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
            acc += mm(kk, tl.load(dm_ptr + s_base + ok[:, None] * V + ov[None, :]), k_ptr, LOWP)
        if USE_G:
            acc = acc * decay[:, None]
        offs = row[:, None] * V + ov[None, :]
        tl.store(dv_ptr + offs, tl.load(dv_ptr + offs, mask=m[:, None], other=0.0) + acc, mask=m[:, None])


@triton.jit
def chunk_bwd_dg_kernel(
    q_ptr, k_ptr, dq_ptr, dk_ptr, c_ptr, da_ptr, dgg_ptr, T, N,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    bh = tl.program_id(0)
    i_b = bh // H
    i_h = bh % H
    o = tl.arange(0, BT)
    carry = tl.load(c_ptr + bh)
    total = carry * 0.0
    for j in range(0, N):
        n = N - 1 - j
        t = n * BT + o
        m = t < T
        row = (i_b * T + t).to(tl.int64) * H + i_h
        dG = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, K // BK):
            offs = row[:, None] * K + (i_k * BK + tl.arange(0, BK))[None, :]
            qq = tl.load(q_ptr + offs, mask=m[:, None], other=0.0).to(tl.float32)
            kk = tl.load(k_ptr + offs, mask=m[:, None], other=0.0).to(tl.float32)
            dqq = tl.load(dq_ptr + offs, mask=m[:, None], other=0.0)
            dkk = tl.load(dk_ptr + offs, mask=m[:, None], other=0.0)
            dG += tl.sum(qq * dqq - kk * dkk, axis=1)
        da = tl.cumsum(dG, axis=0, reverse=True) + carry
        tl.store(da_ptr + row, da, mask=m)
        total += tl.sum(tl.where(m, da, 0.0), axis=0)
        carry += tl.sum(dG, axis=0)
    tl.store(dgg_ptr + bh, total)


def chunk_bwd_dh(q, do, gates: Gates | None, scale: float, BT: int):
    """``dh [B, H, N, K, V]`` (gradient of the state leaving each chunk, from later chunks' ``dO``)
    and ``dS_in [B, H, K, V]``, both float32. q ``[B, T, H, K]``, do ``[B, T, H, V]`` (q's dtype)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K), block(V)
    dh = torch.empty(B, H, N, K, V, dtype=torch.float32, device=q.device)
    ds = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    b, bt = (gates.b, gates.bt) if gates is not None else (dh, dh)
    chunk_bwd_dh_kernel[(K // BK, V // BV, B * H)](
        q, do, b, bt, dh, ds, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype),
    )
    return dh, ds


def chunk_bwd_dqk(q, k, v, do, gates: Gates | None, h, state, dh, scale: float, BT: int):
    """``dq, dk [B, T, H, K]`` float32 due to ``dO``; ``state [B, H, K, V]`` entered the segment."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K), block(V)
    dq = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(dq)
    b, bt, gs = (gates.b, gates.bt, gates.gs) if gates is not None else (dq, dq, dq)
    chunk_bwd_dqk_kernel[(K // BK, N, B * H)](
        q, k, v, do, b, bt, gs, h, state, dh, dq, dk, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype),
    )
    return dq, dk


def chunk_bwd_dv(q, k, do, gates: Gates | None, dh, scale: float, BT: int):
    """``dv [B, T, H, V]`` float32 due to ``dO``."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K), block(V)
    dv = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    b, bt = (gates.b, gates.bt) if gates is not None else (dv, dv)
    chunk_bwd_dv_kernel[(V // BV, N, B * H)](
        q, k, do, b, bt, dh, dv, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype),
    )
    return dv


def summary_bwd(k, v, gates: Gates | None, dM: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, BT: int) -> None:
    """Add the summary's share ``dk_j += e^(logA-G_j) v_j dM^T``, ``dv_j += e^(logA-G_j) k_j dM`` in place.

    dM ``[B, H, K, V]`` float32 contiguous; dk ``[B, T, H, K]``, dv ``[B, T, H, V]`` float32.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K), block(V)
    b, bt, ge = (gates.b, gates.bt, gates.ge) if gates is not None else (dk, dk, dk)
    summary_bwd_kernel[(K // BK + V // BV, N, B * H)](
        k, v, b, bt, ge, dM, dk, dv, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(k.dtype),
    )


def chunk_bwd_dg(q, k, dq, dk, c: torch.Tensor, BT: int):
    """Gradient of the per-token log decay ``da [B, T, H]`` and its per-(batch, head) sum ``[B, H]``.

    c ``[B, H]`` float32: the gradient reaching the segment's total log decay
    (``<dM, M> + dlogA``); every token's ``a`` feeds that total.
    """
    B, T, H, K = q.shape
    N = n_chunks(T, BT)
    da = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    dsum = torch.empty(B, H, dtype=torch.float32, device=q.device)
    chunk_bwd_dg_kernel[(B * H,)](q, k, dq, dk, c, da, dsum, T, N, H=H, K=K, BT=BT, BK=block(K))
    return da, dsum
