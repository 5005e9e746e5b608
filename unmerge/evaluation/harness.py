"""The lm-evaluation-harness adapter: tasks by name through ``lm_eval``'s Python API, on the model already loaded.

The model and tokenizer are wrapped in ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``
(nothing is loaded twice) and run with ``lm_eval.simple_evaluate``; extra task YAMLs (a task defined on local files)
come from ``include_path``. Every ``(task, metric, filter)`` of the results becomes one summary row named
``lm_eval.<task>.<metric>`` (``.<filter>`` appended unless the filter is ``none``), value ± 1.96 · lm_eval's
standard error as its interval (a normal interval, labelled as such); every logged sample becomes one record.
``lm_eval`` is optional (``pip install lm-eval``); without it the protocol fails with an actionable error.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from unmerge.evaluation.common import EvaluationError

#: The keys of the ``lm_eval`` protocol and their defaults.
LM_EVAL_DEFAULTS: dict[str, Any] = {"tasks": None, "num_fewshot": None, "limit": None, "include_path": None,
                                    "include_defaults": True, "batch_size": 16, "max_length": None,
                                    "bootstrap_iters": 1000, "log_samples": True}
Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")


def lm_eval_version() -> str | None:
    """The installed ``lm_eval`` version, or None when the package is absent."""
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # PackageNotFoundError, or a broken install
        return None


def _tasks(value: Any) -> list[str]:
    tasks = [value] if isinstance(value, str) else list(value or [])
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise EvaluationError(f"lm_eval protocol: 'tasks' must name at least one task (got {value!r})",
                              "write e.g. tasks: [arc_easy] or the name of a task YAML under include_path")
    return tasks


def run_lm_eval(model: Any, tokenizer: Any, options: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the loaded model with the protocol ``options`` (see ``LM_EVAL_DEFAULTS``);
    every random seed of lm_eval (python, numpy, torch, few-shot sampling) set to ``seed``. Returns its results."""
    opts = {**LM_EVAL_DEFAULTS, **options}
    tasks = _tasks(opts["tasks"])
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvaluationError(f"the lm_eval protocol needs the lm-eval package, which cannot be imported ({exc})",
                              "pip install lm-eval (or unmerge[lmeval]), or drop the lm_eval protocol") from None
    include = opts["include_path"]
    manager = TaskManager(include_path=[str(p) for p in include] if isinstance(include, (list, tuple))
                          else (str(include) if include else None),
                          include_defaults=bool(opts["include_defaults"]))
    unknown = [t for t in tasks
               if t not in manager.all_tasks and not manager.match_tasks([t]) and not Path(t).is_file()]
    if unknown:
        raise EvaluationError(f"lm_eval protocol: unknown task '{unknown[0]}'"
                              + (f" (include_path: {include})" if include else ""),
                              "check the name (lm-eval ls tasks), or point include_path at the directory of its YAML")
    lm_kwargs = {"batch_size": int(opts["batch_size"])}
    if opts["max_length"]:
        lm_kwargs["max_length"] = int(opts["max_length"])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, **lm_kwargs)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, num_fewshot=opts["num_fewshot"], limit=opts["limit"],
        bootstrap_iters=int(opts["bootstrap_iters"]), log_samples=bool(opts["log_samples"]), random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:
        raise EvaluationError("lm_eval returned no results (a non-zero rank of a distributed launch?)",
                              "run the evaluation in a single process")
    return results


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")  # lm_eval writes "N/A" where it has no standard error
    return number


def metric_name(task: str, metric: str, filter_name: str) -> str:
    """``lm_eval.<task>.<metric>[.<filter>]`` with characters outside ``[A-Za-z0-9_.]`` made ``_`` (so the name
    can be used in a selection rule)."""
    parts = [task, metric] + ([filter_name] if filter_name != "none" else [])
    return "lm_eval." + ".".join(_UNSAFE.sub("_", p) for p in parts)


def results_to_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Summary rows ``{metric, value, ci_low, ci_high, n, stderr, task, lm_eval_metric, filter, num_fewshot,
    interval}`` from lm_eval's ``results`` (tasks and groups), in lm_eval's order."""
    rows = []
    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})
    for task, entries in results.get("results", {}).items():
        for key, value in entries.items():
            if "," not in key or "_stderr," in key or isinstance(value, str):
                continue  # name, alias, sample_len; stderrs are read beside their metric
            metric, filter_name = key.split(",", 1)
            value = _number(value)
            stderr = _number(entries.get(f"{metric}_stderr,{filter_name}"))
            half = Z_95 * stderr
            n = n_samples.get(task, {}).get("effective")
            rows.append({"metric": metric_name(task, metric, filter_name), "value": value,
                         "ci_low": value - half if math.isfinite(half) else float("nan"),
                         "ci_high": value + half if math.isfinite(half) else float("nan"),
                         "n": n, "stderr": stderr, "task": task, "lm_eval_metric": metric, "filter": filter_name,
                         "num_fewshot": n_shot.get(task), "interval": "normal: value ± 1.96 · lm_eval stderr"})
    return rows


def _plain(value: Any) -> Any:
    """JSON-safe copy: tuples as lists, numpy scalars as Python numbers, other objects as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def samples_to_records(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per logged sample: ``{kind: lm_eval, task, doc_id, target, arguments, responses, <metric>: value}``
    (``responses`` are lm_eval's filtered responses, e.g. ``[log-likelihood, is_greedy]`` per choice)."""
    records = []
    for task, samples in (results.get("samples") or {}).items():
        for s in samples:
            metrics: Sequence[str] = s.get("metrics", [])
            records.append({"kind": "lm_eval", "task": task, "doc_id": s.get("doc_id"),
                            "target": _plain(s.get("target")), "filter": s.get("filter"),
                            "arguments": _plain(s.get("arguments")), "responses": _plain(s.get("filtered_resps")),
                            **{m: _plain(s[m]) for m in metrics if m in s}})
    return records
