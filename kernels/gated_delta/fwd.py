"""Forward kernels of the chunked gated delta rule (WY form) and their launchers.

1. :func:`wy_factors` (``wy_fwd_kernel``, one program per chunk and head): optional L2
   normalisation of q, k; the chunk's cumulative gate ``G``; ``L_ij = b_i e^{G_i - G_j} k_i.k_j``
   (j < i); ``(I + L)^-1`` by forward substitution; ``W = (I+L)^-1 diag(b e^G) K`` and
   ``U0 = (I+L)^-1 diag(b) V``.
2. :func:`state_pass` (``state_fwd_kernel``, one program per column tile and head, sequential
   over chunks): ``S_{c+1} = e^{G_C} S_c + Kd^T (U0 - W S_c)``, ``Kd_j = e^{G_C - G_j} k_j``, from a
   given state, zeros, or the identity (then without ``U0``: the trajectory of the transition
   ``A``); stores each chunk's incoming state.
3. :func:`chunk_output` (``output_fwd_kernel``, one program per chunk, head and V tile):
   ``o = scale [(Q K^T o e^Gam)(U0 - W S_c) + diag(e^G) Q S_c]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import low_precision_dots
from .common import Factors, state_tile, chunk_gates, col_block, dot, from_start, n_chunks, pair_decay, qk_decay, to_end


@triton.jit
def wy_fwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, qn_ptr, kn_ptr, w_ptr, u_ptr, gc_ptr, gr_ptr, gn_ptr, T,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, USE_G: tl.constexpr, L2: tl.constexpr, LOWP: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (b * T + t) * H + h  # token-major [B, T, H, .] rows (int64)
    hrow = bh * T + t  # heads-first rows
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
            kt = tl.load(k_ptr + row[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            qt = tl.load(q_ptr + row[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            sk += tl.sum(kt * kt, axis=1)
            sq += tl.sum(qt * qt, axis=1)
        rk = 1.0 / tl.sqrt(sk + 1e-6)
        rq = 1.0 / tl.sqrt(sq + 1e-6)
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(0, K, BK):
        c = i + tl.arange(0, BK)
        kt = tl.load(k_ptr + row[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32) * rk[:, None]
        qt = tl.load(q_ptr + row[:, None] * K + c[None, :], mask=m[:, None], other=0.0).to(tl.float32) * rq[:, None]
        tl.store(kn_ptr + hrow[:, None] * K + c[None, :], kt, mask=m[:, None])
        tl.store(qn_ptr + hrow[:, None] * K + c[None, :], qt, mask=m[:, None])
        kk += dot(kt, tl.trans(kt), LOWP)
    strict = o[:, None] > o[None, :]
    L = beta[:, None] * pair_decay(gn, gr, m, strict, BT) * kk
    # X = (I + L)^-1 by forward substitution: X_i = e_i - sum_{j<i} L_ij X_j
    X = (o[:, None] == o[None, :]).to(tl.float32)
    for i in range(1, BT):
        li = tl.sum(tl.where(o[:, None] == i, L, 0.0), axis=0)
        xi = tl.sum(li[:, None] * X, axis=0)
        X = tl.where(o[:, None] == i, X - xi[None, :], X)
    kb = beta * from_start(gc, gr, m)
    for i in range(0, K, BK):
        c = i + tl.arange(0, BK)
        kt = tl.load(kn_ptr + hrow[:, None] * K + c[None, :], mask=m[:, None], other=0.0)
        wt = dot(X, kt * kb[:, None], False)
        tl.store(w_ptr + hrow[:, None] * K + c[None, :], wt, mask=m[:, None])
    for i in range(0, V, BV):
        c = i + tl.arange(0, BV)
        vt = tl.load(v_ptr + row[:, None] * V + c[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        ut = dot(X, vt * beta[:, None], False)
        tl.store(u_ptr + hrow[:, None] * V + c[None, :], ut, mask=m[:, None])


@triton.jit
def state_fwd_kernel(kn_ptr, w_ptr, u_ptr, gc_ptr, gr_ptr, gn_ptr, s0_ptr, h_ptr, st_ptr, T, NCOL,
                     K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, INIT: tl.constexpr,
                     HAS_U: tl.constexpr, STORE: tl.constexpr, LOWP: tl.constexpr):
    """INIT: 0 zeros, 1 the state at ``s0_ptr``, 2 the identity (NCOL = K); STORE: write ``h``."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    ck, cv, mv, soff = state_tile(iv, K, BV, NCOL)
    if INIT == 1:
        S = tl.load(s0_ptr + bh * K * NCOL + soff, mask=mv[None, :], other=0.0)
    elif INIT == 2:
        S = (ck[:, None] == cv[None, :]).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for n in range(0, N):
        t = n * BT + o
        m = t < T
        hrow = bh * T + t
        if STORE:
            tl.store(h_ptr + (bh * N + n) * K * NCOL + soff, S, mask=mv[None, :])
        w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        vn = -dot(w, S, LOWP)
        if HAS_U:
            vn += tl.load(u_ptr + hrow[:, None] * NCOL + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0)
        gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
        gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
        gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
        dk, dc = to_end(gc, gr, gn, m, n, T, BT)
        kd = tl.load(kn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0) * dk[:, None]
        S = S * dc + dot(tl.trans(kd), vn, LOWP)
    tl.store(st_ptr + bh * K * NCOL + soff, S, mask=mv[None, :])


@triton.jit
def output_fwd_kernel(qn_ptr, kn_ptr, w_ptr, u_ptr, gc_ptr, gr_ptr, gn_ptr, h_ptr, o_ptr, scale, T,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                      LOWP: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, BT)
    t = n * BT + tl.arange(0, BT)
    m = t < T
    hrow = bh * T + t
    ck = tl.arange(0, K)
    cv = iv * BV + tl.arange(0, BV)
    qn = tl.load(qn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
    kn = tl.load(kn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
    w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    S = tl.load(h_ptr + (bh * N + n) * K * V + ck[:, None] * V + cv[None, :])
    vn = tl.load(u_ptr + hrow[:, None] * V + cv[None, :], mask=m[:, None], other=0.0) - dot(w, S, LOWP)
    A = qk_decay(qn, kn, gn, gr, m, LOWP, BT)
    qd = qn * from_start(gc, gr, m)[:, None]
    out = scale * (dot(A, vn, LOWP) + dot(qd, S, LOWP))
    tl.store(o_ptr + ((b * T + t) * H + h)[:, None] * V + cv[None, :], out, mask=m[:, None])


def wy_factors(q, k, v, beta, g, BT: int, use_qk_l2norm: bool) -> Factors:
    """The per-chunk factors of one segment (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta, g
    ``[B, T, H]`` or None, contiguous; any float dtype). Returns :class:`Factors` (fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    qn, kn, w = (torch.empty(B, H, T, K, **f32) for _ in range(3))
    u = torch.empty(B, H, T, V, **f32)
    gc, gr, gn = (torch.empty(B, H, T, **f32) for _ in range(3))
    wy_fwd_kernel[(n_chunks(T, BT), B * H)](
        q, k, v, beta, beta if g is None else g, qn, kn, w, u, gc, gr, gn, T, H=H, K=K, V=V, BT=BT,
        BK=min(K, 64), BV=min(V, 64), USE_G=g is not None, L2=use_qk_l2norm, LOWP=low_precision_dots(q.dtype),
    )
    return Factors(qn, kn, w, u, gc, gr, gn, BT, low_precision_dots(q.dtype))


def state_pass(f: Factors, s0: torch.Tensor | None = None, identity: bool = False, store: bool = True):
    """The chunk-state pass: ``(h [B, H, N, K, X], final [B, H, K, X])`` float32, ``h[:, :, c]``
    the state entering chunk c (None unless ``store``). From ``s0 [B, H, K, V]`` (None: zeros), or
    with ``identity`` the trajectory of the transition from ``I`` (``X = K``, no ``U0``): its final
    value is ``A``."""
    B, H, T, K = f.kn.shape
    X = K if identity else f.u.shape[-1]
    N = n_chunks(T, f.BT)
    st = torch.empty(B, H, K, X, dtype=torch.float32, device=f.kn.device)
    h = torch.empty(B, H, N, K, X, dtype=torch.float32, device=f.kn.device) if store else None
    BV = col_block(K, X)
    init = 2 if identity else (0 if s0 is None else 1)
    state_fwd_kernel[(triton.cdiv(X, BV), B * H)](
        f.kn, f.w, f.u, f.gc, f.gr, f.gn, st if s0 is None else s0, st if h is None else h, st, T, X, K=K, BT=f.BT, BV=BV,
        INIT=init, HAS_U=not identity, STORE=store, LOWP=f.lowp,
    )
    return h, st


def chunk_output(f: Factors, h: torch.Tensor, scale: float) -> torch.Tensor:
    """``o [B, T, H, V]`` float32 from the chunk states ``h [B, H, N, K, V]``."""
    B, H, T, K = f.kn.shape
    V = f.u.shape[-1]
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=f.kn.device)
    BV = col_block(K, V)
    output_fwd_kernel[(n_chunks(T, f.BT), B * H, triton.cdiv(V, BV))](
        f.qn, f.kn, f.w, f.u, f.gc, f.gr, f.gn, h, o, float(scale), T, H=H, K=K, V=V, BT=f.BT, BV=BV, LOWP=f.lowp,
    )
    return o
