"""Data references in recipes and on the command line: ``builtin:NAME``, a local file (.txt one example per line,
.jsonl/.json/.csv with a text column), or a Hugging Face dataset ``{dataset, split, column, config}``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unmerge.errors import DataError

TEXT_COLUMNS = ("text", "content", "sentence", "comment_text")


def _column(rows: list[dict], column: str | None, where: str) -> list[str]:
    if not rows:
        raise DataError(f"'{where}' holds no examples", "give a non-empty dataset")
    keys = list(rows[0])
    col = column or next((c for c in TEXT_COLUMNS if c in keys), None)
    if col is None or col not in keys:
        raise DataError(f"'{where}' has no text column '{column or '/'.join(TEXT_COLUMNS)}' (columns: "
                        f"{', '.join(keys)})", "set `column:` to the column that holds the text")
    return [str(r[col]) for r in rows]


def load_texts(spec: str | dict[str, Any], limit: int | None = None) -> list[str]:
    """Texts of a data reference, in order; ``limit`` keeps the first N."""
    if isinstance(spec, dict):
        texts = _load_mapping(spec)
        limit = spec.get("limit", limit)
    else:
        texts = _load_string(str(spec))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"the dataset '{spec}' is empty", "give at least one non-blank example")
    return texts[:limit] if limit else texts


def load_items(spec: str) -> list[dict]:
    """Multiple-choice items ({prompt, choices, label}) from ``builtin:NAME`` or a .jsonl file."""
    if spec.startswith("builtin:"):
        from unmerge.data.builtin import load_items as builtin_items

        return builtin_items(spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"task file '{spec}' does not exist", "give builtin:cloze or a .jsonl of {prompt, choices, label}")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, item in enumerate(items):
        missing = {"prompt", "choices", "label"} - set(item)
        if missing:
            raise DataError(f"'{spec}' line {i + 1} lacks {', '.join(sorted(missing))}")
    return items


def _load_string(spec: str) -> list[str]:
    if spec.startswith("builtin:"):
        from unmerge.data.builtin import load_texts as builtin_texts

        return builtin_texts(spec)
    path = Path(spec)
    if path.exists():
        return _load_file(path, None)
    return _load_mapping({"dataset": spec})


def _load_file(path: Path, column: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _column(rows, column, str(path))
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
        return _column(data if isinstance(data, list) else [data], column, str(path))
    if suffix == ".csv":
        import pandas as pd

        return _column(pd.read_csv(path).to_dict("records"), column, str(path))
    raise DataError(f"cannot read '{path}': unknown file type '{suffix}'", "use .txt, .jsonl, .json or .csv")


def _load_mapping(spec: dict[str, Any]) -> list[str]:
    if "path" in spec:
        path = Path(spec["path"])
        if not path.exists():
            raise DataError(f"data file '{path}' does not exist")
        return _load_file(path, spec.get("column"))
    if "dataset" not in spec:
        raise DataError(f"data reference {spec!r} names no 'path' or 'dataset'")
    import os

    from datasets import load_dataset

    name = spec["dataset"]
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        hint = "download it once while online, or use a local file / builtin: source"
    else:
        hint = "check the dataset id, split and config"
    try:
        ds = load_dataset(name, spec.get("config"), split=spec.get("split", "train"))
    except Exception as exc:  # the datasets library raises many unrelated types for a missing dataset
        raise DataError(f"cannot load dataset '{name}': {exc}", hint) from exc
    for column, rule in (spec.get("where") or {}).items():
        ds = ds.filter(lambda row: _matches(row[column], rule))
    return _column(ds.to_list(), spec.get("column"), name)


def _matches(value: Any, rule: Any) -> bool:
    """``where: {toxicity: {gt: 0.8}}`` style filters (gt, ge, lt, le, eq)."""
    if not isinstance(rule, dict):
        return value == rule
    ops = {"gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b,
           "le": lambda a, b: a <= b, "eq": lambda a, b: a == b}
    return all(ops[op](value, bound) for op, bound in rule.items())
