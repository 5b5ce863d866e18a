"""Bytes a Qwen3.5 Gated DeltaNet layer stack saves for backward (P = 1, torch path), counted as the
unique storages autograd keeps (``torch.autograd.graph.saved_tensors_hooks``); prints one JSON line.

Run it on two checkouts to compare (e.g. before and after the model stopped repeating q and k)::

    .venv/bin/python scripts/measure_gdn_saved_memory.py --T 2048
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from lasp.models.config import ModelConfig  # noqa: E402
from lasp.models.qwen3_5 import Qwen35GatedDeltaNet  # noqa: E402


def saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--layers", type=int, default=3, help="GDN layers")
    p.add_argument("--key-heads", type=int, default=4)
    p.add_argument("--value-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    hidden = 256
    cfg = ModelConfig(architecture="qwen3_5", linear_variant="gated_deltanet", hidden_size=hidden, num_heads=4,
                      num_kv_heads=2, attention_head_dim=64, linear_num_key_heads=args.key_heads,
                      linear_num_value_heads=args.value_heads, linear_key_head_dim=args.head_dim,
                      linear_value_head_dim=args.head_dim, num_layers=4, vocab_size=64, intermediate_size=64,
                      layer_types=["linear_attention"] * 3 + ["full_attention"], conv_size=4)
    layers = [Qwen35GatedDeltaNet(cfg, i) for i in range(args.layers)]
    x = torch.randn(1, args.T, hidden, requires_grad=True)

    def run():
        h = x
        for layer in layers:
            h = h + layer(h)
        return h

    print(json.dumps(dict(vars(args), saved_mib=round(saved_bytes(run) / 2**20, 2))))


if __name__ == "__main__":
    main()
