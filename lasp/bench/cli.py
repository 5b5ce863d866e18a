"""``lasp bench <kind> [args...]``: each kind is a module with ``main(argv)``."""
from __future__ import annotations


KINDS = {
    "kernels": ("lasp.bench.kernels", "Triton vs torch chunk path (vs fla when installed), one device"),
    "layer": ("lasp.bench.layer", "one attention layer fwd+bwd across methods, sequence lengths, SP sizes"),
    "model": ("lasp.bench.model", "tokens/s of a training step: pure linear, 1/4 hybrid, Llama + ring"),
    "predict": ("lasp.bench.predict", "analytic cluster cost model, calibrated from a layer run"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        print("usage: lasp bench {" + ",".join(KINDS) + "} [args...]\n")
        for k, (_, h) in KINDS.items():
            print(f"  {k:<8} {h}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from lasp.cli import run_module_main

    return run_module_main(KINDS[argv[0]][0], argv[1:], f"lasp bench {argv[0]}")
