"""Recipes: one YAML file describes a whole unlearning run. Loaded with ``yaml.safe_load`` (no tags, no code),
validated against the schema below with 'did you mean' hints, and resolved (defaults filled in)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from unmerge.errors import RecipeError, did_you_mean

ANY = object()

# section -> key -> default (ANY: required or free-form). Nested dicts are sections of their own.
SCHEMA: dict[str, Any] = {
    "kind": "unlearning",  # or "merge": a multi-task merging recipe (unmerge/multitask/runner.py, its own schema)
    "name": "run",
    "description": "",
    "seed": 0,
    "base_model": ANY,
    "oracle_model": None,
    # optional: train the base (pretrain:base) and its retrain oracle (pretrain:oracle) from scratch;
    # None = the defaults of unmerge.train.pretrain.PretrainConfig (see unmerge/pretrain_stage.py)
    "pretrain": {"data": ANY, "forget": "forget", "vocab_size": None, "model": None, "steps": None,
                 "batch_size": None, "learning_rate": None, "warmup": None, "min_lr_ratio": None,
                 "weight_decay": None, "grad_clip": None, "seed": None},
    "data": {"forget": ANY, "retain": ANY, "forget_limit": None, "retain_limit": None, "synthetic": False},
    "finetune": {"epochs": 2.0, "max_steps": -1, "learning_rate": 5e-4, "batch_size": 16, "max_length": 128,
                 "weight_decay": 0.0, "warmup": 0.0,
                 # opt-in: train peft LoRA adapters and merge them into the forget model (unmerge/train/lora.py);
                 # target_modules None = peft's default for the architecture (GPT-2: c_attn)
                 "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None}},
    "fisher": {
        "base": {"data": "retain", "examples": 300, "estimator": "sampled", "level": "sequence", "batch_size": 16,
                 "max_length": 128, "n": None},
        "forget": {"data": "forget", "examples": 300, "estimator": "sampled", "level": "sequence", "batch_size": 16,
                   "max_length": 128, "n": None},
    },
    "removal": {"methods": ["uncertainty_removal", "negation", "fisher_negation"],
                "alpha": [0.25, 0.5, 0.75, 1.0], "params": {}, "alphas": {}},
    "evaluate": {
        "toxicity": {"scorer": "profanity-check", "prompts": "builtin:prompts", "prompt_limit": None,
                     "samples_per_prompt": 4, "max_new_tokens": 20, "do_sample": True, "top_p": 0.9, "top_k": 0,
                     "temperature": 1.0, "seed": 0, "batch_size": 64},
        "perplexity": {"data": "builtin:heldout", "limit": None, "max_length": None, "stride": None,
                       "batch_size": 16, "separator": None},
        "accuracy": {"task": "builtin:cloze", "limit": None},
        "forget_quality": {"holdout": None, "members": 500, "k": 20, "separator": None},
        "lm_eval": {"tasks": ANY, "num_fewshot": None, "limit": None, "include_path": None, "include_defaults": True,
                    "batch_size": 16, "max_length": None, "bootstrap_iters": 1000, "log_samples": True},
    },
    "select": {"minimize": "toxicity.mean", "maximize": None, "subject_to": "perplexity <= 1.05 * base"},
    "report": {"dir": None, "title": None, "tradeoff_y": "toxicity.mean", "tradeoff_x": "perplexity",
               "caveats": [], "compress_samples": False},
}
FREE_FORM = {("removal", "params"), ("removal", "alphas")}
OPTIONAL_SECTIONS = {("evaluate", "toxicity"), ("evaluate", "perplexity"), ("evaluate", "accuracy"),
                     ("evaluate", "forget_quality"), ("evaluate", "lm_eval"), ("pretrain",), ("finetune", "lora")}
OPT_IN_SECTIONS = {("evaluate", "lm_eval"), ("finetune", "lora")}  # run only when the recipe names them (the others run by default)


def load_yaml_data(path: Path, what: str) -> Any:
    """``yaml.safe_load`` of a file that must exist; tags that construct objects are refused with a clear error."""
    if not path.is_file():
        raise RecipeError(f"{what} '{path}' does not exist", "give the path of a YAML file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{what} '{path}' is not valid YAML (tags that construct objects are refused): {exc}",
                          "it is plain data: mappings, lists, strings and numbers") from None


RECIPE_KINDS = ("unlearning", "merge")


def recipe_kind(source: str | Path | dict) -> str:
    """The ``kind`` of a recipe (default ``unlearning``), read before its schema is checked: each kind has its own."""
    given = source if isinstance(source, dict) else load_yaml_data(Path(source), "recipe")
    kind = given.get("kind", "unlearning") if isinstance(given, dict) else "unlearning"
    if kind not in RECIPE_KINDS:
        raise RecipeError(f"unknown recipe kind '{kind}'", did_you_mean(str(kind), RECIPE_KINDS))
    return kind


def load_recipe(source: str | Path | dict) -> dict[str, Any]:
    """Parse (safe YAML) and validate a recipe; returns the recipe as given (a dict)."""
    if isinstance(source, dict):
        given = copy.deepcopy(source)
        where = "recipe"
    else:
        given = load_yaml_data(Path(source), "recipe")
        where = str(source)
    if not isinstance(given, dict):
        raise RecipeError(f"recipe '{where}' must be a mapping at the top level")
    check_keys(given, SCHEMA, (), where)
    return given


def resolve_recipe(given: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults filled in, overrides (``seed``, ``report.dir``) applied. Sections absent from a given ``evaluate``
    stay absent (the protocol is not run)."""
    resolved = fill_defaults(given, SCHEMA, ())
    for key, value in (overrides or {}).items():
        node = resolved
        *parents, last = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    if resolved["select"].get("maximize"):
        resolved["select"]["minimize"] = None
    return resolved


def check_keys(given: dict, schema: dict, path: tuple[str, ...], where: str) -> None:
    """Every key of ``given`` is in ``schema`` (else a 'did you mean' error) and every required key is present."""
    for key, value in given.items():
        if key not in schema:
            dotted = ".".join(path + (key,))
            raise RecipeError(f"unknown recipe key '{dotted}' in '{where}'", did_you_mean(key, schema))
        sub = schema[key]
        if isinstance(sub, dict) and path + (key,) not in FREE_FORM:
            if value is None and path + (key,) in OPTIONAL_SECTIONS:
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key '{'.'.join(path + (key,))}' in '{where}' must be a mapping")
            check_keys(value, sub, path + (key,), where)
    for key, sub in schema.items():
        if sub is ANY and key not in given and path + (key,) not in FREE_FORM:
            raise RecipeError(f"recipe '{where}' lacks the required key '{'.'.join(path + (key,))}'")


def fill_defaults(given: dict, schema: dict, path: tuple[str, ...]) -> dict:
    """``given`` with the schema's defaults filled in (optional sections absent from a given mapping stay absent)."""
    out: dict[str, Any] = {}
    for key, sub in schema.items():
        here = path + (key,)
        if isinstance(sub, dict) and here not in FREE_FORM:
            if here in OPTIONAL_SECTIONS and given and given.get(key) is None:
                continue  # a given `evaluate:` runs only the protocols it names
            if here in OPT_IN_SECTIONS and not (given and given.get(key) is not None):
                continue
            out[key] = fill_defaults(given.get(key) or {}, sub, here)
        elif key in given:
            out[key] = copy.deepcopy(given[key])
        elif sub is not ANY:
            out[key] = copy.deepcopy(sub)
    return out


def dump_recipe(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False)


def selection_rule(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's ``select`` rule, or None when it names no metric to minimise or maximise."""
    select = recipe["select"]
    return select if (select.get("minimize") or select.get("maximize")) else None


def report_run(recipe: dict[str, Any], given: dict[str, Any], default_title: str, metrics: list[dict],
               records: list[dict], timings: dict[str, float], inputs: dict[str, Any], **fields: Any
               ) -> dict[str, Any]:
    """The ``run`` of a recipe's report bundle (``unmerge.report.write_bundle``): the fields every recipe kind
    reports (title, the recipe as given and resolved, metrics, records, selection rule, timings, input hashes,
    sample compression), plus the kind's own ``fields``."""
    return {"title": recipe["report"]["title"] or default_title, "recipe": given, "resolved": recipe,
            "metrics": metrics, "records": records, "selection": selection_rule(recipe),
            "timings": {k: round(v, 2) for k, v in timings.items()}, "inputs": inputs,
            "compress_samples": recipe["report"]["compress_samples"], **fields}
