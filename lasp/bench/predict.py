"""``lasp bench predict``: an analytic cost model of a training step on a cluster, next to the
LASP-2 paper's reported speed-ups; the formulas and the calibration: ``docs/bench/costmodel.md``.

    lasp bench predict --out DIR                        # the paper's setting, A100 defaults
    lasp bench predict --calibrate bench-results/cpu-p2 --out DIR   # fitted to a measured layer run
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os

import numpy as np

from .cli import csv_arg, positive, seq_len_arg
from .results import fmt_num, load_results, markdown_table, plot_metric_vs_seq_len, report, results_doc, write_results

LINEAR_SP = ("lasp2", "lasp1", "ring", "ulysses")
LAYER_METHODS = ("lasp2", "lasp1", "ulysses-linear", "ring-linear", "allgather", "ring", "ulysses-softmax")


def _knob(default: float, flag: str, unit: float, help: str):
    """A :class:`Hardware` field and its ``lasp bench predict`` flag (in ``unit``s of the field)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "unit": unit, "help": help})


@dataclasses.dataclass
class Hardware:
    """One device type and its interconnect (SI units). Defaults: A100-80GB SXM nodes of 8."""

    peak_flops: float = _knob(312e12, "--peak-tflops", 1e12, "dense peak per device (A100 bf16 tensor cores: 312)")
    mfu: float = _knob(0.40, "--mfu", 1, "achieved fraction of peak for matmuls (and attention kernels)")
    gpus_per_node: int = _knob(8, "--gpus-per-node", 1, "GPUs per node")
    bw_intra: float = _knob(300e9, "--bw-intra-gbs", 1e9, "GB/s per GPU per direction inside a node (A100 NVLink)")
    bw_inter: float = _knob(25e9, "--bw-inter-gbs", 1e9, "GB/s per GPU per direction between nodes (8 x 200 Gb/s IB per node)")
    lat_intra: float = _knob(5e-6, "--lat-intra-us", 1e-6, "us per message inside a node")
    lat_inter: float = _knob(10e-6, "--lat-inter-us", 1e-6, "us per message between nodes")
    lat_launch: float = _knob(50e-6, "--lat-launch-us", 1e-6, "us per call / dependent step (launch, sync, NCCL + Python)")

    @property
    def flops(self) -> float:
        return self.peak_flops * self.mfu

    def link(self, P: int) -> tuple[float, float]:
        """(bandwidth, latency) of a group of P ranks (contiguous ranks, nodes of G)."""
        return (self.bw_inter, self.lat_inter) if P > self.gpus_per_node else (self.bw_intra, self.lat_intra)


@dataclasses.dataclass
class Shape:
    """One attention layer's shape on the SP group."""

    seq_len: int
    P: int
    batch: int = 1
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 128
    elem_bytes: int = 2
    chunk: int = 64
    layout: str = "contiguous"


def collective_s(kind: str, n: float, P: int, hw: Hardware) -> float:
    """Seconds of one ``all_gather`` | ``all_to_all`` | ``all_reduce`` of ``n`` bytes per rank."""
    if P == 1:
        return 0.0
    bw, a = hw.link(P)
    steps, volume = {"all_gather": (1, P - 1), "all_to_all": (1, (P - 1) / P), "all_reduce": (2, 2 * (P - 1) / P)}[kind]
    return hw.lat_launch + steps * (P - 1) * a + volume * n / bw


def chain_s(n: float, P: int, hw: Hardware) -> float:
    """P-1 dependent hops along contiguous ranks; ``ceil(P/G) - 1`` of them cross nodes."""
    if P == 1:
        return 0.0
    inter = math.ceil(P / hw.gpus_per_node) - 1
    return ((P - 1 - inter) * (2 * hw.lat_launch + hw.lat_intra + n / hw.bw_intra)
            + inter * (2 * hw.lat_launch + hw.lat_inter + n / hw.bw_inter))


def ring_s(kv: float, block_s: float, s: Shape, hw: Hardware) -> tuple[float, float]:
    """(comm, exposed) of a K/V ring: P-1 steps of ``kv`` bytes forward and backward, P steps of
    the fp32 dK/dV accumulator backward, each overlapping one block (``block_s``, fwd + bwd)."""
    bw, a = hw.link(s.P)
    step, acc = hw.lat_launch + a + kv / bw, hw.lat_launch + a + kv * 4 / s.elem_bytes / bw
    t_fwd, t_bwd = block_s / 3, 2 * block_s / 3
    comm = 2 * (s.P - 1) * step + s.P * acc
    return comm, (s.P - 1) * (max(0.0, step - t_fwd) + max(0.0, step - t_bwd)) + s.P * max(0.0, acc - t_bwd)


def layer_cost(method: str, s: Shape, hw: Hardware) -> dict:
    """Seconds of one attention layer fwd+bwd on the slowest rank: compute, comm, exposed, total.
    ``method``: one of :data:`LAYER_METHODS`."""
    if method not in LAYER_METHODS:
        raise ValueError(f"method must be one of {LAYER_METHODS}, got {method!r}")
    P, F, B, H, D, T, T_l = s.P, hw.flops, s.batch, s.heads, s.head_dim, s.seq_len, s.seq_len / s.P
    state, kv = B * H * D**2 * 4, 2 * B * T_l * s.kv_heads * D * s.elem_bytes  # bytes: a state; a K/V block
    comm = exposed = 0.0
    if method in ("lasp2", "lasp1", "ulysses-linear", "ring-linear"):
        t_intra = 3 * B * T_l * 2 * s.chunk * D * H / F
        compute = t_intra + 3 * B * T_l * 4 * D**2 * H / F
        if method in ("lasp2", "lasp1"):
            one = collective_s("all_gather", state, P, hw) if method == "lasp2" else chain_s(state, P, hw)
            comm, exposed = 2 * one, 2 * max(0.0, one - t_intra / 2)
        elif method == "ring-linear":
            f_block = 3 * 2 * B * T_l * H * D**2  # every received K/V block's K_j^T V_j, with backward
            compute += (P - 1) * f_block / F
            comm, exposed = ring_s(kv, f_block / F, s, hw)
    else:
        pairs = T * T / (2 * P) if method == "ulysses-softmax" or s.layout == "zigzag" else T_l * (T - T_l / 2)
        compute = 3 * 4 * B * H * D * pairs / F
        if method == "allgather":
            comm = exposed = 2 * collective_s("all_gather", kv, P, hw)  # reduce-scatter: same volume
        elif method == "ring":
            comm, exposed = ring_s(kv, compute / P, s, hw)
    note = ""
    if method.startswith("ulysses"):  # all-to-all of q, k, v and of o, each way
        h_kv = H if method == "ulysses-linear" else s.kv_heads
        qkv, o = B * T_l * (H + 2 * h_kv) * D * s.elem_bytes, B * T_l * H * D * s.elem_bytes
        comm = exposed = 2 * (collective_s("all_to_all", qkv, P, hw) + collective_s("all_to_all", o, P, hw))
        if H % P or h_kv % P:
            note = f"needs heads{'' if method == 'ulysses-linear' else ' and kv_heads'} % P == 0 (H={H}, H_kv={h_kv}, P={P})"
    comm, exposed = (0.0, 0.0) if P == 1 else (comm, exposed)
    return {"compute_s": compute, "comm_s": comm, "exposed_comm_s": exposed, "total_s": compute + exposed,
            "feasible": not note, "note": note}


def step_cost(cfg, seq_len: int, P: int, method: str, hw: Hardware, *, batch: int = 1, grad_bytes: int = 2,
              softmax_method: str = "allgather", chunk: int = 64, layout: str = "contiguous", ep: int = 1) -> dict:
    """One training step of ``cfg`` (a ModelConfig) on P devices with linear SP ``method`` (lasp2 |
    lasp1 | ring | ulysses; softmax layers use ``softmax_method``): seconds by part and tokens/s. MoE: ``docs/bench/costmodel.md``."""
    from ..models.info import count_params, flop_breakdown

    if method not in LINEAR_SP:
        raise ValueError(f"method must be one of {LINEAR_SP}, got {method!r}")
    dense = flop_breakdown(cfg, seq_len)["matmul"] * batch * seq_len / P / hw.flops
    shape = dict(seq_len=seq_len, P=P, batch=batch, heads=cfg.num_heads, head_dim=cfg.head_dim, chunk=chunk, layout=layout)
    lin = layer_cost({"ring": "ring-linear", "ulysses": "ulysses-linear"}.get(method, method), Shape(kv_heads=cfg.num_heads, **shape), hw)
    soft = layer_cost({"ring": "ring", "ulysses": "ulysses-softmax"}.get(method, softmax_method),
                      Shape(kv_heads=cfg.kv_heads, **shape), hw)
    n_soft = cfg.layer_types.count("softmax")
    n_lin = cfg.num_layers - n_soft
    experts = sum(cfg.moe_layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.expert_intermediate_size  # routed expert weights
    grads = sum(collective_s("all_reduce", n * grad_bytes, p, hw) for n, p in ((count_params(cfg) - experts, P), (experts // ep, P // ep)))
    a2a = 4 * sum(cfg.moe_layers) * collective_s("all_to_all", batch * seq_len / P * cfg.num_experts_per_tok * cfg.hidden_size * grad_bytes, ep, hw)
    part = {k: n_lin * lin[k] + n_soft * soft[k] for k in ("compute_s", "exposed_comm_s", "comm_s")}
    total = dense + part["compute_s"] + part["exposed_comm_s"] + grads + a2a
    return {
        "method": method, "seq_len": seq_len, "devices": P, "dense_s": dense, "attention_compute_s": part["compute_s"],
        "exposed_comm_s": part["exposed_comm_s"], "attention_comm_s": part["comm_s"], "grad_allreduce_s": grads, "moe_a2a_s": a2a,
        "time_ms": total * 1e3, "tokens_per_s": batch * seq_len / total,
        "feasible": (n_lin == 0 or lin["feasible"]) and (n_soft == 0 or soft["feasible"]),
        "note": "; ".join(x for x in {lin["note"] if n_lin else "", soft["note"] if n_soft else ""} if x),
    }


# LASP-2 paper (arXiv 2502.07563), Linear-Llama3-1B, 64 A100: LASP-2's speed-up in %
PAPER = {("ring", 512 * 1024): 17.8, ("lasp1", 512 * 1024): 7.3, ("ring", 2048 * 1024): 36.6, ("lasp1", 2048 * 1024): 15.2}
PAPER_CITE = "Sun et al. 2025, LASP-2, arXiv 2502.07563"


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
                 rec.get("head_dim", 64), {"fp32": 4, "bf16": 2, "fp16": 2}[rec.get("dtype", "fp32")], 64, rec.get("layout", "contiguous"))


def calibrate(layer_doc: dict) -> dict:
    """Fit ``F`` and ``t0`` per kind and one bandwidth; predict every ok point of ``layer_doc``."""
    unit = Hardware(peak_flops=1.0, mfu=1.0)  # compute_s = the model's FLOPs
    ok = [(dict(r, kind=r.get("kind", "linear")), layer_cost(r["method"], _shape_of(r), unit)["compute_s"])
          for r in layer_doc["records"] if r.get("status") == "ok" and r["method"] in LAYER_METHODS]  # (no delta rule)
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


# what one hardware knob would have to be for the model to reproduce a paper figure
KNOBS = {"ring": ("bw_inter", "inter-node bandwidth per GPU", 1e9, "GB/s"), "lasp1": ("lat_launch", "per-call / per-hop overhead", 1e-6, "us")}


def paper_comparison(cfg, devices: int, hw: Hardware, records: list[dict]) -> list[dict]:
    """Each paper figure next to the predicted one, with the value of its knob (:data:`KNOBS`) that
    would reproduce it (log-scale bisection; None when no value in 1e-4..1e4 x the assumption does)."""
    rows = []
    for (versus, n), paper in PAPER.items():
        ours = next((r["lasp2_speedup_pct"] for r in records if r["method"] == versus and r["seq_len"] == n), None)
        if ours is None:
            continue
        field, what, unit, uname = KNOBS[versus]

        def gap(x: float) -> float:
            a, b = (step_cost(cfg, n, devices, m, dataclasses.replace(hw, **{field: x}))["tokens_per_s"] for m in ("lasp2", versus))
            return 100 * (a / b - 1) - paper  # noqa: B023 - used in this iteration only

        lo, hi = getattr(hw, field) / 1e4, getattr(hw, field) * 1e4
        value, sign = None, gap(lo) < 0
        if sign != (gap(hi) < 0):
            for _ in range(80):
                mid = (lo * hi) ** 0.5
                lo, hi = (mid, hi) if (gap(mid) < 0) == sign else (lo, mid)
            value = (lo * hi) ** 0.5
        rows.append({"versus": versus, "seq_len": n, "paper_pct": paper, "predicted_pct": ours, "difference_pp": ours - paper,
                     "ratio": ours / paper, "knob": field, "knob_meaning": what, "assumed": getattr(hw, field) / unit,
                     "needed": None if value is None else value / unit, "unit": uname})
    return rows


def report_markdown(doc: dict) -> str:
    cfg, hw = doc["config"], doc["config"]["hardware"]
    knobs = ", ".join(f"{f.metadata['flag']} {hw[f.name] / f.metadata['unit']:g}" for f in dataclasses.fields(Hardware))
    headers = ["method", "feasible", "seq len", "step ms", "tokens/s", "dense ms", "attn compute ms", "exposed comm ms",
               "grad all-reduce ms", "MoE all-to-all ms", "LASP-2 speed-up"]
    rows = [[r["method"], "yes" if r["feasible"] else f"no ({r['note']})", f"{r['seq_len']:,}", fmt_num(r["time_ms"]),
             fmt_num(r["tokens_per_s"], 0), fmt_num(r["dense_s"] * 1e3), fmt_num(r["attention_compute_s"] * 1e3),
             fmt_num(r["exposed_comm_s"] * 1e3), fmt_num(r["grad_allreduce_s"] * 1e3), fmt_num(r.get("moe_a2a_s", 0) * 1e3),
             "-" if r["method"] == "lasp2" else f"{r['lasp2_speedup_pct']:+.1f}%"] for r in doc["records"]]
    lines = [report("predict", cfg["command"], {}, markdown_table(headers, rows), "",
                    f"Model {cfg['model_config']}, {cfg['devices']} devices (EP {cfg.get('ep', 1)}), batch 1. Hardware: {knobs}.")]
    if doc.get("paper_comparison"):
        lines += [f"Against the paper ({PAPER_CITE}; its Linear-Llama3-1B on 64 A100):", ""]
        rows = [[f"LASP-2 over {c['versus']}", f"{c['seq_len']:,}", f"{c['paper_pct']:+.1f}%", f"{c['predicted_pct']:+.1f}%",
                 f"{c['difference_pp']:+.1f} pp", f"{c['ratio']:.2f}x", f"{c['knob_meaning']} = " + ("none in 1e-4..1e4 x the assumption"
                 if c["needed"] is None else f"{c['needed']:,.1f} {c['unit']}") + f" (assumed {c['assumed']:,.1f} {c['unit']})"]
                for c in doc["paper_comparison"]]
        headers = ["speed-up", "seq len", "paper", "predicted", "difference", "predicted / paper", "to reproduce it the model needs"]
        lines += [markdown_table(headers, rows), ""]
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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lasp bench predict", description="analytic cost model of a training step on a cluster")
    ap.add_argument("--config", default="configs/models/linear-llama3-1b.yaml", help="model YAML (default: the paper's Linear-Llama3-1B)")
    ap.add_argument("--devices", type=positive(), default=64, help="GPUs in the SP group")
    ap.add_argument("--seq-len", type=csv_arg(seq_len_arg), default="2K,8K,32K,128K,512K,2048K", help="total sequence lengths, comma-separated")
    ap.add_argument("--methods", type=csv_arg(str, LINEAR_SP), default="lasp2,lasp1,ring,ulysses", help=f"of {', '.join(LINEAR_SP)}")
    for f in dataclasses.fields(Hardware):
        kind, unit = type(f.default), f.metadata["unit"]
        ap.add_argument(f.metadata["flag"], dest=f.name, metavar="N", type=kind if f.name.startswith("lat") else positive(kind),
                        default=f.default / unit if unit != 1 else f.default, help=f.metadata["help"])
    ap.add_argument("--ep", type=positive(), default=1, help="expert-parallel devices (MoE models; divides --devices)")
    ap.add_argument("--calibrate", default=None, help="a `lasp bench layer` results.json (or its directory)")
    ap.add_argument("--use-calibration", action="store_true", help="predict with the fitted throughput and bandwidth")
    ap.add_argument("--out", default=None, help="output directory (results.json, results.md, plot)")
    args = ap.parse_args(argv)
    if "lasp2" not in args.methods:
        args.methods.insert(0, "lasp2")
    if any(n < args.devices for n in args.seq_len) or args.devices % args.ep:
        ap.error("every --seq-len must be >= --devices, and --ep must divide --devices")
    if args.use_calibration and not args.calibrate:
        ap.error("--use-calibration needs --calibrate")
    from ..models import ModelConfig

    hw = Hardware(**{f.name: getattr(args, f.name) * f.metadata["unit"] for f in dataclasses.fields(Hardware)})
    what = "--config"
    try:
        cfg = ModelConfig.from_yaml(args.config)
        what = "--calibrate"
        cal = calibrate(load_results(args.calibrate)) if args.calibrate else None
    except (ValueError, OSError, KeyError) as e:
        ap.error(f"{what}: {e}")
    if cal and args.use_calibration and "linear" in cal["fits"]:
        bw = cal["bandwidth_bytes_per_s"] or hw.bw_inter
        hw = dataclasses.replace(hw, peak_flops=cal["fits"]["linear"]["flops_per_s"], mfu=1.0, bw_intra=bw, bw_inter=bw)
    records = [dict(step_cost(cfg, n, args.devices, m, hw, ep=args.ep), sp=args.devices) for n in args.seq_len for m in args.methods]
    for r in records:  # an infeasible point (Ulysses with heads % P != 0) is listed in the table, never plotted
        r["status"] = "ok" if r["feasible"] else "skipped"
        if not r["feasible"]:
            r["reason"] = f"infeasible: {r['note']}"
    lasp2 = {r["seq_len"]: r["tokens_per_s"] for r in records if r["method"] == "lasp2"}
    for r in records:  # LASP-2's speed-up over each
        r["lasp2_speedup_pct"] = 100 * (lasp2[r["seq_len"]] / r["tokens_per_s"] - 1)
    config = {"command": "lasp bench predict " + " ".join(argv), "model_config": args.config, "devices": args.devices, "ep": args.ep,
              "seq_lens": args.seq_len, "methods": args.methods, "hardware": dataclasses.asdict(hw), "calibrate": args.calibrate,
              "use_calibration": args.use_calibration}
    doc = results_doc("predict", {"model": "analytic (lasp.bench.predict)"}, config, records)
    doc.update(paper_comparison=paper_comparison(cfg, args.devices, hw, records) if args.devices == 64 else [], paper=PAPER_CITE,
               **({"calibration": cal} if cal else {}))
    text = report_markdown(doc)
    if args.out:
        doc["plots"] = [os.path.basename(plot_metric_vs_seq_len(
            records, os.path.join(args.out, "predicted_tokens_per_s.png"), series="method", metric="tokens_per_s",
            ylabel="predicted training tokens/s", title=f"predicted, {args.devices} devices"))]
        write_results(args.out, doc, text)
    print(text)
    return 0
