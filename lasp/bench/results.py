"""Benchmark output files: ``results.json`` (schema ``lasp-bench/1``: ``kind`` layer | model |
kernels | predict, ``env`` facts, ``config`` = the arguments, ``records``, ``plots``) and
``results.md``, plus the schema check. A layer / model / kernels record has ``status`` (ok |
unavailable | skipped | error) and ``reason``; an ok one ``time_ms`` (median), the spread
(``time_ms_min/max/p25/p75/std``, ``n_reps``) and the raw ``samples_ms``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

SCHEMA = "lasp-bench/1"
STATUSES = ("ok", "unavailable", "skipped", "error")

# required keys of a record, per kind
REQUIRED = {
    "layer": ("method", "seq_len", "sp", "status", "time_ms", "bytes_per_rank", "collectives"),
    "model": ("model", "seq_len", "sp", "status", "time_ms", "tokens_per_s"),
    "kernels": ("provider", "mode", "seq_len", "status", "time_ms"),
    "predict": ("method", "seq_len", "devices", "time_ms"),
}
OK_REQUIRED = {
    "layer": ("samples_ms", "warmup_ms", "tokens_per_s", "peak_mem_mb", "n_reps", "time_ms_min", "time_ms_max"),
    "model": ("samples_ms", "warmup_ms", "peak_mem_mb", "n_reps"),
    "kernels": ("samples_ms", "n_reps", "tflops"),
    "predict": (),
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
    for i, rec in enumerate(data["records"]):
        status = rec.get("status", "ok")
        need(REQUIRED[kind] + (OK_REQUIRED[kind] if status == "ok" else ()), rec, f"record {i} is missing")
        if status not in STATUSES:
            raise ValueError(f"results.json: record {i} has status {status!r}, expected one of {STATUSES}")
        if status == "ok" and kind != "predict" and len(rec["samples_ms"]) != rec["n_reps"]:
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
    records = [dict({k: None for k in REQUIRED[kind]}, **r) for r in records]
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
    """A benchmark's results.md: title, command, optional header line, environment, table, note."""
    keys = ("device", "world", "cpu_count", "torch_threads_per_rank", "torch", "triton", "date")
    env_line = ", ".join(f"{k} {env[k]}" for k in keys if k in env)
    lines = [f"# lasp bench {kind}", "", f"`{command}`", ""] + ([header, ""] if header else [])
    return "\n".join(lines + [f"Environment: {env_line}", "", table, "", note, ""])
