"""Chunked gated linear attention (``simple_gla``: ``g`` per token and head, ``g_gamma`` per head).

``fwd`` and ``bwd`` hold the Triton kernels and their launchers; ``common`` the shared pieces.
"""
from .common import Gates
from .fwd import chunk_fwd_h, chunk_fwd_inter, chunk_fwd_o, chunk_gates
from .bwd import chunk_bwd_dg, chunk_bwd_dh, chunk_bwd_dqk, chunk_bwd_dv, summary_bwd

__all__ = [
    "Gates", "chunk_gates", "chunk_fwd_h", "chunk_fwd_o", "chunk_fwd_inter",
    "chunk_bwd_dh", "chunk_bwd_dqk", "chunk_bwd_dv", "summary_bwd", "chunk_bwd_dg",
]
