"""The bundle's plots, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_tradeoff", "plot_bars", "plot_guard", "plot_alpha_curves", "pick_metric"]

_DPI = 110
_REFERENCE_STYLE = {  # candidates without a method: base, forget, oracle (others get a grey dot)
    "base": {"marker": "*", "color": "black", "s": 240},
    "forget": {"marker": "X", "color": "#c0102a", "s": 140},
    "oracle": {"marker": "D", "color": "#7b3294", "s": 90},
}
# tab10 without its red and purple, which mark the forget and oracle models
_METHOD_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
# alpha labels of successive methods go to different sides of their points, so coinciding curves stay readable
_LABEL_OFFSETS = [(6, 6), (6, -13), (-34, 6), (-34, -13)]
_PNG_META = {"Software": None}  # keep matplotlib's version out of the bytes


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=_DPI, metadata=_PNG_META)
    return path


def _method_colors(methods: Sequence[str]) -> dict[str, Any]:
    return {m: _METHOD_PALETTE[k % len(_METHOD_PALETTE)] for k, m in enumerate(methods)}


def _is_set(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value) != ""


def _alpha_text(alpha: Any) -> str:
    try:
        return f"{float(alpha):g}"
    except (TypeError, ValueError):
        return str(alpha)


def pick_metric(wanted: str, metrics: Sequence[str]) -> str | None:
    """``wanted`` when present, else the first metric that starts with ``wanted`` + '.' or its family prefix."""
    if wanted in metrics:
        return wanted
    family = wanted.split(".")[0]
    for metric in metrics:
        if metric.startswith(wanted + ".") or metric == family or metric.startswith(family + "."):
            return metric
    return None


def plot_tradeoff(path: Path, wide: pd.DataFrame, info: pd.DataFrame, x: str, y: str,
                  selected: str | None = None, x_bound: float | None = None, y_bound: float | None = None) -> Path:
    """``y`` against ``x``: one connected line per method over alpha (alpha annotated), reference candidates marked.

    ``wide``: index candidate, columns metric. ``info``: index candidate, columns method, alpha.
    """
    fig = Figure(figsize=(8.5, 6.0))
    ax = fig.add_subplot()
    methods = [m for m in dict.fromkeys(info["method"]) if _is_set(m)]
    colors = _method_colors(methods)
    xs_all: list[float] = []
    for k, method in enumerate(methods):
        rows = info[info["method"] == method].copy()
        rows["_alpha"] = pd.to_numeric(rows["alpha"], errors="coerce")
        rows = rows.sort_values("_alpha", na_position="last")
        pts = [(float(wide.at[c, x]), float(wide.at[c, y]), a) for c, a in zip(rows.index, rows["alpha"])
               if math.isfinite(float(wide.at[c, x])) and math.isfinite(float(wide.at[c, y]))]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xs_all += xs
        ax.plot(xs, ys, "-o", color=colors[method], label=method, linewidth=1.8, markersize=6)
        for px, py, alpha in pts:
            if _is_set(alpha):
                ax.annotate(f"α={_alpha_text(alpha)}", (px, py), textcoords="offset points",
                            xytext=_LABEL_OFFSETS[k % len(_LABEL_OFFSETS)],
                            fontsize=8, color=colors[method])
    refs = [c for c in info.index if not _is_set(info.at[c, "method"])]
    for cand in refs:
        px, py = float(wide.at[cand, x]), float(wide.at[cand, y])
        if not (math.isfinite(px) and math.isfinite(py)):
            continue
        xs_all.append(px)
        style = next((v for k, v in _REFERENCE_STYLE.items() if cand.lower().startswith(k)),
                     {"marker": "o", "color": "grey", "s": 70})
        ax.scatter([px], [py], marker=style["marker"], color=style["color"], s=style["s"], zorder=5, label=cand,
                   edgecolors="white", linewidths=0.8)
        ax.annotate(cand, (px, py), textcoords="offset points", xytext=(7, -12), fontsize=9, fontweight="bold")
    if selected is not None and selected in wide.index:
        px, py = float(wide.at[selected, x]), float(wide.at[selected, y])
        if math.isfinite(px) and math.isfinite(py):
            ax.scatter([px], [py], s=380, facecolors="none", edgecolors="black", linewidths=2.0, zorder=6,
                       label=f"selected: {selected}")
    if x_bound is not None and math.isfinite(x_bound):
        ax.axvline(x_bound, color="grey", linestyle="--", linewidth=1, label=f"constraint bound: {x} = {x_bound:.4g}")
    if y_bound is not None and math.isfinite(y_bound):
        ax.axhline(y_bound, color="grey", linestyle=":", linewidth=1, label=f"constraint bound: {y} = {y_bound:.4g}")
    positive = [v for v in xs_all if v > 0]
    if positive and len(positive) == len(xs_all) and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
        x_label = f"{x} (log scale)"
    else:
        x_label = x
    ax.set_xlabel(f"{x_label}  (lower is better)" if "perplexity" in x else x_label)
    ax.set_ylabel(f"{y}  (lower is better)" if "toxicity" in y else y)
    ax.set_title(f"Trade-off: {y} against {x} over α")
    ax.margins(x=0.08, y=0.08)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(path: Path, long: pd.DataFrame, info: pd.DataFrame, metrics: Sequence[str],
              selected: str | None = None) -> Path:
    """One horizontal bar panel per metric, a bar per candidate with its confidence interval and value."""
    candidates = list(info.index)
    methods = [m for m in dict.fromkeys(info["method"]) if _is_set(m)]
    colors = _method_colors(methods)
    ncols = 1 if len(metrics) == 1 else (2 if len(metrics) <= 4 else 3)
    nrows = math.ceil(len(metrics) / ncols)
    label_width = max((len(str(c)) for c in candidates), default=8)
    panel_h = max(2.2, 0.26 * len(candidates) + 1.0)
    fig = Figure(figsize=(ncols * 4.4 + 0.08 * label_width, nrows * panel_h + 0.4), layout="constrained")
    pos = {c: k for k, c in enumerate(candidates)}
    bar_colors = []
    for c in candidates:
        m = info.at[c, "method"]
        bar_colors.append(colors[m] if _is_set(m) else "#7f7f7f")
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        rows = long[long["metric"] == metric].set_index("candidate")
        values, lows, highs = [], [], []
        for c in candidates:
            if c in rows.index:
                v = float(rows.at[c, "value"])
                lo, hi = float(rows.at[c, "ci_low"]), float(rows.at[c, "ci_high"])
            else:
                v = lo = hi = math.nan
            values.append(v)
            lows.append(max(v - lo, 0.0) if math.isfinite(v) and math.isfinite(lo) else 0.0)
            highs.append(max(hi - v, 0.0) if math.isfinite(v) and math.isfinite(hi) else 0.0)
        plotted = [v if math.isfinite(v) else 0.0 for v in values]
        edges = ["black" if c == selected else "none" for c in candidates]
        ax.barh([pos[c] for c in candidates], plotted, color=bar_colors, xerr=[lows, highs], edgecolor=edges,
                linewidth=2, error_kw={"ecolor": "black", "capsize": 2.5, "elinewidth": 1})
        finite = [v + h for v, h in zip(values, highs) if math.isfinite(v)]
        span = max([abs(v) for v in finite] + [1e-12])
        for c, v, h in zip(candidates, values, highs):
            if math.isfinite(v):
                ax.text(max(v + h, 0) + 0.015 * span, pos[c], f"{v:.4g}", va="center", fontsize=6.5, color="#333333")
            else:
                label = " n/a" if math.isnan(v) else (" inf" if v > 0 else " -inf")
                ax.text(0, pos[c], label, va="center", fontsize=7, color="grey")
        ax.set_xlim(right=max(max(finite) if finite else 1.0, 0.0) + 0.16 * span)
        ax.set_yticks(range(len(candidates)))
        ax.set_yticklabels(candidates if k % ncols == 0 else [""] * len(candidates), fontsize=8)
        if k % ncols == 0 and selected in pos:
            ax.get_yticklabels()[pos[selected]].set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    title = "Metrics per candidate (bars: value; whiskers: 95% interval"
    fig.suptitle(title + ("; outlined: selected)" if selected in pos else ")"), fontsize=11)
    return _save(fig, path)


def plot_guard(path: Path, guard: pd.DataFrame, column: str = "clamped_fraction") -> Path:
    """The guard's ``column`` against alpha, one line per method. ``guard``: columns candidate, method, alpha, ..."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    methods = [m for m in dict.fromkeys(guard["method"]) if _is_set(m)]
    colors = _method_colors(methods)
    for method in methods:
        rows = guard[guard["method"] == method].copy()
        rows["_alpha"] = pd.to_numeric(rows["alpha"], errors="coerce")
        rows["_v"] = pd.to_numeric(rows[column], errors="coerce")
        rows = rows.dropna(subset=["_alpha", "_v"]).sort_values("_alpha")
        if rows.empty:
            continue
        ax.plot(rows["_alpha"], rows["_v"], "-o", color=colors[method], label=method, linewidth=1.8)
    ax.set_xlabel("α")
    ax.set_ylabel(column.replace("_", " "))
    ax.set_title(f"Guard: {column.replace('_', ' ')} against α")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


_REFERENCE_LINES = ["-", "--", ":", "-."]


def plot_alpha_curves(path: Path, wide: pd.DataFrame, info: pd.DataFrame, metrics: Sequence[str],
                      methods: Sequence[str] | None = None, references: Sequence[str] | None = None) -> Path:
    """One panel per metric: the metric against α (the scaling factor), a line per method over its α grid, and a
    horizontal line per reference candidate (no method: e.g. base, individual, multitask models).

    ``methods`` default: every method with more than one α; ``references`` default: every candidate without one."""
    swept = [m for m in dict.fromkeys(info["method"]) if _is_set(m)
             and pd.to_numeric(info.loc[info["method"] == m, "alpha"], errors="coerce").notna().sum() > 1]
    methods = [m for m in (methods or swept) if m in set(info["method"].dropna())]
    refs = list(references) if references is not None else [c for c in info.index if not _is_set(info.at[c, "method"])]
    colors = _method_colors(methods)
    ncols = min(len(metrics), 2)
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(6.2 * ncols, 4.2 * nrows), layout="constrained")
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for method in methods:
            rows = info[info["method"] == method].copy()
            rows["_alpha"] = pd.to_numeric(rows["alpha"], errors="coerce")
            rows = rows.dropna(subset=["_alpha"]).sort_values("_alpha")
            pts = [(a, float(wide.at[c, metric])) for c, a in zip(rows.index, rows["_alpha"])
                   if math.isfinite(float(wide.at[c, metric]))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[method], label=method,
                        linewidth=1.8, markersize=5)
        for j, cand in enumerate(c for c in refs if c in wide.index):
            value = float(wide.at[cand, metric])
            if math.isfinite(value):
                ax.axhline(value, color="#444444", linestyle=_REFERENCE_LINES[j % len(_REFERENCE_LINES)],
                           linewidth=1.1, label=f"{cand} ({value:.3g})")
        ax.set_xlabel("α (scaling factor)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against α")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return _save(fig, path)
