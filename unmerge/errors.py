"""One exception hierarchy. Every user-facing failure is an ``UnmergeError`` with a message and a hint."""
from __future__ import annotations

import difflib
from typing import Iterable


class UnmergeError(Exception):
    """Base class: ``message`` says what is wrong (naming the file/tensor/key), ``hint`` what to do."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InputError(UnmergeError):
    """A path, model or dataset given by the user is missing or unusable."""


class CheckpointError(UnmergeError):
    """A checkpoint is corrupt, incompatible with another one, or unsafe to load."""


class StatisticError(UnmergeError):
    """A statistic (Fisher, Gram, ...) is invalid or does not belong to the model."""


class MethodError(UnmergeError):
    """Unknown method, bad parameter, or a numerical failure inside a method."""


class RecipeError(UnmergeError):
    """A recipe or config file is malformed."""


class DataError(UnmergeError):
    """A dataset is empty or lacks the configured column."""


class OutputError(UnmergeError):
    """The output location is unsafe (inside an input, not empty, ...)."""


def suggest(word: str, options: Iterable[str]) -> str | None:
    """Closest option to ``word``, for 'did you mean' hints."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    options = sorted(options)
    close = suggest(word, options)
    head = f"did you mean '{close}'? " if close else ""
    return f"{head}valid choices: {', '.join(options)}"
