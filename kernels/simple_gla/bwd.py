"""Backward kernels of chunked gated linear attention, split the way LASP-2 needs them.

With ``S_in`` the state that entered the segment in forward and ``dO`` the output gradient:

1. :func:`chunk_bwd_dh`  the gradient of the state leaving every chunk due to ``dO`` of the
   later chunks, and ``dS_in = scale * (q * e^G)^T dO`` (what LASP-2 exchanges);
2. :func:`chunk_bwd_dqk`, :func:`chunk_bwd_dv`  ``dq, dk, dv`` due to ``dO`` (runs while the
   all-gather of step 1 is in flight);
3. :func:`summary_bwd`  adds the part of ``dk, dv`` due to the gradient ``dM`` of the
   segment's own summary ``M = sum_j e^(logA - G_j) k_j^T v_j``;
4. :func:`chunk_bwd_dg`  the log-gate gradient: a reverse cumsum inside each chunk of the
   gradient w.r.t. the chunk-local cumsum of the decay, which the kernels of steps 2 and 3
   form in fp32 (per K tile), plus ``dlogA``.

Inside the kernels everything accumulates in fp32; ``dq, dk, dv`` are stored in the input dtype.
"""
from __future__ import annotations

import torch
import triton.language as tl
import triton

from ..utils import block, low_precision_dots, maybe_autotune
from .common import Gates, load_gates, masked_exp, mm, mm_state, n_chunks, to_chunk_end
from .fwd import gate_args, snapshot_dtype


#: Launch settings of the kernels that are not autotuned (they accumulate into existing buffers);
#: compile_check verifies every one fits sm_80 and sm_90 without spills.
SUMMARY_BWD = dict(num_warps=4, num_stages=1)
CHUNK_BWD_DG = dict(num_warps=1, num_stages=1)  # [BT] vectors, one program per head


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_bwd_dh_kernel(
    q_ptr, do_ptr, b_ptr, r_ptr, bt_ptr, dh_ptr, ds_ptr, scale, T, N,
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
    d = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, N):
        n = N - 1 - j
        tl.store(dh_ptr + (bh.to(tl.int64) * N + n) * (K * V) + kv, d.to(dh_ptr.dtype.element_ty))
        t = n * BT + o
        m = t < T
        row = (i_b.to(tl.int64) * T + t) * H + i_h
        qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        dd = tl.load(do_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        if USE_G:
            bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
            qd = qq.to(tl.float32) * masked_exp(rr == 0, bb)[:, None]
            d = d * tl.exp(tl.load(bt_ptr + bh * N + n)) + mm(tl.trans(qd), dd, q_ptr, LOWP) * scale
        else:
            d += mm(tl.trans(qq), dd, q_ptr, LOWP) * scale
    tl.store(ds_ptr + bh.to(tl.int64) * K * V + kv, d)


@maybe_autotune(key=["K", "V", "BT", "USE_G", "HAS_S", "LOWP"])
@triton.jit
def chunk_bwd_dqk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, b_ptr, r_ptr, bt_ptr, gs_ptr, h_ptr, s_ptr, dh_ptr, dq_ptr, dk_ptr, dgp_ptr,
    scale, T, N, B_H,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, HAS_S: tl.constexpr, LOWP: tl.constexpr,
):
    pid, i_k = tl.program_id(0), tl.program_id(1)  # pid = bh * N + n
    bh = pid // N
    n = pid % N
    i_b = bh // H
    i_h = bh % H
    ok = i_k * BK + tl.arange(0, BK)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (i_b.to(tl.int64) * T + t) * H + i_h
    h_base = pid.to(tl.int64) * K * V
    s_base = bh.to(tl.int64) * K * V
    if USE_G:
        g0 = tl.exp(tl.load(gs_ptr + bh * N + n))
    else:
        g0 = 1.0
    da = tl.zeros([BT, BT], dtype=tl.float32)
    dqa = tl.zeros([BT, BK], dtype=tl.float32)
    dka = tl.zeros([BT, BK], dtype=tl.float32)
    hd = tl.zeros([BK, BV], dtype=tl.float32)  # <state entering n, dstate leaving n>, this K tile
    for i_v in range(0, V // BV):
        ov = i_v * BV + tl.arange(0, BV)
        kv = ok[:, None] * V + ov[None, :]
        dd = tl.load(do_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        vv = tl.load(v_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
        da += mm(dd, tl.trans(vv), q_ptr, LOWP)
        state = tl.load(h_ptr + h_base + kv).to(tl.float32)  # full state entering n
        if HAS_S:
            state += g0 * tl.load(s_ptr + s_base + kv)
        dqa += mm_state(dd, tl.trans(state), LOWP)
        dstate = tl.load(dh_ptr + h_base + kv).to(tl.float32)
        dka += mm_state(vv, tl.trans(dstate), LOWP)
        if USE_G:
            hd += state * dstate
    qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
    kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
    causal = (o[:, None] >= o[None, :]) & m[:, None]
    if USE_G:
        bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
        da = da * masked_exp(causal & (rr[:, None] == rr[None, :]), bb[:, None] - bb[None, :])
        dqa = dqa * masked_exp(rr == 0, bb)[:, None]
        dka = dka * to_chunk_end(bb, rr, n, T, BT)[:, None]
    else:
        da = tl.where(causal, da, 0.0)
    dq = (dqa + mm(da, kk, q_ptr, LOWP)) * scale
    dk = mm(tl.trans(da), qq, q_ptr, LOWP) * scale + dka
    offs = row[:, None] * K + ok[None, :]
    tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=m[:, None])
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=m[:, None])
    if USE_G:  # this K tile's share of db (see chunk_bwd_dqk), from the fp32 values
        kf = kk.to(tl.float32)
        db = tl.sum(qq.to(tl.float32) * dq - kf * dk, axis=1)
        last = tl.exp(tl.load(bt_ptr + bh * N + n)) * tl.sum(tl.sum(hd, axis=1), axis=0) + tl.sum(tl.sum(kf * dka, axis=1), axis=0)
        db = tl.where(o == tl.minimum(BT, T - n * BT) - 1, db + last, db)
        tl.store(dgp_ptr + (i_k * B_H + bh).to(tl.int64) * T + t, db, mask=m)


@maybe_autotune(key=["K", "V", "BT", "USE_G", "LOWP"])
@triton.jit
def chunk_bwd_dv_kernel(
    q_ptr, k_ptr, do_ptr, b_ptr, r_ptr, dh_ptr, dv_ptr, scale, T, N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    pid, i_v = tl.program_id(0), tl.program_id(1)  # pid = bh * N + n
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
    st = tl.zeros([BT, BT], dtype=tl.float32)  # st[j, i] = k_j . q_i
    dva = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, K // BK):
        ok = i_k * BK + tl.arange(0, BK)
        kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        qq = tl.load(q_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0)
        st += mm(kk, tl.trans(qq), q_ptr, LOWP)
        dva += mm_state(kk, tl.load(dh_ptr + h_base + ok[:, None] * V + ov[None, :]), LOWP)
    causal_t = (o[None, :] >= o[:, None]) & m[None, :]
    if USE_G:
        bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
        st = st * masked_exp(causal_t & (rr[None, :] == rr[:, None]), bb[None, :] - bb[:, None])
        dva = dva * to_chunk_end(bb, rr, n, T, BT)[:, None]
    else:
        st = tl.where(causal_t, st, 0.0)
    dd = tl.load(do_ptr + row[:, None] * V + ov[None, :], mask=m[:, None], other=0.0)
    dv = mm(st, dd, q_ptr, LOWP) * scale + dva
    tl.store(dv_ptr + row[:, None] * V + ov[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m[:, None])


@triton.jit
def summary_bwd_kernel(
    k_ptr, v_ptr, h_ptr, b_ptr, r_ptr, bt_ptr, ge_ptr, dm_ptr, dk_ptr, dv_ptr, dgp_ptr, T, N, B_H,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, LOWP: tl.constexpr,
):
    """Program ``i < K/BK`` adds K-block i of ``dk``; the others add V-blocks of ``dv``."""
    pid, i_d = tl.program_id(0), tl.program_id(1)  # pid = bh * N + n
    bh = pid // N
    n = pid % N
    i_b = bh // H
    i_h = bh % H
    t = n * BT + tl.arange(0, BT)
    m = t < T
    row = (i_b.to(tl.int64) * T + t) * H + i_h
    s_base = bh.to(tl.int64) * K * V
    if USE_G:  # e^(logA - G_j) = e^(ge_n) * (decay from j to the chunk's end), exact near the segment's end
        bb, rr = load_gates(b_ptr, r_ptr, bh, t, m, T)
        ge = tl.load(ge_ptr + bh * N + n)
        decay = tl.exp(ge) * to_chunk_end(bb, rr, n, T, BT)
    # the two branches use distinct names: Triton merges same-named values of both branches
    if i_d < K // BK:
        ok = i_d * BK + tl.arange(0, BK)
        acc_k = tl.zeros([BT, BK], dtype=tl.float32)
        hd = tl.zeros([BK, BV], dtype=tl.float32)  # <local state entering n, dM>, this K tile
        for i_v in range(0, V // BV):
            ov_k = i_v * BV + tl.arange(0, BV)
            kv = ok[:, None] * V + ov_k[None, :]
            vv = tl.load(v_ptr + row[:, None] * V + ov_k[None, :], mask=m[:, None], other=0.0)
            dm = tl.load(dm_ptr + s_base + kv)
            acc_k += mm_state(vv, tl.trans(dm), LOWP)
            if USE_G:
                hd += tl.load(h_ptr + pid.to(tl.int64) * K * V + kv).to(tl.float32) * dm
        if USE_G:
            acc_k = acc_k * decay[:, None]
            kk = tl.load(k_ptr + row[:, None] * K + ok[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            # the state leaving chunk n gets e^(ge_n) dM: same db terms as in the dq/dk kernel
            kd = tl.sum(kk * acc_k, axis=1)
            last = tl.exp(ge + tl.load(bt_ptr + bh * N + n)) * tl.sum(tl.sum(hd, axis=1), axis=0)
            last += tl.sum(kd, axis=0)
            o = tl.arange(0, BT)
            g_offs = (i_d * B_H + bh).to(tl.int64) * T + t
            db = tl.load(dgp_ptr + g_offs, mask=m, other=0.0) - kd
            db = tl.where(o == tl.minimum(BT, T - n * BT) - 1, db + last, db)
            tl.store(dgp_ptr + g_offs, db, mask=m)
        offs_k = row[:, None] * K + ok[None, :]
        dk = tl.load(dk_ptr + offs_k, mask=m[:, None], other=0.0).to(tl.float32) + acc_k
        tl.store(dk_ptr + offs_k, dk.to(dk_ptr.dtype.element_ty), mask=m[:, None])
    else:
        ov = (i_d - K // BK) * BV + tl.arange(0, BV)
        acc_v = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(0, K // BK):
            ok_v = i_k * BK + tl.arange(0, BK)
            kk_v = tl.load(k_ptr + row[:, None] * K + ok_v[None, :], mask=m[:, None], other=0.0)
            acc_v += mm_state(kk_v, tl.load(dm_ptr + s_base + ok_v[:, None] * V + ov[None, :]), LOWP)
        if USE_G:
            acc_v = acc_v * decay[:, None]
        offs_v = row[:, None] * V + ov[None, :]
        dv = tl.load(dv_ptr + offs_v, mask=m[:, None], other=0.0).to(tl.float32) + acc_v
        tl.store(dv_ptr + offs_v, dv.to(dv_ptr.dtype.element_ty), mask=m[:, None])


@triton.jit
def chunk_bwd_dg_kernel(dgp_ptr, r_ptr, c_ptr, da_ptr, dgg_ptr, T, N, B_H, H: tl.constexpr, NK: tl.constexpr, BT: tl.constexpr):
    """``da_j = c + sum_{i >= j in j's chunk} db_i`` (``c`` alone at a reset, which no cumsum
    holds), ``db`` summed over the NK partials ``[NK, B*H, T]``."""
    bh = tl.program_id(0)
    i_b = bh // H
    i_h = bh % H
    o = tl.arange(0, BT)
    c = tl.load(c_ptr + bh)
    total = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    for n in range(0, N):
        t = n * BT + o
        m = t < T
        db = tl.zeros([BT], dtype=tl.float32)
        for i_k in range(0, NK):
            db += tl.load(dgp_ptr + (i_k * B_H + bh).to(tl.int64) * T + t, mask=m, other=0.0)
        rr = tl.load(r_ptr + bh.to(tl.int64) * T + t, mask=m, other=0.0)
        r_prev = tl.load(r_ptr + bh.to(tl.int64) * T + t - 1, mask=m & (o > 0), other=0.0)
        da = tl.where(rr != r_prev, 0.0, tl.cumsum(db, axis=0, reverse=True)) + c
        tl.store(da_ptr + (i_b.to(tl.int64) * T + t) * H + i_h, da, mask=m)
        total += tl.sum(tl.where(m, da, 0.0), axis=0)
    tl.store(dgg_ptr + bh, total)


def chunk_bwd_dh(q, do, gates: Gates | None, scale: float, BT: int):
    """``dh [B, H, N, K, V]`` (gradient of the state leaving each chunk, from later chunks' ``dO``;
    in :func:`~.fwd.snapshot_dtype`) and ``dS_in [B, H, K, V]`` float32.

    q ``[B, T, H, K]``, do ``[B, T, H, V]`` in q's dtype, contiguous.
    """
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, q.dtype), block(V, q.dtype)
    dh = torch.empty(B, H, N, K, V, dtype=snapshot_dtype(q.dtype), device=q.device)
    ds = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
    chunk_bwd_dh_kernel[(B * H, K // BK, V // BV)](
        q, do, *gate_args(gates, ds, "b", "r", "bt"), dh, ds, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype),
    )
    return dh, ds


def chunk_bwd_dqk(q, k, v, do, gates: Gates | None, h, state: torch.Tensor | None, dh, scale: float, BT: int):
    """``dq, dk [B, T, H, K]`` (q's dtype) due to ``dO``, and ``dgp [K/BK, B*H, T]`` float32.

    ``state [B, H, K, V]`` float32 entered the segment (None: a zero state). ``dgp`` (None without gates) holds per
    K tile the gradient w.r.t. the chunk-local cumsum ``b`` of the log decay:
    ``db_i = <q_i, dq_i> - <k_i, dk_i>``, plus, at the chunk's last token (``bt_n`` is the
    chunk's total log decay, ``-inf`` past a reset), ``<dS_n, S_{n+1}> = e^(bt_n) <dS_n, S_n> +
    sum_j <k_j, dk_j^state>`` with ``S_n`` the state entering chunk n, ``dS_n`` the gradient of
    the one leaving it and ``dk^state`` the part of dk due to ``dS_n``. The decays in dq, dk are
    masked where a reset intervenes, so these identities hold with resets too (a reset's own
    gate is in no cumsum: :func:`chunk_bwd_dg` gives it only ``dlogA``). Chunk-local sums keep
    rounding errors from accumulating over the whole sequence.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, q.dtype), block(V, q.dtype)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dgp = torch.empty(K // BK, B * H, T, dtype=torch.float32, device=q.device) if gates is not None else None
    chunk_bwd_dqk_kernel[(B * H * N, K // BK)](
        q, k, v, do, *gate_args(gates, dq, "b", "r", "bt", "gs"), h, state if state is not None else h, dh, dq, dk,
        dgp if dgp is not None else dq, scale, T, N, B * H,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=gates is not None, HAS_S=state is not None,
        LOWP=low_precision_dots(q.dtype),
    )
    return dq, dk, dgp


def chunk_bwd_dv(q, k, do, gates: Gates | None, dh, scale: float, BT: int):
    """``dv [B, T, H, V]`` (do's dtype) due to ``dO``."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, q.dtype), block(V, q.dtype)
    dv = torch.empty_like(do)
    chunk_bwd_dv_kernel[(B * H * N, V // BV)](
        q, k, do, *gate_args(gates, dv, "b", "r"), dh, dv, scale, T, N, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gates is not None, LOWP=low_precision_dots(q.dtype),
    )
    return dv


def summary_bwd(k, v, h, gates: Gates | None, dM: torch.Tensor, dk, dv, dgp, BT: int) -> None:
    """Add the summary's share in place: ``dk_j += e^(logA-G_j) v_j dM^T``,
    ``dv_j += e^(logA-G_j) k_j dM`` and its ``db`` terms (per K tile; see :func:`chunk_bwd_dqk`).

    h: the local chunk states from :func:`~.fwd.chunk_fwd_h`; dM ``[B, H, K, V]`` float32
    contiguous; dk ``[B, T, H, K]``, dv ``[B, T, H, V]`` (any float dtype); dgp
    ``[K/BK, B*H, T]`` float32 or None without gates.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = n_chunks(T, BT)
    BK, BV = block(K, k.dtype), block(V, k.dtype)
    summary_bwd_kernel[(B * H * N, K // BK + V // BV)](
        k, v, h, *gate_args(gates, dM, "b", "r", "bt", "ge"), dM, dk, dv, dgp if dgp is not None else dM, T, N, B * H,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=gates is not None, LOWP=low_precision_dots(k.dtype), **SUMMARY_BWD,
    )


def chunk_bwd_dg(dgp: torch.Tensor, gates: Gates, c: torch.Tensor, B: int, T: int, H: int, BT: int):
    """Gradient of the per-token log decay ``da [B, T, H]`` and its per-(batch, head) sum ``[B, H]``.

    dgp ``[NK, B*H, T]``: shares of ``db`` (see :func:`chunk_bwd_dqk`); ``da_j = c + sum of db_i
    over i >= j in j's chunk`` (``c`` alone at a reset). c ``[B, H]`` float32: ``dlogA``, the gradient reaching the
    segment's total log decay (every token's ``a`` feeds it).
    """
    N = n_chunks(T, BT)
    da = torch.empty(B, T, H, dtype=torch.float32, device=dgp.device)
    dsum = torch.empty(B, H, dtype=torch.float32, device=dgp.device)
    chunk_bwd_dg_kernel[(B * H,)](dgp, gates.r, c, da, dsum, T, N, B * H, H=H, NK=dgp.shape[0], BT=BT, **CHUNK_BWD_DG)
    return da, dsum
