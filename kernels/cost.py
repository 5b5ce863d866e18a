"""Bytes moved and FLOPs per token and head of the chunked gated delta rule, forward + backward at
P = 1, for lasp's kernels and for flash-linear-attention's ``chunk_gated_delta_rule``
(``python -m lasp.kernels.cost``).

Computed from the kernels, not measured: each entry below restates one kernel's global loads and
stores (with the re-reads its tiling implies: a ``[BT, K]`` tile loaded by each of the ``V / BV``
programs of a chunk counts ``V / BV`` times) and its dots (``2 M N K`` FLOPs each; elementwise work
is left out), per chunk of ``BT`` tokens, divided by ``BT``. lasp's entries follow
``kernels/gated_delta`` (the launchers' tile sizes: ``BK = min(K, 64)``, ``BV = min(V, 64)``, state
tiles ``col_block``); fla's follow fla-core 0.6.0 (``chunk_gated_delta_rule_fwd/bwd``: the fused
kkt + solve kernel, ``recompute_w_u_fwd``, ``chunk_gated_delta_rule_fwd_h``, ``chunk_fwd_o``,
``chunk_bwd_dv_local``, ``chunk_gated_delta_rule_bwd_dhu``, ``chunk_bwd_dqkwg``,
``prepare_wy_repr_bwd``, the gate cumsums; at its 64-wide tiles, ``BV = 64`` in the autotuned
state kernels). Both without the in-kernel L2 norm, no initial or final state. Cache reuse (a
re-read that hits L2) is not modelled: these are upper bounds on DRAM traffic of the same kind
for both.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class Cost:
    kernel: str
    phase: str  # "fwd" | "bwd"
    read: float  # bytes per chunk
    write: float
    flops: float


def lasp_costs(K: int, V: int, BT: int = 64, ib: int = 2, gated: bool = True) -> list[Cost]:
    """lasp's launches at P = 1 (``lasp.gated_delta_rule(..., backend="triton")``, no initial or
    final state): forward wy + state pass (summary from zeros, kept) + outputs; backward the same
    wy + state pass (the segment is rebuilt), dv_local, the reverse pass, the two local kernels.
    ``ib``: bytes of an input element; the factors are fp32, the snapshots bf16 for 16-bit inputs."""
    from .gated_delta.common import col_block

    C, f4 = BT, 4
    sb = 2 if ib == 2 else 4
    BV = min(V, 64)
    BS, BSb = col_block(K, V), col_block(K, V, 4096)  # the state passes' column tiles (forward, reverse)
    nV, nS, nSb = V // BV, V // BS, V // BSb
    g = C * 4 if gated else 0
    wy = Cost("wy_fwd", "fwd",
              read=C * ib + 2 * g + 2 * C * K * ib + C * K * f4 + C * V * ib + (10 / 16 + 1) * C * C * f4,
              write=3 * C * f4 + 3 * C * K * f4 + C * V * f4 + (1 + 10 / 16) * C * C * f4,
              flops=2 * C * C * K + 16 * 2 * 16**3 + 2 * C * C * K + 2 * C * C * V)
    state = Cost("state_fwd (from zeros, kept)", "fwd",
                 read=nS * (2 * C * K * f4 + 3 * C * f4) + C * V * f4, write=K * V * sb + C * V * sb,
                 flops=2 * 2 * C * K * V)
    out = Cost("output_fwd", "fwd",
               read=nV * (2 * C * K * f4 + 3 * C * f4) + K * V * sb + C * V * sb, write=C * V * f4,
               flops=nV * 2 * C * C * K + 2 * C * K * V + 2 * C * C * V)
    cast_o = Cost("o to the input dtype (torch)", "fwd", read=C * V * f4, write=C * V * ib, flops=0)
    dvl = Cost("dv_local", "bwd", read=nV * (2 * C * K * f4 + 2 * C * f4) + C * V * ib, write=C * V * f4,
               flops=nV * 2 * C * C * K + 2 * C * C * V)
    sbwd = Cost("state_bwd (dO)", "bwd",
                read=nSb * (3 * C * f4 + 3 * C * K * f4) + C * V * f4 + C * V * ib,
                write=K * V * sb + C * V * f4, flops=3 * 2 * C * K * V)
    BKd, BKq = min(K, 64), min(K, 32)
    nKd, nKq = K // BKd, K // BKq
    dk = Cost("dk_bwd", "bwd",
              read=nKd * (3 * C * f4 + C * V * (sb + f4)) + 2 * K * V * sb + C * K * f4,
              write=2 * C * K * f4 + nKd * C * f4, flops=2 * 2 * C * K * V)
    dq = Cost("dq_bwd", "bwd",
              read=nKq * (3 * C * f4 + C * V * (ib + sb)) + K * V * sb + 3 * C * K * f4,
              write=2 * C * K * f4 + nKq * C * f4,
              flops=2 * C * K * V + nKq * 2 * C * C * V + 3 * 2 * C * C * K)
    wya = Cost("wy_bwd_a", "bwd",
               read=C * ib + 2 * C * f4 + C * C * f4 + 2 * C * K * f4 + C * V * (ib + f4),
               write=C * V * ib + C * f4 + C * C * f4,
               flops=2 * C * C * K + 2 * 2 * C * C * V + 2 * 2 * C**3)
    wyb = Cost("wy_bwd_b", "bwd",
               read=C * ib + 3 * C * f4 + 2 * C * C * f4 + C * K * f4 + 3 * C * K * f4 + C * f4 + 2 * C * K * f4
               + ((nKd + nKq) * C * f4 + g if gated else 0),
               write=C * K * f4 + C * f4 + 2 * C * K * ib + (C * f4 if gated else 0),
               flops=3 * 2 * C * C * K)
    cast_g = Cost("dbeta, dg to the input dtype (torch)", "bwd", read=2 * C * f4, write=2 * C * ib, flops=0)
    rebuilt = [Cost(c.kernel + " (rebuilt)", "bwd", c.read, c.write, c.flops) for c in (wy, state)]
    return [wy, state, out, cast_o, *rebuilt, dvl, sbwd, dk, dq, wya, wyb, cast_g]


def fla_costs(K: int, V: int, BT: int = 64, ib: int = 2, gated: bool = True) -> list[Cost]:
    """fla-core 0.6.0 ``chunk_gated_delta_rule`` (no in-kernel L2 norm, no initial or final
    state): every intermediate in the input dtype (A, w, u, v_new, h, dh, dv, dw, dq, dk), gates
    and their gradients fp32."""
    C, f4 = BT, 4
    BK, BV = min(K, 64), min(V, 64)
    nK, nV = K // BK, V // BV
    g = C * 4 if gated else 0
    cums = Cost("chunk_local_cumsum(g)", "fwd", read=g, write=g, flops=0)
    kkt = Cost("kkt + solve_tril (fused)", "fwd", read=C * K * ib + C * ib + g, write=C * C * ib + (10 / 16) * C * C * ib,
               flops=(10 / 16) * 2 * C * C * K + 16 * 2 * 16**3)
    wu = Cost("recompute_w_u", "fwd", read=C * C * ib + C * ib + g + C * V * ib + C * K * ib,
              write=C * V * ib + C * K * ib, flops=2 * C * C * V + 2 * C * C * K)
    fh = Cost("fwd_h", "fwd", read=nV * (2 * C * K * ib + g) + C * V * ib, write=K * V * ib + C * V * ib,
              flops=2 * 2 * C * K * V)
    fo = Cost("fwd_o", "fwd", read=nV * (2 * C * K * ib + g) + K * V * ib + C * V * ib, write=C * V * ib,
              flops=2 * C * K * V + nV * 2 * C * C * K + 2 * C * C * V)
    dvl = Cost("dv_local", "bwd", read=2 * C * K * ib + g + C * V * ib, write=C * V * ib, flops=2 * C * C * K + 2 * C * C * V)
    dhu = Cost("bwd_dhu", "bwd", read=nV * (g + 3 * C * K * ib) + 2 * C * V * ib, write=K * V * ib + C * V * ib,
               flops=3 * 2 * C * K * V)
    dqkwg = Cost("dqkwg", "bwd", read=nK * (3 * C * V * ib + g) + 2 * K * V * ib + 2 * C * K * ib,
                 write=3 * C * K * ib + nK * C * f4,
                 flops=nK * 2 * C * C * V + 3 * 2 * C * K * V + 2 * 2 * C * C * K)
    wyb = Cost("prepare_wy_repr_bwd", "bwd",
               read=C * ib + C * C * ib + g + 2 * C * K * ib + 2 * C * V * ib + 2 * C * K * ib,
               write=2 * C * K * ib + C * V * ib + C * ib + g,
               flops=2 * 2 * C * C * K + 2 * 2 * C * C * V + 2 * 2 * C**3 + 3 * 2 * C * C * K)
    tail = Cost("dk += dk2, dg sums, reverse cumsum (torch / kernel)", "bwd",
                read=2 * C * K * ib + (nK + 1) * g + g, write=C * K * ib + 2 * g, flops=0)
    rebuilt = [Cost(c.kernel + " (recomputed)", "bwd", c.read, c.write, c.flops) for c in (wu, fh)]
    return [cums, kkt, wu, fh, fo, *rebuilt, dvl, dhu, dqkwg, wyb, tail]


def totals(costs: list[Cost], BT: int = 64) -> dict[str, float]:
    """Per token: bytes read + written and FLOPs, forward and backward."""
    out = {}
    for phase in ("fwd", "bwd"):
        cs = [c for c in costs if c.phase == phase]
        out[f"{phase}_bytes"] = sum(c.read + c.write for c in cs) / BT
        out[f"{phase}_flops"] = sum(c.flops for c in cs) / BT
    return out


def table(K: int = 128, V: int = 128, BT: int = 64, ib: int = 2) -> str:
    """A markdown table: per token and head, bytes and FLOPs of both, forward and backward."""
    rows = [("lasp (kernels/gated_delta)", totals(lasp_costs(K, V, BT, ib), BT)),
            ("fla chunk_gated_delta_rule", totals(fla_costs(K, V, BT, ib), BT))]
    lines = ["| per token and head | fwd bytes | fwd FLOPs | bwd bytes | bwd FLOPs | fwd+bwd bytes | fwd+bwd FLOPs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in rows:
        lines.append(f"| {name} | {t['fwd_bytes'] / 1024:.1f} KiB | {t['fwd_flops'] / 1e3:.0f} K | "
                     f"{t['bwd_bytes'] / 1024:.1f} KiB | {t['bwd_flops'] / 1e3:.0f} K | "
                     f"{(t['fwd_bytes'] + t['bwd_bytes']) / 1024:.1f} KiB | {(t['fwd_flops'] + t['bwd_flops']) / 1e3:.0f} K |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lasp.kernels.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--BT", type=int, default=64)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--per-kernel", action="store_true", help="also list every kernel")
    args = p.parse_args(argv)
    ib = 2 if args.dtype == "bf16" else 4
    print(f"K={args.K} V={args.V} BT={args.BT} {args.dtype} inputs, P=1, fwd+bwd, no L2 norm in the op, gated\n")
    print(table(args.K, args.V, args.BT, ib))
    if args.per_kernel:
        for name, costs in (("lasp", lasp_costs(args.K, args.V, args.BT, ib)), ("fla", fla_costs(args.K, args.V, args.BT, ib))):
            print(f"\n{name}: kernel, phase, read / write bytes per token, FLOPs per token")
            for c in costs:
                print(f"  {c.kernel:<48} {c.phase}  {c.read / args.BT:8.0f} / {c.write / args.BT:7.0f}  {c.flops / args.BT:9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
