"""Chunked gated delta rule (DeltaNet, Gated DeltaNet) in the WY form.

Everything in Triton, fp32 accumulation:

* ``fwd``: L2 normalisation of q, k, the gate cumsum, the triangular solve and the WY factors
  ``W, U0`` (per chunk); every chunk-state pass (from ``S_in``, from zeros, and the transition's
  from ``I``); the outputs;
* ``bwd``: the reverse state-gradient pass (``dS_in`` and every chunk's state gradient, from
  ``dO`` or from a terminal ``dM`` / ``dA``);
* ``local_bwd``: per chunk, the backward of its maps ``(A_c, M_c, Qeff_c, O_loc_c)`` through the
  WY solve, the gates and the L2 norm to ``dq, dk, dv, dbeta, dg``.
"""
from .common import Factors
from .fwd import chunk_output, state_pass, wy_factors
from .bwd import state_grad_pass
from .local_bwd import local_bwd

__all__ = ["Factors", "wy_factors", "state_pass", "chunk_output", "state_grad_pass", "local_bwd"]
