"""The GPU check (scripts/gpu_check.sh): its smoke mode on the CPU runs every section's code with tiny
shapes and skips the CUDA-only parts with a row saying so; the summary reports failures and
sections stopped by their time budget."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_smoke_mode_runs_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=230)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    by_section = {s: [x for x in rows if x["section"] == s] for s in ("env", "kernels", "softmax", "speed", "train")}
    assert all(by_section.values()), {s: len(v) for s, v in by_section.items()}
    assert all(x["result"] in ("ok", "info", "skip") for x in rows), [x for x in rows if x["result"] not in ("ok", "info", "skip")]
    assert sum(x["result"] == "ok" for x in by_section["kernels"]) == 2 and sum(x["result"] == "ok" for x in by_section["softmax"]) == 2
    assert [x["result"] for x in by_section["train"]] == ["skip"]
    status = {line.split("\t")[0]: line.split("\t") for line in (tmp_path / "status.tsv").read_text().splitlines()}
    assert status["smoke"][1] == "0" and status["compile"][3].startswith("skip") and status["sanitizer"][3].startswith("skip")
    summary = (tmp_path / "summary.md").read_text()
    assert "0 problem(s)" in summary and "sanitizer" in summary and (tmp_path / "gpu_check.log").exists()


def test_summary_reports_failures_and_time_outs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    (tmp_path / "status.tsv").write_text("kernels\t1\t40\t\nspeed\t124\t120\t\ntrain\t\t0\tskip: out of time (450s budget used)\n")
    rows = [{"section": "kernels", "check": "simple GLA bf16", "result": "ok", "detail": "max rel err 1e-3"},
            {"section": "kernels", "check": "gated delta fp32", "result": "FAIL", "detail": "max rel err inf"},
            {"section": "speed", "check": "linear B1", "result": "info", "detail": "triton 1.00 / 3.00"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert gpu_check.main(["--out", str(tmp_path), "summary"]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s): kernels: section; kernels: gated delta fp32; speed: section" in out
    assert "TIME" in out and "(time budget)" in out and "skip: out of time" in out
    lines = out.splitlines()
    assert lines.index(next(x for x in lines if "gated delta fp32" in x)) < lines.index(next(x for x in lines if x.startswith("speed")))
