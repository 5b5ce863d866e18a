"""``lasp bench predict``: the analytic cost model of :mod:`lasp.bench.costmodel` applied to a
training step on a cluster, next to the LASP-2 paper's reported speed-ups.

    lasp bench predict --out DIR                        # the paper's setting, A100 defaults
    lasp bench predict --calibrate bench-results/cpu-p2 --out DIR

Default = the paper's setting (Sun et al., 2025, arXiv 2502.07563): Linear-Llama3-1B, 64 A100
in 8 nodes of 8, SP 64, batch 1, 2K ... 2048K tokens; it reports LASP-2's throughput +36.6% over
Ring Attention and +15.2% over LASP-1 at 2048K, +17.8% / +7.3% at 512K. Hardware defaults:
:class:`~lasp.bench.costmodel.Hardware` (flags override each). Speed-up over X =
``tokens/s(LASP-2) / tokens/s(X) - 1``.

``--calibrate`` (a ``lasp bench layer`` results.json): per operator kind, compute rate ``F``
and fixed cost ``t0`` fitted (``numpy.polyfit``, relative error) to the measured times against
the model's FLOPs of ``lasp2`` / ``allgather``, then one link bandwidth to the residuals against
the bytes sent; every measured point is predicted with its error. ``--use-calibration``
predicts the cluster with the fitted ``F`` and bandwidth.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from .costmodel import LINEAR_SP, Hardware, Shape, layer_cost, step_cost
from .cli import csv_arg, positive, seq_len_arg
from .plots import plot_metric_vs_seq_len
from .results import fmt_num, load_results, markdown_table, results_doc, write_results

# LASP-2 paper (arXiv 2502.07563), Linear-Llama3-1B, 64 A100: LASP-2's speed-up in %
PAPER = {("ring", 512 * 1024): 17.8, ("lasp1", 512 * 1024): 7.3, ("ring", 2048 * 1024): 36.6, ("lasp1", 2048 * 1024): 15.2}
PAPER_CITE = "Sun et al. 2025, LASP-2, arXiv 2502.07563"
DEFAULT_CONFIG = "configs/models/linear-llama3-1b.yaml"


def _fit(xs, ys) -> tuple[float, float]:
    """``y = t0 + b x`` minimising the RELATIVE squared error (``numpy.polyfit`` with weights
    ``1 / y``), so small and large points count alike; through the origin (``t0 = 0``) when there
    is only one x value or the intercept comes out negative or the slope not positive."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(np.unique(x)) > 1:
        b, t0 = np.polyfit(x, y, 1, w=1.0 / y)
        if b > 0 and t0 >= 0:
            return float(t0), float(b)
    r = x / y  # y = b x in relative terms: minimise sum (1 - b r)^2
    return 0.0, float(r.sum() / (r * r).sum())


def _shape_of(rec: dict) -> Shape:
    return Shape(rec["seq_len"], rec["sp"], rec.get("batch", 1), rec.get("heads", 8), rec.get("kv_heads", rec.get("heads", 8)),
                 rec.get("head_dim", 64), {"fp32": 4, "bf16": 2, "fp16": 2}[rec.get("dtype", "fp32")], 64,
                 rec.get("layout", "contiguous"))


def calibrate(layer_doc: dict) -> dict:
    """Fit ``F`` and ``t0`` per kind and one bandwidth; predict every ok point of ``layer_doc``."""
    unit = Hardware(peak_flops=1.0, mfu=1.0)  # compute_s = the model's FLOPs
    ok = [(dict(r, kind=r.get("kind", "linear")), layer_cost(r["method"], _shape_of(r), unit)["compute_s"])
          for r in layer_doc["records"] if r.get("status") == "ok"]
    fits: dict[str, dict] = {}
    for kind, ref in (("linear", "lasp2"), ("softmax", "allgather")):
        pts = [p for p in ok if p[0]["method"] == ref] or [p for p in ok if p[0]["kind"] == kind]
        if pts:
            t0, slope = _fit([f for _, f in pts], [r["time_ms"] / 1e3 for r, _ in pts])
            fits[kind] = {"flops_per_s": 1.0 / slope, "t0_s": t0, "reference": pts[0][0]["method"], "points": len(pts)}
    ok = [(r, f, fits[r["kind"]]) for r, f in ok if r["kind"] in fits]
    comm = [(r, f, fit) for r, f, fit in ok if r["sp"] > 1]  # the time left after compute = bytes / bw
    n = np.array([r["bytes_per_rank"] for r, _, _ in comm], dtype=np.float64)
    y = np.array([r["time_ms"] / 1e3 for r, _, _ in comm])
    den = (n * (y - np.array([fit["t0_s"] + f / fit["flops_per_s"] for _, f, fit in comm])) / y**2).sum()
    bw = float(((n / y) ** 2).sum() / den) if den > 0 else None
    rows = []
    for r, _, fit in ok:
        hw = Hardware(peak_flops=fit["flops_per_s"], mfu=1.0, gpus_per_node=1 << 20, bw_intra=bw or 1e30,
                      bw_inter=bw or 1e30, lat_intra=0.0, lat_inter=0.0, lat_launch=0.0)
        pred = 1e3 * (fit["t0_s"] + layer_cost(r["method"], _shape_of(r), hw)["total_s"])
        rows.append({"method": r["method"], "seq_len": r["seq_len"], "sp": r["sp"], "measured_ms": r["time_ms"],
                     "predicted_ms": pred, "error_pct": 100 * (pred / r["time_ms"] - 1)})
    return {"fits": fits, "bandwidth_bytes_per_s": bw, "points": rows}


def predict(cfg, seq_lens: list[int], devices: int, methods: list[str], hw: Hardware) -> list[dict]:
    """One step-cost record per (length, method), with LASP-2's speed-up over it."""
    recs = [dict(step_cost(cfg, n, devices, m, hw), sp=devices, status="ok") for n in seq_lens for m in methods]
    for r in recs:
        base = step_cost(cfg, r["seq_len"], devices, "lasp2", hw)["tokens_per_s"]
        r["lasp2_speedup_pct"] = 100 * (base / r["tokens_per_s"] - 1)
    return recs


def paper_comparison(records: list[dict]) -> list[dict]:
    rows = []
    for (method, n), paper in PAPER.items():
        ours = next((r["lasp2_speedup_pct"] for r in records if r["method"] == method and r["seq_len"] == n), None)
        if ours is not None:
            rows.append({"versus": method, "seq_len": n, "paper_pct": paper, "predicted_pct": ours,
                         "difference_pp": ours - paper, "ratio": (ours / paper) if paper else None})
    return rows


# what one hardware knob would have to be for the model to reproduce a paper figure
KNOBS = {"ring": ("bw_inter", "inter-node bandwidth per GPU", 1e9, "GB/s"),
         "lasp1": ("lat_launch", "per-call / per-hop overhead", 1e-6, "us")}


def match_paper(cfg, devices: int, hw: Hardware, comparison: list[dict]) -> list[dict]:
    """For each paper figure, bisect (log scale) the knob of ``KNOBS`` that reproduces it."""
    out = []
    for c in comparison:
        field, what, unit, uname = KNOBS[c["versus"]]

        def gap(x: float) -> float:
            h = dataclasses.replace(hw, **{field: x})
            a = step_cost(cfg, c["seq_len"], devices, "lasp2", h)["tokens_per_s"]
            b = step_cost(cfg, c["seq_len"], devices, c["versus"], h)["tokens_per_s"]
            return 100 * (a / b - 1) - c["paper_pct"]

        lo, hi = getattr(hw, field) / 1e4, getattr(hw, field) * 1e4
        value, sign = None, gap(lo) < 0
        if sign != (gap(hi) < 0):
            for _ in range(80):
                mid = (lo * hi) ** 0.5
                lo, hi = (mid, hi) if (gap(mid) < 0) == sign else (lo, mid)
            value = (lo * hi) ** 0.5
        out.append({"versus": c["versus"], "seq_len": c["seq_len"], "knob": field, "knob_meaning": what,
                    "assumed": getattr(hw, field) / unit, "needed": None if value is None else value / unit, "unit": uname})
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def report_markdown(doc: dict) -> str:
    cfg, hw = doc["config"], doc["config"]["hardware"]
    lines = [
        "# lasp bench predict", "", f"`{cfg['command']}`", "",
        f"Model {cfg['model_config']}, {cfg['devices']} devices ({hw['gpus_per_node']} per node), batch 1. Hardware: "
        f"{hw['peak_flops'] / 1e12:.0f} TFLOP/s peak x MFU {hw['mfu']:.2f}; intra {hw['bw_intra'] / 1e9:.0f} GB/s, "
        f"inter {hw['bw_inter'] / 1e9:.1f} GB/s per GPU per direction; latency {hw['lat_intra'] * 1e6:.0f}/"
        f"{hw['lat_inter'] * 1e6:.0f} us per message, {hw['lat_launch'] * 1e6:.0f} us per call.", "",
    ]
    headers = ["method", "feasible", "seq len", "step ms", "tokens/s", "dense ms", "attn compute ms", "exposed comm ms",
               "grad all-reduce ms", "LASP-2 speed-up"]
    rows = [[r["method"], "yes" if r["feasible"] else f"no ({r['note']})", _k(r["seq_len"]), fmt_num(r["time_ms"]),
             fmt_num(r["tokens_per_s"], 0), fmt_num(r["dense_s"] * 1e3), fmt_num(r["attention_compute_s"] * 1e3),
             fmt_num(r["exposed_comm_s"] * 1e3), fmt_num(r["grad_allreduce_s"] * 1e3),
             "-" if r["method"] == "lasp2" else f"{r['lasp2_speedup_pct']:+.1f}%"] for r in doc["records"]]
    lines += [markdown_table(headers, rows), ""]
    if doc.get("paper_comparison"):
        lines += [f"Against the paper ({PAPER_CITE}; its Linear-Llama3-1B on 64 A100):", ""]
        rows = [[f"LASP-2 over {c['versus']}", _k(c["seq_len"]), f"{c['paper_pct']:+.1f}%", f"{c['predicted_pct']:+.1f}%",
                 f"{c['difference_pp']:+.1f} pp", f"{c['ratio']:.2f}x" if c["ratio"] is not None else "-"]
                for c in doc["paper_comparison"]]
        lines += [markdown_table(["speed-up", "seq len", "paper", "predicted", "difference", "predicted / paper"], rows), ""]
        for m in doc.get("paper_match", []):
            needed = "no value in 1e-4..1e4 x the assumption reproduces it" if m["needed"] is None else f"{m['needed']:,.1f} {m['unit']}"
            lines.append(f"- to reproduce LASP-2 over {m['versus']} at {_k(m['seq_len'])} the model needs {m['knob_meaning']} "
                         f"= {needed} (assumed {m['assumed']:,.1f} {m['unit']})")
        lines.append("")
    cal = doc.get("calibration")
    if cal:
        fits = ", ".join(f"{k}: F = {v['flops_per_s'] / 1e9:.2f} GFLOP/s, t0 = {v['t0_s'] * 1e3:.1f} ms (from {v['reference']})"
                         for k, v in cal["fits"].items())
        bw = cal["bandwidth_bytes_per_s"]
        lines += [f"Calibration from `{cfg['calibrate']}`: {fits}; effective bandwidth "
                  f"{'not resolvable (communication hidden in the noise)' if bw is None else f'{bw / 1e9:.3f} GB/s'}.", ""]
        rows = [[p["method"], str(p["sp"]), f"{p['seq_len']:,}", fmt_num(p["measured_ms"]), fmt_num(p["predicted_ms"]),
                 f"{p['error_pct']:+.0f}%"] for p in cal["points"]]
        lines += [markdown_table(["method", "P", "seq len", "measured ms", "predicted ms", "error"], rows), ""]
    return "\n".join(lines)


# hardware flags: (flag, Hardware field, flag unit in the field's unit, help)
HW_FLAGS = [("--gpus-per-node", "gpus_per_node", 1, ""),
            ("--peak-tflops", "peak_flops", 1e12, "per-device dense peak (A100 bf16: 312)"),
            ("--mfu", "mfu", 1, "achieved fraction of peak"),
            ("--bw-intra-gbs", "bw_intra", 1e9, "GB/s per GPU per direction inside a node"),
            ("--bw-inter-gbs", "bw_inter", 1e9, "GB/s per GPU per direction between nodes"),
            ("--lat-intra-us", "lat_intra", 1e-6, ""), ("--lat-inter-us", "lat_inter", 1e-6, ""),
            ("--lat-launch-us", "lat_launch", 1e-6, "per call / dependent step")]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="lasp bench predict", description="analytic cost model of a training step on a cluster")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="model YAML (default: the paper's Linear-Llama3-1B)")
    ap.add_argument("--devices", type=positive(), default=64, help="GPUs in the SP group")
    ap.add_argument("--seq-len", type=csv_arg(seq_len_arg, "--seq-len"), default="2K,8K,32K,128K,512K,2048K",
                    help="total sequence lengths, comma-separated")
    ap.add_argument("--methods", type=csv_arg(str, "--methods"), default="lasp2,lasp1,ring,ulysses", help=f"of {', '.join(LINEAR_SP)}")
    for flag, field, unit, help_ in HW_FLAGS:
        default = getattr(Hardware(), field)
        kind = type(default) if field.startswith("lat") else positive(type(default))
        ap.add_argument(flag, type=kind, default=default / unit if unit != 1 else default, help=help_ or None)
    ap.add_argument("--calibrate", default=None, help="a `lasp bench layer` results.json (or its directory)")
    ap.add_argument("--use-calibration", action="store_true", help="predict with the fitted throughput and bandwidth")
    ap.add_argument("--out", default=None, help="output directory (results.json, results.md, plot)")
    args = ap.parse_args(argv)
    for m in args.methods:
        if m not in LINEAR_SP:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(LINEAR_SP)}")
    if "lasp2" not in args.methods:
        args.methods.insert(0, "lasp2")
    if any(n < args.devices for n in args.seq_len):
        ap.error("every --seq-len must be >= --devices")
    if args.use_calibration and not args.calibrate:
        ap.error("--use-calibration needs --calibrate")
    from ..models import ModelConfig

    hw = Hardware(**{field: getattr(args, flag[2:].replace("-", "_")) * unit for flag, field, unit, _ in HW_FLAGS})
    what = "--config"
    try:
        cfg = ModelConfig.from_yaml(args.config)
        what = "--calibrate"
        cal = calibrate(load_results(args.calibrate)) if args.calibrate else None
    except (ValueError, OSError, KeyError) as e:
        print(f"lasp bench predict: {what}: {e}", file=sys.stderr)
        return 2
    if cal and args.use_calibration and "linear" in cal["fits"]:
        bw = cal["bandwidth_bytes_per_s"] or hw.bw_inter
        hw = dataclasses.replace(hw, peak_flops=cal["fits"]["linear"]["flops_per_s"], mfu=1.0, bw_intra=bw, bw_inter=bw)
    records = predict(cfg, args.seq_len, args.devices, args.methods, hw)
    config = {"command": "lasp bench predict " + " ".join(argv), "model_config": args.config, "devices": args.devices,
              "seq_lens": args.seq_len, "methods": args.methods, "hardware": dataclasses.asdict(hw), "calibrate": args.calibrate,
              "use_calibration": args.use_calibration}
    doc = results_doc("predict", {"model": "analytic (lasp.bench.costmodel)"}, config, records)
    doc["paper_comparison"] = paper_comparison(records) if args.devices == 64 else []
    doc.update(paper_match=match_paper(cfg, args.devices, hw, doc["paper_comparison"]), paper=PAPER_CITE)
    if cal:
        doc["calibration"] = cal
    text = report_markdown(doc)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        doc["plots"] = [os.path.basename(plot_metric_vs_seq_len(
            records, os.path.join(args.out, "predicted_tokens_per_s.png"), series="method", metric="tokens_per_s",
            ylabel="predicted training tokens/s", title=f"predicted, {args.devices} devices"))]
        write_results(args.out, doc, text)
    print(text)
    return 0
