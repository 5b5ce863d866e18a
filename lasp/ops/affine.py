"""The algebra of segment transitions: ``S_out = A S_in + M`` for the scalar and matrix families.

A segment's *summary* is the affine map its tokens apply to the state entering it
(:mod:`lasp.ops.segment`). Two kinds of transition ``A`` (float32):

- ``"scalar"`` (diagonal decay: basic / lightning / retention / simple GLA): ``logA [..., B, H]``,
  ``A S = e^logA S``; ``logA = -inf`` is a hard reset (``A = 0``);
- ``"matrix"`` (delta rule): ``A [..., B, H, K, K]``, ``A S = A @ S``.

States ``S``, ``M`` and state gradients ``G`` are ``[..., B, H, K, V]``. The folds work on the
segments of the whole sequence in global order (``N`` of them, index 0 first):

- prefix: ``S_0`` = the initial state (zeros if None), ``S_{p+1} = A_p S_p + M_p``;
  ``S_p`` enters segment p and ``S_N`` is the final state;
- suffix: ``Gtot_N = G_N`` (the final state's gradient, zeros if None),
  ``Gtot_p = dS_in_p + A_p^T Gtot_{p+1}``; ``Gtot_p`` is the total gradient of ``S_p``.

Both take ``rows``, the indices in ``0..N`` wanted, so a rank computes only its own segments'
states (and the final state). The scalar folds are one masked exp-weighted sum: with
``W[j, i] = exp(sum_{i <= t < j} logA_t)`` for ``i <= j`` (else 0), ``S_p = sum_{i<=p} W[p, i] M'_i``
with ``M' = (S_0, M_0, .., M_{N-1})`` and ``Gtot_p = sum_{j>=p} W[j, p] D_j`` with
``D = (dS_in_0, .., dS_in_{N-1}, G_N)``. Every exponent is a sum of log-decays, hence <= 0 (no
overflow); the segment sums are formed by a masked cumulative sum, never by differences of
prefix sums, so ``-inf`` never meets ``-inf`` (no NaN). The matrix folds are a loop of N small
matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("scalar", "matrix")


def numel(kind: str, K: int) -> int:
    """Floats per (batch, head) in one transition: 1 (scalar) or ``K*K`` (matrix)."""
    return 1 if kind == "scalar" else K * K


def apply(kind: str, A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``A S``: ``S [..., K, V]``."""
    if kind == "scalar":
        return A.exp()[..., None, None] * S
    return A @ S


def apply_t(kind: str, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``A^T G``: the transposed map, for gradients."""
    if kind == "scalar":
        return A.exp()[..., None, None] * G
    return A.transpose(-1, -2) @ G


def grad_A(kind: str, A: torch.Tensor, G: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Gradient of ``<G, A S>`` w.r.t. the transition: ``dlogA = e^logA <G, S>`` or ``dA = G S^T``."""
    if kind == "scalar":
        return A.exp() * (G * S).sum((-1, -2))
    return G @ S.transpose(-1, -2)


def pack(kind: str, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """One float32 buffer ``[B, H, numel + K*V]`` from a transition and a ``[B, H, K, V]`` state."""
    B, H = X.shape[:2]
    a = A[..., None] if kind == "scalar" else A.reshape(B, H, -1)
    return torch.cat([a.float(), X.reshape(B, H, -1).float()], -1)


def unpack(kind: str, buf: torch.Tensor, K: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack` for a batch of buffers ``[..., B, H, numel + K*V]``."""
    n = numel(kind, K)
    a, x = buf[..., :n], buf[..., n:]
    A = a[..., 0] if kind == "scalar" else a.reshape(*a.shape[:-1], K, K)
    return A, x.reshape(*x.shape[:-1], K, V)


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """``[..., C, C]``: ``sum_{l=j+1..i} g_l`` at ``[i, j]`` for ``j <= i`` (0 on the diagonal), -inf
    above it. ``g [..., C]`` may hold -inf: every entry is a sum of values <= 0 (a masked cumulative
    sum), so -inf only ever adds to finite or -inf (no NaN)."""
    C = g.shape[-1]
    x = g[..., :, None].expand(*g.shape, C)  # x[i, j] = g_i
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    gam = x.masked_fill(~strict, 0.0).cumsum(-2)
    return gam.masked_fill(~strict.logical_or(torch.eye(C, dtype=torch.bool, device=g.device)), float("-inf"))


def transfer_weights(logA: torch.Tensor) -> torch.Tensor:
    """``W [N+1, N+1, B, H]`` with ``W[j, i] = exp(sum_{i <= t < j} logA_t)`` for ``i <= j``, else 0:
    the :func:`segment_sums` of ``logA [N, B, H]`` (may hold -inf) after a leading 0."""
    return segment_sums(F.pad(logA.permute(1, 2, 0), (1, 0))).exp().permute(2, 3, 0, 1)


def prefix_states(kind: str, A: torch.Tensor, M: torch.Tensor, S0: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
    """States ``S_p`` for ``p in rows`` (``0..N``; ``N`` = final state) -> ``[len(rows), B, H, K, V]``.

    ``A``: ``logA [N, B, H]`` or ``[N, B, H, K, K]``; ``M [N, B, H, K, V]``; ``S0 [B, H, K, V]`` or None.
    """
    first = torch.zeros_like(M[0]) if S0 is None else S0.float()
    if kind == "scalar":
        W = transfer_weights(A)[rows]  # [R, N+1, B, H]
        items = torch.cat([first[None], M])  # [N+1, B, H, K, V]
        return torch.einsum("rnbh,nbhkv->rbhkv", W, items)
    wanted, out, S = set(rows), {}, first
    for p in range(max(rows) + 1):
        if p in wanted:
            out[p] = S
        if p < M.shape[0]:
            S = A[p] @ S + M[p]
    return torch.stack([out[p] for p in rows])


def suffix_grads(kind: str, A: torch.Tensor, dS: torch.Tensor, G_N: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
    """Total state gradients ``Gtot_p`` for ``p in rows`` (``0..N``) -> ``[len(rows), B, H, K, V]``.

    ``dS [N, B, H, K, V]``: each segment's ``dL/dS_in`` from its own outputs; ``G_N`` the final
    state's gradient or None.
    """
    last = torch.zeros_like(dS[0]) if G_N is None else G_N.float()
    if kind == "scalar":
        W = transfer_weights(A)[:, rows]  # [N+1, R, B, H]
        items = torch.cat([dS, last[None]])
        return torch.einsum("nrbh,nbhkv->rbhkv", W, items)
    wanted, out, G = set(rows), {}, last
    N = dS.shape[0]
    for p in range(N, min(rows) - 1, -1):
        if p < N:
            G = dS[p] + A[p].transpose(-1, -2) @ G
        if p in wanted:
            out[p] = G
    return torch.stack([out[p] for p in rows])
