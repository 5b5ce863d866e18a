"""Backward of the chunked gated delta rule: the sequential state-gradient pass.

:func:`state_grad_pass` (``state_bwd_kernel``, one program per column tile and head, chunks in
reverse): with ``dS_N`` a terminal gradient (or zeros) and, optionally, the outputs' ``dO``::

    dU_c  = Kd_c dS_{c+1} + scale (Q K^T o e^Gam)^T dO_c          (the gradient of U0 - W S_c)
    dS_c  = e^{G_C} dS_{c+1} + scale (diag(e^G) Q)^T dO_c - W^T dU_c

It stores every ``dS_{c+1}`` (the gradient reaching the state LEAVING chunk c), optionally every
``dU_c`` (added to what the buffer holds: the passes of one segment sum their terms), and returns
``dS_0``. The outputs' local term ``scale P^T dO`` comes from :func:`dv_local`
(``dv_local_kernel``, parallel over chunks), which keeps the sequential loop short.

Given the forward states ``S_c`` of the trajectory and these gradients, every input gradient is
the gradient of the per-chunk, state-independent surrogate ``sum_c <dS_{c+1}, A_c S_c + M_c> +
<dO_c, O_loc_c + Qeff_c S_c>`` (the adjoint method), taken chunk by chunk in parallel by
:func:`lasp.kernels.gated_delta.local_bwd`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import Factors, col_block, dot, from_start, n_chunks, pair_decay, state_tile, to_end

#: Launch settings (num_warps, num_stages) per kernel (see compile_check).
STATE_BWD = dict(num_warps=4, num_stages=2)
DV_LOCAL = dict(num_warps=4, num_stages=2)


@triton.jit
def dv_local_kernel(qn_ptr, kn_ptr, gr_ptr, gn_ptr, do_ptr, dvl_ptr, scale, T,
                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, LOWP: tl.constexpr, G: tl.constexpr):
    """``dvl_c = scale (Q K^T o e^Gam)^T dO_c`` per chunk and V tile (heads-first float32)."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    b, h = bh // H, bh % H
    o = tl.arange(0, BT)
    t = n * BT + o
    m = t < T
    hrow = bh * T + t
    krow = (bh // G) * T + t  # qn, kn of the q/k head (GVA)
    cv = iv * BV + tl.arange(0, BV)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(0, K, BK):
        ck = i + tl.arange(0, BK)
        qn = tl.load(qn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        kn = tl.load(kn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        qk += dot(qn, tl.trans(kn), LOWP)
    gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
    gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
    P = qk * pair_decay(gn, gr, m, o[:, None] >= o[None, :], BT)
    do = tl.load(do_ptr + ((b * T + t) * H + h)[:, None] * V + cv[None, :], mask=m[:, None], other=0.0)
    tl.store(dvl_ptr + hrow[:, None] * V + cv[None, :], scale * dot(tl.trans(P), do, LOWP), mask=m[:, None])


@triton.jit
def state_bwd_kernel(qn_ptr, kn_ptr, w_ptr, gc_ptr, gr_ptr, gn_ptr, do_ptr, dvl_ptr, dst_ptr, dh_ptr, du_ptr, ds0_ptr,
                     scale, T, NCOL, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                     HAS_DO: tl.constexpr, HAS_T: tl.constexpr, STORE_DU: tl.constexpr, ACC_DU: tl.constexpr,
                     LOWP: tl.constexpr, G: tl.constexpr):
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    N = tl.cdiv(T, BT)
    o = tl.arange(0, BT)
    ck, cv, mv, soff = state_tile(iv, K, BV, NCOL)
    if HAS_T:
        dS = tl.load(dst_ptr + bh * K * NCOL + soff, mask=mv[None, :], other=0.0)
    else:
        dS = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, N):
        n = N - 1 - i
        t = n * BT + o
        m = t < T
        hrow = bh * T + t
        krow = (bh // G) * T + t  # qn, kn of the q/k head (GVA)
        tl.store(dh_ptr + (bh * N + n) * K * NCOL + soff, dS.to(dh_ptr.dtype.element_ty), mask=mv[None, :])
        gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
        gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
        gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
        dk, dc = to_end(gc, gr, gn, m, n, T, BT)
        kd = tl.load(kn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32) * dk[:, None]
        du = dot(kd, dS, LOWP)
        uoff = hrow[:, None] * NCOL + cv[None, :]
        um = m[:, None] & mv[None, :]
        if HAS_DO:
            du += tl.load(dvl_ptr + uoff, mask=um, other=0.0)
        if STORE_DU:
            if ACC_DU:
                tl.store(du_ptr + uoff, du + tl.load(du_ptr + uoff, mask=um, other=0.0), mask=um)
            else:
                tl.store(du_ptr + uoff, du, mask=um)
        dS = dS * dc
        if HAS_DO:
            qd = tl.load(qn_ptr + krow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0).to(tl.float32)
            qd = qd * from_start(gc, gr, m)[:, None]
            do = tl.load(do_ptr + ((b * T + t) * H + h)[:, None] * NCOL + cv[None, :], mask=um, other=0.0)
            dS += scale * dot(tl.trans(qd), do, LOWP)
        w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        dS -= dot(tl.trans(w), du, LOWP)
    tl.store(ds0_ptr + bh * K * NCOL + soff, dS, mask=mv[None, :])


def dv_local(f: Factors, do: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale P^T dO`` per chunk: ``[B, H, T, V]`` float32 (do ``[B, T, H, V]`` contiguous)."""
    B, H, T, K = f.w.shape
    V = do.shape[-1]
    dvl = torch.empty(B, H, T, V, dtype=torch.float32, device=do.device)
    BV = min(V, f.tile)
    dv_local_kernel[(n_chunks(T, f.BT), B * H, triton.cdiv(V, BV))](
        f.qn, f.kn, f.gr, f.gn, do, dvl, float(scale), T, H=H, K=K, V=V, BT=f.BT, BK=min(K, f.tile), BV=BV, LOWP=f.lowp,
        G=f.G, **DV_LOCAL,
    )
    return dvl


def state_grad_pass(f: Factors, ncol: int, dS_T: torch.Tensor | None = None, do: torch.Tensor | None = None,
                    scale: float = 1.0, du: torch.Tensor | None = None, accumulate: bool = False,
                    dh_dtype: torch.dtype | None = None):
    """The reverse chunk pass: ``(dh [B, H, N, K, X], dS_0 [B, H, K, X] float32)``.

    ``dh[:, :, c]`` is the gradient reaching the state leaving chunk c (``dh_dtype``, default the
    store dtype). ``dS_T [B, H, K, X]`` float32: the terminal gradient (None: zeros). ``do [B, T,
    H, V]`` contiguous: the outputs' gradient (None: no outputs on this trajectory; ``X = ncol``).
    ``du [B, H, T, X]`` float32: where ``dU`` goes (None: not stored), added to its content when
    ``accumulate``."""
    B, H, T, K = f.w.shape
    N = n_chunks(T, f.BT)
    dev = f.kn.device
    dh = torch.empty(B, H, N, K, ncol, dtype=dh_dtype or f.snap, device=dev)
    ds0 = torch.empty(B, H, K, ncol, dtype=torch.float32, device=dev)
    dvl = dv_local(f, do, scale) if do is not None else None
    BV = col_block(K, ncol, 64 * f.tile)  # K x 32 at K = 128 (16-bit): no spills on sm_90 at 4 warps
    state_bwd_kernel[(triton.cdiv(ncol, BV), B * H)](
        f.qn, f.kn, f.w, f.gc, f.gr, f.gn, ds0 if do is None else do, ds0 if dvl is None else dvl,
        ds0 if dS_T is None else dS_T, dh, ds0 if du is None else du, ds0, float(scale), T, ncol,
        H=H, K=K, BT=f.BT, BV=BV, HAS_DO=do is not None, HAS_T=dS_T is not None, STORE_DU=du is not None,
        ACC_DU=accumulate, LOWP=f.lowp, G=f.G, **STATE_BWD,
    )
    return dh, ds0
