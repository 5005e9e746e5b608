"""Curvature statistics: diagonal Fisher (and, later, Gram, K-FAC, Adam second moments)."""
from unmerge.stats.store import Statistic, save_statistic

__all__ = ["Statistic", "save_statistic"]
