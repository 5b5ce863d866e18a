"""Chunked gated delta rule (DeltaNet, Gated DeltaNet) in the WY form.

``fwd``: the Triton forward (WY factors, chunk-state pass, outputs); ``bwd``: the Triton
state-gradient pass and the per-chunk local backward. What runs where:

* Triton: L2 normalisation of q, k, the gate cumsum, the triangular solve and the WY factors
  ``W, U0``; every chunk-state pass (from ``S_in``, from zeros, and the transition's from ``I``);
  the outputs; the reverse state-gradient pass (``dS_in`` and every chunk's ``dS``).
* plain torch (autograd, all chunks at once, no loop over chunks): the local backward of each
  chunk's maps ``(A_c, M_c, Qeff_c, O_loc_c)`` to ``dq, dk, dv, dbeta, dg`` through the WY solve,
  given the Triton passes' states and state gradients (:func:`bwd.local_grads`).
"""
from .common import Factors
from .fwd import chunk_output, state_pass, wy_factors
from .bwd import local_grads, state_grad_pass

__all__ = ["Factors", "wy_factors", "state_pass", "chunk_output", "state_grad_pass", "local_grads"]
