"""``lasp bench model --models qwen3_5-tiny --compare-hf``: one training step (forward, backward,
AdamW) of the SAME Qwen3.5 model in lasp (SP = 1) and in transformers (``Qwen3_5ForCausalLM``,
its torch path), tokens/s of both; details: ``docs/bench/README.md``. Needs ``lasp[hf]``.

    lasp bench model --models qwen3_5-tiny --compare-hf [--seq-len 512,2K] [--batch 1] [--reps 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

from .cli import csv_arg, positive, seq_len_arg
from .results import fmt_num, markdown_table, report, results_doc, write_results
from .timing import env_info, summarize_samples, time_steps

DEFAULT_CONFIG = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models", "qwen3_5-tiny.yaml"))


def train_step(forward_logits, model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, losses: list[float]):
    """One AdamW training step of ``model`` on ``ids [B, T]``; appends its loss to ``losses``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(forward_logits(ids).float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return step


def compare(config: str, seq_lens: list[int], batch: int, reps: int, warmup: int) -> list[dict]:
    """One row per sequence length: tokens/s of lasp and of transformers on the same weights (their
    repetitions interleaved by :func:`lasp.bench.timing.time_steps`) and both first losses."""
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
        losses: tuple[list, list] = ([], [])
        steps = [train_step(lasp_model, lasp_model, ids, labels, losses[0]),
                 train_step(lambda x: hf_model(x).logits, hf_model, ids, labels, losses[1])]
        timed = time_steps(steps, group=None, device=torch.device("cpu"), warmup=warmup, reps=reps, max_seconds=1e9, min_reps=reps)
        t_lasp, t_hf = (summarize_samples(t["samples_s"])["time_ms"] / 1e3 for t in timed)
        rows.append(dict(model="qwen3_5-tiny", seq_len=T, batch=batch, lasp_tokens_per_s=batch * T / t_lasp,
                         hf_tokens_per_s=batch * T / t_hf, speedup=t_hf / t_lasp, lasp_step_ms=1e3 * t_lasp,
                         hf_step_ms=1e3 * t_hf, first_loss_lasp=losses[0][0], first_loss_hf=losses[1][0]))
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lasp bench model --compare-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3_5-tiny", choices=("qwen3_5-tiny",))
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="a qwen3_5 model YAML (default: configs/models/qwen3_5-tiny.yaml)")
    ap.add_argument("--seq-len", type=csv_arg(positive(seq_len_arg), "--seq-len"), default=[512, 2048],
                    help="comma-separated sequence lengths (K = 1024)")
    ap.add_argument("--batch", type=positive(), default=1)
    ap.add_argument("--reps", type=positive(), default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for results.json and results.md")
    args, _ = ap.parse_known_args(argv)
    try:
        rows = compare(args.config, args.seq_len, args.batch, args.reps, args.warmup)
    except ImportError as e:
        print(f"lasp bench model --compare-hf: needs transformers (pip install 'lasp[hf]'): {e}", file=sys.stderr)
        return 2
    table = markdown_table(["seq len", "lasp tokens/s", "HF tokens/s", "lasp/HF", "first loss lasp", "first loss HF"],
                           [[f"{r['seq_len']:,}", fmt_num(r["lasp_tokens_per_s"], 0), fmt_num(r["hf_tokens_per_s"], 0),
                             f"{r['speedup']:.2f}", f"{r['first_loss_lasp']:.5f}", f"{r['first_loss_hf']:.5f}"] for r in rows])
    env = env_info("cpu", 1)
    text = report("model --compare-hf", "lasp bench model " + " ".join(argv), env, table,
                  f"training step (forward + backward + AdamW) of {args.config}, fp32, median of {args.reps}.")
    if args.out:
        write_results(args.out, results_doc("compare-hf", env, vars(args), rows), text)
    print(text)
    return 0
