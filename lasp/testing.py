"""Closeness metric and random inputs shared by the tests and benchmarks (DESIGN.md §4)."""
from __future__ import annotations

import contextlib
import random
import zlib

import torch

#: Relative-error bounds of the numerics contract, by input dtype.
RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf for NaN/inf anywhere, or a shape mismatch)."""
    if ref.shape != out.shape:
        return float("inf")
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(ref: torch.Tensor, out: torch.Tensor, rtol: float | None = None, name: str = "tensor") -> float:
    """Assert ``rel_error(ref, out) <= rtol`` (default by ``out``'s dtype); NaN never passes."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    rtol = RTOL.get(out.dtype, 1e-5) if rtol is None else rtol
    err = rel_error(ref, out)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.0e}")
    return err


def assert_close_sum(ref: torch.Tensor, out: torch.Tensor, summands_abs: torch.Tensor, rtol: float, name: str = "tensor") -> float:
    """Assert a REDUCTION (e.g. ``dg_gamma = sum over batch and tokens of dL/da``) is accurate.

    A sum of terms that cancel is ill-conditioned: its true value can be tiny next to its
    terms, and no fp32 computation gets it to ``rtol`` relative to itself (seen here: terms
    29,000x larger than their sum). The error is therefore measured against the sum of the
    terms' magnitudes ``summands_abs`` (the sum's condition scale), the standard error bound of
    a summation: ``||out - ref|| / max(||ref||, ||summands_abs||) <= rtol``.
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out.detach()).all():
        raise AssertionError(f"{name}: not finite")
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    scale = max(ref.detach().double().norm().item(), summands_abs.detach().double().norm().item())
    err = diff / scale if scale > 0 else diff
    if not err <= rtol:
        raise AssertionError(f"{name}: error {err:.3e} relative to the summands' magnitude > {rtol:.0e}")
    return err


def seed_for(*parts) -> int:
    """A stable seed from a test case's parameters (``hash`` of strings changes every run)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def linear_inputs(B, T, H, K, V, *, gates: str = "none", dtype=torch.float32, seed: int = 0, device="cpu", resets=()):
    """Random q, k, v, g, g_gamma for linear attention, fresh from ``seed`` (never zeros).

    ``gates``: ``none`` | ``g`` | ``g_gamma`` | ``both``. Gates are log-sigmoid-like values in
    (-0.5, -0.01) so decays are real but states do not vanish on short sequences.
    ``resets``: token positions where ``g = -inf`` (a hard reset; needs ``g``), in every
    (batch, head) row but the last head of the last batch entry, so one call mixes both.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = g_gamma = None
    if gates in ("g", "both"):
        g = -(torch.rand(B, T, H, generator=gen) * 0.49 + 0.01)
        keep = g[-1, :, -1].clone()
        g[:, list(resets)] = float("-inf")
        g[-1, :, -1] = keep
    elif resets:
        raise ValueError("resets need gates='g' or 'both'")
    if gates in ("g_gamma", "both"):
        g_gamma = -(torch.rand(H, generator=gen) * 0.2 + 0.01)
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), (None if g is None else g.to(device)), (None if g_gamma is None else g_gamma.to(device))


def delta_inputs(B, T, H, K, V, *, gates="g", dtype=torch.float32, l2norm=False, init=False, seed=0, device="cpu", hv=None):
    """Random ``[q, k, v, g, beta, initial_state]`` for the gated delta rule, in the order of
    :func:`lasp.gated_delta_rule` (fla's; never zeros): beta in
    (0.05, 0.95), g (fp32, ``gates="g"``; ``"reset"`` adds hard resets, ``"none"``: None) in
    (-0.41, -0.01). Without in-op L2 norm (``l2norm=False``) the keys are unit vectors (as a GDN
    layer makes them), so the recurrence stays bounded. ``hv``: value heads (GVA; default H) of v,
    g, beta and the state."""
    gen = torch.Generator().manual_seed(seed)
    HV = H if hv is None else hv
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not l2norm:
        k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    beta = torch.rand(B, T, HV, generator=gen) * 0.9 + 0.05
    g = None
    if gates in ("g", "reset"):
        g = -(torch.rand(B, T, HV, generator=gen) * 0.4 + 0.01)
        if gates == "reset":  # hard resets (exp(g) = 0), inside and at the edge of chunks
            g[0, T // 3, 0] = g[-1, T - 1, -1] = g[0, 0, -1] = float("-inf")
    s0 = torch.randn(B, HV, K, V, generator=gen) if init else None
    cast = lambda x, dt=dtype: None if x is None else x.to(device=device, dtype=dt)  # noqa: E731
    return [cast(q), cast(k), cast(v), cast(g, torch.float32), cast(beta), cast(s0, torch.float32)]


def softmax_inputs(B, T, H, H_kv, D, dtype=torch.float32, seed=0):
    """Random q ``[B, T, H, D]``, k, v ``[B, T, H_kv, D]`` and an output gradient for softmax
    attention (never zeros): ``([q, k, v], do)`` in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    q, do = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, H, D, generator=gen)
    k, v = torch.randn(B, T, H_kv, D, generator=gen), torch.randn(B, T, H_kv, D, generator=gen)
    return [x.to(dtype) for x in (q, k, v)], do.to(dtype)


def document_starts(seq_len: int, n_docs: int, seed: int = 0) -> torch.Tensor:
    """``cu_seqlens [n_docs + 1]`` (int64): ``n_docs`` documents of random lengths (>= 1) filling
    ``seq_len`` tokens; seeded, so identical on every rank."""
    cuts = sorted(random.Random(seed).sample(range(1, seq_len), n_docs - 1))
    return torch.tensor([0, *cuts, seq_len], dtype=torch.int64)


#: What reads a device value on the host (a host-device synchronisation on a GPU).
HOST_SYNCS = (
    (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"), (torch.Tensor, "numpy"),
    (torch.Tensor, "count_nonzero"), (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"),
    (torch.Tensor, "__int__"), (torch, "count_nonzero"),
)


class HostSyncError(AssertionError):
    """Raised by :func:`no_host_sync` when an operator reads a device value on the host."""


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, :data:`HOST_SYNCS` (``Tensor.item/.tolist/.cpu/.numpy``,
    ``count_nonzero``, ``bool/float/int(tensor)``) raise :class:`HostSyncError`: run an operator's forward
    and backward in it to show they never wait for the device. Not thread-safe (patches torch)."""

    def forbid(name: str):
        def raise_(*args, **kwargs):
            raise HostSyncError(f"host-device synchronisation inside an operator: {name}")

        return raise_

    saved = [(obj, name, obj.__dict__.get(name)) for obj, name in HOST_SYNCS]
    try:
        for obj, name in HOST_SYNCS:
            setattr(obj, name, forbid(f"{getattr(obj, '__name__', obj)}.{name}"))
        yield
    finally:
        for obj, name, old in saved:
            if old is None:
                delattr(obj, name)  # inherited (from torch's C base class): unshadow it
            else:
                setattr(obj, name, old)


def full_and_cached_logits(model, ids: torch.Tensor, prefill: int):
    """``(one full forward, the same ids decoded with the cache: a prefill of ``prefill`` tokens,
    then one token per step, cache)``: the logits a decoding test compares."""
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model.forward_cached(ids[:, :prefill], cache, start_pos=0)]
        for t in range(prefill, ids.shape[1]):
            steps.append(model.forward_cached(ids[:, t : t + 1], cache, start_pos=t))
    return full, torch.cat(steps, dim=1), cache


def value_error_and_collectives(call) -> tuple[str | None, list[str]]:
    """Run ``call()``: its ValueError message (None when it returns) and the tags of the
    collectives it made first (bad input must fail before any)."""
    from . import comm

    with comm.record() as log:
        try:
            call()
        except ValueError as e:
            return str(e), [ev.tag for ev in log.events]
    return None, [ev.tag for ev in log.events]


def drive_segment(make, state: torch.Tensor, do: torch.Tensor, dM: torch.Tensor, dA: torch.Tensor):
    """Drive one segment through the protocol exactly as LASP-2 does (:mod:`lasp.ops.segment`):
    forward on ``make()``, backward on a second ``make()`` (the drivers rebuild their segments);
    ``({A or logA, M, o, dS_in}, [input gradients])``; ``A`` under the key ``"A"``."""
    seg = make()
    A, M = seg.summary()
    seg.compute_local()
    o = seg.output(state)
    seg = make()
    ds = seg.state_grad(do)
    seg.prepare_backward(state)
    seg.backward_output(do)
    seg.backward_summary(dM, dA)
    return dict(A=A, M=M, o=o, dS_in=ds), list(seg.grads())


# ----------------------------------------------------------------------------- activation memory census


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def saved_storage_bytes(root: torch.Tensor, exclude=()) -> int:
    """Bytes of the distinct storages the autograd graph of ``root`` keeps for backward (tensors
    saved by its nodes, custom Functions' ``save_for_backward`` included), except those of the
    tensors in ``exclude`` (parameters, the inputs): the census the memory estimate is checked on."""
    skip = {_storage_key(t) for t in exclude}
    seen: set = set()
    total, stack, visited = 0, [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    v = getattr(node, name)
                except RuntimeError:  # freed already
                    continue
                tensors += [v] if isinstance(v, torch.Tensor) else [x for x in v if isinstance(x, torch.Tensor)] if isinstance(v, (tuple, list)) else []
        if not tensors and hasattr(node, "saved_tensors"):
            tensors = [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        for t in tensors:
            key = _storage_key(t)
            if key not in skip and key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return total


class SavedTensorCensus(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct storages saved for backward while active, by device
    (``census.bytes["cpu"]``). Saved-tensor hooks do not nest: tensors saved under inner hooks
    (activation checkpointing's, :class:`lasp.models.offload.HostOffload`) are theirs, not counted."""

    def __init__(self, exclude=()):
        self.bytes: dict[str, int] = {}
        skip = {_storage_key(t) for t in exclude}
        seen: set = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _storage_key(t)
            if key not in skip and key not in seen:
                seen.add(key)
                self.bytes[str(t.device)] = self.bytes.get(str(t.device), 0) + t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)


def live_peak_bytes(fn) -> int:
    """Peak bytes of the CPU tensors allocated while ``fn()`` runs, above what was allocated before
    (the profiler's memory events; frees of earlier tensors are not seen, so this is an upper bound
    when ``fn`` frees tensors it did not allocate)."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base
