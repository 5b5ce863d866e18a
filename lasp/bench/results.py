"""Benchmark output files: ``results.json`` (schema ``lasp-bench/1``, see
``docs/bench/README.md``) with its check, ``results.md`` and the PNG plots (matplotlib, Agg): a
metric vs sequence length per series (one panel per SP size, or per ``panel``) and speed-ups of
one series over others."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCHEMA = "lasp-bench/1"
STATUSES = ("ok", "unavailable", "skipped", "error")

# required keys of a record, per kind: (of every record, more of an ok one)
REQUIRED = {
    "layer": (("method", "seq_len", "sp", "status", "time_ms", "bytes_per_rank", "collectives"),
              ("samples_ms", "warmup_ms", "tokens_per_s", "peak_mem_mb", "n_reps", "time_ms_min", "time_ms_max")),
    "model": (("model", "seq_len", "sp", "status", "time_ms", "tokens_per_s"), ("samples_ms", "warmup_ms", "peak_mem_mb", "n_reps")),
    "kernels": (("provider", "mode", "seq_len", "status", "time_ms"), ("samples_ms", "n_reps", "tflops")),
    "predict": (("method", "seq_len", "devices", "time_ms"), ()),
}


def validate_results(data: dict) -> None:
    """Raise ``ValueError`` naming the first problem of a loaded ``results.json``."""
    def need(keys, where: dict, what: str) -> None:
        missing = [k for k in keys if k not in where]
        if missing:
            raise ValueError(f"results.json: {what} {missing[0]!r}")

    need(("schema", "kind", "env", "config", "records"), data, "missing key")
    kind = data["kind"]
    if data["schema"] != SCHEMA:
        raise ValueError(f"results.json: schema must be {SCHEMA!r}, got {data['schema']!r}")
    if kind not in REQUIRED:
        raise ValueError(f"results.json: kind must be one of {tuple(REQUIRED)}, got {kind!r}")
    if kind != "predict":
        need(("torch", "triton", "device", "world", "cpu_count", "date"), data["env"], "env is missing")
    every, ok = REQUIRED[kind]
    for i, rec in enumerate(data["records"]):
        status = rec.get("status", "ok")
        need(every + (ok if status == "ok" else ()), rec, f"record {i} is missing")
        if status not in STATUSES:
            raise ValueError(f"results.json: record {i} has status {status!r}, expected one of {STATUSES}")
        if status == "ok" and "samples_ms" in ok and len(rec["samples_ms"]) != rec["n_reps"]:
            raise ValueError(f"results.json: record {i} has {len(rec['samples_ms'])} samples for n_reps={rec['n_reps']}")


def write_results(out_dir: str, doc: dict, markdown: str) -> None:
    """``out_dir/results.json`` (atomically) and ``out_dir/results.md``: every benchmark's output pair."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown)


def load_results(path: str) -> dict:
    """Read and validate a ``results.json`` (a directory holding one is accepted too)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    validate_results(data)
    return data


def results_doc(kind: str, env: dict, config: dict, records: list[dict], plots: Iterable[str] = ()) -> dict:
    """The results.json document; records missing a required key (failed points) get it as None."""
    records = [dict({k: None for k in REQUIRED[kind][0]}, **r) for r in records]
    return {"schema": SCHEMA, "kind": kind, "env": env, "config": config, "records": records, "plots": list(plots)}


def fmt_bytes(n: float | None) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n is not None and n >= scale:
            return f"{n / scale:.2f} {unit}"
    return "-" if n is None else f"{int(n)} B"


def fmt_num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (numbers right-aligned: every column after the first two)."""
    align = ["---" if i < 2 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def status_cell(rec: dict) -> str:
    reason = (rec.get("reason") or "").replace("|", "/").replace("\n", " ")
    return rec["status"] if not reason else f"{rec['status']}: {reason[:90]}"


def report(kind: str, command: str, env: dict, table: str, note: str, header: str = "") -> str:
    """A benchmark's results.md: title, command, optional header line, environment (when known), table, note."""
    keys = ("device", "world", "cpu_count", "torch_threads_per_rank", "torch", "triton", "date")
    env_line = ", ".join(f"{k} {env[k]}" for k in keys if k in env)
    lines = [f"# lasp bench {kind}", "", f"`{command}`", ""] + ([header, ""] if header else [])
    return "\n".join(lines + ([f"Environment: {env_line}", ""] if env_line else []) + [table, ""] + ([note, ""] if note else []))


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status", "ok") == "ok" and r.get("time_ms") is not None]


def plot_metric_vs_seq_len(records: list[dict], path: str, *, series: str, metric: str, ylabel: str, title: str,
                           dashed: tuple[str, ...] = (), panel: str = "sp", panel_name: str = "P", hline: float | None = None) -> str:
    """``metric`` vs ``seq_len`` on log-log axes, one line per value of ``series`` (one fixed colour
    each; ``dashed`` ones dashed), one panel per ``panel``; a grey reference line at ``hline``."""
    ok = _ok(records)
    panels = sorted({r[panel] for r in ok}) or [0]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {n: cycle[i % len(cycle)] for i, n in enumerate(sorted({r[series] for r in ok}))}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, value in zip(axes[0], panels):
        lines = defaultdict(list)
        for r in ok:
            if r[panel] == value and r.get(metric) is not None:
                lines[r[series]].append((r["seq_len"], r[metric]))
        for name, pts in sorted(lines.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", label=name, ls="--" if name in dashed else "-", color=colors[name])
        if hline is not None:
            ax.axhline(hline, color="grey", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        if lines:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no successful points", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="total sequence length (tokens)", ylabel=ylabel, title=f"{title}, {panel_name}={value}" if value else title)
        ax.grid(True, which="both", alpha=0.3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup(records: list[dict], path: str, *, series: str, base: str, against: tuple[str, ...], title: str) -> str:
    """Speed-up of ``base`` over each of ``against`` (time ratio, one line each) vs sequence length, one panel per SP size."""
    t = {(r[series], r["sp"], r["seq_len"]): r["time_ms"] for r in _ok(records)}
    ratios = [dict(over=f"{base} over {other}", sp=sp, seq_len=n, time_ms=tb, speedup=t[(other, sp, n)] / tb)
              for (name, sp, n), tb in t.items() if name == base and tb > 0 for other in against if (other, sp, n) in t]
    return plot_metric_vs_seq_len(ratios, path, series="over", metric="speedup", ylabel=f"speed-up of {base} (time ratio, x)",
                                  title=title, hline=1.0)
