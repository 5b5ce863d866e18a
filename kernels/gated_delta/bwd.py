"""Backward of the chunked gated delta rule: the sequential state-gradient pass in Triton and the
per-chunk (parallel) local backward in plain torch.

:func:`state_grad_pass` (``state_bwd_kernel``, one program per column tile and head, chunks in
reverse): with ``dS_N`` a terminal gradient (or zeros) and, optionally, the outputs' ``dO``::

    dVn_c = Kd_c dS_{c+1} + scale (Q K^T o e^Gam)^T dO_c
    dS_c  = e^{G_C} dS_{c+1} + scale (diag(e^G) Q)^T dO_c - W^T dVn_c

It stores every ``dS_{c+1}`` (the gradient reaching the state LEAVING chunk c) and returns
``dS_0``. Given those and the forward's incoming states ``S_c``, the gradient of every input is
the gradient of the per-chunk, state-independent surrogate
``sum_c <dS_{c+1}, A_c S_c + M_c> + <dO_c, O_loc_c + Qeff_c S_c>`` (the adjoint method), which
:func:`local_grads` takes with torch autograd through :func:`lasp.ops.delta_chunk.chunk_factors`,
all chunks at once (no loop over chunks). That part (the WY solve's backward, the L2 norm's
backward, the gate cumsum's backward) is plain torch: see the package docstring.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ops.delta_chunk import chunk_factors, chunk_output_maps
from .common import Factors, state_tile, col_block, dot, from_start, n_chunks, qk_decay, to_end


@triton.jit
def state_bwd_kernel(qn_ptr, kn_ptr, w_ptr, gc_ptr, gr_ptr, do_ptr, dst_ptr, dh_ptr, ds0_ptr, scale, T, NCOL,
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
        dk, dc = to_end(gc, gr, m, n, T, BT)
        kn = tl.load(kn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        w = tl.load(w_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
        dvn = dot(kn * dk[:, None], dS, LOWP)
        dS = dS * dc
        if HAS_DO:
            qn = tl.load(qn_ptr + hrow[:, None] * K + ck[None, :], mask=m[:, None], other=0.0)
            do = tl.load(do_ptr + ((b * T + t) * H + h)[:, None] * NCOL + cv[None, :], mask=m[:, None] & mv[None, :], other=0.0)
            A = qk_decay(qn, kn, gc, gr, m, LOWP, BT)
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
        f.qn, f.kn, f.w, f.gc, f.gr, ds0 if do is None else do, ds0 if dS_T is None else dS_T, dh, ds0, float(scale), T, ncol,
        H=H, K=K, BT=f.BT, BV=BV, HAS_DO=do is not None, HAS_T=dS_T is not None, LOWP=f.lowp,
    )
    return dh, ds0


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """``[B, T, H, X]`` -> ``[B, H, N, C, X]`` float32, zero-padded to whole chunks."""
    B, T, H, X = x.shape
    N = -(-T // C)
    x = x.float().transpose(1, 2)
    if N * C != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, N * C - T))
    return x.reshape(B, H, N, C, X)


def local_grads(inputs, chunk_size: int, use_qk_l2norm: bool, scale: float, D, E, dO, S_out):
    """Input gradients from the adjoint terms of every chunk (module docstring), in torch autograd.

    Args:
        inputs: ``(q, k, v, beta, g)`` leaves (g may be None); only those with ``requires_grad``
            get a gradient.
        D ``[B, H, N, K, K]``: ``sum dS_{c+1} S_c^T`` over the trajectories (gradient of ``A_c``);
        E ``[B, H, N, K, V]``: ``sum dS_{c+1}`` over the trajectories that carry ``U0`` (of ``M_c``);
        dO ``[B, T, H, V]`` or None, with ``S_out [B, H, N, K, V]`` the output trajectory's states.
    Returns:
        ``(dq, dk, dv, dbeta, dg)``, None where not wanted.
    """
    wanted = [i for i, x in enumerate(inputs) if x is not None and x.requires_grad]
    out: list[torch.Tensor | None] = [None] * 5
    if not wanted:
        return tuple(out)
    T = inputs[0].shape[1]
    C = min(chunk_size, T)  # chunk_factors' chunking (one short chunk when T < chunk_size)
    with torch.enable_grad():
        ch = chunk_factors(*inputs, C, use_qk_l2norm)
        outs, gouts = [ch.A, ch.M], [D, E]
        if dO is not None:
            Qeff, O_loc = chunk_output_maps(ch, scale)
            dOc = to_chunks(dO, C)
            outs += [Qeff, O_loc]
            gouts += [dOc @ S_out.transpose(-1, -2), dOc]
        got = torch.autograd.grad(outs, [inputs[i] for i in wanted], gouts, allow_unused=True)
    for i, gr in zip(wanted, got):
        out[i] = torch.zeros_like(inputs[i]) if gr is None else gr
    return tuple(out)
