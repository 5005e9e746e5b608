"""Multiple-choice items from any labelled dataset: a prompt template over the row's columns and verbalizers.

A task reference is a mapping: the data (``path: FILE`` or ``dataset: ID`` with ``split``/``config``/``where``, as
in :mod:`unmerge.sources`) plus

- ``template``: the prompt, with ``{column}`` fields (``{{``/``}}`` for braces; nothing else is interpreted);
  default ``"{text}"``;
- ``label_column`` (default ``label``);
- ``verbalizers``: the choices, the same for every row: a list (the label is the index) or a mapping from label
  value to its text (the label's position in the mapping is its index); or instead ``choices_column``: a column
  holding each row's list of choices (the label is the index).

Choices are scored as written after the prompt, so give them their leading space (``" positive"``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from unmerge.errors import DataError

TASK_KEYS = ("path", "dataset", "split", "config", "where", "template", "label_column", "verbalizers",
             "choices_column")
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def fill_template(template: str, row: Mapping[str, Any], where: str = "template") -> str:
    """``template`` with each ``{column}`` replaced by ``str(row[column])``; ``{{`` and ``}}`` are braces."""

    def field(match: re.Match) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        name = match.group(1)
        if name is None:
            raise DataError(f"{where} {template!r}: a lone '{text}'", "write {column} fields, and {{ or }} for braces")
        if name not in row:
            raise DataError(f"{where} {template!r} uses the column '{name}', which the data lacks (columns: "
                            f"{', '.join(map(str, row))})", "name a column of the dataset")
        return str(row[name])

    return _FIELD.sub(field, template)


def _label_index(value: Any, keys: Sequence[Any], n: int, i: int) -> int:
    if keys:  # verbalizers given as {label value: text}
        for j, key in enumerate(keys):
            if str(key) == str(value):
                return j
        raise DataError(f"row {i}: label {value!r} is not a key of verbalizers ({list(map(str, keys))})",
                        "list every label value under verbalizers")
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise DataError(f"row {i}: label {value!r} is not an index", "give verbalizers as {label: text}") from None
    if not 0 <= index < n:
        raise DataError(f"row {i}: label {index} out of range for {n} choices", "labels are 0-based indices")
    return index


def labelled_items(rows: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> list[dict]:
    """``[{prompt, choices, label}]`` for multiple-choice accuracy from dataset rows and a task reference."""
    unknown = [k for k in spec if k not in TASK_KEYS]
    if unknown:
        from unmerge.errors import did_you_mean

        raise DataError(f"unknown task key '{unknown[0]}'", did_you_mean(unknown[0], TASK_KEYS))
    verbalizers, choices_column = spec.get("verbalizers"), spec.get("choices_column")
    if (verbalizers is None) == (choices_column is None):
        raise DataError("a labelled task needs exactly one of 'verbalizers' and 'choices_column'",
                        "e.g. verbalizers: [' negative', ' positive']")
    keys = list(verbalizers) if isinstance(verbalizers, Mapping) else []
    fixed = [str(verbalizers[k]) for k in keys] if keys else ([str(v) for v in verbalizers] if verbalizers else None)
    template, label_column = spec.get("template", "{text}"), spec.get("label_column", "label")
    items = []
    for i, row in enumerate(rows):
        if label_column not in row:
            raise DataError(f"row {i} has no label column '{label_column}'", "set label_column")
        choices = fixed if fixed is not None else [str(c) for c in row[choices_column]]
        items.append({"prompt": fill_template(template, row), "choices": choices,
                      "label": _label_index(row[label_column], keys, len(choices), i)})
    if not items:
        raise DataError(f"the labelled task {dict(spec)!r} has no rows", "give a non-empty dataset")
    return items
