"""Comparing removal methods at matched effect: the question "at the same toxicity reduction, which method costs
less perplexity, and how sensitive is each to α?" answered from the candidates' (α, y, x) points.

Every removal rule returns the base at α = 0, so each method's curve starts at the base point (0, y₀, x₀) and its
candidates follow in increasing α. Along one curve, y (e.g. toxicity, lower is better) and x (e.g. perplexity) are
interpolated linearly in α between neighbouring grid points:

* **matched level** ``t``: the first α at which the curve reaches y ≤ t (walking up from α = 0), ``α_t``, and x there,
  ``x(α_t)``. The levels are fractions of the *common reduction* ``R = y₀ − max_m min_α y_m``, the largest reduction
  every method reaches on its grid; a method whose grid never gets there has no value (never an extrapolation).
* **α budget**: the first α at which x exceeds a bound (e.g. the selection rule's ``perplexity <= 1.05 * base``),
  ``α_max`` (``> last α`` when the whole grid stays within it), and the y reached there.
* **window**: ``α_max / α_t`` at the deepest matched level, a scale-free sensitivity: how far past the α that buys the
  matched reduction one can go before the bound breaks (α's meaning differs between methods, so raw α ranges are not
  comparable; the ratio is). Large is forgiving, near 1 is a knife edge, below 1 means the bound breaks first.

Pure functions of plain numbers: no pandas, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

Point = tuple[float, float, float]  # (alpha, y, x)
LEVELS = (0.5, 1.0)  # fractions of the common reduction R


@dataclass
class MethodMatch:
    method: str
    min_y: float
    at_level: dict[float, tuple[float, float] | None] = field(default_factory=dict)  # level t -> (α_t, x(α_t))
    alpha_max: float | None = None   # first α where x crosses the bound; None: never on the grid
    alpha_last: float = 0.0          # largest α of the grid
    alpha_first: float = 0.0         # smallest α of the grid: a match below it is interpolated toward the base
    y_at_max: float | None = None    # y at alpha_max (or at the last α when the bound never breaks)
    window: float | None = None      # alpha_max / α at the deepest level (alpha_last when the bound never breaks)


@dataclass
class MatchedComparison:
    base_y: float
    base_x: float
    bound: float
    reduction: float                 # common reduction R (<= 0: no common reduction)
    levels: dict[float, float]       # fraction -> target y
    methods: list[MethodMatch]

    def best_at(self, level: float) -> tuple[str, float] | None:
        """(method, x) with the smallest x at a target level, among methods that reach it."""
        reached = [(m.at_level[level][1], m.method) for m in self.methods if m.at_level.get(level)]
        if not reached:
            return None
        x, name = min(reached)
        return name, x


def _curve(points: Sequence[Point], base_y: float, base_x: float) -> list[Point]:
    return [(0.0, base_y, base_x)] + sorted((float(a), float(y), float(x)) for a, y, x in points if a > 0)


def _lerp(a0: float, v0: float, a1: float, v1: float, a: float) -> float:
    return v0 if a1 == a0 else v0 + (v1 - v0) * (a - a0) / (a1 - a0)


def first_crossing(curve: Sequence[Point], index: int, target: float, above: bool) -> tuple[float, int] | None:
    """First α (linear interpolation) at which ``curve[.][index]`` reaches ``target`` (``>`` when ``above``, else
    ``<=``), with the index of the segment's upper point; None when the curve never does."""
    def hit(v: float) -> bool:
        return v > target if above else v <= target

    if hit(curve[0][index]):
        return curve[0][0], 0
    for k in range(1, len(curve)):
        v0, v1 = curve[k - 1][index], curve[k][index]
        if hit(v1):
            a0, a1 = curve[k - 1][0], curve[k][0]
            return (a1 if v1 == v0 else a0 + (target - v0) * (a1 - a0) / (v1 - v0)), k
    return None


def _value_at(curve: Sequence[Point], k: int, alpha: float, index: int) -> float:
    lo, hi = curve[max(k - 1, 0)], curve[k]
    return _lerp(lo[0], lo[index], hi[0], hi[index], alpha)


def compare(points: Mapping[str, Sequence[Point]], base_y: float, base_x: float, bound: float,
            levels: Sequence[float] = LEVELS) -> MatchedComparison:
    """The matched comparison of removal methods from their (α, y, x) candidates (see the module docstring)."""
    curves = {m: _curve(p, base_y, base_x) for m, p in points.items() if any(a > 0 for a, _, _ in p)}
    mins = {m: min(y for _, y, _ in c) for m, c in curves.items()}
    reduction = base_y - max(mins.values()) if mins else 0.0
    targets = {f: base_y - f * reduction for f in levels} if reduction > 0 else {}
    out = []
    for m, curve in curves.items():
        match = MethodMatch(m, mins[m], alpha_last=curve[-1][0], alpha_first=curve[1][0])
        for f, t in targets.items():
            hit = first_crossing(curve, 1, t, above=False)
            match.at_level[f] = None if hit is None else (hit[0], _value_at(curve, hit[1], hit[0], 2))
        broke = first_crossing(curve, 2, bound, above=True)
        if broke is not None:
            match.alpha_max = broke[0]
            match.y_at_max = _value_at(curve, broke[1], broke[0], 1)
        else:
            match.y_at_max = curve[-1][1]
        deepest = match.at_level.get(max(targets)) if targets else None
        if deepest is not None and deepest[0] > 0:
            match.window = (match.alpha_max if match.alpha_max is not None else match.alpha_last) / deepest[0]
        out.append(match)
    return MatchedComparison(base_y, base_x, bound, reduction, targets, out)


def describe(cmp: MatchedComparison, y_name: str, x_name: str, fmt=lambda v: f"{v:.4g}",
             noise: float | None = None) -> list[str]:
    """Plain-text sentences stating the answer, whichever way it goes. ``noise``: half-width of the base's 95%
    interval of y; a common reduction below it is flagged as within noise."""
    if not cmp.methods:
        return ["No removal candidates: nothing to compare."]
    if cmp.reduction <= 0:
        return [f"The methods do not reach a common {y_name} reduction: at least one method never goes below the "
                f"base {y_name} ({fmt(cmp.base_y)}) on its α grid, so they cannot be compared at matched {y_name}."]
    deepest = max(cmp.levels)
    lines = [f"Common reduction: every method reaches {y_name} ≤ {fmt(cmp.levels[deepest])} "
             f"(from {fmt(cmp.base_y)} at the base, a reduction of {fmt(cmp.reduction)}); "
             f"matched levels are {', '.join(f'{f:.0%}' for f in sorted(cmp.levels))} of it."]
    if noise is not None and cmp.reduction < noise:
        lines.append(f"Caution: that reduction is smaller than the half-width of the base's 95% interval of {y_name} "
                     f"({fmt(noise)}), so the comparison below is within sampling noise.")
    for f in sorted(cmp.levels):
        best = cmp.best_at(f)
        others = [f"{m.method} {fmt(m.at_level[f][1])} (α {fmt(m.at_level[f][0])}"
                  + (", below its first grid α: interpolated from the base)" if m.at_level[f][0] < m.alpha_first
                     else ")") for m in cmp.methods if m.at_level.get(f)]
        if best is not None:
            lines.append(f"At {y_name} {fmt(cmp.levels[f])} ({f:.0%} of the common reduction), {best[0]} costs the "
                         f"least {x_name}: " + "; ".join(others) + f" (base {fmt(cmp.base_x)}).")
    for m in cmp.methods:
        if m.alpha_max is None:
            budget = f"stays within {x_name} ≤ {fmt(cmp.bound)} over its whole grid (α ≤ {fmt(m.alpha_last)})"
        else:
            budget = f"exceeds {x_name} {fmt(cmp.bound)} at α ≈ {fmt(m.alpha_max)}"
        window = (f"; window α_max/α_matched = {fmt(m.window)}" + (" or more" if m.alpha_max is None else "")
                  if m.window is not None and math.isfinite(m.window) else "")
        lines.append(f"{m.method} {budget}, where {y_name} is {fmt(m.y_at_max)}{window}.")
    return lines


def points_from_frames(wide, info, x: str, y: str) -> dict[str, list[Point]]:
    """(α, y, x) per method from the report's wide metrics frame and candidate info (method, alpha columns)."""
    points: dict[str, list[Point]] = {}
    for cand in info.index:
        method, alpha = info.at[cand, "method"], info.at[cand, "alpha"]
        if method is None or alpha is None or cand not in wide.index:
            continue
        a, vy, vx = float(alpha), float(wide.at[cand, y]), float(wide.at[cand, x])
        if all(math.isfinite(v) for v in (a, vy, vx)):
            points.setdefault(str(method), []).append((a, vy, vx))
    return points


def add_section(doc, wide, info, base: str, x: str, y: str, constraints: Sequence[Mapping], fmt,
                noise: float | None = None) -> None:
    """The report section "Matched comparison" (see the module docstring); skipped when there is nothing to compare.

    ``constraints`` are the selection rule's evaluated constraints; the first ``x <= bound`` one is the bound, else
    1.05 × the base's x."""
    if not (x in wide.columns and y in wide.columns and base in wide.index):
        return
    points = points_from_frames(wide, info, x, y)
    base_y, base_x = float(wide.at[base, y]), float(wide.at[base, x])
    if not points or not (math.isfinite(base_y) and math.isfinite(base_x)):
        return
    given = [c for c in constraints if c.get("metric") == x and c.get("op") in ("<=", "<")]
    bound = float(given[0]["bound"]) if given else 1.05 * base_x
    cmp = compare(points, base_y, base_x, bound)
    sec = doc.section("Matched comparison")
    sec.p(f"Each method's candidates form a curve over α that starts at the base ({base}) at α = 0. Along it, {y} "
          f"and {x} are interpolated linearly in α. Matched levels are fractions of the largest {y} reduction "
          f"that every method reaches on its grid; 'α budget' is the first α at which {x} exceeds {fmt(bound)} "
          + ("(the selection rule's bound)" if given else f"(1.05 × {base}; the selection rule bounds no {x})")
          + "; 'window' is α budget ÷ α at the deepest matched level (scale-free: α means different things per "
            "method). Point estimates; the intervals are in the Metrics table.")
    sec.ul(describe(cmp, y, x, fmt, noise))
    levels = sorted(cmp.levels)
    headers = (["method", "α grid", f"min {y}"]
               + [h for f in levels for h in (f"α at {y} ≤ {fmt(cmp.levels[f])}", f"{x} there")]
               + ["α budget", f"{y} at budget", "window"])
    rows = []
    for m in cmp.methods:
        grid = sorted(a for a, _, _ in points[m.method])
        row = [m.method, ", ".join(f"{a:g}" for a in grid), fmt(m.min_y)]
        for f in levels:
            hit = m.at_level.get(f)
            row += [fmt(hit[0]), fmt(hit[1])] if hit else ["not reached", "n/a"]
        row += [fmt(m.alpha_max) if m.alpha_max is not None else f"> {m.alpha_last:g}", fmt(m.y_at_max),
                "n/a" if m.window is None else (fmt(m.window) + ("+" if m.alpha_max is None else ""))]
        rows.append(row)
    sec.table(headers, rows)
