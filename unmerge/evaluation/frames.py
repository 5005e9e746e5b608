"""The result of :func:`unmerge.evaluate` as pandas DataFrames."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

#: The leading columns of the summary frame (the tidy columns of the bundle's metrics.csv, then n and protocol).
SUMMARY_COLUMNS = ["candidate", "method", "alpha", "metric", "value", "ci_low", "ci_high", "n", "protocol"]


@dataclass(frozen=True)
class EvaluationResult:
    """``records``: one row per generation / example / sample (``candidate``, ``protocol``, ``kind``, ...);
    ``summary``: one row per (candidate, metric) with its interval and protocol parameters; ``bundle``: the report
    bundle directory when one was written. Unpacks as ``records, summary = unmerge.evaluate(...)``."""

    records: pd.DataFrame
    summary: pd.DataFrame
    bundle: Path | None = None

    @classmethod
    def from_rows(cls, rows: list[dict], records: list[dict], bundle: Path | None = None) -> "EvaluationResult":
        summary = pd.DataFrame(rows)
        lead = [c for c in SUMMARY_COLUMNS if c in summary.columns]
        summary = summary[lead + [c for c in summary.columns if c not in lead]]
        return cls(records=pd.DataFrame(records), summary=summary, bundle=bundle)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.records, self.summary))
