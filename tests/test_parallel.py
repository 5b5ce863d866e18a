"""Process groups and sequence sharding."""

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.parallel import global_positions, shard_sequence, unshard_sequence


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_shard_roundtrip(P, layout):
    x = torch.randn(2, 24, 3)
    pieces = [shard_sequence(x, r, P, layout) for r in range(P)]
    assert all(p.shape == (2, 24 // P, 3) for p in pieces)
    assert torch.equal(unshard_sequence(pieces, layout), x)


def test_zigzag_order():
    # 2P = 4 chunks of 2 tokens: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert global_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert global_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert global_positions(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout,T", [("contiguous", 7), ("zigzag", 6)])
def test_shard_rejects_indivisible(layout, T):
    with pytest.raises(ValueError, match="divisible"):
        shard_sequence(torch.zeros(1, T), 0, 2, layout)


def test_init_parallel_single_process_without_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    state = lasp.init_parallel(1)
    assert (state.sp_size, state.dp_size, state.sp_group) == (1, 1, None)
    with pytest.raises(ValueError, match="torchrun"):
        lasp.init_parallel(2)
    with pytest.raises(ValueError, match="sp_size"):
        lasp.init_parallel(0)


def grid_worker(rank, world, sp_size):
    """Worker: init_parallel over the group the caller already made; report the grid."""
    state = lasp.init_parallel(sp_size)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=state.sp_group)
    u = torch.tensor([float(rank)])
    dist.all_reduce(u, group=state.dp_group)
    return state.sp_rank, state.sp_size, state.dp_rank, state.dp_size, state.sp_ranks, t.item(), u.item()


def test_init_parallel_grid(spawn):
    res = spawn(4).run(grid_worker, 2)
    # SP groups {0,1},{2,3} (contiguous), DP groups {0,2},{1,3} (strided)
    assert [r[:4] for r in res] == [(0, 2, 0, 2), (1, 2, 0, 2), (0, 2, 1, 2), (1, 2, 1, 2)]
    assert [r[4] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r[5] for r in res] == [1.0, 1.0, 5.0, 5.0]
    assert [r[6] for r in res] == [2.0, 4.0, 2.0, 4.0]


def bad_sp_worker(rank, world):
    try:
        lasp.init_parallel(3)
    except ValueError as e:
        return str(e)
    return None


def test_init_parallel_sp_must_divide_world(spawn):
    msgs = spawn(4).run(bad_sp_worker)
    assert all(m and "sp_size=3" in m for m in msgs)
