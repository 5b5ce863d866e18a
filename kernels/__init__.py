"""Triton kernels for lasp (imported as ``lasp.kernels``: setup.py maps this folder there), one folder per op.

* :mod:`lasp.kernels.simple_gla`  chunked causal linear attention with ``g`` / ``g_gamma`` gating,
  split into the forward and backward steps LASP-2 needs;
* :mod:`lasp.kernels.segment`  ``TritonSegment``, the LASP-2 segment protocol on those kernels
  (``lasp.linear_attention(..., backend="triton")``);
* :mod:`lasp.kernels.gated_delta`  the chunked gated delta rule (WY form): forward, chunk-state
  passes, the reverse state-gradient pass and the per-chunk local backward;
* :mod:`lasp.kernels.delta_segment`  ``TritonDeltaSegment``, the delta-rule segment on them
  (``lasp.gated_delta_rule(..., backend="triton")``);
* :mod:`lasp.kernels.compile_check`  compiles every launch (recorded by :mod:`lasp.kernels.launches`)
  for sm_80 and sm_90 without a GPU and checks shared memory and spills;
* :mod:`lasp.kernels.cost`  bytes and FLOPs per token of the gated delta rule, lasp vs fla.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors.
"""
