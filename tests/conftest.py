"""Shared fixtures: ``spawn(P)`` gives a pool of P gloo processes (see lasp.spawn)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

from lasp.spawn import SpawnedGroup

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def spawn():
    """``spawn(P).run(fn, *args)`` runs ``fn(rank, P, *args)`` on P gloo ranks; pools are reused."""
    pools: dict[int, SpawnedGroup] = {}

    def get(world_size: int) -> SpawnedGroup:
        if world_size not in pools:
            pools[world_size] = SpawnedGroup(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
