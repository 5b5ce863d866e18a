"""No host-device synchronisation inside an operator's forward or backward (issue 12 item 5):
``lasp.linear_attention`` runs with ``.item()``, ``.tolist()``, ``.cpu()``, ``count_nonzero`` and
``bool(tensor)`` patched to raise (:func:`lasp.testing.no_host_sync`), both backends (Triton
under the interpreter), one process and LASP-2 over 2 ranks (after the first call with the shapes,
which compares the ranks' shapes once)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp
from lasp.parallel import shard_sequence
from lasp.testing import HostSyncError, linear_inputs, no_host_sync

BACKENDS = ["torch", "triton"]


def _run(ins, do, group, backend):
    with no_host_sync():
        o = lasp.linear_attention(*ins, group=group, backend=backend)
        o.backward(do)
    return o.detach(), [x.grad for x in ins]


def test_no_host_sync_catches_syncs():
    x = torch.ones(3)
    for f in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: x.tolist(), lambda: x.cpu(), lambda: torch.count_nonzero(x)):
        with pytest.raises(HostSyncError), no_host_sync():
            f()
    assert x.sum().item() == 3.0 and bool(x.sum()) and torch.count_nonzero(x) == 3  # restored


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_attention_single_process_has_no_host_sync(backend):
    full = linear_inputs(1, 40, 2, 16, 16, gates="both", seed=1, resets=(7,))
    ins = [x.clone().requires_grad_() for x in full]
    o, grads = _run(ins, torch.randn(1, 40, 2, 16), None, backend)
    assert torch.isfinite(o).all() and all(torch.isfinite(gr).all() for gr in grads)


def no_sync_worker(rank, world, full, do, backend):
    torch.set_num_threads(1)
    local = [shard_sequence(x, rank, world) for x in full[:4]]
    ins = [x.clone().requires_grad_() for x in (*local, full[4])]
    # the first call with these shapes compares the ranks' shape fingerprints (one small all-gather
    # read on the host, lasp.ops.rank_check); every later call reads nothing
    lasp.linear_attention(*ins, group=dist.group.WORLD, backend=backend)
    try:
        _run(ins, shard_sequence(do, rank, world), dist.group.WORLD, backend)
    except HostSyncError as e:
        return str(e)
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_lasp2_two_ranks_has_no_host_sync(spawn, backend):
    full = linear_inputs(1, 64, 2, 16, 16, gates="both", seed=2)
    do = torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(3))
    assert spawn(2).run(no_sync_worker, full, do, backend, timeout=120) == [None, None]
