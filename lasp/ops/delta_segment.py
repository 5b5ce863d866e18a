"""The delta-rule segment of the segment protocol v2 (``transition = "matrix"``), in plain torch.

A segment of ``T`` tokens maps its incoming state affinely, ``S_out = A S_in + M`` with
``A = prod_t exp(g_t)(I - beta_t k_t k_t^T)`` (``[B, H, K, K]``, latest factor on the left) and
``M`` its final state from zero. Built from the chunked WY form (:mod:`lasp.ops.delta_chunk`):
per chunk ``S_{c+1} = A_c S_c + M_c``; one scan over chunks of the augmented ``[P_c | M_c]``
(``P_c`` = product of the earlier chunks' ``A``, from ``[I | 0]``) gives the summary and, for
every chunk, how its incoming state depends on ``S_in``: ``S_c = P_c S_in + Ms_c``. So

    o = o_local + Qt S_in,   o_local = O_loc + Qeff Ms,   Qt = Qeff P      (Qt: [B, H, T, K])

and ``dL/dS_in = Qt^T dO``. Everything but ``Qt S_in`` is independent of ``S_in``.

==========================  ====================================================================
constructor                 the WY factors, chunk maps and the scan (what ``summary`` needs)
``summary()``               ``(A [B, H, K, K], M [B, H, K, V])`` float32
``compute_local()``         the intra-chunk products, ``o_local`` and ``Qt`` (overlap the gather)
``output(S_in)``            ``o [B, T, H, V]`` float32
``prepare_backward(S_in)``  backward: ``compute_local`` + ``output`` (records their graph)
``state_grad(dO)``          ``Qt^T dO`` ``[B, H, K, V]`` float32
``backward_output(dO)``     records ``dO`` (gradients with ``S_in`` held fixed)
``backward_summary(dM, dA)``  records the summary's gradient
``grads()``                 ``(dq, dk, dv, dg, dbeta)``: ONE autograd pass over what was recorded
==========================  ====================================================================
"""
from __future__ import annotations

import torch

from .delta_chunk import DEFAULT_CHUNK_SIZE, chunk_factors, chunk_output_maps, chunk_outputs, scan_states


class DeltaTorchSegment:
    """Plain-torch gated delta rule segment. Inputs in the operator layout and order: q, k ``[B, T,
    H, K]``, v ``[B, T, HV, V]``, g ``[B, T, HV]`` or None, beta ``[B, T, HV]`` (GVA: ``HV`` a multiple
    of ``H``); states ``[B, HV, K, V]``."""

    transition = "matrix"

    def __init__(self, q, k, v, g, beta, scale: float, use_qk_l2norm: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.inputs = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (q, k, v, g, beta)]
        self.scale = scale
        B, T, _, K = q.shape
        H, V = v.shape[2], v.shape[-1]
        self.K = K
        self._outs: list[torch.Tensor] = []
        self._gouts: list[torch.Tensor] = []
        with torch.enable_grad():
            self.ch = chunk_factors(*self.inputs, chunk_size, use_qk_l2norm)
            eye = torch.eye(K, dtype=torch.float32, device=q.device).expand(B, H, K, K)
            start = torch.cat([eye, q.new_zeros(B, H, K, V, dtype=torch.float32)], dim=-1)
            zero_k = self.ch.M.new_zeros(*self.ch.M.shape[:-1], K)
            self.X, final = scan_states(self.ch.A, torch.cat([zero_k, self.ch.M], dim=-1), start)
            self.A, self.M = final[..., :K], final[..., K:]

    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A.detach(), self.M.detach()

    def compute_local(self) -> None:
        if hasattr(self, "Qt"):  # idempotent: output / state_grad call it if the driver did not
            return
        with torch.enable_grad():
            Qeff, O_loc = chunk_output_maps(self.ch, self.scale)
            P, Ms = self.X[..., : self.K], self.X[..., self.K :]
            self.o_local = chunk_outputs(Qeff, O_loc, Ms, self.ch.T)  # [B, H, T, V]
            self.Qt = chunk_outputs(Qeff, None, P, self.ch.T)  # Qeff P: [B, H, T, K]

    def output(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> torch.Tensor:
        self.compute_local()
        with torch.enable_grad():
            self.o = self.o_local if state_is_zero else self.o_local + self.Qt @ S_in.detach().float()
        return self.o.detach().transpose(1, 2)

    def prepare_backward(self, S_in: torch.Tensor, *, state_is_zero: bool = False) -> None:
        """Backward: records the forward's graph again (``compute_local`` + ``output``)."""
        self.compute_local()
        self.output(S_in, state_is_zero=state_is_zero)

    def state_grad(self, do: torch.Tensor) -> torch.Tensor:
        self.compute_local()
        with torch.no_grad():
            return self.Qt.transpose(-1, -2) @ do.float().transpose(1, 2)

    def backward_output(self, do: torch.Tensor) -> None:
        if not hasattr(self, "o"):
            raise RuntimeError("DeltaTorchSegment.backward_output: call output(S_in) or prepare_backward(S_in) first (it records the graph)")
        self._outs.append(self.o)
        self._gouts.append(do.float().transpose(1, 2))

    def backward_summary(self, dM: torch.Tensor, dA: torch.Tensor) -> None:
        self._outs += [self.M, self.A]
        self._gouts += [dM.float(), dA.float()]

    def grads(self) -> tuple:
        out: list[torch.Tensor | None] = [None] * 5
        wanted = [i for i, x in enumerate(self.inputs) if x is not None and x.requires_grad]
        pairs = [(o, go) for o, go in zip(self._outs, self._gouts) if o.requires_grad]
        if wanted and pairs:
            outs, gouts = zip(*pairs)
            got = torch.autograd.grad(outs, [self.inputs[i] for i in wanted], gouts, allow_unused=True)
            for i, gr in zip(wanted, got):
                out[i] = gr
        self._outs, self._gouts = [], []
        return tuple(out)
