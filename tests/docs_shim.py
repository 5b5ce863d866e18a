"""TEMPORARY (issue 15, until the operators' ``cu_seqlens`` is merged): which public operators
take ``cu_seqlens`` yet, a skip for tests that need them all, and a wrapper that drops the
argument where it is not taken (only for tests of the trainer's loss reduction, which hold
whatever the operators do with documents, as long as every SP size does the same)."""
from __future__ import annotations

import functools
import importlib
import inspect

import pytest

OPERATORS = (("lasp.attention", "linear_attention"), ("lasp.attention", "softmax_attention"),
             ("lasp.recurrent", "gated_delta_rule"), ("lasp.recurrent", "causal_conv1d"))


def _takes_documents(module: str, name: str) -> bool:
    fn = getattr(importlib.import_module(module), name)
    return "cu_seqlens" in inspect.signature(inspect.unwrap(fn)).parameters


def operators_take_documents() -> bool:
    """True once every public operator accepts ``cu_seqlens``."""
    return all(_takes_documents(m, n) for m, n in OPERATORS)


def require_documents() -> None:
    """Skip the calling test until every operator accepts ``cu_seqlens``."""
    if not operators_take_documents():
        pytest.skip("the operators do not take cu_seqlens yet (issue 15: lindocs/softdocs); runs once merged")


def drop_documents_where_unsupported() -> bool:
    """Make the operators that lack ``cu_seqlens`` ignore it (in this process). Returns whether any did."""
    dropped = False
    for module, name in OPERATORS:
        if _takes_documents(module, name):
            continue
        mod = importlib.import_module(module)
        fn = getattr(mod, name)
        if getattr(fn, "drops_documents", False):
            dropped = True
            continue

        @functools.wraps(fn)
        def without(*args, _fn=fn, cu_seqlens=None, **kwargs):
            return _fn(*args, **kwargs)

        without.drops_documents = True
        setattr(mod, name, without)
        dropped = True
    return dropped
