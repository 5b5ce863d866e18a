"""The per-chunk local backward of the gated delta rule: four Triton kernels, all parallel over
chunks, tiled over K and V (no whole ``[BT, K]`` / ``[BT, V]`` tile set held at once).

Per chunk c, from the trajectory's incoming state ``S_c``, the gradient ``dS_{c+1}`` of the state
leaving it (summed over the segment's reverse passes), ``Vn_c = U0 - W S_c``, ``dU_c`` (from
:mod:`~.bwd`) and ``dO_c``, the maps (see :mod:`lasp.kernels.gated_delta.bwd`)::

    S_{c+1} = e^{G_C} S_c + Kd^T Vn        o = scale [P Vn + diag(e^G) Q S_c]
    W = X diag(b e^G) K      U0 = X diag(b) V      X = (I + L)^-1      L = diag(b) (K K^T o e^Gam) (strict)
    P = (Q K^T) o e^Gam (incl.)    Kd = diag(e^{G_C - G}) K

give, with ``dP = scale dO Vn^T``::

    dW  = -dU S^T (- Kd D)        dKd = Vn dS^T (- W D^T)        dQ = scale e^G dO S^T + (dP o e^Gam) K
    dK  = (dP o e^Gam)^T Q + e^{G_C-G} dKd + [the WY part]
    dL  = -X^T (dW (diag(b e^G) K)^T + dU (diag(b) V)^T) X^T     (strictly lower)

``D`` (``[K, K]`` per chunk, optional) is an extra gradient of the chunk's transition that is not
of the form ``dS_{c+1} S_c^T`` (a general ``dA``: see ``TritonDeltaSegment``).

1. ``dk_bwd_kernel`` (chunk, head, K tile): loops over V tiles for ``dKd`` and ``dW``; stores
   ``dk`` (before the outputs', WY and L2 parts) and ``dW`` (float32 scratch) and its share of
   the gate gradient; ``dq_bwd_kernel`` (same grid, with outputs): ``dQe = dO S^T`` and ``dP``;
   stores ``dq``, adds to ``dk`` and the gate gradient (one kernel holding all four accumulators
   spilled on sm_80);
2. ``wy_bwd_a_kernel`` (chunk, head): ``dX``, ``dL`` through the stored inverse ``X``; ``dv``,
   ``dbeta``'s share; stores ``dL`` (``[BT, BT]`` per chunk);
3. ``wy_bwd_b_kernel`` (chunk, head): the gradient of ``K K^T``, the WY part of ``dk``, the L2
   norm's backward, ``dq``, ``dk``, ``dbeta``, the gate gradient (two kernels: one holding every
   ``[BT, BT]`` tile at once spilled).

The gate gradient is collected in two parts so that no O(1) term cancels: ``dGe_i`` w.r.t. factors
``e^{G_i}`` (it reaches every ``g_t``, ``t <= i``) and ``dGp_ij`` (``i > j``) w.r.t. factors
``e^{G_i - G_j}`` (it reaches ``g_t`` for ``j < t <= i`` only): ``dg_t = sum_{i >= t} dGe_i +
sum_{i >= t > j} dGp_ij`` (0 at hard resets).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import RESET, Factors, dot, from_start, n_chunks, pair_decay, to_end

#: Launch settings (num_warps, num_stages) per kernel (see compile_check).
DK_BWD = dict(num_warps=8, num_stages=1)
DQ_BWD = dict(num_warps=8, num_stages=1)


def dk_tiles(K: int, V: int, cap: int) -> tuple[int, int]:
    """(BK, BV) of ``dk_bwd_kernel`` (``cap``: ``Factors.tile``; 64-wide V tiles spill on sm_80)."""
    return min(K, cap), min(V, cap // 2)


def dq_tiles(K: int, V: int, cap: int) -> tuple[int, int]:
    """(BK, BV) of ``dq_bwd_kernel`` (it recomputes ``dP`` per K tile, K / BK times; 64-wide K tiles
    spill on sm_80)."""
    return min(K, cap // 2), min(V, cap // 2)
WY_BWD = dict(num_warps=8, num_stages=1)


@triton.jit
def crossing_sums(dGp, BT: tl.constexpr):
    """``[BT]``: ``sum_{i >= t > j} dGp_ij`` for a strictly lower ``dGp`` (module docstring): the
    crossing set grows by column t and loses row t from t to t + 1, so it is the exclusive prefix
    sum of ``colsum - rowsum``. The pairs inside ``[0, t)`` cancel there; with no diagonal terms
    (and decays exact to their span) they are of the size of the result, not O(1)."""
    o = tl.arange(0, BT)
    x = tl.sum(dGp, axis=0) - tl.sum(dGp, axis=1)
    return tl.sum(tl.where(o[None, :] < o[:, None], x[None, :], 0.0), axis=1)


@triton.jit
def suffix_sums(dGe, m):
    """``[BT]``: ``sum_{i >= t} dGe_i`` over real tokens."""
    return tl.cumsum(tl.where(m, dGe, 0.0), axis=0, reverse=True)


@triton.jit
def dk_bwd_kernel(kn_ptr, w_ptr, gc_ptr, gr_ptr, gn_ptr, h_ptr, dh_ptr, vn_ptr, du_ptr, d_ptr, dkn_ptr, dw_ptr, dgp_ptr, T,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_D: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    """Per chunk and K tile, the terms through the state: ``dKd = Vn dS^T``, ``dW = -dU S^T`` (and
    an extra ``D``), ``dk``'s ``e^{G_C - G} dKd`` and their gate gradient."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    ik = tl.program_id(2)
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    hrow = bh * T + t
    cidx = bh * N + n
    ck = ik * BK + tl.arange(0, BK)
    koff = hrow[:, None] * K + ck[None, :]
    krow = (bh // G) * T + t  # kn of the q/k head (GVA)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    dke, eC = to_end(gc, gr, gn, m, n, T, BT)
    dKd = tl.zeros([BT, BK], dtype=tl.float32)
    dW = tl.zeros([BT, BK], dtype=tl.float32)
    tr = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    for i in range(0, V, BV):
        cv = i + tl.arange(0, BV)
        soff = cidx * K * V + ck[:, None] * V + cv[None, :]
        S = tl.load(h_ptr + soff)
        dS = tl.load(dh_ptr + soff)
        voff = hrow[:, None] * V + cv[None, :]
        dKd += dot(tl.load(vn_ptr + voff, mask=m[:, None], other=0.0), tl.trans(dS), LOWP)
        dW -= dot(tl.load(du_ptr + voff, mask=m[:, None], other=0.0), tl.trans(S), LOWP)
        tr += tl.sum(tl.sum(S.to(tl.float32) * dS.to(tl.float32), axis=1), axis=0)
    if HAS_D:  # an extra transition gradient D: dW -= Kd D, dKd -= W D^T, trace(D)
        for j in range(0, K, BK):
            cj = j + tl.arange(0, BK)
            kdj = tl.load(kn_ptr + krow[:, None] * K + cj[None, :], mask=m[:, None], other=0.0).to(tl.float32) * dke[:, None]
            wj = tl.load(w_ptr + hrow[:, None] * K + cj[None, :], mask=m[:, None], other=0.0)
            dW -= dot(kdj, tl.load(d_ptr + cidx * K * K + cj[:, None] * K + ck[None, :]), False)
            dKd -= dot(wj, tl.trans(tl.load(d_ptr + cidx * K * K + ck[:, None] * K + cj[None, :])), False)
        Dkk = tl.load(d_ptr + cidx * K * K + ck[:, None] * K + ck[None, :])
        tr += tl.sum(tl.sum(tl.where(ck[:, None] == ck[None, :], Dkk, 0.0), axis=1), axis=0)
    last = tl.minimum(BT, T - n * BT) - 1
    kn = tl.load(kn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    tkd = tl.sum(kn * dke[:, None] * dKd, axis=1)
    # e^{G_C} (the trace term) reaches every g_t; the pairs (last, j) of Kd reach g_t for j < t <= last
    dg = tl.sum(tl.where(o[:, None] > o[None, :], tkd[None, :], 0.0), axis=1) + suffix_sums(tl.where(o == last, tr * eC, 0.0), m)
    tl.store(dkn_ptr + koff, dKd * dke[:, None], mask=m[:, None])
    tl.store(dw_ptr + koff, dW, mask=m[:, None])
    tl.store(dgp_ptr + (ik * tl.num_programs(1) + bh) * T + t, dg, mask=m)


@triton.jit
def dq_bwd_kernel(qn_ptr, kn_ptr, gc_ptr, gr_ptr, gn_ptr, h_ptr, vn_ptr, do_ptr, dqn_ptr, dkn_ptr, dgp_ptr, scale, T,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    """Per chunk and K tile, the outputs' terms: ``dQe = dO S^T``, ``dP = scale dO Vn^T``; ``dq``,
    ``dk``'s ``(dP o e^Gam)^T Q`` (added to :func:`dk_bwd_kernel`'s) and their gate gradient."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    ik = tl.program_id(2)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    hrow = bh * T + t
    cidx = bh * N + n
    ck = ik * BK + tl.arange(0, BK)
    koff = hrow[:, None] * K + ck[None, :]
    dQe = tl.zeros([BT, BK], dtype=tl.float32)
    dP = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(0, V, BV):
        cv = i + tl.arange(0, BV)
        do = tl.load(do_ptr + ((b * T + t) * H + h)[:, None] * V + cv[None, :], mask=m[:, None], other=0.0)
        dQe += dot(do, tl.trans(tl.load(h_ptr + cidx * K * V + ck[:, None] * V + cv[None, :])), LOWP)
        dP += dot(do, tl.trans(tl.load(vn_ptr + hrow[:, None] * V + cv[None, :], mask=m[:, None], other=0.0)), LOWP)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    eG = from_start(gc, gr, m)
    kkoff = ((bh // G) * T + t)[:, None] * K + ck[None, :]  # qn, kn of the q/k head (GVA)
    qn = tl.load(qn_ptr + kkoff, mask=m[:, None], other=0.0).to(tl.float32)
    kn = tl.load(kn_ptr + kkoff, mask=m[:, None], other=0.0).to(tl.float32)
    dPG = scale * dP * pair_decay(gn, gr, m, o[:, None] >= o[None, :], BT)
    tl.store(dqn_ptr + koff, scale * eG[:, None] * dQe + dot(dPG, kn, LOWP), mask=m[:, None])
    tl.store(dkn_ptr + koff, tl.load(dkn_ptr + koff, mask=m[:, None], other=0.0) + dot(tl.trans(dPG), qn, LOWP),
             mask=m[:, None])
    # e^{G_i} of the outputs reaches g_t, t <= i; the pairs of P (this K tile's share of Q K^T)
    dg = suffix_sums(scale * eG * tl.sum(qn * dQe, axis=1), m)
    dg += crossing_sums(tl.where(o[:, None] > o[None, :], dPG * dot(qn, tl.trans(kn), LOWP), 0.0), BT)
    tl.store(dgp_ptr + (ik * tl.num_programs(1) + bh) * T + t, dg, mask=m)


@triton.jit
def wy_bwd_a_kernel(v_ptr, beta_ptr, kn_ptr, x_ptr, gr_ptr, gc_ptr, dw_ptr, du_ptr, dl_ptr, dv_ptr, db_ptr, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    """Through ``X``: ``dv``, ``dbeta``'s share and ``dL = -X^T dX X^T`` (stored, ``[BT, BT]``)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (b * T + t) * H + h
    hrow = bh * T + t
    beta = tl.load(beta_ptr + row, mask=m, other=0.0).to(tl.float32)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    bg = beta * from_start(gc, gr, m)
    strict = o[:, None] > o[None, :]
    xoff = (bh * tl.cdiv(T, BT) + n) * BT * BT + o[:, None] * BT + o[None, :]
    Xt = tl.trans(tl.load(x_ptr + xoff, mask=m[:, None], other=0.0))
    # dX = dW (diag(b e^G) K)^T + dU (diag(b) V)^T; dv = b X^T dU
    dX = tl.zeros([BT, BT], dtype=tl.float32)
    krow = (bh // G) * T + t  # kn of the q/k head (GVA)
    for i in range(0, K, BK):
        koff = hrow[:, None] * K + (i + tl.arange(0, BK))[None, :]
        kb = tl.load(kn_ptr + krow[:, None] * K + (i + tl.arange(0, BK))[None, :], mask=m[:, None], other=0.0) * bg[:, None]
        dX += dot(tl.load(dw_ptr + koff, mask=m[:, None], other=0.0), tl.trans(kb), LOWP)
    dbeta = tl.zeros([BT], dtype=tl.float32)
    for i in range(0, V, BV):
        cv = i + tl.arange(0, BV)
        v = tl.load(v_ptr + row[:, None] * V + cv[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        du = tl.load(du_ptr + hrow[:, None] * V + cv[None, :], mask=m[:, None], other=0.0)
        dX += dot(du, tl.trans(v * beta[:, None]), LOWP)
        dVb = dot(Xt, du, LOWP)
        tl.store(dv_ptr + row[:, None] * V + cv[None, :], (dVb * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=m[:, None])
        dbeta += tl.sum(dVb * v, axis=1)
    tl.store(db_ptr + row, dbeta, mask=m)
    tl.store(dl_ptr + xoff, tl.where(strict, -dot(dot(Xt, dX, False), Xt, False), 0.0))  # dL = -X^T dX X^T (strictly lower)


@triton.jit
def wy_bwd_b_kernel(beta_ptr, g_ptr, qn_ptr, kn_ptr, x_ptr, gc_ptr, gr_ptr, gn_ptr, rq_ptr, rk_ptr, dqn_ptr, dkn_ptr,
                    dw_ptr, dl_ptr, dgp_ptr, dq_ptr, dk_ptr, db_ptr, dg_ptr, T,
                    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
                    USE_G: tl.constexpr, L2: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    """From ``dL``: the gradient of ``K K^T``, ``dk``'s WY part (``(dKK + dKK^T) K + e^G b X^T
    dW``), the L2 norm's backward, ``dq``, ``dk``, ``dbeta``, ``dg``."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    row = (b * T + t) * H + h
    hrow = bh * T + t
    krow = (bh // G) * T + t  # qn, kn, rq, rk of the q/k head (GVA)
    beta = tl.load(beta_ptr + row, mask=m, other=0.0).to(tl.float32)
    gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    eG = from_start(gc, gr, m)
    bg = beta * eG
    xoff = (bh * tl.cdiv(T, BT) + n) * BT * BT + o[:, None] * BT + o[None, :]
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(0, K, BK):
        kn = tl.load(kn_ptr + krow[:, None] * K + (i + tl.arange(0, BK))[None, :], mask=m[:, None], other=0.0)
        kk += dot(kn, tl.trans(kn), LOWP)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    dLG = tl.load(dl_ptr + xoff) * pair_decay(gn, gr, m, o[:, None] > o[None, :], BT)  # L = diag(b) (K K^T o e^Gam)
    dLGk = dLG * kk
    dbeta = tl.sum(dLGk, axis=1)
    dg_pairs = crossing_sums(dLGk * beta[:, None], BT)  # dL o L
    dKK = dLG * beta[:, None]
    dKs = dKK + tl.trans(dKK)
    Xt = tl.trans(tl.load(x_ptr + xoff, mask=m[:, None], other=0.0))
    tb = tl.zeros([BT], dtype=tl.float32)
    sk = tl.zeros([BT], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    for i in range(0, K, BK):
        koff = hrow[:, None] * K + (i + tl.arange(0, BK))[None, :]
        kkoff = krow[:, None] * K + (i + tl.arange(0, BK))[None, :]
        kn = tl.load(kn_ptr + kkoff, mask=m[:, None], other=0.0).to(tl.float32)
        dKb = dot(Xt, tl.load(dw_ptr + koff, mask=m[:, None], other=0.0), LOWP)
        dkn = tl.load(dkn_ptr + koff, mask=m[:, None], other=0.0) + dot(dKs, kn, LOWP) + dKb * bg[:, None]
        tb += tl.sum(dKb * kn, axis=1)
        tl.store(dkn_ptr + koff, dkn, mask=m[:, None])
        if L2:
            sk += tl.sum(kn * dkn, axis=1)
            sq += tl.sum(tl.load(qn_ptr + kkoff, mask=m[:, None], other=0.0).to(tl.float32)
                         * tl.load(dqn_ptr + koff, mask=m[:, None], other=0.0), axis=1)
    tl.store(db_ptr + row, tl.load(db_ptr + row, mask=m, other=0.0) + dbeta + tb * eG, mask=m)
    if L2:
        rk = tl.load(rk_ptr + krow, mask=m, other=0.0)
        rq = tl.load(rq_ptr + krow, mask=m, other=0.0)
    tl.debug_barrier()  # this program's dkn stores are read back below
    for i in range(0, K, BK):
        ck = i + tl.arange(0, BK)
        koff = hrow[:, None] * K + ck[None, :]
        kkoff = krow[:, None] * K + ck[None, :]
        ooff = row[:, None] * K + ck[None, :]  # [B, T, H(value heads), K]: summed over each group after (GVA)
        dkn = tl.load(dkn_ptr + koff, mask=m[:, None], other=0.0)
        dqn = tl.load(dqn_ptr + koff, mask=m[:, None], other=0.0)
        if L2:  # the L2 norm's backward r (dxn - xn (xn . dxn))
            dkn = rk[:, None] * (dkn - tl.load(kn_ptr + kkoff, mask=m[:, None], other=0.0).to(tl.float32) * sk[:, None])
            dqn = rq[:, None] * (dqn - tl.load(qn_ptr + kkoff, mask=m[:, None], other=0.0).to(tl.float32) * sq[:, None])
        tl.store(dk_ptr + ooff, dkn.to(dk_ptr.dtype.element_ty), mask=m[:, None])
        tl.store(dq_ptr + ooff, dqn.to(dq_ptr.dtype.element_ty), mask=m[:, None])
    if USE_G:
        dg = dg_pairs + suffix_sums(tb * bg, m)
        for ik in range(0, NK):
            dg += tl.load(dgp_ptr + (ik * tl.num_programs(1) + bh) * T + t, mask=m, other=0.0)
        a = tl.load(g_ptr + row, mask=m, other=0.0).to(tl.float32)
        tl.store(dg_ptr + row, tl.where(a < RESET, 0.0, dg), mask=m)


def local_bwd(inputs, f: Factors, scale: float, h, dh, vn, du, dO=None, D=None):
    """``(dq, dk, dv, dg, dbeta)`` in the input layout: dq, dk, dv in the inputs' dtypes, dg,
    dbeta float32 (dg None without gates).

    inputs: contiguous ``(q, k, v, g, beta)`` (q, k are not read: the factors hold what is
    needed); h, dh ``[B, H, N, K, V]`` (snapshot dtype): the trajectory's incoming states and the
    gradients of the states leaving the chunks; vn ``[B, H, T, V]``, du ``[B, H, T, V]`` float32;
    dO ``[B, T, H, V]`` or None (no outputs); D ``[B, H, N, K, K]`` float32 or None."""
    _, _, v, g, beta = inputs
    B, T, H, V = v.shape  # H: the value heads (f.G per q/k head)
    K = f.kn.shape[-1]
    BT, N = f.BT, n_chunks(T, f.BT)
    (bkd, bvd), (bkq, bvq) = dk_tiles(K, V, f.tile), dq_tiles(K, V, f.tile)
    nk_d, nk_q = K // bkd, K // bkq
    dev = v.device
    f32 = dict(dtype=torch.float32, device=dev)
    dkn, dw = torch.empty(B, H, T, K, **f32), torch.empty(B, H, T, K, **f32)
    dqn = torch.empty(B, H, T, K, **f32) if dO is not None else torch.zeros(B, H, T, K, **f32)
    dgp = torch.empty(nk_d + (nk_q if dO is not None else 0), B * H, T, **f32)  # the gate gradient's shares
    dk_bwd_kernel[(N, B * H, nk_d)](
        f.kn, f.w, f.gc, f.gr, f.gn, h, dh, vn, du, du if D is None else D, dkn, dw, dgp, T,
        K=K, V=V, BT=BT, BK=bkd, BV=bvd, HAS_D=D is not None, LOWP=f.lowp, G=f.G, **DK_BWD,
    )
    if dO is not None:
        dq_bwd_kernel[(N, B * H, nk_q)](
            f.qn, f.kn, f.gc, f.gr, f.gn, h, vn, dO, dqn, dkn, dgp[nk_d:], float(scale), T,
            H=H, K=K, V=V, BT=BT, BK=bkq, BV=bvq, LOWP=f.lowp, G=f.G, **DQ_BWD,
        )
    BK, BV = min(K, f.tile), min(V, f.tile)
    q, k = inputs[0], inputs[1]
    if f.G == 1:
        dq, dk = torch.empty_like(q), torch.empty_like(k)  # stored in the inputs' dtypes
    else:  # GVA: one row per value head, summed over each q/k head's group below
        dq, dk = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)
    dv = torch.empty_like(v)
    db, dg = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    dl = torch.empty_like(f.x)
    wy_bwd_a_kernel[(N, B * H)](
        v, beta, f.kn, f.x, f.gr, f.gc, dw, du, dl, dv, db, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        LOWP=f.lowp, G=f.G, **WY_BWD,
    )
    wy_bwd_b_kernel[(N, B * H)](
        beta, beta if g is None else g, f.qn, f.kn, f.x, f.gc, f.gr, f.gn, f.gc if f.rq is None else f.rq,
        f.gc if f.rk is None else f.rk, dqn, dkn, dw, dl, dgp, dq, dk, db, dg, T,
        H=H, K=K, BT=BT, BK=BK, NK=dgp.shape[0], USE_G=g is not None, L2=f.rq is not None, LOWP=f.lowp, G=f.G,
        **WY_BWD,
    )
    if f.G > 1:
        dq, dk = (x.view(B, T, H // f.G, f.G, K).sum(3).to(y.dtype) for x, y in ((dq, q), (dk, k)))
    return dq, dk, dv, None if g is None else dg, db
