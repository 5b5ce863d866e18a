"""Matplotlib (Agg) plots of benchmark records: a metric vs sequence length per series (one
panel per SP size, or per ``panel``) and speed-ups of one series over others."""
from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LINESTYLES = ("-", "--", ":", "-.")


def _colors(names) -> dict:
    """One fixed colour per series name (the same in every panel and plot)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(sorted(set(names)))}


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status", "ok") == "ok" and r.get("time_ms") is not None]


def _style(ax, ylabel: str, title: str, logy: bool, empty: str | None) -> None:
    """Log-2 sequence-length axis, labels, grid; a legend, or the ``empty`` note when nothing was drawn."""
    ax.set_xscale("log", base=2)
    if empty is None:
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="total sequence length (tokens)", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_vs_seq_len(records: list[dict], path: str, *, series: str, metric: str, ylabel: str, title: str,
                           logy: bool = True, dashed: tuple[str, ...] = (), panel: str = "sp", panel_name: str = "P") -> str:
    """``metric`` vs ``seq_len``, one line per value of ``series`` (``dashed`` ones dashed), one panel per ``panel``."""
    ok = _ok(records)
    panels = sorted({r[panel] for r in ok}) or [0]
    colors = _colors(r[series] for r in ok)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, value in zip(axes[0], panels):
        lines = defaultdict(list)
        for r in ok:
            if r[panel] == value and r.get(metric) is not None:
                lines[r[series]].append((r["seq_len"], r[metric]))
        for name, pts in sorted(lines.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", label=name, ls="--" if name in dashed else "-", color=colors[name])
        _style(ax, ylabel, f"{title}, {panel_name}={value}" if value else title, logy,
               None if lines else "no successful points")
    return _save(fig, path)


def plot_speedup(records: list[dict], path: str, *, series: str, base: str, against: tuple[str, ...], title: str) -> str:
    """Speed-up of ``base`` over each of ``against`` (time ratio) vs sequence length; one colour
    per baseline, one line style per SP size."""
    t = {(r[series], r["sp"], r["seq_len"]): r["time_ms"] for r in _ok(records)}
    data: dict = defaultdict(list)  # (other, sp) -> [(seq_len, time_other / time_base)]
    for (name, sp, n), tb in sorted(t.items()):
        for other in against if name == base and tb > 0 else ():
            if (other, sp, n) in t:
                data[(other, sp)].append((n, t[(other, sp, n)] / tb))
    colors = _colors(other for other, _ in data)
    styles = {sp: _LINESTYLES[i % len(_LINESTYLES)] for i, sp in enumerate(sorted({sp for _, sp in data}))}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (other, sp), pts in sorted(data.items()):
        ax.plot(*zip(*pts), marker="o", label=f"{base} over {other}, P={sp}", color=colors[other], ls=styles[sp])
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    _style(ax, f"speed-up of {base} (time ratio, x)", title, True, None if data else "no comparable points")
    return _save(fig, path)
