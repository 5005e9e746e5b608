"""Seeded percentile bootstrap over units (prompts, examples), deterministic given the seed.

The resampled indices depend only on ``(seed, n_boot, sizes)``, so the same call returns the same interval.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_N_BOOT = 1000
DEFAULT_LEVEL = 0.95


def resample_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` indices drawn with replacement from ``range(n)``."""
    return rng.integers(0, n, size=(n_boot, n))


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Central ``level`` percentile interval of the finite bootstrap replicates (NaN, NaN when none)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(
    statistic: Callable[..., np.ndarray | float],
    sizes: int | Sequence[int],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    vectorized: bool = True,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` resampling units with replacement.

    ``sizes`` is the number of units, or one number per independently resampled group (a stratified
    bootstrap, e.g. members and non-members for an AUC). With ``vectorized=True`` ``statistic`` receives one
    ``(n_boot, n_g)`` index array per group and returns ``n_boot`` values; otherwise it is called once per
    replicate with one ``(n_g,)`` index array per group and returns a float.
    """
    sizes = [int(sizes)] if np.isscalar(sizes) else [int(s) for s in sizes]
    if n_boot <= 0 or any(s <= 0 for s in sizes):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = [resample_indices(s, n_boot, rng) for s in sizes]
    if vectorized:
        values = np.asarray(statistic(*idx), dtype=float)
    else:
        values = np.array([statistic(*(g[b] for g in idx)) for b in range(n_boot)], dtype=float)
    return percentile_interval(values, level)
