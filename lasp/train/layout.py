"""``python -m lasp.train.layout --config C --nnodes N --nproc P [--backend B] [trainer args...]``.

The launch scripts ask this for the world layout instead of re-reading YAML in shell: it loads
the run config exactly as ``lasp train`` does (``--set key=value`` / ``--set=key=value``
overrides; other trainer arguments are ignored), checks it, and prints one line::

    world: 2 node(s) x 4 process(es) = 8 ranks; SP=4 x DP=2; backend nccl

Exit status 2 with ``error: ...`` on stderr when the config is invalid or ``parallel.sp_size``
does not divide the world size.
"""
from __future__ import annotations

import argparse
import sys

from .config import RunConfig


def layout_line(cfg: RunConfig, nnodes: int, nproc: int, backend: str) -> str:
    """The layout line; ValueError unless the world is valid for ``cfg``."""
    if nnodes < 1 or nproc < 1:
        raise ValueError(f"NNODES and NPROC must be >= 1, got NNODES={nnodes}, NPROC={nproc}")
    world, sp = nnodes * nproc, cfg.parallel.sp_size
    if world % sp != 0:
        raise ValueError(f"parallel.sp_size={sp} must divide the world size {world} ({nnodes} nodes x {nproc} processes)")
    return f"world: {nnodes} node(s) x {nproc} process(es) = {world} ranks; SP={sp} x DP={world // sp}; backend {backend}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lasp.train.layout", description="print the world layout of a run (for the launch scripts)")
    p.add_argument("--config", required=True)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = p.parse_known_args(argv)
    try:
        if args.nnodes < 1 or args.nproc < 1:
            raise ValueError(f"NNODES and NPROC must be >= 1, got NNODES={args.nnodes}, NPROC={args.nproc}")
        cfg = RunConfig.from_yaml(args.config, args.overrides, world=args.nnodes * args.nproc)  # sp_size | world checked first
        print(layout_line(cfg, args.nnodes, args.nproc, args.backend))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
