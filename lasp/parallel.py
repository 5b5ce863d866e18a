"""Process groups (sequence parallel x data parallel, and expert parallel) and sequence sharding.

Ranks are arranged as a DP x SP grid: SP groups are blocks of ``sp_size`` contiguous ranks
(so an SP group stays inside a node when ``sp_size`` <= GPUs per node), DP groups are strided
(rank ``r`` is in DP group ``r % sp_size``).

Expert parallelism (``ep_size``, MoE models) is carved from the same ranks, independently of the
SP x DP split: EP groups are blocks of ``ep_size`` contiguous ranks (``[0..ep-1], [ep..2ep-1], ...``;
rank ``r`` holds experts ``[(r % ep) * E/ep, (r % ep + 1) * E/ep)``), expert-data-parallel (EDP)
groups are strided (``r % ep``, ``r % ep + ep``, ...: the ranks holding the same experts, over
which their gradients are reduced). This is DeepSpeed's layout for expert parallelism without
model parallelism (``deepspeed.utils.groups``), so its MoE parameter groups use these groups.
With ``ep_size == sp_size`` the EP groups are the SP groups and the EDP groups the DP groups.

Two token layouts for a sequence of ``T`` tokens over ``P`` SP ranks:

- ``contiguous``: rank ``r`` holds tokens ``[r*T/P, (r+1)*T/P)``.
- ``zigzag``: the sequence is cut into ``2P`` equal chunks; rank ``r`` holds chunk ``r``
  followed by chunk ``2P-1-r``, concatenated in that order along T. This balances causal
  softmax work (every rank gets one early and one late chunk).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")

#: Seconds a collective may wait for a peer before it fails (instead of hanging forever).
DEFAULT_TIMEOUT_S = float(os.environ.get("LASP_COLLECTIVE_TIMEOUT", "600"))


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the SP x DP grid.

    ``sp_group``/``dp_group`` are ``None`` when torch.distributed is not initialised (a single
    process, no parallelism).
    """

    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    sp_rank: int
    sp_size: int
    dp_rank: int
    dp_size: int
    rank: int = 0
    world_size: int = 1
    ep_group: dist.ProcessGroup | None = None  # None when ep_size == 1
    edp_group: dist.ProcessGroup | None = None
    ep_rank: int = 0
    ep_size: int = 1

    @property
    def sp_ranks(self) -> list[int]:
        """Global ranks of this process's SP group, in SP-rank order."""
        start = self.dp_rank * self.sp_size
        return list(range(start, start + self.sp_size))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def default_backend() -> str:
    """``$LASP_DIST_BACKEND`` if set (the launch scripts set it), else nccl with CUDA, gloo without."""
    forced = os.environ.get("LASP_DIST_BACKEND")
    if forced:
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the timeout of every process group created from now on without one.

    ``torch.distributed.new_group(ranks)`` without ``timeout`` takes torch's backend default (30
    min gloo, 10 min NCCL), not the default group's: DeepSpeed creates its groups that way, so
    without this a stalled rank would hang them long after ``timeout_s``. torch reads these two
    module defaults each time a group is created."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


def _init_from_env(backend: str | None, timeout_s: float) -> None:
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            "init_parallel: torch.distributed is not initialised and the launcher variables "
            f"{missing} are not set; launch with torchrun / the deepspeed launcher, or call "
            "torch.distributed.init_process_group first"
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    # Under torchrun the store outlives a restart: the keys the dead attempt's groups wrote
    # (peer addresses) are still there. A per-attempt prefix keeps the new groups off them.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"lasp/attempt{restart}", client)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def expert_parallel_ranks(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(EP groups, EDP groups)`` as lists of global ranks (the layout in the module docstring)."""
    if not isinstance(ep_size, int) or ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size={ep_size!r} must be a positive int that divides the world size {world_size}")
    ep = [list(range(g * ep_size, (g + 1) * ep_size)) for g in range(world_size // ep_size)]
    edp = [list(range(i, world_size, ep_size)) for i in range(ep_size)]
    return ep, edp


def new_expert_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """``(EP group, EDP group)`` of this rank in the initialised world (every rank must call it)."""
    rank = dist.get_rank()
    ep_ranks, edp_ranks = expert_parallel_ranks(dist.get_world_size(), ep_size)
    mine = []
    for layout in (ep_ranks, edp_ranks):
        groups = [dist.new_group(ranks) for ranks in layout]  # every group on every rank, in order
        mine.append(next(g for g, ranks in zip(groups, layout) if rank in ranks))
    return mine[0], mine[1]


def init_parallel(
    sp_size: int = 1, *, ep_size: int = 1, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> ParallelState:
    """Initialise torch.distributed (if needed) and build the SP x DP process groups, and with
    ``ep_size > 1`` the expert-parallel and expert-data-parallel groups.

    Works under ``torchrun`` and the ``deepspeed`` launcher (both set RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and with a process group the caller already made.
    Without any of these and with ``sp_size == 1`` it returns a single-process state.

    Args:
        sp_size: ranks per sequence-parallel group; must divide the world size.
        ep_size: ranks per expert-parallel group (MoE models); must divide the world size.
        backend: ``gloo``/``nccl``; default nccl on CUDA machines, gloo otherwise.
        timeout_s: collective timeout, so a lost peer ends in an error instead of a hang: of the
            default group (when this initialises it), of the SP and DP groups, and of every group
            created later without a timeout (DeepSpeed's; :func:`set_default_group_timeout`).
    """
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive int, got {sp_size!r}")
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ and sp_size == 1 and ep_size == 1:
            return ParallelState(None, None, 0, 1, 0, 1, 0, 1)
        _init_from_env(backend, timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size != 0:
        raise ValueError(f"sp_size={sp_size} must divide the world size {world}")
    if world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    timeout = datetime.timedelta(seconds=timeout_s)
    set_default_group_timeout(timeout)
    dp_size = world // sp_size
    sp_group = dp_group = None
    # Every rank must create every group, in the same order.
    for d in range(dp_size):
        ranks = list(range(d * sp_size, (d + 1) * sp_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            sp_group = group
    for s in range(sp_size):
        ranks = list(range(s, world, sp_size))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dp_group = group
    ep_group, edp_group = new_expert_groups(ep_size) if ep_size > 1 else (None, None)
    return ParallelState(
        sp_group=sp_group,
        dp_group=dp_group,
        sp_rank=rank % sp_size,
        sp_size=sp_size,
        dp_rank=rank // sp_size,
        dp_size=dp_size,
        rank=rank,
        world_size=world,
        ep_group=ep_group,
        edp_group=edp_group,
        ep_rank=rank % ep_size,
        ep_size=ep_size,
    )


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) within ``group``; (0, 1) for ``None``."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------- sharding


def check_shardable(seq_len: int, sp_size: int, layout: str, name: str = "seq_len") -> None:
    """Raise ValueError unless a sequence of ``seq_len`` tokens can be laid out on ``sp_size`` ranks."""
    _check_layout(layout)
    parts = sp_size if layout == "contiguous" else 2 * sp_size
    if seq_len % parts != 0:
        raise ValueError(
            f"{name}={seq_len} must be divisible by {parts} "
            f"({'sp_size' if layout == 'contiguous' else '2 * sp_size'} for the {layout} layout)"
        )


def layout_chunks(sp_rank: int, sp_size: int, layout: str) -> list[int]:
    """Indices of the equal global chunks a rank holds, in its local order.

    contiguous: ``[r]`` out of P chunks; zigzag: ``[r, 2P-1-r]`` out of 2P chunks.
    """
    _check_layout(layout)
    if layout == "contiguous":
        return [sp_rank]
    return [sp_rank, 2 * sp_size - 1 - sp_rank]


def num_chunks(sp_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into (P or 2P)."""
    _check_layout(layout)
    return sp_size if layout == "contiguous" else 2 * sp_size


def chunk_owners(sp_size: int, layout: str) -> list[tuple[int, int]]:
    """For every global chunk c (natural order): ``(rank that holds it, its index among that rank's chunks)``."""
    owners = [(0, 0)] * num_chunks(sp_size, layout)
    for r in range(sp_size):
        for j, c in enumerate(layout_chunks(r, sp_size, layout)):
            owners[c] = (r, j)
    return owners


def shard_sequence(x: torch.Tensor, sp_rank: int, sp_size: int, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """A rank's piece of a full ``[B, T, ...]`` tensor (sequence along ``dim``)."""
    check_shardable(x.shape[dim], sp_size, layout)
    chunks = x.chunk(num_chunks(sp_size, layout), dim=dim)
    return torch.cat([chunks[c] for c in layout_chunks(sp_rank, sp_size, layout)], dim=dim)


def unshard_sequence(pieces: list[torch.Tensor], layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full tensor from every rank's piece (in SP-rank order)."""
    sp_size = len(pieces)
    if layout == "contiguous":
        return torch.cat(pieces, dim=dim)
    _check_layout(layout)
    ordered: list[torch.Tensor | None] = [None] * (2 * sp_size)
    for r, piece in enumerate(pieces):
        first, second = piece.chunk(2, dim=dim)
        ordered[r], ordered[2 * sp_size - 1 - r] = first, second
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


def global_positions(seq_len: int, sp_rank: int, sp_size: int, layout: str = "contiguous", device=None) -> torch.Tensor:
    """Global token positions (``[T_local]`` int64) of a rank's shard of a ``seq_len`` sequence."""
    return shard_sequence(torch.arange(seq_len, device=device).unsqueeze(0), sp_rank, sp_size, layout)[0]


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """All-gather the shards of a sequence-sharded tensor back into the full sequence (no autograd)."""
    rank, size = group_rank_size(group)
    if size == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return unshard_sequence(pieces, layout, dim)
