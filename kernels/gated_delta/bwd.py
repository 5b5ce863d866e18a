"""Backward of the chunked gated delta rule: the sequential state-gradient pass.

:func:`state_grad_pass` (``state_bwd_kernel``, one program per column tile and head, chunks in
reverse): with ``dS_N`` a terminal gradient (or zeros) and, optionally, the outputs' ``dO``::

    dVn_c = Kd_c dS_{c+1} + scale (Q K^T o e^Gam)^T dO_c
    dS_c  = e^{G_C} dS_{c+1} + scale (diag(e^G) Q)^T dO_c - W^T dVn_c

It stores every ``dS_{c+1}`` (the gradient reaching the state LEAVING chunk c) and returns
``dS_0``. Given those and the forward's incoming states ``S_c``, the gradient of every input is
the gradient of the per-chunk, state-independent surrogate
``sum_c <dS_{c+1}, A_c S_c + M_c> + <dO_c, O_loc_c + Qeff_c S_c>`` (the adjoint method): with
``D_c = sum dS_{c+1} S_c^T`` over the trajectories (the gradient of ``A_c``) and ``E_c = sum
dS_{c+1}`` over those that carry ``U0`` (of ``M_c``), :func:`lasp.kernels.gated_delta.local_bwd`
takes it chunk by chunk, in parallel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import Factors, state_tile, col_block, dot, from_start, n_chunks, qk_decay, to_end


@triton.jit
def state_bwd_kernel(qn_ptr, kn_ptr, w_ptr, gc_ptr, gr_ptr, gn_ptr, do_ptr, dst_ptr, dh_ptr, ds0_ptr, scale, T, NCOL,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                     HAS_DO: tl.constexpr, HAS_T: tl.constexpr, LOWP: tl.constexpr):
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
        tl.store(dh_ptr + (bh * N + n) * K * NCOL + soff, dS, mask=mv[None, :])
        gc = tl.load(gc_ptr + hrow, mask=m, other=0.0)
        gr = tl.load(gr_ptr + hrow, mask=m, other=0.0)
        gn = tl.load(gn_ptr + hrow, mask=m, other=0.0)
        dk, dc = to_end(gc, gr, gn, m, n, T, BT)
        kn = tl.load(kn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        dvn = dot(kn * dk[:, None], dS, LOWP)
        dS = dS * dc
        if HAS_DO:
            qn = tl.load(qn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
            do = tl.load(do_ptr + ((b * T + t) * H + h)[:, None] * NCOL + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0)
            A = qk_decay(qn, kn, gn, gr, m, LOWP, BT)
            dvn += scale * dot(tl.trans(A), do, LOWP)
            qd = qn * from_start(gc, gr, m)[:, None]
            dS += scale * dot(tl.trans(qd), do, LOWP)
        dS -= dot(tl.trans(w), dvn, LOWP)
    tl.store(ds0_ptr + bh * K * NCOL + soff, dS, mask=mv[None, :])


def state_grad_pass(f: Factors, ncol: int, dS_T: torch.Tensor | None = None, do: torch.Tensor | None = None,
                    scale: float = 1.0):
    """The reverse chunk pass: ``(dh [B, H, N, K, X], dS_0 [B, H, K, X])`` float32.

    ``dh[:, :, c]`` is the gradient reaching the state leaving chunk c. ``dS_T [B, H, K, X]``: the
    terminal gradient (None: zeros). ``do [B, T, H, V]`` float32 contiguous: the outputs'
    gradient (None: no outputs on this trajectory; ``X = ncol``)."""
    B, H, T, K = f.kn.shape
    N = n_chunks(T, f.BT)
    dh = torch.empty(B, H, N, K, ncol, dtype=torch.float32, device=f.kn.device)
    ds0 = torch.empty(B, H, K, ncol, dtype=torch.float32, device=f.kn.device)
    BV = col_block(K, ncol)
    state_bwd_kernel[(triton.cdiv(ncol, BV), B * H)](
        f.qn, f.kn, f.w, f.gc, f.gr, f.gn, ds0 if do is None else do, ds0 if dS_T is None else dS_T, dh, ds0, float(scale), T, ncol,
        H=H, K=K, BT=f.BT, BV=BV, HAS_DO=do is not None, HAS_T=dS_T is not None, LOWP=f.lowp,
    )
    return dh, ds0
