"""The transition algebra of lasp.ops.affine: vectorised scalar folds vs the plain recurrences,
scalar vs matrix (A = e^logA I), hard resets (-inf), packing, and the transition gradient."""
from __future__ import annotations

import pytest
import torch

from lasp.ops import affine
from lasp.testing import assert_close

N, B, H, K, V = 6, 2, 3, 4, 5


def draws(resets: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logA = -torch.rand(N, B, H, generator=gen) * 2
    if resets:
        logA[0] = float("-inf")  # the first segment cuts the initial state
        logA[3, 0, 1] = float("-inf")
        logA[N - 1] = float("-inf")  # the last segment cuts everything before it
    M, dS = torch.randn(2, N, B, H, K, V, generator=gen)
    S0, G_N = torch.randn(2, B, H, K, V, generator=gen)
    return logA, M, dS, S0, G_N


def loop_prefix(logA, M, S0):
    S, out = S0, [S0]
    for p in range(N):
        S = logA[p].exp()[..., None, None] * S + M[p]
        out.append(S)
    return torch.stack(out)


def loop_suffix(logA, dS, G_N):
    G, out = G_N, [G_N]
    for p in reversed(range(N)):
        G = dS[p] + logA[p].exp()[..., None, None] * G
        out.append(G)
    return torch.stack(out[::-1])


@pytest.mark.parametrize("resets", [False, True], ids=["finite", "resets"])
@pytest.mark.parametrize("kind", affine.KINDS)
def test_folds_match_the_recurrences(kind, resets):
    logA, M, dS, S0, G_N = draws(resets)
    A = logA if kind == "scalar" else logA.exp()[..., None, None] * torch.eye(K)
    rows = [0, 2, 3, N]
    got = affine.prefix_states(kind, A, M, S0, rows)
    assert torch.isfinite(got).all()
    assert_close(loop_prefix(logA, M, S0)[rows], got, name="prefix")
    got = affine.suffix_grads(kind, A, dS, G_N, rows)
    assert torch.isfinite(got).all()
    assert_close(loop_suffix(logA, dS, G_N)[rows], got, name="suffix")
    zero = affine.prefix_states(kind, A, M, None, [N])
    assert_close(loop_prefix(logA, M, torch.zeros_like(S0))[N:], zero, name="prefix from zero")


def test_transfer_weights_with_resets_are_finite_and_triangular():
    logA = draws(True)[0]
    W = affine.transfer_weights(logA)
    assert torch.isfinite(W).all() and (W >= 0).all() and (W <= 1).all()
    assert (W.permute(2, 3, 0, 1).triu(1) == 0).all()  # W[j, i] = 0 for i > j
    assert (W.diagonal(dim1=0, dim2=1) == 1).all()


@pytest.mark.parametrize("kind", affine.KINDS)
def test_pack_unpack_roundtrip_and_sizes(kind):
    A = -torch.rand(B, H) if kind == "scalar" else torch.randn(B, H, K, K)
    X = torch.randn(B, H, K, V)
    buf = affine.pack(kind, A, X)
    assert buf.shape == (B, H, affine.numel(kind, K) + K * V) and buf.dtype == torch.float32
    A2, X2 = affine.unpack(kind, torch.stack([buf, buf]), K, V)
    assert torch.equal(A2[1], A) and torch.equal(X2[0], X)


@pytest.mark.parametrize("kind", affine.KINDS)
def test_grad_A_is_the_gradient_of_apply(kind):
    gen = torch.Generator().manual_seed(1)
    A = (-torch.rand(B, H, generator=gen)) if kind == "scalar" else torch.randn(B, H, K, K, generator=gen)
    A = A.double().requires_grad_()
    S, G = torch.randn(2, B, H, K, V, generator=gen).double()
    (affine.apply(kind, A, S) * G).sum().backward()
    assert_close(A.grad, affine.grad_A(kind, A.detach(), G, S), name="dA")
    assert_close((affine.apply_t(kind, A.detach(), G) * S).sum(), (affine.apply(kind, A.detach(), S) * G).sum(), name="transpose")
