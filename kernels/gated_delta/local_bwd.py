"""The per-chunk local backward of the gated delta rule in Triton (``local_bwd_kernel``).

Given, per chunk c, the adjoint terms of its maps (see :mod:`lasp.kernels.gated_delta.bwd`):
``D_c = dA_c`` ``[K, K]``, ``E_c = dM_c`` ``[K, V]`` and, with outputs, ``dO_c`` and the incoming
state ``S_c`` (so ``dQeff = dO S^T``, ``dO_loc = dO``), one program per chunk and head recomputes
``L``, ``X = (I + L)^-1`` and backpropagates, all in fp32::

    A = e^{G_C} I - Kd^T W       M = Kd^T U0        W = X diag(b e^G) K      U0 = X diag(b) V
    Qeff = scale [diag(e^G) Q - P W]     O_loc = scale P U0     P = (Q K^T) o e^Gam (incl.)
    dL = -X^T dX X^T (strictly lower)    L = diag(b) (K K^T o e^Gam) (strict)

The gate gradient collects ``dG_i`` (w.r.t. the chunk's cumulative gate) and reverse-cumsums it
inside the chunk (0 at hard resets); the L2 norm's backward is ``r (dqn - qn (qn . dqn))``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import RESET, Factors, dot, from_start, n_chunks, pair_decay, to_end


@triton.jit
def l2_bwd(x_ptr, row, m, xn, dxn, K: tl.constexpr, ck):
    """The L2 norm's backward at the raw rows ``x``: ``r (dxn - xn (xn . dxn))``."""
    x = tl.load(x_ptr + row[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)
    return r[:, None] * (dxn - xn * tl.sum(xn * dxn, axis=1)[:, None])


@triton.jit
def local_bwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, qn_ptr, kn_ptr, w_ptr, u_ptr, gc_ptr, gr_ptr, gn_ptr,
                     d_ptr, e_ptr, do_ptr, s_ptr, dq_ptr, dk_ptr, dv_ptr, db_ptr, dg_ptr, scale, T,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     USE_G: tl.constexpr, L2: tl.constexpr, HAS_DO: tl.constexpr, LOWP: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (b * T + t) * H + h
    hrow = bh * T + t
    ck = tl.arange(0, K)
    cv = tl.arange(0, V)
    mk, mvv = m[:, None], m[:, None]
    qn = tl.load(qn_ptr + hrow[:, None] * K + ck[None, :], mask=mk, other=0.0)
    kn = tl.load(kn_ptr + hrow[:, None] * K + ck[None, :], mask=mk, other=0.0)
    w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=mk, other=0.0)
    u = tl.load(u_ptr + hrow[:, None] * V + cv[None, :], mask=mvv, other=0.0)
    v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=mvv, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + row, mask=m, other=0.0).to(tl.float32)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    eG = from_start(gc, gr, m)
    dke, eC = to_end(gc, gr, gn, m, n, T, BT)
    cidx = (bh * N + n)
    Dm = tl.load(d_ptr + cidx * K * K + ck[:, None] * K + ck[None, :])
    Em = tl.load(e_ptr + cidx * K * V + ck[:, None] * V + cv[None, :])
    kd = kn * dke[:, None]
    # A = eC I - Kd^T W, M = Kd^T U0
    dW = -dot(kd, Dm, LOWP)
    dKd = dot(u, tl.trans(Em), LOWP) - dot(w, tl.trans(Dm), LOWP)
    dU = dot(kd, Em, LOWP)
    trace = tl.sum(tl.sum(tl.where(ck[:, None] == ck[None, :], Dm, 0.0), axis=1), axis=0)
    last = tl.minimum(BT, T - n * BT) - 1
    strict = o[:, None] > o[None, :]
    # The gate gradient in two parts, so that nothing cancels: dGe_i, the gradient w.r.t. a
    # factor e^{G_i} (it reaches every g_t, t <= i) and dGp_ij (i > j), w.r.t. a factor
    # e^{G_i - G_j} (it reaches g_t for j < t <= i only).
    dGe = tl.where(o == last, trace * eC, 0.0)
    if HAS_DO:
        do = tl.load(do_ptr + row[:, None] * V + cv[None, :], mask=mvv, other=0.0)
        S = tl.load(s_ptr + cidx * K * V + ck[:, None] * V + cv[None, :])
        dQe = dot(do, tl.trans(S), LOWP)  # dL/dQeff
        gam = pair_decay(gn, gr, m, o[:, None] >= o[None, :], BT)
        P = dot(qn, tl.trans(kn), LOWP) * gam
        dU += scale * dot(tl.trans(P), do, LOWP)
        dW -= scale * dot(tl.trans(P), dQe, LOWP)
        dP = scale * (dot(do, tl.trans(u), LOWP) - dot(dQe, tl.trans(w), LOWP))
        dPG = dP * gam
        dqn = scale * eG[:, None] * dQe + dot(dPG, kn, LOWP)
        dkn = dot(tl.trans(dPG), qn, LOWP)
        dGp = tl.where(strict, dP * P, 0.0)  # the diagonal's e^{G_i - G_i} has no gate gradient
        dGe += scale * eG * tl.sum(qn * dQe, axis=1)
    else:
        dqn = tl.zeros([BT, K], dtype=tl.float32)
        dkn = tl.zeros([BT, K], dtype=tl.float32)
        dGp = tl.zeros([BT, BT], dtype=tl.float32)
    # Kd_j = e^{G_C - G_j} k_j: the pair (last, j)
    tkd = tl.sum(kd * dKd, axis=1)
    dkn += dKd * dke[:, None]
    dGp += tl.where((o[:, None] == last) & strict, tkd[None, :], 0.0)
    # X = (I + L)^-1, recomputed as in the forward
    gs = pair_decay(gn, gr, m, strict, BT)
    kk = dot(kn, tl.trans(kn), LOWP)
    L = beta[:, None] * gs * kk
    X = (o[:, None] == o[None, :]).to(tl.float32)
    for i in range(1, BT):
        li = tl.sum(tl.where(o[:, None] == i, L, 0.0), axis=0)
        xi = tl.sum(li[:, None] * X, axis=0)
        X = tl.where(o[:, None] == i, X - xi[None, :], X)
    kb = kn * (beta * eG)[:, None]
    vb = v * beta[:, None]
    dKb = dot(tl.trans(X), dW, False)
    dVb = dot(tl.trans(X), dU, False)
    dX = dot(dW, tl.trans(kb), False) + dot(dU, tl.trans(vb), False)
    dL = -dot(dot(tl.trans(X), dX, False), tl.trans(X), False)
    dL = tl.where(strict, dL, 0.0)
    dGp += dL * L
    dLG = dL * gs
    dbeta = tl.sum(dLG * kk, axis=1)
    dKK = dLG * beta[:, None]
    dkn += dot(dKK, kn, LOWP) + dot(tl.trans(dKK), kn, LOWP)
    dkn += dKb * (beta * eG)[:, None]
    tb = tl.sum(dKb * kn, axis=1)
    dbeta += tb * eG + tl.sum(dVb * v, axis=1)
    dGe += tb * beta * eG
    dv = dVb * beta[:, None]
    if L2:
        dqn = l2_bwd(q_ptr, row, m, qn, dqn, K, ck)
        dkn = l2_bwd(k_ptr, row, m, kn, dkn, K, ck)
    tl.store(dq_ptr + row[:, None] * K + ck[None, :], dqn, mask=mk)
    tl.store(dk_ptr + row[:, None] * K + ck[None, :], dkn, mask=mk)
    tl.store(dv_ptr + row[:, None] * V + cv[None, :], dv, mask=mvv)
    tl.store(db_ptr + row, dbeta, mask=m)
    if USE_G:
        # dg_t = sum_{i >= t} dGe_i + sum_{i >= t > j} dGp_ij
        dg = tl.cumsum(tl.where(m, dGe, 0.0), axis=0, reverse=True)
        dg += tl.sum(tl.where(o[:, None] > o[None, :], tl.cumsum(dGp, axis=0, reverse=True), 0.0), axis=1)
        a = tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32)
        tl.store(dg_ptr + row, tl.where(a < RESET, 0.0, dg), mask=m)


def local_bwd(inputs, f: Factors, use_qk_l2norm: bool, scale: float, D, E, dO, S_out):
    """``(dq, dk, dv, dbeta, dg)`` float32 in the input layout (dg None without gates).

    inputs: contiguous ``(q, k, v, beta, g)``; D ``[B, H, N, K, K]``, E ``[B, H, N, K, V]``;
    dO ``[B, T, H, V]`` float32 or None (then S_out is unused)."""
    q, k, v, beta, g = inputs
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, V, **f32)
    db, dg = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    local_bwd_kernel[(n_chunks(T, f.BT), B * H)](
        q, k, v, beta, beta if g is None else g, f.qn, f.kn, f.w, f.u, f.gc, f.gr, f.gn, D, E,
        D if dO is None else dO, D if dO is None else S_out, dq, dk, dv, db, dg, float(scale), T,
        H=H, K=K, V=V, BT=f.BT, USE_G=g is not None, L2=use_qk_l2norm, HAS_DO=dO is not None, LOWP=f.lowp,
    )
    return dq, dk, dv, db, None if g is None else dg
