"""Per-tensor parameter values, mergekit-style: a scalar, a gradient over layer depth (a list), or conditions
``[{filter: substring, value: x}, ..., {value: default}]`` matched against the tensor name (first match wins)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from unmerge.errors import MethodError
from unmerge.methods.registry import Method

_LAYER = re.compile(r"\.(\d+)\.")
_INPUT_SIDE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _depth_fraction(name: str, n_layers: int | None) -> float:
    """Where a tensor sits in depth, in [0, 1]; embeddings at 0, heads and final norms at 1."""
    index = layer_index(name)
    if index is None or not n_layers:
        return 0.0 if any(key in name for key in _INPUT_SIDE) else 1.0
    return index / max(n_layers - 1, 1)


def _interpolate(anchors: list[float], t: float) -> float:
    if len(anchors) == 1:
        return anchors[0]
    pos = t * (len(anchors) - 1)
    low = min(int(pos), len(anchors) - 2)
    frac = pos - low
    return anchors[low] * (1 - frac) + anchors[low + 1] * frac


def value_for_tensor(value: Any, name: str, n_layers: int | None) -> Any:
    """Resolve one parameter value (scalar, gradient list, or filter conditions) for tensor ``name``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for cond in value:
            pattern = cond.get("filter")
            if pattern is None or pattern in name:
                return value_for_tensor(cond["value"], name, n_layers)
        return None
    if isinstance(value, dict):
        if "value" in value:
            return value_for_tensor(value["value"], name, n_layers)
        raise MethodError(f"cannot read the parameter value {value!r}", "use a number, a list, or {filter, value} items")
    if isinstance(value, list):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise MethodError(f"a gradient parameter must be a list of numbers, got {value!r}")
        return _interpolate([float(v) for v in value], _depth_fraction(name, n_layers))
    return value


@dataclass
class ParamPlan:
    """Validated parameters of one merge: global values and per-model values, still in their raw forms."""

    method: Method
    global_values: dict[str, Any]
    model_values: list[dict[str, Any]]
    n_layers: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # filled from statistics (e.g. N) when not given

    @classmethod
    def build(cls, method: Method, global_values: dict[str, Any] | None, model_values: list[dict[str, Any]],
              n_layers: int | None = None) -> "ParamPlan":
        glob = method.canonical_params(global_values or {})
        per_model = [method.canonical_params(v or {}) for v in model_values]
        for values in per_model:
            for key in values:
                if not method.param(key).per_model:
                    raise MethodError(f"parameter '{key}' of method '{method.name}' is global, not per model",
                                      "move it to the top-level parameters")
        plan = cls(method, glob, per_model, n_layers)
        plan.for_tensor("model.layers.0.x", check_only=True)
        return plan

    def for_tensor(self, name: str, check_only: bool = False) -> dict[str, Any]:
        """Concrete, validated values for one tensor; per-model parameters become lists."""
        out: dict[str, Any] = {}
        for param in self.method.params:
            raw_global = self.global_values.get(param.name, self.overrides.get(param.name, param.default))
            if param.per_model:
                values = []
                for model in self.model_values:
                    raw = model.get(param.name, raw_global)
                    values.append(param.check(value_for_tensor(raw, name, self.n_layers), self.method.name))
                out[param.name] = values
            else:
                out[param.name] = param.check(value_for_tensor(raw_global, name, self.n_layers), self.method.name)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"global": {**self.overrides, **self.global_values}, "per_model": self.model_values}
