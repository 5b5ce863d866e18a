"""``TritonSegment``: the LASP-2 segment protocol (see :mod:`lasp.ops.segment`) on Triton kernels.

Every step calls the kernels of :mod:`lasp.kernels.simple_gla` explicitly; no autograd graph is
built. Forward: gate summaries and the chunk states/summary (constructor, before the
all-gather), the local output (``compute_local``, overlapping it), the inter part
(``output``, added in place to the local output: one float32 output buffer). Backward: the
incoming state kept for ``dq`` (``prepare_backward``: no output kernel runs again),
``dS_in`` and the chunk state gradients (``state_grad``), ``dq, dk, dv`` from ``dO``
(``backward_output``, overlapping the all-gather), the summary's share (``backward_summary``)
and the gate gradients (``grads``). The driver says when the incoming state is zero
(``output(S, state_is_zero=True)``: the first segment; the inter pass is skipped) and does not
call ``backward_summary`` when the summary's gradient is zero (the last segment): with P = 1
the path is the plain chunked algorithm. Nothing reads a device value on the host.
"""
from __future__ import annotations

import torch

from . import simple_gla as sg
from .utils import DEFAULT_CHUNK, block, check_chunk_size, check_device, check_head_dim


class TritonSegment:
    """One segment's compute on Triton kernels; same constructor as ``TorchSegment``.

    Protocol v2 (``lasp.ops.segment``): ``transition = "scalar"``; gates may hold hard resets
    (``-inf``), then ``logA`` is ``-inf``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (fp32, fp16 or bf16; K, V powers of two 16..256).
        g: ``[B, T, H]`` log gates or None; g_gamma: ``[H]`` log decay or None.
        scale: output scale. chunk_size: 16, 32 or 64 tokens per chunk.
    """

    transition = "scalar"

    def __init__(self, q, k, v, g, g_gamma, scale: float, chunk_size: int = DEFAULT_CHUNK):
        check_device(q)
        check_head_dim(q.shape[-1], "K (q/k head dim)")
        check_head_dim(v.shape[-1], "V (v head dim)")
        check_chunk_size(chunk_size)
        self.q, self.k, self.v = (x.detach().contiguous() for x in (q, k, v))
        self.g_dtype = None if g is None else g.dtype
        self.gg_dtype = None if g_gamma is None else g_gamma.dtype
        self.scale, self.BT = float(scale), chunk_size
        B, T, H, _ = q.shape
        with torch.no_grad():
            self.gates = sg.chunk_gates(
                None if g is None else g.detach().contiguous(),
                None if g_gamma is None else g_gamma.detach().contiguous(),
                B, T, H, self.BT, q.device,
            )
            self.h, self.M = sg.chunk_fwd_h(self.k, self.v, self.gates, self.BT)
        self.logA = self.gates.logA if self.gates is not None else self.M.new_zeros(B, H)
        self._do = self._do_src = self.dh = self.dq = self.dk = self.dv = self.dgp = self.state = None
        self._c = self.M.new_zeros(B, H)  # gradient reaching logA (dlogA)

    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logA [B, H], M [B, H, K, V])`` float32."""
        return self.logA, self.M

    def compute_local(self) -> None:
        self.o_local = sg.chunk_fwd_o(self.q, self.k, self.v, self.gates, self.h, self.scale, self.BT)

    def output(self, state: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        """``o [B, T, H, V]`` float32 given the state ``[B, H, K, V]`` entering the segment
        (``state_is_zero``: the caller knows it is all zeros; the inter pass is skipped)."""
        o, self.o_local = self.o_local, None
        if state_is_zero:
            self.state = None
            return o
        self.state = state.detach().float().contiguous()
        return sg.chunk_fwd_inter(self.q, self.gates, self.state, o, self.scale, self.BT)

    def prepare_backward(self, state: torch.Tensor, *, state_is_zero: bool = False) -> None:
        """Backward: keeps the incoming state ``[B, H, K, V]`` as ``output`` does (None when
        ``state_is_zero``); the output itself is not recomputed (``backward_output`` does not read it)."""
        self.state = None if state_is_zero else state.detach().float().contiguous()

    def _grad_out(self, do: torch.Tensor) -> torch.Tensor:
        return do.detach().to(self.q.dtype).contiguous()

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """``dL/dS_in [B, H, K, V]`` float32 from this segment's ``dO [B, T, H, V]``."""
        self._do_src, self._do = do, self._grad_out(do)
        self.dh, ds = sg.chunk_bwd_dh(self.q, self._do, self.gates, self.scale, self.BT)
        return ds

    def backward_output(self, do: torch.Tensor) -> None:
        """Gradients due to ``dO [B, T, H, V]`` (the state given to ``output`` or
        ``prepare_backward`` held fixed)."""
        if self._do is None or do is not self._do_src:  # state_grad ran on another dO
            self.state_grad(do)
        do = self._do
        dq, dk, dgp = sg.chunk_bwd_dqk(self.q, self.k, self.v, do, self.gates, self.h, self.state, self.dh, self.scale, self.BT)
        dv = sg.chunk_bwd_dv(self.q, self.k, do, self.gates, self.dh, self.scale, self.BT)
        if self.dq is None:
            self.dq, self.dk, self.dv, self.dgp = dq, dk, dv, dgp
        else:
            self.dq, self.dk, self.dv = self.dq + dq, self.dk + dk, self.dv + dv
            self.dgp = None if dgp is None else self.dgp + dgp
        self.dh = None

    def _zero_grads(self) -> None:
        self.dq, self.dk, self.dv = (torch.zeros_like(x) for x in (self.q, self.k, self.v))
        B, T, H, K = self.q.shape
        if self.gates is not None:
            self.dgp = torch.zeros(K // block(K, self.q.dtype), B * H, T, dtype=torch.float32, device=self.q.device)

    def backward_summary(self, dM: torch.Tensor, dlogA: torch.Tensor) -> None:
        """Add the gradients due to the summary's own gradient ``dM [B, H, K, V]``, ``dlogA [B, H]``
        (the driver skips this call when both are known to be zero)."""
        if self.dq is None:
            self._zero_grads()
        dM = dM.detach().float().contiguous()
        sg.summary_bwd(self.k, self.v, self.h, self.gates, dM, self.dk, self.dv, self.dgp, self.BT)
        if self.gates is not None:
            self._c = self._c + dlogA.detach().float()

    def grads(self):
        """``(dq, dk, dv, dg, dg_gamma)`` in the inputs' dtypes (None where there is no input)."""
        if self.dq is None:
            self._zero_grads()
        dg = dgg = None
        if self.gates is not None:
            B, T, H, _ = self.q.shape
            da, dsum = sg.chunk_bwd_dg(self.dgp, self.gates, self._c.contiguous(), B, T, H, self.BT)
            dg = None if self.g_dtype is None else da.to(self.g_dtype)
            dgg = None if self.gg_dtype is None else dsum.sum(0).to(self.gg_dtype)
        self.h = None
        return self.dq, self.dk, self.dv, dg, dgg

