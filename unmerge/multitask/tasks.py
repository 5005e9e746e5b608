"""Labelled classification tasks for multi-task merging, built from ordinary data references: one reference per
class, so every source ``unmerge.sources.load_texts`` reads works (builtin texts, local files, document corpora such
as ``{corpus: bbcnews, where: {topic: tech}}``), plus the bundled WordNet example sentences by lexicographer file
(``{wordnet: verb.motion}``; a prefix such as ``{wordnet: verb}`` takes every verb file).

A task in a recipe::

    topic:
      classes: [business, entertainment, politics, sport, tech]
      data: {corpus: bbcnews, where: {topic: "{class}"}}     # "{class}" is replaced by each class name
      train_per_class: 100
      test_per_class: 40

or ``classes: {noun: {wordnet: noun}, verb: {wordnet: verb}}`` (a reference per class). The split is the same on
every machine: within a class the distinct texts are ordered by sha256(salt, task, text); the first
``test_per_class`` are the test set and the next ``train_per_class`` the training set (balanced classes, chance =
1 / number of classes). A text found under two classes of one task has no single label and is left out of both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from unmerge.errors import DataError, RecipeError, did_you_mean
from unmerge.train.classifier import ClassificationTask

SPLIT_SALT = "unmerge-multitask-split-v1"
TASK_KEYS = ("classes", "data", "train_per_class", "test_per_class")


def wordnet_texts(lexname: str) -> list[str]:
    """Example sentences of the bundled WordNet corpus whose lexicographer file is ``lexname`` or starts with
    ``lexname + '.'`` (``verb`` → every ``verb.*``), in corpus order."""
    from unmerge.data.corpus import corpus

    texts = [s for lex, s in corpus() if lex == lexname or lex.startswith(lexname + ".")]
    if not texts:
        names = sorted({lex for lex, _ in corpus()} | {lex.split(".")[0] for lex, _ in corpus()})
        raise DataError(f"no WordNet example sentence has the lexicographer file '{lexname}'",
                        did_you_mean(lexname, names))
    return texts


def class_texts(ref: Any) -> list[str]:
    """Texts of one class reference: ``{wordnet: LEXNAME}`` or anything ``load_texts`` reads."""
    if isinstance(ref, dict) and "wordnet" in ref:
        return wordnet_texts(str(ref["wordnet"]))
    from unmerge.sources import load_texts

    return load_texts(ref)


def _substitute(template: Any, name: str) -> Any:
    if isinstance(template, str):
        return template.replace("{class}", name)
    if isinstance(template, dict):
        return {k: _substitute(v, name) for k, v in template.items()}
    if isinstance(template, list):
        return [_substitute(v, name) for v in template]
    return template


def class_references(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """{class name: data reference} of a task spec (see the module docstring)."""
    unknown = [k for k in spec if k not in TASK_KEYS]
    if unknown:
        raise RecipeError(f"unknown key '{unknown[0]}' in task '{task}'", did_you_mean(str(unknown[0]), TASK_KEYS))
    classes = spec.get("classes")
    if isinstance(classes, dict) and classes:
        return {str(k): v for k, v in classes.items()}
    if isinstance(classes, list) and len(classes) >= 2 and spec.get("data") is not None:
        return {str(c): _substitute(spec["data"], str(c)) for c in classes}
    raise RecipeError(f"task '{task}' needs classes: a mapping {{class: data reference}}, or a list of at least two "
                      "names with a data template containing \"{class}\"",
                      "see unmerge/multitask/tasks.py for an example")


def _order_key(task: str, text: str) -> bytes:
    return hashlib.sha256(f"{SPLIT_SALT}\0{task}\0{text}".encode("utf-8")).digest()


@dataclass
class TaskSplits:
    train: ClassificationTask
    test: ClassificationTask


def build_task(task: str, spec: dict[str, Any]) -> TaskSplits:
    """The balanced train and test sets of one task (see the module docstring)."""
    refs = class_references(task, spec)
    n_train, n_test = int(spec.get("train_per_class", 100)), int(spec.get("test_per_class", 40))
    if n_train < 1 or n_test < 1:
        raise RecipeError(f"task '{task}': train_per_class and test_per_class must be positive",
                          "for example train_per_class: 100, test_per_class: 40")
    sets = {name: {t for t in class_texts(ref) if t.strip()} for name, ref in refs.items()}
    seen: dict[str, int] = {}
    for texts in sets.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    per_class: dict[str, list[str]] = {}
    for name, texts in sets.items():  # a text under two classes has no single label: left out of both
        kept = sorted((t for t in texts if seen[t] == 1), key=lambda t: _order_key(task, t))
        if len(kept) < n_train + n_test:
            raise DataError(f"task '{task}', class '{name}': {len(kept)} distinct texts found in no other class, "
                            f"fewer than train_per_class + test_per_class = {n_train + n_test}",
                            "lower the per-class counts")
        per_class[name] = kept
    names = list(refs)
    splits = {}
    for split, lo, hi in (("test", 0, n_test), ("train", n_test, n_test + n_train)):
        texts, labels = [], []
        for k in range(lo, hi):  # interleaved by class, so any prefix stays balanced
            for label, name in enumerate(names):
                texts.append(per_class[name][k])
                labels.append(label)
        splits[split] = ClassificationTask(task, texts, labels, names).check()
    return TaskSplits(splits["train"], splits["test"])
