"""The gated linear recurrence token by token, and the per-token log decay every path builds.

``a_t = g_t + g_gamma`` (log decay, <= 0; ``-inf`` is a hard reset), ``S_t = exp(a_t) S_{t-1} +
k_t^T v_t``, ``o_t = scale * q_t S_t``. The float64 oracle (:mod:`lasp.ops.reference`) runs
:func:`recurrent_update` over every token, the chunked torch path (:mod:`lasp.ops.chunk`) and
the torch segment use :func:`log_gates`, and a model's decoding step is :func:`recurrent_step`.
"""
from __future__ import annotations

import torch

#: Log decays below this reset the state: ``e^a < 4e-44``, under fp32's smallest normal number,
#: so a decayed state contributes nothing an fp32 result can hold. The chunked paths (torch and
#: Triton) treat such a gate, ``-inf`` included, as an exact reset: they keep a per-chunk count
#: of resets next to the cumulative sum of the other gates, and a decay ``e^(G_i - G_j)`` is 0
#: when a reset lies between j and i, else the exponent of a difference of finite sums. So
#: nothing computes ``-inf - (-inf)``, and no gate this large enters a cumulative sum whose
#: differences would lose fp32 precision. The oracle computes ``e^a`` as given.
RESET_LOG_DECAY = -100.0


def log_gates(
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    B: int,
    T: int,
    H: int,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """Per-token log decay ``a = g + g_gamma`` as ``[B, H, T]`` in ``dtype``, or None without gates.

    g: ``[B, T, H]`` or None; g_gamma: ``[H]`` or None (autograd flows to both).
    """
    if g is None and g_gamma is None:
        return None
    a = torch.zeros(B, H, T, dtype=dtype, device=device)
    if g is not None:
        a = a + g.transpose(1, 2).to(dtype)
    if g_gamma is not None:
        a = a + g_gamma.to(dtype)[None, :, None]
    return a


def recurrent_update(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor | None, state: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token, heads first, computed in ``state``'s dtype.

    q, k ``[B, H, K]``, v ``[B, H, V]``, log_a ``[B, H]`` or None (no decay), state ``[B, H, K, V]``.
    Returns ``(o [B, H, V], new state [B, H, K, V])``, both in ``state``'s dtype.
    """
    cd = state.dtype
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    kv = k[..., :, None] * v[..., None, :]
    state = kv + (state if log_a is None else log_a.to(cd).exp()[..., None, None] * state)
    o = torch.einsum("bhk,bhkv->bhv", q, state) * scale
    return o, state


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step in the operators' layout (``lasp.linear_attention``'s semantics).

    q, k ``[B, 1, H, K]``, v ``[B, 1, H, V]``, g ``[B, 1, H]`` or None, g_gamma ``[H]`` or None,
    state ``[B, H, K, V]`` float32; scale defaults to ``K ** -0.5``. Returns ``(o [B, 1, H, V]``
    in q's dtype, the new float32 state); memory is constant in the context length.
    """
    B, _, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    a = log_gates(g, g_gamma, B, 1, H, q.device)
    o, state = recurrent_update(q[:, 0], k[:, 0], v[:, 0], None if a is None else a[..., 0], state.float(), scale)
    return o[:, None].to(q.dtype), state
