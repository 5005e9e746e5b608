"""mergekit-shaped merge configs: parse (``yaml.safe_load``), validate with suggestions, and run through the engine.

Shape (mergekit's keys plus statistic paths)::

    merge_method: ties
    base_model: path/or/hub-id
    models:
      - model: path/to/finetune
        parameters: {weight: 1.0, density: 0.5}      # per-model parameters (scalar, gradient list or filters)
        fisher: path/to/fisher                       # per-model statistics: fisher, gram, kfac
    parameters: {lambda: 1.0}                        # global parameters (also defaults for per-model ones)
    base_fisher: path/to/base/fisher                 # statistics of the base model
    dtype: bfloat16                                  # output dtype (out_dtype wins when both are given)
    tokenizer_source: base                           # base, or a model path

As in mergekit, a ``models`` entry naming the base model is dropped for methods that merge task vectors; for
methods that need no base (``linear``, ``slerp``) it is kept as the first endpoint. Relative paths are read
against the config file's directory when they exist there.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmerge.checkpoint import Checkpoint
from unmerge.checkpoint.writer import parse_size
from unmerge.engine import MergeResult, merge_checkpoints, required_stats
from unmerge.recipe import load_yaml_data
from unmerge.errors import RecipeError, did_you_mean
from unmerge.methods import Method, get_method
from unmerge.methods.params import ParamPlan
from unmerge.stats import Statistic

log = logging.getLogger(__name__)

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "base_fisher", "name")
MODEL_STATS = ("fisher", "gram", "kfac")
BASE_STATS = ("base_fisher",)
MODEL_KEYS = ("model", "parameters", *MODEL_STATS)
UNSUPPORTED = {
    "slices": "layer slices are not supported: list whole models under `models`",
    "modules": "per-module configs are not supported: list whole models under `models`",
    "tokenizer": "tokenizer merging is not supported: use tokenizer_source (base or a model path)",
}
# mergekit options that do not change the result here: dropped with a note
IGNORED_PARAMS = {"int8_mask": "mergekit's int8 sign mask only saves memory"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ModelSpec:
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, str] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A validated merge config; ``raw`` is the config as given (recorded in the model card)."""

    method: Method
    base_model: str | None
    models: list[ModelSpec]
    params: dict[str, Any]
    base_stats: dict[str, str]
    dtype: torch.dtype | None
    tokenizer_source: str | None
    raw: dict[str, Any]


def load_config(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The config mapping and the directory relative paths are read against (None for a dict)."""
    if isinstance(source, dict):
        return copy.deepcopy(source), None
    path = Path(source)
    return load_yaml_data(path, "merge config"), path.parent


def _resolve(value: Any, where: str, root: Path | None) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where} must be a path or hub id, got {value!r}")
    if root is not None and not Path(value).is_absolute() and (root / value).exists():
        return str(root / value)
    return value


def _check_keys(given: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in given:
        if key in UNSUPPORTED:
            raise RecipeError(f"{where}: '{key}' is not supported", UNSUPPORTED[key])
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key '{key}'", did_you_mean(str(key), allowed))


def _params(given: Any, where: str) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise RecipeError(f"{where} must be a mapping of parameter names to values, got {given!r}")
    params = dict(given)
    for key, why in IGNORED_PARAMS.items():
        if params.pop(key, None) is not None:
            log.info("ignoring '%s' in %s: %s", key, where, why)
    return params


def _dtype(data: dict[str, Any]) -> torch.dtype | None:
    name = data.get("out_dtype", data.get("dtype"))
    if name is None:
        return None
    if name not in DTYPES:
        raise RecipeError(f"unknown dtype '{name}'", did_you_mean(str(name), DTYPES))
    return DTYPES[name]


def parse_config(data: Any, root: Path | None = None) -> MergeConfig:
    """Validate a config mapping: keys, method, parameters (with suggestions) and the statistics the method needs."""
    if not isinstance(data, dict):
        raise RecipeError(f"a merge config must be a mapping, got {type(data).__name__}")
    _check_keys(data, TOP_KEYS, "merge config")
    if "merge_method" not in data:
        raise RecipeError("merge config has no 'merge_method'", "add e.g. merge_method: ties")
    method = get_method(str(data["merge_method"]))
    base = _resolve(data["base_model"], "base_model", root) if data.get("base_model") else None
    entries = data.get("models") or []
    if not isinstance(entries, list):
        raise RecipeError("'models' must be a list of {model: ..., parameters: {...}} entries")

    models: list[ModelSpec] = []
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise RecipeError(f"models[{i}] must be a mapping with a 'model' key, got {entry!r}")
        for key in entry:
            if key not in MODEL_KEYS and key in method.defaults():
                raise RecipeError(f"models[{i}]: '{key}' is a parameter", f"put it under 'parameters' of models[{i}]")
        _check_keys(entry, MODEL_KEYS, f"models[{i}]")
        if "model" not in entry:
            raise RecipeError(f"models[{i}] has no 'model'")
        stats = {kind: _resolve(entry[kind], f"models[{i}].{kind}", root) for kind in MODEL_STATS if kind in entry}
        models.append(ModelSpec(_resolve(entry["model"], f"models[{i}].model", root),
                                _params(entry.get("parameters"), f"models[{i}].parameters"), stats))

    tokenizer = data.get("tokenizer_source")
    if tokenizer == "base":
        if base is None:
            raise RecipeError("tokenizer_source is 'base' but there is no base_model", "name a model path instead")
        tokenizer = base
    elif tokenizer is not None:
        tokenizer = _resolve(tokenizer, "tokenizer_source", root)

    # mergekit lists the base among the models: a task-vector method skips it, a base-free one uses it first.
    base_entries = [m for m in models if base is not None and m.path == base]
    if base_entries:
        models = [m for m in models if m.path != base]
        if not method.needs_base:
            models, base = base_entries[:1] + models, None

    params = _params(data.get("parameters"), "parameters")
    for key, value in params.items():  # checkpoint paths among the parameters resolve like the models
        if method.param(key).input_checkpoint and isinstance(value, str):
            params[key] = _resolve(value, f"parameters.{key}", root)
    ParamPlan.build(method, params, [m.params for m in models])
    base_stats = {kind: _resolve(data[kind], kind, root) for kind in BASE_STATS if kind in data}
    _check_stats(method, models, base_stats, base, required_stats(method, params))
    return MergeConfig(method, base, models, params, base_stats, _dtype(data), tokenizer, copy.deepcopy(data))


def _check_stats(method: Method, models: list[ModelSpec], base_stats: dict[str, str], base: str | None,
                 needed: tuple[str, ...]) -> None:
    """Every statistic the method needs (``needed``: for its parameters) is given for every model (or the base),
    and none that it ignores."""
    for kind in (*MODEL_STATS, *BASE_STATS):
        given = [m.stats.get(kind) for m in models] if kind in MODEL_STATS else [base_stats.get(kind)]
        if kind in needed:
            missing = [i for i, path in enumerate(given) if path is None]
            if missing:
                where = "the config's top level" if kind in BASE_STATS else f"models{missing}"
                how = "unmerge fisher" if "fisher" in kind else f"unmerge stats MODEL DATA OUT --kind {kind}"
                raise RecipeError(f"method '{method.name}' needs a '{kind}' statistic in {where}",
                                  f"compute it with `{how}` and add `{kind}: PATH`")
            if kind in BASE_STATS and base is None:
                raise RecipeError(f"'{kind}' is given but there is no base_model", "set base_model")
        elif any(path is not None for path in given):
            raise RecipeError(f"method '{method.name}' does not use '{kind}' statistics",
                              f"remove them, or pick a method that does (it uses: {', '.join(needed) or 'none'})")


def merge(config: str | Path | dict[str, Any] | MergeConfig, out_dir: str | Path, device: str = "auto",
          overwrite: bool = False, out_shard_size: str | int = "2GB", allow_pickle: bool = False,
          progress: bool = True, force: bool = False) -> MergeResult:
    """Run a mergekit-shaped config (a YAML path, a dict or a parsed ``MergeConfig``) into ``out_dir``. ``force``
    accepts statistics whose recorded model hash is not their model's."""
    cfg = config if isinstance(config, MergeConfig) else parse_config(*load_config(config))
    base = Checkpoint(cfg.base_model, allow_pickle=allow_pickle) if cfg.base_model else None
    models = [Checkpoint(m.path, allow_pickle=allow_pickle) for m in cfg.models]
    needed = required_stats(cfg.method, cfg.params)
    stats = {kind: [Statistic(m.stats[kind]) for m in cfg.models] for kind in MODEL_STATS if kind in needed}
    stats.update({kind: [Statistic(path)] for kind, path in cfg.base_stats.items()})
    tokenizer = Checkpoint(cfg.tokenizer_source, allow_pickle=allow_pickle) if cfg.tokenizer_source else None
    return merge_checkpoints(
        cfg.method, base, models, out_dir,
        params=cfg.params, model_params=[m.params for m in cfg.models], stats=stats, device=device, dtype=cfg.dtype,
        overwrite=overwrite, max_shard_bytes=parse_size(out_shard_size), tokenizer_source=tokenizer,
        progress=progress, force=force, description={"merge_config": cfg.raw},
    )
