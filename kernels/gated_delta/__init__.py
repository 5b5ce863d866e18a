"""Chunked gated delta rule (DeltaNet, Gated DeltaNet) in the WY form.

Everything in Triton, fp32 accumulation (bf16 dot operands on a GPU for 16-bit inputs):

* ``fwd``: L2 normalisation of q, k, the gates, the blocked triangular inverse and the WY factors
  ``W, U0`` (per chunk); the chunk-state passes (a trajectory from ``S_in`` or zeros with its
  snapshots and ``Vn``; the transition's and the summary's side by side); the outputs;
* ``bwd``: the reverse state-gradient pass (``dS_in``, every chunk's state gradient and ``dU``,
  from ``dO`` and / or a terminal gradient);
* ``local_bwd``: per chunk, the backward of its maps through the WY solve, the gates and the L2
  norm to ``dq, dk, dv, dbeta, dg`` (two kernels, tiled over K and V).
"""
from .common import Factors
from .fwd import chunk_output, identity_trajectory, state_pass, transition_and_summary, wy_factors
from .bwd import state_grad_pass
from .local_bwd import local_bwd

__all__ = ["Factors", "wy_factors", "state_pass", "transition_and_summary", "identity_trajectory", "chunk_output",
           "state_grad_pass", "local_bwd"]
