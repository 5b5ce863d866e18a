"""Memory of the softmax methods at a long sequence: no tensor of ``T_local x T`` elements (no
dense mask, no score matrix) is ever returned by an aten op, forward AND backward, and the
largest one is linear in T; working tensors go through ``save_for_backward`` (so activation
checkpointing can drop them), and a checkpointed call gives the same gradients."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import lasp
from lasp.ops.softmax_local import sdpa_attention
from lasp.parallel import shard_sequence
from lasp.testing import assert_close, document_starts, softmax_inputs

T, P, H, H_KV, D = 4096, 2, 4, 2, 16


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def largest_in_fwd_bwd(fn, ins, do) -> tuple[int, str]:
    ins = [x.clone().requires_grad_() for x in ins]
    with LargestTensor() as rec:
        fn(*ins).backward(do)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in ins)
    return rec.numel, rec.op


def run_largest(rank, world, method, layout, n_docs=0):
    torch.set_num_threads(1)
    full, do = softmax_inputs(1, T, H, H_KV, D, seed=1)
    ins = [shard_sequence(x, rank, world, layout) for x in full]
    cu = document_starts(T, n_docs) if n_docs else None

    def fn(q, k, v):
        return lasp.softmax_attention(q, k, v, group=dist.group.WORLD, method=method, layout=layout, cu_seqlens=cu)

    return largest_in_fwd_bwd(fn, ins, shard_sequence(do, rank, world, layout))


def assert_linear(numel: int, op: str, t_local: int, t: int) -> None:
    """Below ``T_local x T`` elements, and (stricter) at most a few full-sequence q-sized tensors."""
    assert numel < t_local * t or t_local == 1, f"{op} returned {numel} >= T_local x T = {t_local * t} elements"
    linear = 4 * t * H * D
    assert numel <= linear, f"{op} returned {numel} elements, more than 4 * T * H * D = {linear}"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", ["allgather", "ring", "ulysses"])
def test_softmax_methods_allocate_no_score_sized_tensor(spawn, method, layout):
    for numel, op in spawn(P).run(run_largest, method, layout):
        assert_linear(numel, op, T // P, T)


@pytest.mark.parametrize("n_docs", [1, 64], ids=lambda n: f"{n}docs")
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", ["allgather", "ring", "ulysses"])
def test_softmax_documents_allocate_no_score_sized_tensor(spawn, method, layout, n_docs):
    """Packed documents (cu_seqlens): per-document pieces, never a T_local x T mask or scores."""
    for numel, op in spawn(P).run(run_largest, method, layout, n_docs):
        assert_linear(numel, op, T // P, T)


@pytest.mark.parametrize("n_docs", [1, 64], ids=lambda n: f"{n}docs")
def test_single_process_documents_allocate_no_score_sized_tensor(n_docs):
    (q, k, v), do = softmax_inputs(1, T, H, H_KV, D, seed=2)
    cu = document_starts(T, n_docs) if n_docs else None
    numel, op = largest_in_fwd_bwd(lambda q, k, v: lasp.softmax_attention(q, k, v, cu_seqlens=cu), (q, k, v), do)
    assert_linear(numel, op, T, T)


@pytest.mark.parametrize("t_q", [T, T // 2, 1], ids=["square", "half", "one"])
def test_single_process_allocates_no_score_sized_tensor(t_q):
    """group=None (and the decoding cache's bottom-right case, fewer queries than keys)."""
    (q, k, v), do = softmax_inputs(1, T, H, H_KV, D, seed=2)
    numel, op = largest_in_fwd_bwd(
        lambda q, k, v: sdpa_attention(q, k, v, causal=True, scale=D**-0.5), (q[:, T - t_q :], k, v), do[:, T - t_q :])
    assert_linear(numel, op, t_q, T)


def run_checkpointed(rank, world, method, layout):
    """Grads with and without non-reentrant checkpointing, and the tensor attributes of the ctx."""
    full, do = softmax_inputs(1, 64, H, H_KV, D, seed=3)
    grads, ctx_tensors = [], None
    for ckpt in (False, True):
        ins = [shard_sequence(x, rank, world, layout).clone().requires_grad_() for x in full]

        def fn(q, k, v):
            return lasp.softmax_attention(q, k, v, group=dist.group.WORLD, method=method, layout=layout)

        o = checkpoint(fn, *ins, use_reentrant=False) if ckpt else fn(*ins)
        if not ckpt:
            ctx_tensors = [
                name for name, val in vars(o.grad_fn).items()
                if isinstance(val, torch.Tensor)
                or (isinstance(val, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in val))
            ]
        o.backward(shard_sequence(do, rank, world, layout))
        grads.append([x.grad for x in ins])
    return grads, ctx_tensors


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", ["allgather", "ring"])
def test_softmax_saves_through_save_for_backward(spawn, method, layout):
    for (plain, ckpt), ctx_tensors in spawn(P).run(run_checkpointed, method, layout):
        assert ctx_tensors == [], f"tensors kept as plain ctx attributes: {ctx_tensors}"
        for name, a, b in zip("qkv", plain, ckpt):
            assert_close(a, b, name=f"d{name} (checkpointed)")
