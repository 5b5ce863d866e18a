"""Forward kernels of the chunked gated delta rule (WY form) and their launchers.

1. :func:`wy_factors` (``wy_fwd_kernel``, one program per chunk and head): optional L2
   normalisation of q, k; the chunk's gates (``gc, gr, gn``); ``L_ij = b_i e^{G_i - G_j} k_i.k_j``
   (j < i); ``X = (I + L)^-1`` blockwise (:func:`~.common.invert_unit_lower`, kept: the backward
   reads it); ``W = X diag(b e^G) K`` and ``U0 = X diag(b) V``.
2. :func:`state_pass` (``state_fwd_kernel``, one program per column tile and head, sequential
   over chunks): ``S_{c+1} = e^{G_C} S_c + Kd^T Vn_c`` with ``Vn_c = U0 - W S_c`` and
   ``Kd_j = e^{G_C - G_j} k_j``, from a given state, zeros, or the identity (then without ``U0``:
   the trajectory of the transition ``A``). Stores each chunk's incoming state and ``Vn`` when
   asked. One launch may run two trajectories side by side (the transition's and the summary's:
   :func:`transition_and_summary`): their column tiles are independent programs.
3. :func:`chunk_output` (``output_fwd_kernel``, one program per chunk, head and V tile):
   ``o = scale [(Q K^T o e^Gam) Vn + diag(e^G) Q S_c]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import low_precision_dots, tile_cap
from .common import (Factors, chunk_gates, col_block, dot, from_start, invert_unit_lower, n_chunks, pair_decay,
                     snapshot_dtype, state_tile, to_end)

#: Launch settings (num_warps, num_stages) per kernel; compile_check verifies that each fits
#: sm_80 and sm_90 and does not spill.
WY_FWD = dict(num_warps=8, num_stages=1)
STATE_FWD = dict(num_warps=8, num_stages=2)
OUTPUT_FWD = dict(num_warps=4, num_stages=2)


@triton.jit
def wy_fwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, qn_ptr, kn_ptr, w_ptr, u_ptr, x_ptr, gc_ptr, gr_ptr, gn_ptr,
                  rq_ptr, rk_ptr, T,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, L2: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (b * T + t) * H + h  # token-major [B, T, HV, .] rows (int64) of v, g, beta
    hrow = bh * T + t  # heads-first rows (value heads)
    qrow = (b * T + t) * (H // G) + h // G  # token-major rows of q, k (GVA: the q/k head of value head h)
    krow = (bh // G) * T + t  # heads-first rows of qn, kn, rq, rk (one per q/k head)
    mine = m & (h % G == 0)  # the first value head of a group stores its q/k head's qn, kn, rq, rk
    beta = tl.load(beta_ptr + row, mask=m, other=0.0).to(tl.float32)
    gc, gr, gn = chunk_gates(g_ptr, row, t, T, H, USE_G, BT)
    tl.store(gc_ptr + hrow, gc, mask=m)
    tl.store(gr_ptr + hrow, gr, mask=m)
    tl.store(gn_ptr + hrow, gn, mask=m)
    rk = tl.full([BT], 1.0, dtype=tl.float32)
    rq = tl.full([BT], 1.0, dtype=tl.float32)
    if L2:
        sk = tl.zeros([BT], dtype=tl.float32)
        sq = tl.zeros([BT], dtype=tl.float32)
        for i in range(0, K, BK):
            c = i + tl.arange(0, BK)
            kt = tl.load(k_ptr + qrow[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            qt = tl.load(q_ptr + qrow[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            sk += tl.sum(kt * kt, axis=1)
            sq += tl.sum(qt * qt, axis=1)
        rk = 1.0 / tl.sqrt(sk + 1e-6)
        rq = 1.0 / tl.sqrt(sq + 1e-6)
        tl.store(rk_ptr + krow, rk, mask=mine)
        tl.store(rq_ptr + krow, rq, mask=mine)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(0, K, BK):
        c = i + tl.arange(0, BK)
        kt = (tl.load(k_ptr + qrow[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
              * rk[:, None]).to(kn_ptr.dtype.element_ty)
        qt = tl.load(q_ptr + qrow[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32) * rq[:, None]
        tl.store(kn_ptr + krow[:, None] * K + c[None, :], kt, mask=mine[:, None])
        tl.store(qn_ptr + krow[:, None] * K + c[None, :], qt.to(qn_ptr.dtype.element_ty), mask=mine[:, None])
        kk += dot(kt, tl.trans(kt), LOWP)
    L = beta[:, None] * pair_decay(gn, gr, m, o[:, None] > o[None, :], BT) * kk
    xb = x_ptr + (bh * tl.cdiv(T, BT) + n) * BT * BT  # this chunk's [BT, BT] (padded rows included: L is 0 there)
    xoff = o[:, None] * BT + o[None, :]
    tl.store(xb + xoff, L)
    tl.debug_barrier()
    invert_unit_lower(xb, BT)
    tl.debug_barrier()
    X = tl.load(xb + xoff, mask=m[:, None], other=0.0)
    kb = beta * from_start(gc, gr, m)
    for i in range(0, K, BK):
        c = i + tl.arange(0, BK)
        # k again from the input (another program of the group may hold its kn store): the same fp32 values
        kt = (tl.load(k_ptr + qrow[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
              * rk[:, None]).to(kn_ptr.dtype.element_ty).to(tl.float32)
        wt = dot(X, kt * kb[:, None], LOWP)
        tl.store(w_ptr + hrow[:, None] * K + c[None, :], wt.to(w_ptr.dtype.element_ty), mask=m[:, None])
    for i in range(0, V, BV):
        c = i + tl.arange(0, BV)
        vt = tl.load(v_ptr + row[:, None] * V + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        ut = dot(X, vt * beta[:, None], LOWP)
        tl.store(u_ptr + hrow[:, None] * V + c[None, :], ut.to(u_ptr.dtype.element_ty), mask=m[:, None])


@triton.jit
def state_fwd_kernel(kn_ptr, w_ptr, u_ptr, gc_ptr, gr_ptr, gn_ptr, s0_ptr, h_ptr, vn_ptr, st_ptr, a_ptr, T, NCOL,
                     NA, K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, INIT: tl.constexpr,
                     HAS_U: tl.constexpr, STORE_H: tl.constexpr, STORE_VN: tl.constexpr, LOWP: tl.constexpr,
                     G: tl.constexpr):
    """Programs ``pid < NA`` run the transition's trajectory (from ``I``, no ``U0``; columns of a
    ``[K, K]`` state; final state at ``a_ptr``, nothing stored on the way). The others run a
    ``[K, NCOL]`` trajectory from INIT (0 zeros, 1 the state at ``s0_ptr``, 2 the identity,
    NCOL = K), with ``U0`` when HAS_U, final state at ``st_ptr``, storing each chunk's incoming
    state at ``h_ptr`` (STORE_H) and ``Vn = U0 - W S_c`` at ``vn_ptr`` (STORE_VN)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    is_a = pid < NA
    own = pid >= NA  # a trajectory of this launch's own (non-transition) kind
    ncol = tl.where(is_a, K, NCOL)
    ck, cv, mv, soff = state_tile(tl.where(is_a, pid, pid - NA), K, BV, ncol)
    if INIT == 1:
        S = tl.load(s0_ptr + bh * K * NCOL + soff, mask=mv[None, :] & own, other=0.0)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    S = tl.where((is_a | (INIT == 2)) & (ck[:, None] == cv[None, :]), 1.0, S)
    for n in range(0, N):
        t = n * BT + o
        m = t < T
        hrow = bh * T + t
        if STORE_H:
            tl.store(h_ptr + (bh * N + n) * K * NCOL + soff, S.to(h_ptr.dtype.element_ty), mask=mv[None, :] & own)
        w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        vn = -dot(w, S, LOWP)
        if HAS_U:
            vn += tl.load(u_ptr + hrow[:, None] * NCOL + cv[None, :], mask=m[:, None] & mv[None, :] & own,
                          other=0.0).to(tl.float32)
        if STORE_VN:
            tl.store(vn_ptr + hrow[:, None] * NCOL + cv[None, :], vn.to(vn_ptr.dtype.element_ty),
                     mask=m[:, None] & mv[None, :] & own)
        gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
        gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
        gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
        dk, dc = to_end(gc, gr, gn, m, n, T, BT)
        krow = (bh // G) * T + t  # the q/k head of value head bh (GVA)
        kd = tl.load(kn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32) * dk[:, None]
        S = S * dc + dot(tl.trans(kd), vn, LOWP)
    if is_a:
        tl.store(a_ptr + bh * K * K + soff, S, mask=mv[None, :])
    else:
        tl.store(st_ptr + bh * K * NCOL + soff, S, mask=mv[None, :])


@triton.jit
def output_fwd_kernel(qn_ptr, kn_ptr, vn_ptr, gc_ptr, gr_ptr, gn_ptr, h_ptr, o_ptr, scale, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    hrow = bh * T + t
    krow = (bh // G) * T + t  # qn, kn of value head bh's q/k head (GVA)
    cv = iv * BV + tl.arange(0, BV)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    qs = tl.zeros([BT, BV], dtype=tl.float32)
    for i in range(0, K, BK):
        ck = i + tl.arange(0, BK)
        qn = tl.load(qn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        kn = tl.load(kn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        S = tl.load(h_ptr + (bh * N + n) * K * V + ck[:, None] * V + cv[None, :])
        qk += dot(qn, tl.trans(kn), LOWP)
        qs += dot(qn, S, LOWP)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    P = qk * pair_decay(gn, gr, m, o[:, None] >= o[None, :], BT)
    vn = tl.load(vn_ptr + hrow[:, None] * V + cv[None, :], mask=m[:, None], other=0.0)
    out = scale * (dot(P, vn, LOWP) + qs * from_start(gc, gr, m)[:, None])
    tl.store(o_ptr + ((b * T + t) * H + h)[:, None] * V + cv[None, :], out, mask=m[:, None])


def wy_factors(q, k, v, g, beta, BT: int, use_qk_l2norm: bool) -> Factors:
    """The per-chunk factors of one segment (q, k ``[B, T, HK, K]``, v ``[B, T, H, V]``, g, beta
    ``[B, T, H]`` or None, contiguous; any float dtype; ``H`` a multiple of ``HK``: GVA, value head h
    reads q/k head ``h // (H // HK)``, nothing repeated). Returns :class:`Factors`."""
    B, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    qn, kn = (torch.empty(B, HK, T, K, **f32) for _ in range(2))  # one per q/k head
    w = torch.empty(B, H, T, K, **f32)
    u = torch.empty(B, H, T, V, **f32)
    x = torch.empty(B, H, n_chunks(T, BT) * BT, BT, **f32)  # padded to whole chunks: the inverse's scratch
    gc, gr, gn = (torch.empty(B, H, T, **f32) for _ in range(3))
    rq, rk = (torch.empty(B, HK, T, **f32) for _ in range(2)) if use_qk_l2norm else (None, None)
    lowp, cap = low_precision_dots(q.dtype), tile_cap(q.dtype)
    wy_fwd_kernel[(n_chunks(T, BT), B * H)](
        q, k, v, beta, beta if g is None else g, qn, kn, w, u, x, gc, gr, gn, gc if rq is None else rq,
        gc if rk is None else rk, T, H=H, K=K, V=V, BT=BT, BK=min(K, cap), BV=min(V, cap), USE_G=g is not None,
        L2=use_qk_l2norm, LOWP=lowp, G=H // HK, **WY_FWD,
    )
    return Factors(qn, kn, w, u, x, gc, gr, gn, rq, rk, BT, lowp, snapshot_dtype(q.dtype), cap, H // HK)


def _state_launch(f: Factors, transition: bool, ncol: int, init: int, s0, has_u: bool, store_h: bool, store_vn: bool):
    """``(A or None, final [B, H, K, ncol], h or None, vn or None)``: one launch of
    ``state_fwd_kernel`` (the transition's programs first when ``transition``)."""
    B, H, T, K = f.w.shape
    N = n_chunks(T, f.BT)
    dev = f.kn.device
    BV = col_block(K, max(ncol, K) if transition else ncol, 128 * f.tile)
    na = triton.cdiv(K, BV) if transition else 0
    st = torch.empty(B, H, K, ncol, dtype=torch.float32, device=dev)
    A = torch.empty(B, H, K, K, dtype=torch.float32, device=dev) if transition else None
    snap = torch.float32 if init == 2 else f.snap  # the identity's trajectory feeds an fp32 bmm
    h = torch.empty(B, H, N, K, ncol, dtype=snap, device=dev) if store_h else None
    vn = torch.empty(B, H, T, ncol, dtype=f.snap, device=dev) if store_vn else None
    state_fwd_kernel[(na + triton.cdiv(ncol, BV), B * H)](
        f.kn, f.w, f.u, f.gc, f.gr, f.gn, st if s0 is None else s0, st if h is None else h, st if vn is None else vn,
        st, st if A is None else A, T, ncol, na, K=K, BT=f.BT, BV=BV, INIT=init, HAS_U=has_u, STORE_H=store_h,
        STORE_VN=store_vn, LOWP=f.lowp, G=f.G, **STATE_FWD,
    )
    return A, st, h, vn


def state_pass(f: Factors, s0: torch.Tensor | None = None):
    """The trajectory from ``s0 [B, H, K, V]`` float32 contiguous (None: zeros): ``(final [B, H, K, V]
    float32, h [B, H, N, K, V], vn [B, H, T, V])``, ``h[:, :, c]`` the state entering chunk c and
    ``vn`` the chunks' ``U0 - W S_c`` (store dtype)."""
    _, st, h, vn = _state_launch(f, False, f.u.shape[-1], 0 if s0 is None else 1, s0, True, True, True)
    return st, h, vn


def transition_and_summary(f: Factors, transition: bool = True, store: bool = False):
    """One launch, two trajectories side by side: ``(A [B, H, K, K] or None, M [B, H, K, V], h,
    vn)``, the transition (from ``I``; skipped unless ``transition``) and the summary (from
    zeros), with the summary trajectory's ``h`` and ``vn`` when ``store`` (else None)."""
    return _state_launch(f, transition, f.u.shape[-1], 0, None, True, store, store)


def identity_trajectory(f: Factors) -> torch.Tensor:
    """The transition's trajectory ``Phi [B, H, N, K, K]`` float32 (``Phi_c``: the map from the
    segment's start to chunk c's start); only for a general ``dA`` (see ``TritonDeltaSegment``)."""
    K = f.kn.shape[-1]
    _, _, h, _ = _state_launch(f, False, K, 2, None, False, True, False)
    return h


def chunk_output(f: Factors, h: torch.Tensor, vn: torch.Tensor, scale: float) -> torch.Tensor:
    """``o [B, T, H, V]`` float32 from the chunk states ``h [B, H, N, K, V]`` and ``vn``."""
    B, H, T, K = f.w.shape
    V = vn.shape[-1]
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=f.kn.device)
    BV = min(V, f.tile)
    output_fwd_kernel[(n_chunks(T, f.BT), B * H, triton.cdiv(V, BV))](
        f.qn, f.kn, vn, f.gc, f.gr, f.gn, h, o, float(scale), T, H=H, K=K, V=V, BT=f.BT, BK=min(K, f.tile), BV=BV,
        LOWP=f.lowp, G=f.G, **OUTPUT_FWD,
    )
    return o
