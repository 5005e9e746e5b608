"""Method registry: each method is a pure per-tensor function plus a declared parameter schema.

The CLI, recipes, ``unmerge methods`` and the docs read the schemas; nothing lists methods by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from unmerge.errors import MethodError, did_you_mean


@dataclass(frozen=True)
class Param:
    """One method parameter. ``per_model`` parameters take one value per input model (or one for all)."""

    name: str
    default: Any
    kind: type = float
    doc: str = ""
    per_model: bool = False
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    # the value is the path of a checkpoint the method reads (e.g. mats' init_model): the engine hashes it with the
    # other inputs into the model card and never lets the output overwrite it
    input_checkpoint: bool = False

    def check(self, value: Any, method: str) -> Any:
        """Validate and coerce one scalar value; raise a ``MethodError`` naming the method and parameter."""
        where = f"parameter '{self.name}' of method '{method}'"
        if value is None and self.default is None:
            return None
        if self.choices is not None:
            if value not in self.choices:
                raise MethodError(f"{where} is {value!r}", did_you_mean(str(value), [str(c) for c in self.choices]))
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MethodError(f"{where} must be true or false, got {value!r}", "write true or false")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise MethodError(f"{where} must be a number, got {value!r}", self._range_hint()) from None
            value = self.kind(value)
            if isinstance(value, float) and not math.isfinite(value):
                raise MethodError(f"{where} must be finite, got {value!r}", self._range_hint())
            low_bad = self.minimum is not None and (value <= self.minimum if self.min_exclusive else value < self.minimum)
            if low_bad or (self.maximum is not None and value > self.maximum):
                raise MethodError(f"{where} is {value}, outside {self.interval()}", self._range_hint())
            return value
        return self.kind(value)

    def _range_hint(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        return f"give {kind} in {self.interval()} ({self.name}: {self.doc})" if self.doc else \
            f"give {kind} in {self.interval()}"

    def interval(self) -> str:
        low = "(-inf" if self.minimum is None else f"{'(' if self.min_exclusive else '['}{self.minimum:g}"
        high = "inf)" if self.maximum is None else f"{self.maximum:g}]"
        return f"{low}, {high}"

    def describe(self) -> str:
        scope = "per model" if self.per_model else "global"
        rng = ""
        if self.choices:
            rng = f" one of {', '.join(map(str, self.choices))}"
        elif self.minimum is not None or self.maximum is not None:
            rng = f" in {self.interval()}"
        alias = f" (also: {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.name} = {self.default!r} [{scope}{rng}]{alias}: {self.doc}"


WEIGHT = Param("weight", 1.0, float, "per-model weight w_i (negative to subtract)", per_model=True)


@dataclass
class Proof:
    """What a kernel proved about the tensor it wrote: ``finite``, every value was seen finite as written."""

    finite: bool = False


@dataclass
class TensorTask:
    """Everything a method sees for one tensor. ``params`` are already resolved for this tensor.

    ``stats`` maps a statistic kind to tensors aligned with ``models`` (``fisher``) or to one tensor for the base
    (``base_fisher``). Methods write per-tensor diagnostics (e.g. the guard's clamped count) into ``record``.
    ``context`` holds the result of the method's whole-model pre-pass (e.g. a global top-k threshold), if any.
    ``prepared`` holds what the method's ``prepare`` step computed for this tensor (None until it ran); a prepare
    step that read every input value and found them all finite sets ``inputs_finite``, and the engine then skips
    its own NaN/Inf check of the inputs. ``out``, when set (by the engine, on the CPU), is a flat float32 buffer of
    the tensor's size that the method may write its result into and return (viewed to the shape): the engine
    recycles it once written, which saves the page faults of fresh memory. ``proof`` is for the kernels that make
    the returned tensor: ``proof.finite`` set means they saw every value of it finite, and the engine does not read
    it again for its NaN/Inf check (pass it only to the call whose output is returned unchanged).
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    params: dict[str, Any]
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    prepared: Any = None
    inputs_finite: bool = False
    out: torch.Tensor | None = None
    proof: Proof = field(default_factory=Proof)


Prepass = Callable[[dict[str, Any], Callable[[], Iterator[TensorTask]]], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[TensorTask], torch.Tensor]
    summary: str
    formula: str
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    stats: tuple[str, ...] = ()  # statistic kinds required, e.g. ("fisher", "base_fisher")
    min_models: int = 1
    max_models: int | None = None
    aliases: tuple[str, ...] = ()
    symmetric: bool = True  # permuting the input models does not change the result
    # Whole-model pre-pass: called with the first float tensor's parameters (to decide whether it is needed, with
    # no tensor read) and a factory of fresh streams of TensorTasks (one tensor at a time, so it can take several
    # passes without holding the model); returns the JSON-able ``context`` given to every task.
    prepass: Prepass | None = None
    # Per-tensor preparation, split from ``fn`` so that the engine can run it on its loader thread for the next
    # tensor while ``fn`` combines the current one (e.g. TIES's exact top-k thresholds: a whole pass over the
    # inputs). Its result reaches ``fn`` as ``task.prepared``; ``fn`` calls it itself when that is None.
    prepare: Callable[[TensorTask], Any] | None = None
    # Every non-finite input element makes an output element non-finite (elementwise affine maps such as
    # θ₀ + λ Σ w τ: IEEE NaN/Inf survive +, −, × and 0·Inf = NaN). The engine then checks only the output, and
    # the inputs only when the output is non-finite, to name the culprit: one read of every input byte less.
    propagates_nonfinite: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name or name in p.aliases:
                return p
        raise MethodError(
            f"method '{self.name}' has no parameter '{name}'", did_you_mean(name, [p.name for p in self.params])
        )

    def canonical_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Map aliases to canonical names and reject unknown names (with a suggestion)."""
        return {self.param(key).name: value for key, value in given.items()}

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method '{method.name}' registered twice")
    _REGISTRY[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def get_method(name: str) -> Method:
    _load_all()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise MethodError(f"unknown merge method '{name}'", did_you_mean(name, list(_REGISTRY)))
    return _REGISTRY[key]


def all_methods() -> list[Method]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_all() -> None:
    """Import every method module once so that their ``register`` calls run."""
    import unmerge.methods.library  # noqa: F401
