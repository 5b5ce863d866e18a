"""``TritonDeltaSegment``: the delta-rule segment of protocol v2 (``transition = "matrix"``) on the
kernels of :mod:`lasp.kernels.gated_delta`; same constructor and protocol as
:class:`lasp.ops.delta_segment.DeltaTorchSegment`.

Three trajectories of the chunk-state pass, all linear in their start: the transition's (from
``I``, no ``U0``: its end is ``A [B, H, K, K]``), the summary's (from zeros: its end is ``M``) and
the outputs' (from ``S_in``; the summary's when ``state_is_zero``). Backward runs the reverse pass
once per trajectory that has a gradient (``dO`` for the outputs', ``dM``, ``dA``) and takes all
input gradients in one local step per chunk (:func:`lasp.kernels.gated_delta.local_bwd`). Nothing reads
a device value on the host.

==========================  ====================================================================
constructor                 WY factors, the transition's pass (no snapshots) and the summary's
``summary()``               ``(A [B, H, K, K], M [B, H, K, V])`` float32
``compute_local()``         nothing (the factors are built in the constructor)
``output(S_in)``            the outputs' pass from ``S_in`` and ``o [B, T, H, V]`` float32
``prepare_backward(S_in)``  backward: the outputs' pass only (its states; no output kernel)
``state_grad(dO)``          ``dL/dS_in`` (the reverse pass with ``dO``)
``backward_output(dO)``     records the outputs' adjoint terms
``backward_summary(dM, dA)``  the reverse passes from ``dM`` and ``dA``; records their terms
``grads()``                 ``(dq, dk, dv, dbeta, dg)`` in the inputs' dtypes
==========================  ====================================================================
"""
from __future__ import annotations

import torch

from . import gated_delta as gd
from .utils import DEFAULT_CHUNK, check_chunk_size, check_device, check_head_dim


#: Chunk size for fp32 inputs: at 64 the local backward kernel needs 296 KiB of shared memory on
#: sm_90 for K = V = 128 (limit 227 KiB; 144 KiB for 16-bit inputs).
FP32_CHUNK = 32


def unsupported_head_dims(K: int, V: int, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the delta kernels cannot take head dims ``K, V``, or None. Besides powers of two 16..256:
    the per-chunk local backward keeps whole ``[64, K]`` and ``[64, V]`` tiles; for K = V = 256 that
    is 288 KiB of shared memory on sm_90 (limit 227 KiB; K=256, V=128 takes 224 KiB), and fp32
    inputs with K = 256, V = 64 need 460 KiB even at 32-token chunks."""
    if dtype == torch.float32 and max(K, V) == 256:
        return "fp32 inputs with a head dim of 256: the gated delta local backward kernel needs 460 KiB shared memory on sm_90 (limit 227 KiB)"
    if K == 256 and V == 256:
        return "K = V = 256: the gated delta local backward kernel needs 288 KiB shared memory on sm_90 (limit 227 KiB)"
    return None


class TritonDeltaSegment:
    """Gated delta rule segment on Triton kernels. q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta
    ``[B, T, H]``, g ``[B, T, H]`` (finite log gates) or None; K, V powers of two 16..256."""

    transition = "matrix"

    def __init__(self, q, k, v, beta, g, scale: float, use_qk_l2norm: bool = False, chunk_size: int | None = None):
        check_device(q)
        check_head_dim(q.shape[-1], "K (q/k head dim)")
        check_head_dim(v.shape[-1], "V (v head dim)")
        if chunk_size is None:  # fp32 operands stage twice the shared memory of 16-bit ones in the local backward
            chunk_size = FP32_CHUNK if q.dtype == torch.float32 else DEFAULT_CHUNK
        check_chunk_size(chunk_size)
        why = unsupported_head_dims(q.shape[-1], v.shape[-1], q.dtype)
        if why:
            raise ValueError(f"{why}; use backend='torch'")
        self.inputs = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (q, k, v, beta, g)]
        self.scale, self.l2, self.BT = float(scale), use_qk_l2norm, chunk_size
        with torch.no_grad():
            c = [None if x is None else x.detach().contiguous() for x in self.inputs]
            self.f = gd.wy_factors(*c, chunk_size, use_qk_l2norm)
            _, self.A = gd.state_pass(self.f, identity=True, store=False)  # its states: only for dA
            self.Ms, self.M = gd.state_pass(self.f)
        self.S_out = None
        self._do = self._do_src = self._dh = None
        self.D = self.E = self.dO = None

    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.M

    def compute_local(self) -> None:
        return None

    def output(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        """``o [B, T, H, V]`` float32 for the state ``S_in [B, H, K, V]`` entering the segment."""
        self.prepare_backward(S_in, state_is_zero=state_is_zero)
        return gd.chunk_output(self.f, self.S_out, self.scale)

    def prepare_backward(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> None:
        """The outputs' pass from ``S_in`` (its chunk states, which ``backward_output`` and
        ``grads`` read), without the outputs themselves."""
        if state_is_zero:
            self.S_out = self.Ms
        else:
            self.S_out, _ = gd.state_pass(self.f, S_in.detach().float().contiguous())

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """``dL/dS_in [B, H, K, V]`` float32 from ``dO [B, T, H, V]``."""
        self._do_src, self._do = do, do.detach().float().contiguous()
        self._dh, ds0 = gd.state_grad_pass(self.f, self.M.shape[-1], do=self._do, scale=self.scale)
        return ds0

    def _add(self, D, E) -> None:
        self.D = D if self.D is None else self.D + D
        if E is not None:
            self.E = E if self.E is None else self.E + E

    def backward_output(self, do: torch.Tensor) -> None:
        """Records the outputs' terms (call ``output(S_in)`` or ``prepare_backward(S_in)`` first:
        its states are used)."""
        if self.S_out is None:
            raise RuntimeError("TritonDeltaSegment.backward_output: call output(S_in) or prepare_backward(S_in) first")
        if self._do is None or do is not self._do_src:
            self.state_grad(do)
        self._add(self._dh @ self.S_out.transpose(-1, -2), self._dh)
        self.dO = self._do if self.dO is None else self.dO + self._do
        if self.dO is not self._do:
            raise NotImplementedError("TritonDeltaSegment: backward_output called twice")
        self._dh = None

    def backward_summary(self, dM: torch.Tensor, dA: torch.Tensor) -> None:
        """Records the terms of the summary's gradient ``dM [B, H, K, V]``, ``dA [B, H, K, K]``."""
        K, V = self.M.shape[-2:]
        dhM, _ = gd.state_grad_pass(self.f, V, dS_T=dM.detach().float().contiguous())
        dhA, _ = gd.state_grad_pass(self.f, K, dS_T=dA.detach().float().contiguous())
        P, _ = gd.state_pass(self.f, identity=True)  # the transition's trajectory, recomputed
        self._add(dhM @ self.Ms.transpose(-1, -2) + dhA @ P.transpose(-1, -2), dhM)

    def grads(self) -> tuple:
        """``(dq, dk, dv, dbeta, dg)`` (None where the input has no gradient or is None)."""
        B, H, K, V = self.M.shape
        N = self.Ms.shape[2]
        dev = self.M.device
        out: list[torch.Tensor | None] = [None] * 5
        if not any(x is not None and x.requires_grad for x in self.inputs):
            return tuple(out)
        D = self.D.contiguous() if self.D is not None else torch.zeros(B, H, N, K, K, device=dev)
        E = self.E.contiguous() if self.E is not None else torch.zeros(B, H, N, K, V, device=dev)
        ins = [None if x is None else x.detach().contiguous() for x in self.inputs]
        got = gd.local_bwd(ins, self.f, self.l2, self.scale, D, E, self.dO, None if self.dO is None else self.S_out.contiguous())
        for i, (x, gr) in enumerate(zip(self.inputs, got)):
            if x is not None and x.requires_grad:
                out[i] = gr.to(x.dtype)
        self.D = self.E = self.dO = None
        return tuple(out)
