"""The report bundle: one directory, written atomically, from which every number can be checked.

``write_bundle(out_dir, run)`` takes the results of a run as a plain dict (see :func:`write_bundle` for the exact
contract) and writes::

    manifest.json   recipe (given + resolved), versions, hardware, seeds, timings, selection, inputs' and outputs' sha256
    metrics.csv     candidate, method, alpha, metric, value, ci_low, ci_high
    samples.jsonl   per-generation / per-example records, one JSON object a line (samples.jsonl.gz when the run
                    sets compress_samples, e.g. for bundles committed to a repository)
    metric_details.jsonl  every metrics row as given, extra keys included (only when rows carry keys beyond
                    the tidy columns: n, seed, protocol parameters, ...)
    guard.csv       per-candidate guard statistics (only when guard data is given)
    tradeoff.png    y (toxicity) against x (perplexity) over alpha for each method
    bars.png        every metric per candidate with its interval
    guard.png       the guard's clamped fraction against alpha (only when guard data is given)
    report.md       the report in Markdown (links the PNGs)
    report.html     the same report, self-contained (inline CSS, PNGs embedded, all text escaped)

``manifest.json`` lists the sha256 of every other file under ``outputs``; :func:`unmerge.report.verify` checks them.
Clock time and timings (stage seconds, per-metric ``seconds``) are written to manifest.json only, so the other files
are byte-identical whenever the results are.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import gzip
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from unmerge.checkpoint.hashing import sha256_file
from unmerge.checkpoint.writer import MARKER, atomic_output_dir
from unmerge.errors import DataError
from unmerge.report import matched, plots
from unmerge.report.render import Document, render_html, render_markdown
from unmerge.report.selection import Selection, _fmt, select
from unmerge.report.verify import MANIFEST

__all__ = ["write_bundle", "METRIC_COLUMNS", "MANIFEST", "BUNDLE_FORMAT", "library_versions", "hardware_info"]

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["candidate", "method", "alpha", "metric", "value", "ci_low", "ci_high"]
BUNDLE_FORMAT = "unmerge-report/1"

_RUN_KEYS = {
    "recipe", "resolved", "metrics", "records", "guard", "selection", "timings", "inputs", "seeds", "caveats",
    "title", "base_candidate", "protocol", "eligible", "plots", "tradeoff", "samples_per_candidate", "hardware",
    "compress_samples", "oracle_candidate",
}
_LIBRARIES = [  # (name in the manifest, distribution name)
    ("torch", "torch"), ("transformers", "transformers"), ("datasets", "datasets"), ("evaluate", "evaluate"),
    ("pandas", "pandas"), ("safetensors", "safetensors"), ("accelerate", "accelerate"), ("unmerge", "unmerge"),
    ("numpy", "numpy"), ("matplotlib", "matplotlib"), ("tokenizers", "tokenizers"),
]
_OPTIONAL_LIBRARIES = [  # recorded only when installed
    ("profanity_check", "alt-profanity-check", "profanity_check"), ("scikit-learn", "scikit-learn", "sklearn"),
    ("detoxify", "detoxify", "detoxify"), ("peft", "peft", "peft"), ("lm_eval", "lm-eval", "lm_eval"),
]
_PROFANITY_CAVEAT = ("The profanity-check scorer is a word-based classifier: it reacts to vocabulary rather than "
                     "meaning and saturates near 1 on profane words, so small differences between strong "
                     "candidates are not meaningful.")


# ----------------------------------------------------------------------------------------------------------------
# environment


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries a result depends on (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in _LIBRARIES:
        out[name] = _dist_version(dist)
    for name, dist, module in _OPTIONAL_LIBRARIES:
        try:
            importable = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            importable = False
        if importable:
            out[name] = _dist_version(dist) or "installed"
    return out


def hardware_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads and CUDA devices of this process."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python_implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda_device"] = info["cuda_devices"][0]
            info["cuda_version"] = torch.version.cuda
        else:
            info["cuda_device"] = None
    except Exception as exc:  # torch missing or broken: record why rather than fail the report
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    return info


# ----------------------------------------------------------------------------------------------------------------
# normalizing the run


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, paths and other objects -> str, numpy scalars -> Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_clean(v) for v in obj]
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return _clean(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (list, dict, tuple)) else False
    except (TypeError, ValueError):
        return False


def _num(value: Any, what: str) -> float:
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return math.nan
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"report: {what} is not a number: {value!r}") from None


def _metric_rows(metrics: Any) -> list[Mapping[str, Any]]:
    if isinstance(metrics, pd.DataFrame):
        return metrics.to_dict("records")
    if isinstance(metrics, Iterable) and not isinstance(metrics, (str, bytes, Mapping)):
        return list(metrics)
    raise DataError("report: run['metrics'] must be a list of rows or a DataFrame")


def _metrics_frame(metrics: Any) -> pd.DataFrame:
    rows = _metric_rows(metrics)
    if not rows:
        raise DataError("report: run['metrics'] is empty", "evaluate at least one candidate before reporting")
    out = []
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"report: metrics row {k} is not a mapping: {row!r}")
        for key in ("candidate", "metric", "value"):
            if key not in row or _is_missing(row[key]):
                raise DataError(f"report: metrics row {k} lacks '{key}': {dict(row)!r}",
                                f"each row needs {', '.join(METRIC_COLUMNS)}")
        method = row.get("method")
        method = None if _is_missing(method) or str(method) == "" else str(method)
        out.append({
            "candidate": str(row["candidate"]),
            "method": method,
            "alpha": _num(row.get("alpha"), f"alpha of row {k}"),
            "metric": str(row["metric"]),
            "value": _num(row["value"], f"value of row {k}"),
            "ci_low": _num(row.get("ci_low"), f"ci_low of row {k}"),
            "ci_high": _num(row.get("ci_high"), f"ci_high of row {k}"),
        })
    frame = pd.DataFrame(out, columns=METRIC_COLUMNS)
    frame["method"] = frame["method"].astype(object)
    dup = frame.duplicated(["candidate", "metric"], keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        raise DataError(f"report: metrics has more than one row for candidate '{first['candidate']}', "
                        f"metric '{first['metric']}'")
    for cand, rows_c in frame.groupby("candidate", sort=False):
        methods = {None if _is_missing(m) else m for m in rows_c["method"]}
        alphas = {None if math.isnan(a) else a for a in rows_c["alpha"]}
        if len(methods) > 1 or len(alphas) > 1:
            raise DataError(f"report: candidate '{cand}' has rows with different method/alpha "
                            f"({sorted(map(str, methods))}, {sorted(map(str, alphas))})")
    return frame


def _candidate_info(long: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: its method and alpha; reference models (base, forget, oracle) get method None.

    A reference model is a candidate without a method, or one whose method is its own name and that has no alpha
    (rows written as ``method: cand.method or cand.name``)."""
    info = long.drop_duplicates("candidate")[["candidate", "method", "alpha"]].set_index("candidate")
    methods = pd.Series([None if _is_missing(m) or (str(m) == str(c) and _is_missing(a)) else str(m)
                         for c, m, a in zip(info.index, info["method"], info["alpha"])], index=info.index, dtype=object)
    return pd.DataFrame({"method": methods, "alpha": info["alpha"].astype(float)}, index=info.index)


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    candidates = list(dict.fromkeys(long["candidate"]))
    metrics = list(dict.fromkeys(long["metric"]))
    wide = long.pivot(index="candidate", columns="metric", values="value").reindex(index=candidates, columns=metrics)
    wide.columns.name = None
    return wide.astype(float)


GAP_PREFIX, ABSGAP_PREFIX = "oracle_gap.", "oracle_absgap."


def _oracle_gaps(wide: pd.DataFrame, oracle: str) -> pd.DataFrame:
    """Columns ``oracle_gap.M`` (candidate − oracle, as :func:`unmerge.evaluation.oracle_gap`) and
    ``oracle_absgap.M`` (its absolute value) for every metric M; no columns when there is no candidate ``oracle``."""
    if oracle not in wide.index:
        return pd.DataFrame(index=wide.index)
    gaps = wide - wide.loc[oracle]
    return pd.concat([gaps.add_prefix(GAP_PREFIX), gaps.abs().add_prefix(ABSGAP_PREFIX)], axis=1)


def _oracle_gap_frame(wide: pd.DataFrame, oracle: str) -> pd.DataFrame:
    """Tidy rows (candidate, metric, value, oracle, gap) for oracle_gap.csv."""
    gaps = wide - wide.loc[oracle]
    rows = [{"candidate": c, "metric": m, "value": wide.at[c, m], "oracle": wide.at[oracle, m],
             "gap": gaps.at[c, m]} for c in wide.index for m in wide.columns]
    return pd.DataFrame(rows, columns=["candidate", "metric", "value", "oracle", "gap"])


def _guard_frame(guard: Any, info: pd.DataFrame) -> pd.DataFrame | None:
    if guard is None or (hasattr(guard, "__len__") and len(guard) == 0):
        return None
    if isinstance(guard, pd.DataFrame):
        guard = guard.to_dict("records")
    if isinstance(guard, Mapping):
        rows = []
        for cand, values in guard.items():
            if not isinstance(values, Mapping):
                values = {"clamped_fraction": values}
            rows.append({"candidate": str(cand), **values})
    else:
        rows = [dict(r) for r in guard]
        for r in rows:
            if "candidate" not in r:
                raise DataError(f"report: guard row lacks 'candidate': {r!r}")
    out = []
    for r in rows:
        cand = str(r["candidate"])
        method = r.get("method", info.at[cand, "method"] if cand in info.index else None)
        alpha = r.get("alpha", info.at[cand, "alpha"] if cand in info.index else None)
        row = {"candidate": cand, "method": None if _is_missing(method) else str(method),
               "alpha": _num(alpha, f"guard alpha of {cand}")}
        for key, value in r.items():
            if key in ("candidate", "method", "alpha"):
                continue
            if isinstance(value, (Mapping, list, tuple)):
                value = json.dumps(_clean(value), sort_keys=True)
            row[str(key)] = _clean(value)
        out.append(row)
    return pd.DataFrame(out)


def _inputs(inputs: Any) -> dict[str, Any]:
    if not inputs:
        return {}
    if not isinstance(inputs, Mapping):
        raise DataError("report: run['inputs'] must map names to sha256 (or to {sha256, path, ...})")
    return {str(k): (_clean(v) if isinstance(v, Mapping) else str(v)) for k, v in inputs.items()}


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, Mapping):
        out: list[tuple[str, str]] = []
        for key, value in obj.items():
            out += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(obj, (list, tuple)):
        return [(prefix, json.dumps(_clean(obj)))]
    return [(prefix, "null" if obj is None else (str(obj) if not isinstance(obj, bool) else str(obj).lower()))]


# ----------------------------------------------------------------------------------------------------------------
# formatting


_f = _fmt  # one number format for the tables and the selection reasons


def _alpha(value: Any) -> str:
    return "" if _is_missing(value) else f"{float(value):g}"


def _with_ci(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return _f(value)
    if math.isfinite(low) and math.isfinite(high):
        return f"{_f(value)} [{_f(low)}, {_f(high)}]"
    return _f(value)


def _change(new: float, old: float) -> str:
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return ""
    return f" ({(new - old) / abs(old) * 100:+.1f}%)"


def _truncate(text: str, limit: int = 1200) -> str:
    return text if len(text) <= limit else text[:limit] + " …[truncated]"


# ----------------------------------------------------------------------------------------------------------------
# the document


def _build_document(ctx: dict[str, Any]) -> Document:
    long: pd.DataFrame = ctx["long"]
    info: pd.DataFrame = ctx["info"]
    wide: pd.DataFrame = ctx["wide"]
    selection: Selection | None = ctx["selection"]
    base = ctx["base_candidate"]
    metrics = list(wide.columns)
    # no clock time and no timings in the report: the same results give byte-identical files (both are in
    # manifest.json, which is the one file that describes the run rather than its results)
    doc = Document(ctx["title"], f"unmerge report · bundle format {BUNDLE_FORMAT}")

    # summary
    sec = doc.section("Summary")
    methods = [m for m in dict.fromkeys(info["method"]) if m is not None]
    refs = [c for c in info.index if info.at[c, "method"] is None]
    n_method = int(sum(1 for c in info.index if info.at[c, "method"] is not None))
    alphas = sorted({float(a) for a in info["alpha"] if not _is_missing(a)})
    text = f"{len(info)} candidates evaluated"
    if refs:
        text += f": {', '.join(refs)}"
        if n_method:
            text += f", and {n_method} from the methods {', '.join(methods)}"
    elif n_method:
        text += f", from the methods {', '.join(methods)}"
    if alphas:
        text += f" at α ∈ {{{', '.join(f'{a:g}' for a in alphas)}}}"
    sec.p(text + f". Metrics: {', '.join(metrics)}.")
    if selection is None:
        sec.p("No selection rule was given, so no candidate was selected.")
    elif selection.candidate is None:
        sec.p(("No candidate was selected. ", True), selection.reason)
    else:
        sec.p("Selected candidate: ", (selection.candidate, True), f" (rule: {selection.rule.describe()}).")
        if base in wide.index and selection.candidate != base:
            items = []
            for m in [selection.rule.objective] + [c.metric for c in selection.rule.constraints]:
                if m in wide.columns and not any(i.startswith(m + ":") for i in items):
                    new, old = float(wide.at[selection.candidate, m]), float(wide.at[base, m])
                    items.append(f"{m}: {_f(old)} ({base}) → {_f(new)} ({selection.candidate}){_change(new, old)}")
            sec.ul(items)
    if ctx["caveats"]:
        sec.p(f"Read the caveats at the end ({len(ctx['caveats'])}) before relying on these numbers.")

    # selection
    sec = doc.section("Selected candidate and why")
    if selection is None:
        sec.p("No selection rule was given (recipe key 'select').")
    else:
        sec.p("Rule: ", (selection.rule.describe(), True), ".")
        sec.p(selection.reason)
        if selection.constraints:
            sec.ul([f"{c['constraint']}: {c['metric']} {c['op']} {_f(c['bound'])} (bound evaluated on {base})"
                    for c in selection.constraints])
        table = selection.table
        constraint_cols = [c for c in table.columns if c not in ctx["select_wide"].columns
                           and c not in ("eligible", "satisfies", "selected")]
        metric_cols = [c for c in table.columns if c in ctx["select_wide"].columns]
        headers = ["candidate"] + metric_cols + [c.strip() for c in constraint_cols] + ["eligible", "selected"]
        rows, classes = [], []
        for cand in table.index:
            row = [cand] + [_f(table.at[cand, m]) for m in metric_cols]
            cls: list[str | None] = [None] * (1 + len(metric_cols))
            for c in constraint_cols:
                ok = bool(table.at[cand, c])
                row.append("pass" if ok else "fail")
                cls.append("pass" if ok else "fail")
            row += ["yes" if table.at[cand, "eligible"] else "no", "◀ selected" if table.at[cand, "selected"] else ""]
            cls += [None, "selected" if table.at[cand, "selected"] else None]
            rows.append(row)
            classes.append(cls)
        sec.table(headers, rows, classes)

    # metrics
    sec = doc.section("Metrics")
    sec.p("Each cell: value [95% interval low, high] where an interval was computed. The same numbers, in tidy "
          "form, are in metrics.csv.")
    headers = ["candidate", "method", "α"] + metrics
    by_key = {(r.candidate, r.metric): r for r in long.itertuples(index=False)}
    rows, classes = [], []
    sel = selection.candidate if selection is not None else None
    for cand in info.index:
        row = [cand, info.at[cand, "method"] or "", _alpha(info.at[cand, "alpha"])]
        for m in metrics:
            r = by_key.get((cand, m))
            row.append(_with_ci(r.value, r.ci_low, r.ci_high) if r is not None else "n/a")
        rows.append(row)
        classes.append(["selected"] + [None] * (len(row) - 1) if cand == sel else None)
    sec.table(headers, rows, classes)
    if ctx["guard"] is not None:
        g = ctx["guard"]
        cols = [c for c in g.columns if c not in ("candidate", "method", "alpha")]
        sec.p("Guard statistics per candidate (also in guard.csv):")
        sec.table(["candidate", "method", "α"] + cols,
                  [[r["candidate"], r["method"] or "", _alpha(r["alpha"])]
                   + [_f(r[c]) if isinstance(r[c], (int, float)) else ("" if _is_missing(r[c]) else str(r[c]))
                      for c in cols] for r in g.to_dict("records")])

    oracle = ctx["oracle_candidate"]
    if oracle in wide.index:
        sec = doc.section("Gap to the retrain oracle")
        sec.p(f"Per candidate, its value minus the oracle's ({oracle}: the model trained without the forget data) "
              f"on every metric; 0 is the oracle's behaviour. The same numbers are in oracle_gap.csv, and a "
              f"selection rule can read them as oracle_gap.METRIC (signed) and oracle_absgap.METRIC (absolute).")
        gap_cols = [f"{GAP_PREFIX}{m}" for m in metrics]
        sec.table(["candidate", "method", "α"] + metrics,
                  [[cand, info.at[cand, "method"] or "", _alpha(info.at[cand, "alpha"])]
                   + [_f(ctx["select_wide"].at[cand, g]) for g in gap_cols] for cand in info.index],
                  [["selected"] + [None] * (2 + len(metrics)) if cand == sel else None for cand in info.index])

    # removal methods at matched effect (unmerge/report/matched.py)
    x, y = ctx["tradeoff"]
    if x and y and x != y:
        ci = long[(long["candidate"] == base) & (long["metric"] == y)][["ci_low", "ci_high"]].astype(float)
        noise = float((ci["ci_high"] - ci["ci_low"]).iloc[0]) / 2 if len(ci) and ci.notna().all(axis=None) else None
        matched.add_section(doc, wide, info, base, x, y, selection.constraints if selection is not None else [], _f,
                            noise)

    # plots
    sec = doc.section("Plots")
    for filename, caption in ctx["plots"]:
        sec.img(filename, caption)
    for note in ctx["plot_notes"]:
        sec.p(note)

    # samples
    sec = doc.section("Sample generations")
    samples = ctx["samples"]
    if samples:
        k = ctx["samples_per_candidate"]
        sec.p(f"Up to {k} generations per candidate, as generated (all records are in samples.jsonl).")
        has_prompt = any("prompt" in r for r in samples)
        has_score = any("score" in r for r in samples)
        headers = ["candidate"] + (["prompt"] if has_prompt else []) + ["generation"] + (["score"] if has_score else [])
        rows = []
        for r in samples:
            row = [str(r.get("candidate", ""))]
            if has_prompt:
                row.append(_truncate(str(r.get("prompt", ""))))
            row.append(_truncate(str(r["text"])))
            if has_score:
                row.append(_f(r.get("score")))
            rows.append(row)
        gen_cols = tuple(range(1, 3 if has_prompt else 2))
        sec.table(headers, rows, generated=gen_cols)
    else:
        sec.p("No generation records with text were given.")

    # protocol
    sec = doc.section("Protocol")
    flat = _flatten(ctx["protocol"])
    if flat:
        sec.table(["parameter", "value"], [[k, v] for k, v in flat])
    else:
        sec.p("No protocol parameters were recorded.")
    if ctx["seeds"]:
        sec.p("Seeds:")
        sec.table(["seed", "value"], [[k, v] for k, v in _flatten(ctx["seeds"])])

    # inputs
    sec = doc.section("Inputs and hashes")
    if ctx["inputs"]:
        rows = []
        for name, value in ctx["inputs"].items():
            if isinstance(value, Mapping):
                rest = {k: v for k, v in value.items() if k != "sha256"}
                rows.append([name, str(value.get("sha256", "")), json.dumps(rest) if rest else ""])
            else:
                rows.append([name, value, ""])
        sec.table(["input", "sha256", "details"], rows, [[None, "hash", None]] * len(rows))
    else:
        sec.p("No input hashes were recorded.")
    sec.p("The sha256 of every file of this bundle is in manifest.json; `unmerge verify DIR` rechecks them.")

    # environment
    sec = doc.section("Environment")
    sec.table(["library", "version"], [[k, v or "not installed"] for k, v in ctx["versions"].items()])
    sec.table(["hardware", "value"], [[k, v] for k, v in _flatten(ctx["hardware"])])
    if ctx["timings"]:
        sec.p("Wall-clock timings and the time the bundle was written are in manifest.json.")

    # caveats
    sec = doc.section("Caveats")
    if ctx["caveats"]:
        sec.ul(ctx["caveats"])
    else:
        sec.p("None recorded.")
    return doc


_TIMING_KEYS = ("seconds",)  # per-row timings: kept in manifest.json (metric_timings), not in metric_details.jsonl


def _metric_timings(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{candidate: {protocol (or metric): seconds}} from rows that carry a timing."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        for key in _TIMING_KEYS:
            if key in r and not _is_missing(r[key]):
                what = str(r.get("protocol") or r.get("metric"))
                out.setdefault(str(r.get("candidate")), {})[what] = _clean(r[key])
    return out


def _pick_samples(records: list[dict], order: list[str], per_candidate: int) -> list[dict]:
    by_cand: dict[str, list[dict]] = {}
    for r in records:
        if not isinstance(r.get("text"), str):
            continue
        if r.get("kind") not in (None, "generation"):
            continue
        bucket = by_cand.setdefault(str(r.get("candidate", "")), [])
        if len(bucket) < per_candidate:
            bucket.append(r)
    ordered = [c for c in order if c in by_cand] + [c for c in by_cand if c not in order]
    return [r for c in ordered for r in by_cand[c]]


# ----------------------------------------------------------------------------------------------------------------
# the bundle


def write_bundle(out_dir: str | Path, run: Mapping[str, Any], overwrite: bool = False,
                 input_paths: Iterable[str | Path] = ()) -> Path:
    """Write the report bundle for ``run`` to ``out_dir`` atomically and return its path.

    ``run`` (only ``metrics`` is required)::

        metrics     list of rows (or a DataFrame) with candidate, metric, value and optional method, alpha,
                    ci_low, ci_high; method/alpha empty for reference models (base, forget, oracle), or method
                    equal to the candidate's name with no alpha. Any other keys of the rows (n, seed, protocol,
                    ...) are kept, with the whole row, in metric_details.jsonl
        records     list of JSON-able dicts written to samples.jsonl; those with a str 'text' (and 'kind' absent or
                    'generation') are shown as sample generations by 'candidate', with 'prompt'/'score' if present
        selection   the rule mapping {minimize|maximize: METRIC, subject_to: "..."}; absent: nothing is selected
        eligible    candidates the rule may select (default: those with a method; if none has one, all but the base)
        base_candidate  name of the base model's candidate (default "base")
        guard       {candidate: {clamped_fraction: x, ...}} or rows with 'candidate' (method/alpha taken from metrics)
        recipe, resolved   the recipe as given and as resolved (mappings)
        protocol    protocol parameters (nested mapping); seeds (mapping); timings (stage -> seconds)
        inputs      name -> sha256 (or name -> {sha256, path, ...})
        caveats     list of str; title str
        plots       optional {tradeoff_x: "perplexity", tradeoff_y: "toxicity.mean", guard_column: "clamped_fraction"}
                    (``tradeoff: {x, y}`` is accepted too)
        samples_per_candidate  generations shown per candidate in the report (default 3)
        hardware    optional mapping merged over the detected hardware (for runs evaluated elsewhere)

    ``overwrite`` replaces an existing bundle that unmerge wrote; ``input_paths`` are refused as output locations.
    Raises :class:`~unmerge.errors.DataError` on malformed results and
    :class:`~unmerge.errors.RecipeError` on a bad selection rule, before anything is written.
    """
    if not isinstance(run, Mapping):
        raise DataError("report: run must be a mapping")
    unknown = set(run) - _RUN_KEYS
    if unknown:
        log.warning("report: run keys %s are not used by the report", sorted(unknown))
    out_dir = Path(out_dir)
    base_candidate = str(run.get("base_candidate") or "base")
    long = _metrics_frame(run.get("metrics"))
    info = _candidate_info(long)
    wide = _wide(long)
    candidates = list(info.index)

    oracle_candidate = str(run.get("oracle_candidate") or "oracle")
    select_wide = wide.join(_oracle_gaps(wide, oracle_candidate))  # the metrics plus the gaps a rule may read

    selection: Selection | None = None
    rule = run.get("selection")
    if rule:
        eligible = run.get("eligible")
        if eligible is None:
            with_method = [c for c in candidates if info.at[c, "method"] is not None]
            eligible = with_method or [c for c in candidates if c != base_candidate]
        selection = select(select_wide, rule, base_candidate=base_candidate, eligible=eligible)

    guard = _guard_frame(run.get("guard"), info)
    records = [dict(r) for r in (run.get("records") or [])]
    protocol = _clean(run.get("protocol") or {})
    caveats = [str(c) for c in (run.get("caveats") or [])]
    if any(v == "profanity-check" for _, v in _flatten(protocol)) and not any(
            "profanity" in c.lower() for c in caveats):
        caveats.append(_PROFANITY_CAVEAT)
    hardware = hardware_info()
    hardware.update(_clean(run.get("hardware") or {}))
    plot_cfg = dict(run.get("plots") or {})
    for key in ("x", "y"):  # run["tradeoff"] = {x, y} is accepted as an alias of plots.tradeoff_x / tradeoff_y
        if (run.get("tradeoff") or {}).get(key) and f"tradeoff_{key}" not in plot_cfg:
            plot_cfg[f"tradeoff_{key}"] = run["tradeoff"][key]
    ctx: dict[str, Any] = {
        "title": str(run.get("title") or "unmerge report"),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "long": long, "info": info, "wide": wide, "selection": selection, "base_candidate": base_candidate,
        "guard": guard, "protocol": protocol, "seeds": _clean(run.get("seeds") or {}),
        "timings": {str(k): _num(v, f"timing of {k}") for k, v in (run.get("timings") or {}).items()},
        "inputs": _inputs(run.get("inputs")), "caveats": caveats, "versions": library_versions(),
        "hardware": hardware, "samples_per_candidate": int(run.get("samples_per_candidate", 3)),
        "plots": [], "plot_notes": [], "oracle_candidate": oracle_candidate, "select_wide": select_wide,
    }
    ctx["samples"] = _pick_samples(records, candidates, ctx["samples_per_candidate"])
    ctx["tradeoff"] = _tradeoff_axes(plot_cfg, list(wide.columns))

    with atomic_output_dir(out_dir, inputs=[Path(p) for p in input_paths], overwrite=overwrite) as tmp:
        # data files
        long.to_csv(tmp / "metrics.csv", index=False, columns=METRIC_COLUMNS, lineterminator="\n")
        lines = "".join(json.dumps(_clean(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        if run.get("compress_samples"):  # gzip without a timestamp, so the bytes repeat run to run
            (tmp / "samples.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8"), mtime=0))
        else:
            (tmp / "samples.jsonl").write_text(lines, encoding="utf-8")
        if guard is not None:
            guard.to_csv(tmp / "guard.csv", index=False, lineterminator="\n")
        if oracle_candidate in wide.index:
            _oracle_gap_frame(wide, oracle_candidate).to_csv(tmp / "oracle_gap.csv", index=False,
                                                             lineterminator="\n")
        details = _metric_rows(run["metrics"])
        details = [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in details]
        if any(set(map(str, r)) - set(METRIC_COLUMNS) for r in details):
            # per-metric facts beyond the tidy columns (n, seed, scorer, protocol parameters; not the seconds)
            with open(tmp / "metric_details.jsonl", "w", encoding="utf-8") as handle:
                for r in details:
                    handle.write(json.dumps(_clean(r), ensure_ascii=False, allow_nan=False) + "\n")

        # plots
        _draw_plots(tmp, ctx, plot_cfg)

        # report
        doc = _build_document(ctx)
        (tmp / "report.md").write_text(render_markdown(doc), encoding="utf-8")
        images = {name: (tmp / name).read_bytes() for name, _ in ctx["plots"]}
        (tmp / "report.html").write_text(render_html(doc, images), encoding="utf-8")

        # manifest last: hashes of everything else
        outputs = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                   if p.is_file() and p.name not in (MANIFEST, MARKER)}
        manifest = {
            "format": BUNDLE_FORMAT,
            "title": ctx["title"],
            "created_utc": ctx["created_utc"],
            "recipe": {"given": _clean(run.get("recipe") or {}), "resolved": _clean(run.get("resolved") or {})},
            "base_candidate": base_candidate,
            "candidates": [{"candidate": c, "method": info.at[c, "method"],
                            "alpha": _clean(float(info.at[c, "alpha"]))} for c in candidates],
            "selection": selection.to_dict() if selection is not None else None,
            "protocol": protocol,
            "seeds": ctx["seeds"],
            "timings": _clean(ctx["timings"]),
            "metric_timings": _metric_timings(_metric_rows(run["metrics"])),
            "versions": ctx["versions"],
            "hardware": hardware,
            "caveats": caveats,
            "inputs": ctx["inputs"],
            "outputs": outputs,
        }
        text = json.dumps(_clean(manifest), indent=2, ensure_ascii=False, allow_nan=False)
        (tmp / MANIFEST).write_text(text + "\n", encoding="utf-8")
        for path in (tmp / MANIFEST, *[tmp / name for name in outputs]):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    return out_dir


def _tradeoff_axes(cfg: Mapping[str, Any], metrics: list[str]) -> tuple[str | None, str | None]:
    """The (x, y) metrics of the trade-off plot and of the matched comparison (None where absent)."""
    return (plots.pick_metric(str(cfg.get("tradeoff_x", "perplexity")), metrics),
            plots.pick_metric(str(cfg.get("tradeoff_y", "toxicity.mean")), metrics))


def _draw_plots(tmp: Path, ctx: dict[str, Any], cfg: Mapping[str, Any]) -> None:
    wide, info, long = ctx["wide"], ctx["info"], ctx["long"]
    metrics = list(wide.columns)
    selection: Selection | None = ctx["selection"]
    x, y = ctx["tradeoff"]
    if x and y and x != y:
        bounds: dict[str, float] = {}
        if selection is not None:
            for c in selection.constraints:
                bounds.setdefault(c["metric"], c["bound"])
        plots.plot_tradeoff(tmp / "tradeoff.png", wide, info, x, y,
                            selected=selection.candidate if selection is not None else None,
                            x_bound=bounds.get(x), y_bound=bounds.get(y))
        ctx["plots"].append(("tradeoff.png", f"Trade-off: {y} against {x}; one line per method over α, "
                                             f"reference models as marked points."))
        unplotted = [c for c in wide.index if not (math.isfinite(float(wide.at[c, x]))
                                                   and math.isfinite(float(wide.at[c, y])))]
        if unplotted:
            ctx["plot_notes"].append(f"Not on the trade-off plot (missing or non-finite {x} or {y}): "
                                     f"{', '.join(unplotted)}.")
    else:
        ctx["plot_notes"].append(
            f"No trade-off plot: it needs a '{cfg.get('tradeoff_x', 'perplexity')}' and a "
            f"'{cfg.get('tradeoff_y', 'toxicity.mean')}' metric (set run['plots'] tradeoff_x / tradeoff_y).")
    plots.plot_bars(tmp / "bars.png", long, info, metrics,
                    selected=selection.candidate if selection is not None else None)
    ctx["plots"].append(("bars.png", "Every metric per candidate; whiskers are 95% intervals where computed."))
    curves = cfg.get("alpha_curves")  # {metrics: [...], methods: [...], references: [...]}: metric against α
    if curves:
        wanted = [plots.pick_metric(str(m), metrics) for m in curves.get("metrics", [])]
        wanted = [m for m in dict.fromkeys(wanted) if m]
        if wanted:
            plots.plot_alpha_curves(tmp / "alpha_curves.png", wide, info, wanted, methods=curves.get("methods"),
                                    references=curves.get("references"))
            ctx["plots"].append(("alpha_curves.png", f"{', '.join(wanted)} against the scaling factor α, one line "
                                                     "per swept method; horizontal lines: reference models."))
        else:
            ctx["plot_notes"].append(f"No α-curve plot: none of the metrics {curves.get('metrics')} was measured.")
    guard = ctx["guard"]
    column = str(cfg.get("guard_column", "clamped_fraction"))
    if guard is not None and column in guard.columns and pd.to_numeric(guard[column], errors="coerce").notna().any() \
            and guard["method"].notna().any():
        plots.plot_guard(tmp / "guard.png", guard, column)
        ctx["plots"].append(("guard.png", f"The guard's {column.replace('_', ' ')} against α, one line per method."))
    elif guard is not None:
        ctx["plot_notes"].append(f"No guard plot: the guard data has no numeric '{column}' for a method candidate.")
