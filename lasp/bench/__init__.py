"""Benchmarks: kernels, one layer across methods, a training step, and an analytic cost model."""
