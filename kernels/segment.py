"""``TritonSegment``: the LASP-2 segment protocol (see :mod:`lasp.ops.segment`) on Triton kernels.

Every step calls the kernels of :mod:`kernels.simple_gla` explicitly; no autograd graph is
built. Forward: gate summaries and the chunk states/summary (constructor, before the
all-gather), the local output (``compute_local``, overlapping it), the inter part
(``output``). Backward: ``dS_in`` and the chunk state gradients (``state_grad``), ``dq, dk, dv``
from ``dO`` (``backward_output``, overlapping the all-gather), the summary's share
(``backward_summary``) and the gate gradients (``grads``). A zero incoming state (the first
segment) skips the inter pass, a zero summary gradient (the last segment) the summary's
backward: with P = 1 the path is the plain chunked algorithm.
"""
from __future__ import annotations

import torch

from . import simple_gla as sg
from .utils import DEFAULT_CHUNK, block, check_chunk_size, check_device, check_head_dim


class TritonSegment:
    """One segment's compute on Triton kernels; same constructor as ``TorchSegment``.

    (``transition`` / ``state_is_zero``: protocol v2, see :mod:`lasp.ops.segment`.)

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
        self._do = self._do_src = self.dh = self.dq = self.dk = self.dv = self.dgp = None
        self._c = self.M.new_zeros(B, H)  # gradient reaching logA (dlogA)

    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logA [B, H], M [B, H, K, V])`` float32."""
        return self.logA, self.M

    def compute_local(self) -> None:
        self.o_local = sg.chunk_fwd_o(self.q, self.k, self.v, self.gates, self.h, self.scale, self.BT)

    def output(self, state: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        """``o [B, T, H, V]`` float32 given the state ``[B, H, K, V]`` entering the segment."""
        self.state = state.detach().float().contiguous()
        o, self.o_local = self.o_local, None
        if not state_is_zero and not _all_zero(self.state):  # the first segment of the sequence gets no state
            o = sg.chunk_fwd_inter(self.q, self.gates, self.state, o, self.scale, self.BT)
        return o

    def _grad_out(self, do: torch.Tensor) -> torch.Tensor:
        return do.detach().to(self.q.dtype).contiguous()

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """``dL/dS_in [B, H, K, V]`` float32 from this segment's ``dO [B, T, H, V]``."""
        self._do_src, self._do = do, self._grad_out(do)
        self.dh, ds = sg.chunk_bwd_dh(self.q, self._do, self.gates, self.scale, self.BT)
        return ds

    def backward_output(self, do: torch.Tensor) -> None:
        """Gradients due to ``dO [B, T, H, V]`` (the state given to ``output`` held fixed)."""
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
            self.dgp = torch.zeros(K // block(K), B * H, T, dtype=torch.float32, device=self.q.device)

    def backward_summary(self, dM: torch.Tensor, dlogA: torch.Tensor) -> None:
        """Add the gradients due to the summary's own gradient ``dM [B, H, K, V]``, ``dlogA [B, H]``."""
        if self.dq is None:
            self._zero_grads()
        dM = dM.detach().float().contiguous()
        if not _all_zero(dM):  # the last segment of the sequence: nothing reads its summary
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
            da, dsum = sg.chunk_bwd_dg(self.dgp, self._c.contiguous(), B, T, H, self.BT)
            dg = None if self.g_dtype is None else da.to(self.g_dtype)
            dgg = None if self.gg_dtype is None else dsum.sum(0).to(self.gg_dtype)
        self.h = None
        return self.dq, self.dk, self.dv, dg, dgg


def _all_zero(x: torch.Tensor) -> bool:
    """Whether ``x`` is all zeros: lets the first/last segment (all of it when P = 1) skip a
    kernel pass over its tokens, at the price of one small device-to-host read."""
    return not bool(torch.count_nonzero(x))
