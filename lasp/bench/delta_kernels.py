"""The gated delta rule cases of ``lasp bench kernels --op gated_delta``.

Providers ``f(q, k, v, beta, g, scale) -> o``: ``triton`` and ``torch``
(``lasp.gated_delta_rule(..., backend=)``) and ``fla`` (flash-linear-attention's
``chunk_gated_delta_rule``) when importable, all with the in-kernel q/k L2 norm (as a Gated
DeltaNet layer calls them). FLOPs: an estimate of the chunked WY algorithm (chunk ``C``, per batch
and head, the same for every provider): forward ``2 T C (3K + 2V) + 8 T K V``, backward twice that.
"""
from __future__ import annotations

import inspect

import torch

from ..ops.delta_reference import naive_gated_delta_rule
from ..testing import rel_error


def delta_flops(B: int, H: int, T: int, K: int, V: int, mode: str, C: int = 64) -> float:
    fwd = 2 * T * C * (3 * K + 2 * V) + 8 * T * K * V
    return float(B * H * fwd * (3 if mode == "fwdbwd" else 1))


def delta_inputs(B: int, T: int, H: int, K: int, V: int, *, dtype, device, seed: int = 0) -> list[torch.Tensor]:
    """Random ``q, k, v, beta`` in ``dtype`` and fp32 log gates ``g`` in (-0.41, -0.01) (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.rand(B, T, H, generator=gen) * 0.9 + 0.05
    g = -(torch.rand(B, T, H, generator=gen) * 0.4 + 0.01)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, beta)] + [g.to(device)]


def fla_gdn_fn():
    """flash-linear-attention's ``chunk_gated_delta_rule`` as ``f(q, k, v, beta, g, scale)``, or None."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    params = inspect.signature(chunk_gated_delta_rule).parameters

    def run(q, k, v, beta, g, scale):
        kw = {"head_first": False} if "head_first" in params else {}
        out = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=True, **kw)
        return out[0] if isinstance(out, tuple) else out

    return run


def delta_providers(device: torch.device, wanted: list[str]) -> dict:
    """name -> ``f(q, k, v, beta, g, scale) -> o``, for those available on ``device``."""
    import lasp

    def ours(backend: str):
        return lambda q, k, v, b, g, s: lasp.gated_delta_rule(q, k, v, b, g, scale=s, use_qk_l2norm_in_kernel=True, backend=backend)

    table = {"torch": ours("torch")}
    if device.type == "cuda":
        table.update(triton=ours("triton"), fla=fla_gdn_fn())
    return {n: table[n] for n in wanted if table.get(n) is not None}


def delta_check_provider(fn, name: str, dims: list[int], gates: str, device: torch.device) -> list[dict]:
    """Rel. errors vs the float64 oracle (outputs and all gradients), fp32 and bf16, T = 777
    (fla's chunk_gated_delta_rule refuses fp32: bf16 only for it)."""
    rows = []
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    for dname, dtype in dtypes[1:] if name == "fla" else dtypes:
        for d in dims:
            full = delta_inputs(2, 777, 4, d, d, dtype=dtype, device=device, seed=2 * d)
            do = torch.randn(2, 777, 4, d, generator=torch.Generator().manual_seed(d)).to(device=device, dtype=dtype)
            ins = [x.clone().requires_grad_() for x in full]
            ref_in = [x.detach().double().requires_grad_() for x in full]
            o = fn(*ins, d**-0.5)
            ref = naive_gated_delta_rule(*ref_in, scale=d**-0.5, use_qk_l2norm=True)
            o.backward(do)
            ref.backward(do.double())
            errs = {"o": rel_error(ref, o)}
            for n, a, r in zip(("q", "k", "v", "beta", "g"), ins, ref_in):
                errs["d" + n] = None if a.grad is None else rel_error(r.grad, a.grad)
            bound = {"fp32": 1e-5, "bf16": 1e-2}[dname]
            ok = all(e is None or e <= bound for e in errs.values())
            rows.append({"provider": name, "op": "gated_delta", "dtype": dname, "K": d, "V": d, "errors": errs, "ok": ok})
            print(f"check {name:6s} gated_delta {dname} K=V={d}: " + " ".join(
                f"{n}={'none' if e is None else f'{e:.1e}'}" for n, e in errs.items()) + ("" if ok else "  FAIL"))
    return rows
