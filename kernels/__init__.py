"""Triton kernels for the intra-chunk work of linear attention (one folder per op)."""
