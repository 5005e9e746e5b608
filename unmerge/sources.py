"""Data references in recipes and on the command line: ``builtin:NAME``, a local file (.txt one example per line,
.jsonl/.json/.csv with a text column), a document corpus ``{corpus: bbcnews, split, where, unit}``
(:mod:`unmerge.data.corpora`), or a Hugging Face dataset ``{dataset, split, column, config}``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unmerge.errors import DataError, did_you_mean

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


def load_labelled(spec: str | dict[str, Any], label_column: str = "label") -> tuple[list[str], list[int]]:
    """(texts, integer labels) of a local .jsonl / .json / .csv file with a text column and ``label_column``
    (a path, or ``{path, column, label_column}``); rows with a blank text are dropped, as ``load_texts`` does."""
    if isinstance(spec, dict):
        path, column = Path(spec.get("path", "")), spec.get("column")
        label_column = spec.get("label_column", label_column)
    else:
        path, column = Path(str(spec)), None
    suffix = path.suffix.lower()
    if not path.is_file() or suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"labelled data '{spec}' is not a .jsonl, .json or .csv file",
                        f"give a file with a text column and a '{label_column}' column")
    if suffix == ".csv":
        import pandas as pd

        rows = pd.read_csv(path).to_dict("records")
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else [data]
    texts = _column(rows, column, str(path))
    missing = [i for i, r in enumerate(rows) if label_column not in r]
    if missing:
        raise DataError(f"'{path}' row {missing[0] + 1} has no '{label_column}' column",
                        "give every row an integer class label")
    kept = [(t, int(r[label_column])) for t, r in zip(texts, rows) if t.strip()]
    if not kept:
        raise DataError(f"the dataset '{spec}' is empty", "give at least one non-blank example")
    return [t for t, _ in kept], [y for _, y in kept]


def load_items(spec: str | dict[str, Any]) -> list[dict]:
    """Multiple-choice items ({prompt, choices, label}) from ``builtin:NAME``, a .jsonl file of items, or any
    labelled dataset with a template and verbalizers (a mapping; see :func:`unmerge.evaluation.tasks.labelled_items`).
    """
    if isinstance(spec, dict):
        from unmerge.evaluation.tasks import labelled_items

        return labelled_items(load_rows(spec), spec)
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
    if path.suffix.lower() in (".txt", ".text"):
        return path.read_text(encoding="utf-8").splitlines()
    rows = _file_rows(path)
    if all(isinstance(x, str) for x in rows):  # a .json list of strings
        return rows
    return _column(rows, column, str(path))


def _file_rows(path: Path) -> list[Any]:
    """The records of a .jsonl, .json (a list, or one record) or .csv file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else [data]
    if suffix == ".csv":
        import pandas as pd

        return pd.read_csv(path).to_dict("records")
    raise DataError(f"cannot read '{path}': unknown file type '{suffix}'", "use .txt, .jsonl, .json or .csv")


def load_rows(spec: dict[str, Any]) -> list[dict]:
    """The records of a labelled data reference: ``{path: FILE}`` (.jsonl/.json/.csv) or ``{dataset, split,
    config, where}``."""
    if "path" in spec:
        path = Path(spec["path"])
        if not path.exists():
            raise DataError(f"data file '{path}' does not exist")
        return _file_rows(path)
    if "dataset" not in spec:
        raise DataError(f"labelled data reference {spec!r} names no 'path' or 'dataset'")
    return _dataset_rows(spec)


def _load_mapping(spec: dict[str, Any]) -> list[str]:
    if "path" in spec:
        path = Path(spec["path"])
        if not path.exists():
            raise DataError(f"data file '{path}' does not exist")
        return _load_file(path, spec.get("column"))
    if "corpus" in spec:  # a document corpus from an optional package (unmerge/data/corpora.py)
        from unmerge.data.corpora import load_corpus

        return load_corpus(spec)
    if "dataset" not in spec:
        raise DataError(f"data reference {spec!r} names no 'path', 'corpus' or 'dataset'")
    return _column(_dataset_rows(spec), spec.get("column"), spec["dataset"])


def _dataset_rows(spec: dict[str, Any]) -> list[dict]:
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
    return ds.to_list()


def _matches(value: Any, rule: Any) -> bool:
    """``where: {toxicity: {gt: 0.8}}`` style filters (gt, ge, lt, le, eq, ne, in: a list)."""
    if not isinstance(rule, dict):
        return value == rule
    ops = {"gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b,
           "le": lambda a, b: a <= b, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
           "in": lambda a, b: a in b}
    unknown = [op for op in rule if op not in ops]
    if unknown:
        raise DataError(f"unknown filter '{unknown[0]}' in {rule!r}", did_you_mean(str(unknown[0]), ops))
    return all(ops[op](value, bound) for op, bound in rule.items())
