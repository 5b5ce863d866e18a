"""Ranks that call an operator with different shapes get a ValueError naming the mismatch on every
rank (never a gloo abort or a hang), from one small handshake on a fingerprint's first use; later
calls with the same shapes make no handshake."""
from __future__ import annotations

import torch
import torch.distributed as dist

import lasp
from lasp import comm
from lasp.testing import value_error_and_collectives

# field the message must name -> (both ranks' arguments, rank 1's change); distinctive sizes: no other
# test makes these fingerprints, so neither rank has them cached
DELTA = {
    "H": ({}, dict(H=2)),
    "B": ({}, dict(B=2)),
    "K": ({}, dict(K=6)),
    "V": ({}, dict(V=6)),
    "dtype": ({}, dict(dtype=torch.float64)),
    "T_local (ulysses)": (dict(H=2, HV=4, method="ulysses"), dict(T=14)),
    "T_local (zigzag)": (dict(layout="zigzag"), dict(T=14)),
    "use_qk_l2norm": ({}, dict(l2=True)),
}


def delta_call(rank, B=1, T=10, H=1, HV=2, K=5, V=7, dtype=torch.float32, method="lasp2", layout="contiguous", l2=False):
    gen = torch.Generator().manual_seed(rank)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, HV, V, generator=gen, dtype=dtype)
    g, beta = -torch.rand(B, T, HV, generator=gen), torch.rand(B, T, HV, generator=gen)
    return lambda: lasp.gated_delta_rule(q, k, v, g, beta, group=dist.group.WORLD, method=method, layout=layout,
                                         use_qk_l2norm_in_kernel=l2)


def mismatches(rank, world):
    out = {}
    for name, (base, change) in DELTA.items():
        out[name] = value_error_and_collectives(delta_call(rank, **({**base, **change} if rank == 1 else base)))
    gen = torch.Generator().manual_seed(rank)
    D = 3 if rank == 0 else 5  # softmax: different head dims
    x = torch.randn(1, 6, 2, D, generator=gen)
    out["softmax D"] = value_error_and_collectives(lambda: lasp.softmax_attention(x, x, x, group=dist.group.WORLD))
    x = torch.randn(1, 6, 2, 3, generator=gen)
    g = torch.zeros(1, 6, 2) if rank == 0 else None  # linear: g given on one rank only
    out["linear g"] = value_error_and_collectives(lambda: lasp.linear_attention(x, x, x, g, group=dist.group.WORLD))
    return out


def test_rank_shape_mismatch_is_a_value_error_on_every_rank(spawn):
    r0, r1 = spawn(2).run(mismatches)
    for name in (*DELTA, "softmax D", "linear g"):
        (msg0, tags0), (msg1, tags1) = r0[name], r1[name]
        assert msg0 == msg1 and msg0 is not None, (name, msg0, msg1)
        assert tags0 == tags1 == [], (name, tags0)  # nothing of the operator ran
        field = name.split()[-1] if name.startswith(("softmax", "linear")) else name.split()[0]
        assert f"same {field}" in msg0 or f", {field}" in msg0, (name, msg0)
        assert "rank 0" in msg0 and "rank 1" in msg0, msg0


def same_shapes_twice(rank, world):
    counts = []
    for _ in range(2):
        with comm.record() as log:
            delta_call(0, T=12, K=3, V=9)()
        counts.append(len(log.checks))
    return counts


def test_same_shapes_are_checked_once(spawn):
    for counts in spawn(2).run(same_shapes_twice):
        assert counts == [1, 0], counts


def ulysses_heads_before_handshake(rank, world):
    """Ulysses with heads that P does not divide: the ValueError comes before the shape handshake
    (a collective) as well as before the operator's own collectives."""
    group, out = dist.group.WORLD, []
    x = torch.randn(1, 6, 1, 3, generator=torch.Generator().manual_seed(rank))  # H = 1 over P = 2
    calls = [lambda: lasp.linear_attention(x, x, x, group=group, method="ulysses"),
             lambda: lasp.softmax_attention(x, x, x, group=group, method="ulysses"),
             delta_call(rank, T=6, H=1, HV=3, K=2, V=3, method="ulysses")]
    for call in calls:
        with comm.record() as log:
            msg, tags = value_error_and_collectives(call)
        out.append((msg, tags, [e.tag for e in log.checks]))
    return out


def test_ulysses_heads_checked_before_handshake(spawn):
    for results in spawn(2).run(ulysses_heads_before_handshake):
        for msg, tags, checks in results:
            assert msg is not None and "divisible" in msg and "P=2" in msg, msg
            assert tags == [] and checks == [], (msg, tags, checks)


def conv_unequal_contiguous_shards(rank, world):
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 15, 4, generator=gen), torch.randn(4, 3, generator=gen)
    mine = slice(0, 6) if rank == 0 else slice(6, 15)
    whole = lasp.causal_conv1d(x, weight, activation="silu")[:, mine]
    return (lasp.causal_conv1d(x[:, mine], weight, activation="silu", group=dist.group.WORLD) - whole).abs().max().item()


def test_conv_takes_unequal_contiguous_shards(spawn):
    """Only the W-1 token halo crosses ranks on a contiguous layout: shards of 6 and 9 tokens are fine."""
    assert max(spawn(2).run(conv_unequal_contiguous_shards)) < 1e-6
