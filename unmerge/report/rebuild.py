"""``unmerge report DIR``: rebuild a bundle (tables, plots, Markdown, HTML, manifest) from the results it holds —
``metrics.csv``, ``samples.jsonl``, ``guard.csv`` and the manifest's recipe, protocol, inputs and timings — without
recomputing anything; optionally with another selection rule."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd

from unmerge.errors import InputError
from unmerge.report.bundle import write_bundle
from unmerge.report.verify import verify


def _metric_rows(source: Path, rows: list[dict], timings: dict) -> list[dict]:
    """metrics.csv rows with what the bundle keeps beside them put back: the per-metric facts of
    metric_details.jsonl (same rows, same order) and the seconds of manifest.json's metric_timings, so a rebuild
    writes both again instead of dropping them."""
    details = source / "metric_details.jsonl"
    if details.exists():
        extra = [json.loads(line) for line in details.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(extra) != len(rows) or any((e.get("candidate"), e.get("metric")) != (r["candidate"], r["metric"])
                                          for e, r in zip(extra, rows)):
            raise InputError(f"'{details}' does not list the rows of metrics.csv in order",
                             "the bundle was edited by hand; re-run the recipe to rebuild it")
        rows = [{**e, **r} for e, r in zip(extra, rows)]
    for r in rows:
        seconds = (timings.get(str(r["candidate"])) or {}).get(str(r.get("protocol") or r["metric"]))
        if seconds is not None:
            r["seconds"] = seconds
    return rows


def rebuild_bundle(source: str | Path, out: str | Path | None = None, selection: dict[str, Any] | None = None) -> Path:
    """Re-render the bundle in ``source`` into ``out`` (default: in place). The source must verify first."""
    source = Path(source)
    problems = verify(source)
    if problems:
        raise InputError(f"bundle '{source}' does not verify: {problems[0]}",
                         "rebuild only intact bundles (unmerge verify DIR lists every problem)")
    manifest = json.loads((source / "manifest.json").read_text())
    metrics = pd.read_csv(source / "metrics.csv")
    metrics = metrics.astype(object).where(metrics.notna(), None)
    compressed = (source / "samples.jsonl.gz").exists()
    text = (gzip.decompress((source / "samples.jsonl.gz").read_bytes()).decode("utf-8") if compressed
            else (source / "samples.jsonl").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = _metric_rows(source, metrics.to_dict("records"), manifest.get("metric_timings") or {})
    guard = None
    if (source / "guard.csv").exists():
        guard = pd.read_csv(source / "guard.csv").to_dict("records")
    recipe = manifest.get("recipe", {})
    resolved = recipe.get("resolved") or {}
    if out is not None and isinstance(resolved.get("report"), dict):  # the resolved recipe names where it now lies
        resolved = {**resolved, "report": {**resolved["report"], "dir": str(out)}}
    run = {
        "title": manifest.get("title"),
        "recipe": recipe.get("given", {}),
        "resolved": resolved,
        "metrics": rows,
        "records": records,
        "guard": guard,
        "selection": selection or (manifest.get("selection") or {}).get("rule"),
        "timings": manifest.get("timings", {}),
        "inputs": manifest.get("inputs", {}),
        "seeds": manifest.get("seeds", {}),
        "caveats": manifest.get("caveats", []),
        "base_candidate": manifest.get("base_candidate", "base"),
        "compress_samples": compressed,
        "protocol": manifest.get("protocol", {}),
        "tradeoff": {"x": (resolved.get("report") or {}).get("tradeoff_x", "perplexity"),
                     "y": (resolved.get("report") or {}).get("tradeoff_y", "toxicity.mean")},
    }
    if not run["guard"]:
        run.pop("guard")
    return write_bundle(out or source, run, overwrite=True)
