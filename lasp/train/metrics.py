"""Training metrics: a tqdm bar, ``metrics.jsonl``, a loss-curve PNG, optional TensorBoard.

Only rank 0 writes. ``metrics.jsonl`` gets one JSON object per optimizer step::

    {"step": 12, "loss": 3.21, "lr": 0.0029, "tokens": 49152, "tokens_per_s": 8123.4,
     "step_time_s": 0.5, "peak_memory_mb": 812.3}

``tokens`` counts the tokens trained on so far (all ranks); a resumed run keeps the records up
to its checkpoint's step and appends after them.
"""
from __future__ import annotations

import json
import os
import resource
import warnings

import torch


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max RSS on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl``, one per step (the last record of a step wins)."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics_path: str, png_path: str, title: str = "training loss") -> str:
    """Write the loss curve of ``metrics_path`` to ``png_path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


class MetricsLogger:
    """Rank-0 logger for one run (every rank may create it; non-zero ranks do nothing)."""

    def __init__(self, out_dir: str, rank: int, total_steps: int, start_step: int = 0, *, tensorboard: bool = False, progress: bool = True):
        self.active = rank == 0
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.plot_path = os.path.join(out_dir, "loss.png")
        self._bar = self._tb = self._file = None
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.metrics_path):
            # a fresh run starts a fresh log; a resumed one drops the steps it will redo
            keep = [r for r in read_metrics(self.metrics_path) if r["step"] <= start_step] if start_step else []
            with open(self.metrics_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard: the 'tensorboard' package is not installed; skipping TensorBoard logging")

    def log(self, step: int, loss: float, lr: float, tokens: int, tokens_per_s: float, step_time_s: float,
            extra: dict[str, float] | None = None) -> dict:
        """Record optimizer step ``step`` (1-based: the number of steps done); ``extra``: more scalars
        (e.g. an MoE model's ``aux_loss``), written to the record and TensorBoard."""
        rec = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": round(tokens_per_s, 2),
            "step_time_s": round(step_time_s, 4),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            **(extra or {}),
        }
        if not self.active:
            return rec
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", step_s=f"{step_time_s:.2f}", mem=f"{rec['peak_memory_mb']:.0f}MB",
                refresh=False,
            )
            self._bar.update(1)
        if self._tb is not None:
            for key in ("loss", "lr", "tokens_per_s", "peak_memory_mb", *(extra or {})):
                self._tb.add_scalar(f"train/{key}", rec[key], step)
        return rec

    def close(self, plot: bool = True) -> str | None:
        """Close the bar and files; write the loss PNG (returns its path) when there is data."""
        if not self.active:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        if plot and os.path.getsize(self.metrics_path) > 0:
            return plot_loss(self.metrics_path, self.plot_path)
        return None
