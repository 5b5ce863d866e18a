"""Naive oracle of the (gated) delta rule: token by token, float64-capable, obviously right.

Per (batch, head), tokens t = 1..T, state ``S`` of shape ``K x V``::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

Layout: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g and beta ``[B, T, HV]`` (``g=None``: plain
DeltaNet); ``HV`` a multiple of ``H`` (GVA: value head ``j`` reads q/k head ``j // (HV // H)``, as
``repeat_interleave`` of q, k in transformers' Qwen3.5 and fla's kernels). Argument names as
flash-linear-attention's; the ORDER is that of its public ``chunk_gated_delta_rule(q, k, v, g, beta,
...)``, used by every lasp delta-rule function (fla's ``naive_recurrent_gated_delta_rule`` alone
takes ``beta, g``).
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's / transformers' ``l2norm``)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    compute_dtype: torch.dtype = torch.float64,
):
    """The gated delta rule over the whole sequence, one token at a time.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV]`` or None; beta: ``[B, T, HV]``.
        scale: default ``K ** -0.5``.
        initial_state: ``[B, HV, K, V]`` state before the first token (zeros if None).
        use_qk_l2norm: L2-normalise q and k per head first (inside, so gradients include it).
        compute_dtype: dtype of the recurrence (float64 by default: this is the oracle).
    Returns:
        ``o [B, T, HV, V]`` in q's dtype, and the final state ``[B, HV, K, V]`` (compute dtype)
        when ``output_final_state``.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[-1]
    dtype = q.dtype
    cd = compute_dtype
    scale = K**-0.5 if scale is None else scale
    q, k, v = (x.to(cd).transpose(1, 2) for x in (q, k, v))  # [B, heads, T, D]
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = (x.repeat_interleave(HV // H, dim=1) for x in (q, k))  # GVA (the oracle may repeat)
    beta = beta.to(cd).transpose(1, 2)  # [B, HV, T]
    gate = None if g is None else g.to(cd).transpose(1, 2).exp()
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(cd)
    outs = []
    for t in range(T):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None, None]
        # exp(g) (I - b k k^T) S + b k v^T  ==  S' + b k (v - S'^T k)^T  with  S' = exp(g) S
        if gate is not None:
            S = gate[:, :, t, None, None] * S
        kS = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + bt * kt[..., :, None] * (vt - kS)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S) * scale)
    o = torch.stack(outs, dim=2).transpose(1, 2).to(dtype)
    return (o, S) if output_final_state else o
