"""``lasp bench model --models qwen3_5-tiny --compare-hf``: one training step (forward,
backward, AdamW) of the SAME Qwen3.5 model in lasp (SP = 1) and in transformers
(``Qwen3_5ForCausalLM``, its torch path), side by side, tokens/s of both.

    lasp bench model --models qwen3_5-tiny --compare-hf [--seq-len 512,2K] [--batch 1] [--reps 5] [--out DIR]

The lasp model is built from ``--config`` (default ``configs/models/qwen3_5-tiny.yaml``),
written with :func:`lasp.models.to_hf` and loaded by transformers, so both run identical
weights; the first step's losses are printed too (they agree). Needs ``pip install lasp[hf]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models", "qwen3_5-tiny.yaml"))
COMPARE_MODELS = ("qwen3_5-tiny",)


def _seq(s: str) -> int:
    return int(s[:-1]) * 1024 if s.upper().endswith("K") else int(s)


def time_steps(step, reps: int, warmup: int) -> tuple[float, float]:
    """``(median seconds, first loss)`` of ``step()`` (returns the loss) over ``reps`` timed calls."""
    first = step()
    for _ in range(max(warmup - 1, 0)):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def make_step(forward_logits, params, ids, labels):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(forward_logits(ids).float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        return loss.item()

    return step


def compare(config: str, seq_lens: list[int], batch: int, reps: int, warmup: int) -> list[dict]:
    """One row per sequence length: tokens/s of lasp and of transformers on the same weights."""
    from transformers import AutoModelForCausalLM

    from ..models import LinearLlamaForCausalLM, ModelConfig, to_hf

    cfg = ModelConfig.from_yaml(config)
    rows = []
    for T in seq_lens:
        torch.manual_seed(0)
        lasp_model = LinearLlamaForCausalLM(cfg)
        with tempfile.TemporaryDirectory() as d:
            to_hf(lasp_model, d)
            hf_model = AutoModelForCausalLM.from_pretrained(d).float().train()
        tokens = torch.randint(0, cfg.vocab_size, (batch, T + 1), generator=torch.Generator().manual_seed(1))
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        t_lasp, loss_lasp = time_steps(make_step(lasp_model, list(lasp_model.parameters()), ids, labels), reps, warmup)
        t_hf, loss_hf = time_steps(make_step(lambda x: hf_model(x).logits, list(hf_model.parameters()), ids, labels), reps, warmup)
        rows.append(dict(model="qwen3_5-tiny", seq_len=T, batch=batch, lasp_tokens_per_s=batch * T / t_lasp,
                         hf_tokens_per_s=batch * T / t_hf, speedup=t_hf / t_lasp, lasp_step_ms=1e3 * t_lasp,
                         hf_step_ms=1e3 * t_hf, first_loss_lasp=loss_lasp, first_loss_hf=loss_hf))
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lasp bench model --compare-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare-hf", action="store_true", required=True)
    ap.add_argument("--models", default="qwen3_5-tiny", help=f"one of {', '.join(COMPARE_MODELS)}")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="a qwen3_5 model YAML (default: configs/models/qwen3_5-tiny.yaml)")
    ap.add_argument("--seq-len", default="512,2K", help="comma-separated sequence lengths (K = 1024)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for results.json")
    args, _ = ap.parse_known_args(argv)
    if args.models not in COMPARE_MODELS:
        ap.error(f"--models: --compare-hf supports {', '.join(COMPARE_MODELS)}, got {args.models!r}")
    try:
        rows = compare(args.config, [_seq(s) for s in args.seq_len.split(",")], args.batch, args.reps, args.warmup)
    except ImportError as e:
        print(f"lasp bench model --compare-hf: needs transformers (pip install 'lasp[hf]'): {e}", file=sys.stderr)
        return 2
    print(f"training step (forward + backward + AdamW), {args.config}, fp32, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'seq_len':>8} {'lasp tok/s':>12} {'HF tok/s':>12} {'lasp/HF':>8} {'loss lasp':>10} {'loss HF':>10}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['lasp_tokens_per_s']:>12.0f} {r['hf_tokens_per_s']:>12.0f} {r['speedup']:>8.2f} "
              f"{r['first_loss_lasp']:>10.5f} {r['first_loss_hf']:>10.5f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare_hf.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0
