"""``lasp.linear_cross_entropy`` (issue 21 item 1) against ``F.cross_entropy(hidden @ weight.T)``:
loss and both gradients for every reduction, ignored rows (a whole chunk, the whole input), tied
weights, bf16, chunk sizes that do and do not divide N; the chunk bound on memory (the largest
tensor any op allocates, and a process's resident-set growth); no host sync; validation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lasp
from lasp.ops import cross_entropy as lce
from lasp.testing import assert_close, no_host_sync, seed_for

N, V, H = 48, 40, 16
REPO = os.path.join(os.path.dirname(__file__), "..")


def inputs(dtype=torch.float32, seed=0, ignored=slice(16, 32)):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[ignored] = -100  # rows 16..31: one whole chunk of 16, parts of chunks of 20
    y[3] = -100
    return h, w, y


def reference(h, w, y, reduction, grad):
    """``F.cross_entropy(hidden @ weight.T)``: in float64 for fp32 inputs (the oracle), else as the
    inputs' dtype computes it (bf16 logits upcast, the op's definition)."""
    ref_dtype = torch.float64 if h.dtype == torch.float32 else h.dtype
    h, w = (x.detach().to(ref_dtype).requires_grad_() for x in (h, w))
    loss = F.cross_entropy((h @ w.T).to(torch.float64 if ref_dtype == torch.float64 else torch.float32), y, reduction=reduction)
    loss.backward(grad.to(loss.dtype))
    return loss.detach(), h.grad, w.grad


def fused(h, w, y, reduction, grad, **kw):
    h, w = (x.detach().clone().requires_grad_() for x in (h, w))
    loss = lasp.linear_cross_entropy(h, w, y, reduction=reduction, **kw)
    loss.backward(grad)
    return loss.detach(), h.grad, w.grad


CASES = [(r, d, c) for r in lce.REDUCTIONS for d in ("fp32", "bf16") for c in (16, 20, None)]


@pytest.mark.parametrize("reduction,dtype,chunk", CASES, ids=[f"{r}-{d}-chunk{c}" for r, d, c in CASES])
def test_matches_cross_entropy(reduction, dtype, chunk):
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    h, w, y = inputs(dt, seed=seed_for(reduction, dtype, chunk))
    grad = torch.randn(N) if reduction == "none" else torch.tensor(1.7)
    loss, dh, dw = fused(h, w, y, reduction, grad, chunk_size=chunk)
    ref_loss, ref_dh, ref_dw = reference(h, w, y, reduction, grad)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == dt
    assert_close(ref_loss.float(), loss, rtol=1e-5 if dt == torch.float32 else 1e-2, name="loss")
    assert_close(ref_dh.to(dt), dh, name="dhidden")
    assert_close(ref_dw.to(dt), dw, name="dweight")
    if reduction == "none":
        assert (loss[y == -100] == 0).all()


def test_all_ignored_is_what_cross_entropy_gives():
    """Every row ignored: sum 0, none zeros, mean NaN (0 / 0, as F.cross_entropy); gradients 0."""
    h, w, y = inputs(ignored=slice(None))
    for reduction in lce.REDUCTIONS:
        grad = torch.ones(N) if reduction == "none" else torch.tensor(1.0)
        loss, dh, dw = fused(h, w, y, reduction, grad, chunk_size=16)
        ref = F.cross_entropy(h @ w.T, y, reduction=reduction)
        assert torch.equal(loss.isnan(), ref.isnan()) and torch.equal(loss.nan_to_num(), ref.nan_to_num()), reduction
        assert not dh.any() and not dw.any()


def test_tied_weight_gets_both_gradients():
    """weight = the embedding matrix: the loss's gradient is added to the embedding's."""
    _, _, y = inputs()
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    mix = torch.randn(H, H, generator=torch.Generator().manual_seed(6)) / H**0.5
    grads = []
    for use_fused in (True, False):
        emb = torch.nn.Embedding(V, H)
        torch.nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(7))
        h = torch.tanh(emb(ids) @ mix)
        loss = (lasp.linear_cross_entropy(h, emb.weight, y, reduction="mean", chunk_size=20) if use_fused
                else F.cross_entropy(h @ emb.weight.T, y))
        loss.backward()
        grads.append(emb.weight.grad)
    assert_close(grads[1], grads[0], name="tied dweight")


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm_.default)
        return func(*args, **(kwargs or {}))


def test_frozen_weight_and_no_grad():
    """Only the gradients wanted are computed: none under no_grad (one matmul per chunk)."""
    h, w, y = inputs()
    hg = h.clone().requires_grad_()
    with CountMatmuls() as mode:
        lasp.linear_cross_entropy(hg, w, y, chunk_size=20).backward()
    assert mode.count == 3 * 2  # 3 chunks: logits and dhidden, no dweight
    assert_close(reference(h, w, y, "sum", torch.tensor(1.0))[1].float(), hg.grad, name="dhidden, weight frozen")
    with torch.no_grad(), CountMatmuls() as mode:
        loss = lasp.linear_cross_entropy(hg, w.requires_grad_(), y, chunk_size=20)
    assert mode.count == 3
    assert_close(F.cross_entropy(h @ w.T, y, reduction="sum"), loss, name="no-grad loss")


def test_second_backward_of_a_kept_graph_is_an_error():
    h, w, y = inputs()
    loss = lasp.linear_cross_entropy(h.requires_grad_(), w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reduction='none'"):
        loss.backward()


def test_default_chunk_size():
    """One chunk of fp32 logits is at most 256 MiB: 270 tokens at Qwen3.5's vocabulary."""
    assert lce.CHUNK_BYTES == 256 * 2**20
    assert lce.default_chunk_size(248_320) == 270 and 270 * 248_320 * 4 <= lce.CHUNK_BYTES < 271 * 248_320 * 4
    assert lce.default_chunk_size(256) == 262_144 and lce.default_chunk_size(2**40) == 1


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns, in bytes, and its shape."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() > self.largest[0]:
                self.largest = (o.untyped_storage().nbytes(), tuple(o.shape))
        return out


@pytest.mark.parametrize("reduction", lce.REDUCTIONS)
def test_no_tensor_larger_than_one_chunk(monkeypatch, reduction):
    """The default chunk (CHUNK_BYTES made small) bounds every tensor of forward and backward:
    the largest is one chunk of fp32 logits, never [N, V]."""
    n, v, h_dim = 256, 512, 8  # [V, H] is 16 KiB, one chunk 64 KiB, the logits 512 KiB
    monkeypatch.setattr(lce, "CHUNK_BYTES", 32 * v * 4)
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(n, h_dim, generator=gen, requires_grad=True), torch.randn(v, h_dim, generator=gen, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=gen)
    with LargestAllocation() as mode:
        loss = lasp.linear_cross_entropy(h, w, y, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    assert mode.largest == (32 * v * 4, (32, v))


def test_resident_memory_growth_is_one_chunk():
    """A fresh process (scripts/bench_linear_cross_entropy.py's memory probe): forward + backward at
    N = 2048, V = 32768, H = 64, chunks of 128 tokens grows the resident set by about one chunk of
    logits (16 MiB) plus dweight (8 MiB); the plain path's logits alone would be 256 MiB."""
    cmd = [sys.executable, os.path.join(REPO, "scripts", "bench_linear_cross_entropy.py"), "--child", "fused",
           "--N", "2048", "--V", "32768", "--H", "64", "--chunk-size", "128", "--threads", "1"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    assert 0 < out["peak_growth_mib"] < 64, out


@pytest.mark.parametrize("reduction", lce.REDUCTIONS)
def test_no_host_sync(reduction):
    h, w, y = inputs()
    h.requires_grad_(), w.requires_grad_()
    with no_host_sync():
        loss = lasp.linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=20)
        loss.backward(torch.ones_like(loss))
    assert torch.isfinite(w.grad).all()


BAD = [
    ("hidden", lambda h, w, y: dict(hidden=h[None])),
    ("hidden", lambda h, w, y: dict(hidden=h.long())),
    ("weight", lambda h, w, y: dict(weight=w[:, :4])),
    ("weight", lambda h, w, y: dict(weight=w.double())),
    ("labels", lambda h, w, y: dict(labels=y.float())),
    ("labels", lambda h, w, y: dict(labels=y[:5])),
    ("ignore_index", lambda h, w, y: dict(ignore_index=-100.0)),
    ("reduction", lambda h, w, y: dict(reduction="avg")),
    ("chunk_size", lambda h, w, y: dict(chunk_size=0)),
]


@pytest.mark.parametrize("name,change", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, change):
    h, w, y = inputs()
    args = dict(hidden=h, weight=w, labels=y)
    args.update(change(h, w, y))
    kw = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "labels")}
    with pytest.raises(ValueError, match=rf"^{name} "):
        lasp.linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kw)
