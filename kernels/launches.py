"""Every kernel launch lasp's Triton paths make, recorded without running anything (for
:mod:`lasp.kernels.compile_check`).

Each variant (dtype, head dims, gates, L2 norm) drives its segment class on CPU tensors the way
the drivers do: the LASP-2 middle segment through the whole protocol
(:func:`lasp.testing.drive_segment`: summary, outputs from a non-zero incoming state, ``dS_in``,
the gradients through ``dO`` and the summary's ``dM`` / ``dA``) and the single-process path
(``lasp2_apply`` over no group, forward and backward: the first segment, zero incoming state).
Kernels are not run (:func:`lasp.kernels.compile_check.recording`), so the tensors hold garbage;
nothing reads their values. Shapes: B = 1, H = 16, T = 1024 (the chunk counts are multiples of
16, as at long context: the runtime's divisibility hints are those of a real run).
"""
from __future__ import annotations

import contextlib
import itertools

import torch

B, H, T = 1, 16, 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def cpu_launches():
    """The segments take CPU tensors without the interpreter (their device check is skipped)."""
    from . import delta_segment, segment

    saved = segment.check_device, delta_segment.check_device
    segment.check_device = delta_segment.check_device = lambda *a, **k: None
    try:
        yield
    finally:
        segment.check_device, delta_segment.check_device = saved


def _rand(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


def drive_simple_gla(dtype, K: int, V: int, gates: str) -> None:
    from ..ops.lasp2 import lasp2_apply
    from ..testing import drive_segment
    from .segment import TritonSegment

    q, k = _rand(B, T, H, K, dtype=dtype), _rand(B, T, H, K, dtype=dtype)
    v = _rand(B, T, H, V, dtype=dtype)
    g = _rand(B, T, H) if gates in ("g", "both") else None
    gg = _rand(H) if gates in ("g_gamma", "both") else None
    scale = K**-0.5
    drive_segment(lambda: TritonSegment(q, k, v, g, gg, scale), _rand(B, H, K, V), _rand(B, T, H, V, dtype=dtype),
                  _rand(B, H, K, V), _rand(B, H))
    ins = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g)]
    o = lasp2_apply(TritonSegment, ins, [gg], scale=scale, group=None)
    o.backward(torch.empty_like(o))


def drive_gated_delta(dtype, K: int, V: int, gated: bool, l2: bool, group: int = 1) -> None:
    """``group``: value heads per q/k head (GVA: q, k on H // group heads, the kernels' G)."""
    from ..ops.lasp2 import lasp2_apply
    from ..testing import drive_segment
    from .delta_segment import TritonDeltaSegment

    q, k = _rand(B, T, H // group, K, dtype=dtype), _rand(B, T, H // group, K, dtype=dtype)
    v, beta = _rand(B, T, H, V, dtype=dtype), _rand(B, T, H, dtype=dtype)
    g = _rand(B, T, H) if gated else None
    scale = K**-0.5
    drive_segment(lambda: TritonDeltaSegment(q, k, v, g, beta, scale, use_qk_l2norm=l2), _rand(B, H, K, V),
                  _rand(B, T, H, V, dtype=dtype), _rand(B, H, K, V), _rand(B, H, K, K))
    ins = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, g, beta)]
    o = lasp2_apply(TritonDeltaSegment, ins, [], scale=scale, group=None, use_qk_l2norm=l2)
    o.backward(torch.empty_like(o))


def simple_gla_variants(quick: bool):
    """``(label, thunk)``: dtypes x head dims x gates (the launchers' branches)."""
    if quick:
        cases = [("bf16", 128, 128, "both"), ("fp32", 64, 64, "g")]
    else:
        dims = [(128, 128), (256, 256), (256, 64), (64, 256), (16, 32), (64, 16)]
        cases = [(dt, K, V, gt) for dt, (K, V), gt in itertools.product(DTYPES, dims, ("both", "g", "g_gamma", "none"))]
    for dt, K, V, gates in cases:
        yield f"simple_gla {dt} K{K} V{V} {gates}", lambda dt=dt, K=K, V=V, gates=gates: drive_simple_gla(DTYPES[dt], K, V, gates)


def gated_delta_variants(quick: bool):
    """``(label, thunk)``: dtypes x head dims (those TritonDeltaSegment takes) x gates, L2 norm."""
    from .delta_segment import unsupported_head_dims

    if quick:
        cases = [("bf16", 128, 128, True, True), ("fp32", 64, 64, True, False)]
    else:
        dims = [(128, 128), (256, 128), (128, 256), (256, 64), (64, 256), (16, 32), (32, 16)]
        cases = [(dt, K, V, g, l2) for dt, (K, V), (g, l2) in itertools.product(DTYPES, dims, ((True, True), (False, False)))
                 if not unsupported_head_dims(K, V, DTYPES[dt])]
    for dt, K, V, gated, l2 in cases:
        yield (f"gated_delta {dt} K{K} V{V} g={gated} l2={l2}",
               lambda dt=dt, K=K, V=V, gated=gated, l2=l2: drive_gated_delta(DTYPES[dt], K, V, gated, l2))
    if not quick:  # GVA: two value heads per q/k head (the kernels' G = 2 variants)
        yield "gated_delta bf16 K128 V128 g=True l2=True GVA2", lambda: drive_gated_delta(DTYPES["bf16"], 128, 128, True, True, 2)


def capture(op: str = "all", quick: bool = False):
    """Every launch of the chosen family (``all``, ``simple_gla``, ``gated_delta``), labelled."""
    from .compile_check import recording

    variants = []
    if op in ("all", "simple_gla"):
        variants += list(simple_gla_variants(quick))
    if op in ("all", "gated_delta"):
        variants += list(gated_delta_variants(quick))
    out = []
    with cpu_launches():
        for label, drive in variants:
            with recording() as launches:
                drive()
            for launch in launches:
                launch.label = label
            out += launches
    return out
