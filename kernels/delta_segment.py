"""``TritonDeltaSegment``: the delta-rule segment of protocol v2 (``transition = "matrix"``) on the
kernels of :mod:`lasp.kernels.gated_delta`; same constructor and protocol as
:class:`lasp.ops.delta_segment.DeltaTorchSegment`.

One forward trajectory carries everything: the outputs' (from ``S_in``, or from zeros, when it is
the summary's). Its chunk states ``S_c`` and ``Vn_c = U0 - W S_c`` feed the outputs and the local
backward. The summary ``(A, M)`` is one launch with both trajectories side by side (the
transition's from ``I``, no snapshots; the summary's from zeros), and the transition is not run
when the driver does not want it (``summary(transition=False)``: one segment, no incoming state).

Backward runs one reverse pass from ``dO`` (``dS_in``, every chunk's state gradient and ``dU``)
and one from the summary's gradient ``dM`` (added to the first's). Because ``S_out = A S_in + M``,
a driver's ``dA`` is ``dM S_in^T``: the two passes on the outputs' trajectory already give its
gradient (``backward_summary(dM, None)``; a general ``dA`` adds a correction from the
transition's trajectory, see :meth:`TritonDeltaSegment.backward_summary`). Then one local step per
chunk (:func:`lasp.kernels.gated_delta.local_bwd`). Nothing reads a device value on the host.

Sequential passes over the chunks at P = 1 (no initial state): forward 1, backward 2 (the state
pass again, the reverse pass), 3 with the final state's gradient.

==========================  ====================================================================
constructor                 WY factors (gates, L2 norm, the blocked inverse, W, U0)
``summary(transition)``     ``(A [B, H, K, K], M [B, H, K, V])`` float32 (A zeros when not wanted)
``compute_local()``         nothing
``output(S_in)``            the outputs' trajectory and ``o [B, T, H, V]`` float32
``prepare_backward(S_in)``  backward: the outputs' trajectory only (no output kernel)
``state_grad(dO)``          ``dL/dS_in`` (the reverse pass with ``dO``)
``backward_output(dO)``     records ``dO`` (its reverse pass ran in ``state_grad``)
``backward_summary(dM, dA)``  the reverse pass from ``dM`` (``dA`` None: ``dM S_in^T``)
``grads()``                 ``(dq, dk, dv, dg, dbeta)`` in the inputs' dtypes
==========================  ====================================================================
"""
from __future__ import annotations

import torch

from . import gated_delta as gd
from .utils import DEFAULT_CHUNK, check_chunk_size, check_device, check_head_dim


def unsupported_head_dims(K: int, V: int, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why the delta kernels cannot take head dims ``K, V``, or None. Besides powers of two 16..256:
    K = V = 256, and fp32 inputs with a head dim of 256, are not taken (the kernels before issue 22
    needed 288 / 460 KiB of shared memory there; the restructured ones are not compile-checked at
    those dims: ``python -m lasp.kernels.compile_check`` covers what is taken)."""
    if dtype == torch.float32 and max(K, V) == 256:
        return "fp32 inputs with a head dim of 256 are not supported by the gated delta Triton kernels"
    if K == 256 and V == 256:
        return "K = V = 256 is not supported by the gated delta Triton kernels"
    return None


class TritonDeltaSegment:
    """Gated delta rule segment on Triton kernels, in fla's order: q, k ``[B, T, H, K]``, v ``[B, T,
    HV, V]``, g ``[B, T, HV]`` (log gates; -inf a hard reset) or None, beta ``[B, T, HV]``; K, V powers
    of two 16..256; ``HV`` a multiple of ``H`` (GVA: the kernels index q/k head ``v_head // (HV // H)``,
    nothing is repeated; dq, dk are summed over each group)."""

    transition = "matrix"
    #: Protocol extensions (:mod:`lasp.ops.segment`): ``summary(transition=False)`` and
    #: ``backward_summary(dM, None)``.
    lazy_transition = True
    dA_from_state = True

    def __init__(self, q, k, v, g, beta, scale: float, use_qk_l2norm: bool = False, chunk_size: int | None = None):
        check_device(q)
        check_head_dim(q.shape[-1], "K (q/k head dim)")
        check_head_dim(v.shape[-1], "V (v head dim)")
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK
        check_chunk_size(chunk_size)
        why = unsupported_head_dims(q.shape[-1], v.shape[-1], q.dtype)
        if why:
            raise ValueError(f"{why}; use backend='torch'")
        self.inputs = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (q, k, v, g, beta)]
        self.scale, self.l2, self.BT = float(scale), use_qk_l2norm, chunk_size
        with torch.no_grad():
            c = [None if x is None else x.detach().contiguous() for x in self.inputs]
            self.f = gd.wy_factors(*c, chunk_size, use_qk_l2norm)
        B, T, _, K = q.shape
        self.shape = (B, v.shape[2], K, v.shape[-1])  # states per value head (GVA: v may have more heads)
        self.A = self.M = None
        self._zero_traj = None  # (h, vn) of the trajectory from zeros, when the summary's pass kept it
        self._no_transition = False
        self.S_in = self.h = self.vn = None  # the outputs' trajectory
        self._do = self._do_src = self.dO = None
        self.dh = self.du = self.D = None

    def summary(self, transition: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, M)``; with ``transition=False`` (the caller applies ``A`` to zero states only, and
        its gradient is zero) the transition's trajectory is not run and ``A`` is zeros."""
        if self.M is None or (transition and self.A is None):
            A, self.M, h, vn = gd.transition_and_summary(self.f, transition=transition, store=not transition)
            self.A = A if transition else None
            if h is not None:
                self._zero_traj = (h, vn)
        if not transition:
            self._no_transition = True
            B, H, K, _ = self.shape
            return torch.zeros(B, H, K, K, dtype=torch.float32, device=self.M.device), self.M
        return self.A, self.M

    def compute_local(self) -> None:
        return None

    def output(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        """``o [B, T, H, V]`` float32 for the state ``S_in [B, H, K, V]`` entering the segment."""
        self.prepare_backward(S_in, state_is_zero=state_is_zero)
        return gd.chunk_output(self.f, self.h, self.vn, self.scale)

    def prepare_backward(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> None:
        """The outputs' trajectory from ``S_in`` (its chunk states and ``Vn``, which
        ``backward_output`` and ``grads`` read), without the outputs themselves."""
        if state_is_zero:
            self.S_in = None
            if self._zero_traj is None:
                _, h, vn = gd.state_pass(self.f)
                self._zero_traj = (h, vn)
            self.h, self.vn = self._zero_traj
        else:
            self.S_in = S_in.detach().float().contiguous()
            _, self.h, self.vn = gd.state_pass(self.f, self.S_in)

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        """``dL/dS_in [B, H, K, V]`` float32 from ``dO [B, T, H, V]`` (the reverse pass; keeps
        its chunk state gradients and ``dU`` for the local backward)."""
        B, H, K, V = self.shape
        self._do_src, self._do = do, do.detach().contiguous()
        self.du = torch.empty(B, H, self.f.kn.shape[2], V, dtype=torch.float32, device=do.device)
        self.dh, ds0 = gd.state_grad_pass(self.f, V, do=self._do, scale=self.scale, du=self.du)
        return ds0

    def backward_output(self, do: torch.Tensor) -> None:
        """Records ``dO`` (call ``output(S_in)`` or ``prepare_backward(S_in)`` first: the local
        backward reads that trajectory)."""
        if self.h is None:
            raise RuntimeError("TritonDeltaSegment.backward_output: call output(S_in) or prepare_backward(S_in) first")
        if self.dO is not None:
            raise NotImplementedError("TritonDeltaSegment: backward_output called twice")
        if self._do is None or do is not self._do_src:
            self.state_grad(do)
        self.dO = self._do

    def backward_summary(self, dM: torch.Tensor, dA: torch.Tensor | None) -> None:
        """The summary's gradient ``dM [B, H, K, V]``, ``dA [B, H, K, K]`` (None: ``dM S_in^T``, the
        gradient of ``S_out = A S_in + M``, what the drivers pass). A general ``dA`` differs from
        that by ``Delta = dA - dM S_in^T``, whose share ``D_c = dS^Delta_{c+1} Phi_c^T`` comes from
        one more reverse pass (from ``Delta``) and the transition's trajectory ``Phi``."""
        B, H, K, V = self.shape
        if self.h is None:
            raise RuntimeError("TritonDeltaSegment.backward_summary: call prepare_backward(S_in) first")
        first = self.du is None
        if first:
            self.du = torch.empty(B, H, self.f.kn.shape[2], V, dtype=torch.float32, device=dM.device)
        dh, _ = gd.state_grad_pass(self.f, V, dS_T=dM.detach().float().contiguous(), du=self.du, accumulate=not first)
        self.dh = dh if self.dh is None else self.dh + dh
        if dA is None or self._no_transition:
            return
        delta = dA.detach().float()
        if self.S_in is not None:
            delta = delta - dM.detach().float() @ self.S_in.transpose(-1, -2)
        dh_delta, _ = gd.state_grad_pass(self.f, K, dS_T=delta.contiguous(), dh_dtype=torch.float32)
        D = dh_delta @ gd.identity_trajectory(self.f).transpose(-1, -2)
        self.D = D if self.D is None else self.D + D

    def grads(self) -> tuple:
        """``(dq, dk, dv, dg, dbeta)`` (None where the input has no gradient or is None)."""
        out: list[torch.Tensor | None] = [None] * 5
        if not any(x is not None and x.requires_grad for x in self.inputs):
            return tuple(out)
        B, H, K, V = self.shape
        T = self.f.kn.shape[2]
        if self.h is None:
            raise RuntimeError("TritonDeltaSegment.grads: call prepare_backward(S_in) first")
        dev = self.f.kn.device
        dh = self.dh if self.dh is not None else torch.zeros_like(self.h)
        du = self.du if self.du is not None else torch.zeros(B, H, T, V, dtype=torch.float32, device=dev)
        ins = [None if x is None else x.detach().contiguous() for x in self.inputs]
        got = gd.local_bwd(ins, self.f, self.scale, self.h, dh, self.vn, du, self.dO, self.D)
        for i, (x, gr) in enumerate(zip(self.inputs, got)):
            if x is not None and x.requires_grad:
                out[i] = gr.to(x.dtype)
        self.dh = self.du = self.D = self.dO = None
        return tuple(out)
