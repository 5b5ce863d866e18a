"""Depthwise causal short convolution over a sequence sharded across ranks (the halo exchange).

``y[t, d] = bias[d] + sum_{w<W} weight[d, w] * x[t - W + 1 + w, d]`` (zeros before the first
token), the convolution of Mamba / Gated DeltaNet layers (``nn.Conv1d(D, D, W, groups=D,
padding=W-1)`` cut to the first T outputs), optionally followed by SiLU.

A segment's first W-1 outputs need the previous segment's last W-1 inputs (its *halo*), held by
another rank (contiguous: segment r-1; zigzag: global chunk c-1 precedes chunk c, i.e. chunk
2P-2-r precedes rank r's second chunk 2P-1-r, chunk r-1 its first).

- Forward: ONE all-gather of every segment's last W-1 inputs (``n_seg * B * (W-1) * D``
  elements per rank, in x's dtype); each segment takes its predecessor's tail as its halo.
- Backward: ONE all-gather of the halos' gradients; each segment adds its successor's halo
  gradient to the gradient of its own last W-1 inputs.

The convolution itself is local (``F.conv1d`` on ``[halo, segment]``), so weight and bias get
this rank's share of their gradient (summed over ranks by the data-parallel reduction, like
every other replicated parameter).

Packed documents (``cu_seqlens``, :mod:`lasp.ops.documents`): an output only reads inputs of its
own document; a tap reaching before the document start (also into the halo) reads zero. The
per-token distance to the document start comes from this rank's global positions (tensor ops, no
host sync); the halo exchange and its bytes are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import comm
from ..parallel import chunk_owners, group_rank_size, layout_chunks
from .checks import check_conv
from .documents import check_cu_seqlens, document_offsets
from .rank_check import check_same_on_ranks


class _Halo(torch.autograd.Function):
    """``segments' tails [n_seg, B, W-1, D]`` -> each segment's halo (its predecessor's tail)."""

    @staticmethod
    def forward(ctx, tails, group, layout):
        rank, size = group_rank_size(group)
        ctx.group, ctx.layout = group, layout
        gathered, _ = comm.all_gather(tails, group, tag="conv.halo.fwd")
        owners = chunk_owners(size, layout)
        halos = torch.zeros_like(tails)
        for j, c in enumerate(layout_chunks(rank, size, layout)):
            if c > 0:
                r, s = owners[c - 1]
                halos[j] = gathered[r, s]
        return halos

    @staticmethod
    def backward(ctx, dhalos):
        rank, size = group_rank_size(ctx.group)
        gathered, _ = comm.all_gather(dhalos, ctx.group, tag="conv.halo.bwd")
        owners = chunk_owners(size, ctx.layout)
        dtails = torch.zeros_like(dhalos)
        for j, c in enumerate(layout_chunks(rank, size, ctx.layout)):
            if c + 1 < len(owners):
                r, s = owners[c + 1]
                dtails[j] = gathered[r, s]
        return dtails, None, None


def _conv(xh: torch.Tensor, weight: torch.Tensor, bias, activation, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Valid depthwise conv of ``[B, W-1+T, D]`` -> ``[B, T, D]`` (+ activation).

    ``offsets [T]`` (documents): each output token's distance to its document's first token; the
    taps reaching further back read zero.
    """
    D, W = weight.shape
    if offsets is not None and W > 1:
        back = torch.arange(W - 1, -1, -1, device=xh.device)  # tap w reads token t - back[w]
        keep = (back[None, :] <= offsets[:, None]).to(xh.dtype)  # [T, W]
        y = (xh.unfold(1, W, 1) * (keep[None, :, None, :] * weight.to(xh.dtype)[None, None])).sum(-1)
        if bias is not None:
            y = y + bias.to(xh.dtype)
        return F.silu(y) if activation == "silu" else y
    y = F.conv1d(xh.transpose(1, 2), weight.to(xh.dtype)[:, None, :], None if bias is None else bias.to(xh.dtype), groups=D)
    y = y.transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(x, weight, bias=None, *, activation: str | None = None, group=None, layout: str = "contiguous",
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal convolution of this rank's shard of a sequence.

    Args:
        x: ``[B, T_local, D]``, this rank's tokens in ``layout`` order.
        weight: ``[D, W]``; bias: ``[D]`` or None; activation: None or ``"silu"``.
        group: SP process group or None (whole sequence here).
        cu_seqlens: packed documents (B = 1): ``[N+1]`` integer global document starts, the same on
            every rank; each document is convolved as if alone (zeros before its first token).
    Returns:
        ``[B, T_local, D]`` in x's dtype, equal to the convolution of the whole sequence.
    """
    check_conv(x, weight, bias, activation=activation, group=group, layout=layout)
    check_same_on_ranks("causal_conv1d", dict(B=x.shape[0], T_local=x.shape[1], D=x.shape[2], W=weight.shape[1], dtype=x.dtype,
                                              layout=layout, cu_seqlens=cu_seqlens is not None), group, x.device,
                       ignore=("T_local",) if layout == "contiguous" and cu_seqlens is None else ())  # halo: W-1 tokens
    _, size = group_rank_size(group)
    W = weight.shape[1]
    offs = None
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, x.shape[1] * size, x.shape[0], group, device=x.device)
        offs = document_offsets(cu, x.shape[1], group, layout)
    if size == 1 or W == 1:
        return _conv(F.pad(x, (0, 0, W - 1, 0)), weight, bias, activation, offs)
    segs = x.chunk(2, dim=1) if layout == "zigzag" else (x,)
    seg_offs = (None,) * len(segs) if offs is None else offs.chunk(len(segs))
    tails = torch.stack([s[:, s.shape[1] - (W - 1) :] for s in segs])
    halos = _Halo.apply(tails, group, layout)
    ys = [_conv(torch.cat([h, s], dim=1), weight, bias, activation, o) for h, s, o in zip(halos.unbind(0), segs, seg_offs)]
    return torch.cat(ys, dim=1)


def causal_conv1d_with_state(x, weight, bias=None, *, activation: str | None = None, state: torch.Tensor | None = None):
    """Single-process convolution that continues from ``state`` (decoding).

    ``state [B, W-1, D]`` holds the last W-1 inputs before ``x`` (zeros if None). Returns
    ``(y [B, T, D], new_state [B, W-1, D])``; one token at a time equals one call on the whole.
    """
    check_conv(x, weight, bias, activation=activation, group=None, layout="contiguous")
    W = weight.shape[1]
    if state is None:
        state = x.new_zeros(x.shape[0], W - 1, x.shape[2])
    xh = torch.cat([state.to(x.dtype), x], dim=1)
    return _conv(xh, weight, bias, activation), xh[:, xh.shape[1] - (W - 1) :]
