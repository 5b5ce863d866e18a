"""Sequence-parallel attention operators, one module per method, plus the naive oracles."""
