"""The Python API: the same operations as the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from unmerge.checkpoint import Checkpoint
from unmerge.engine import MergeResult, merge_checkpoints
from unmerge.models import resolve_model
from unmerge.sources import load_texts
from unmerge.stats import Statistic


def run(recipe: str | Path | dict, *, out: str | Path | None = None, device: str = "auto", seed: int | None = None,
        cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Run a recipe end to end (unlearning, or ``kind: merge`` multi-task merging); returns the report bundle."""
    from unmerge.recipe import recipe_kind

    if recipe_kind(recipe) == "merge":
        from unmerge.multitask.runner import MultiTaskRun as Run
    else:
        from unmerge.workflow import UnlearningRun as Run
    return Run(recipe, out=out, seed=seed, device=device, cache_dir=cache_dir, progress=progress).execute()


def plan(recipe: str | Path | dict, *, out: str | Path | None = None, seed: int | None = None,
         cache_dir: str | Path | None = None) -> str:
    """The recipe validated and its stages listed (cached or not), without computing or downloading anything."""
    from unmerge.recipe import recipe_kind
    from unmerge.workflow import describe_plan

    if recipe_kind(recipe) == "merge":
        from unmerge.multitask.runner import MultiTaskRun

        return MultiTaskRun(recipe, out=out, seed=seed, cache_dir=cache_dir, progress=False).describe()

    return describe_plan(recipe, out=out, seed=seed, cache_dir=cache_dir)


def finetune(model: str, data: Any, out: str | Path, *, device: str = "auto", progress: bool = True,
             overwrite: bool = False, **config: Any) -> dict:
    from unmerge.train import FinetuneConfig, finetune as _finetune

    return _finetune(resolve_model(model), load_texts(data), out, FinetuneConfig(**config), device=device,
                     progress=progress, overwrite=overwrite)


def fisher(model: str, data: Any, out: str | Path, **options: Any) -> dict:
    from unmerge.stats.compute import estimate_fisher, fisher_data

    texts, labels = fisher_data(model, data, options.get("estimator", "sampled"))
    return estimate_fisher(model, texts, out, data_name=str(data), labels=labels, **options)


def subtract(base: str, forget: str, out: str | Path, *, method: str = "uncertainty_removal",
             params: dict[str, Any] | None = None, base_fisher: str | None = None, forget_fisher: str | None = None,
             device: str = "auto", force: bool = False, allow_pickle: bool = False, overwrite: bool = False,
             progress: bool = True) -> MergeResult:
    """Remove the task vector ``forget − base`` from ``base`` with a removal method."""
    stats: dict[str, list[Statistic]] = {}
    if forget_fisher:
        stats["fisher"] = [Statistic(forget_fisher)]
    if base_fisher:
        stats["base_fisher"] = [Statistic(base_fisher)]
    return merge_checkpoints(
        method, Checkpoint(resolve_model(base, allow_pickle=allow_pickle), allow_pickle=allow_pickle),
        [Checkpoint(resolve_model(forget, allow_pickle=allow_pickle), allow_pickle=allow_pickle)], out,
        params=params or {}, stats=stats, device=device, force=force, overwrite=overwrite, progress=progress,
    )


def merge(config: str | Path | dict, out: str | Path, **options: Any) -> MergeResult:
    """Merge from a mergekit-shaped config (path or dict)."""
    from unmerge.merge_config import merge as _merge

    return _merge(config, out, **options)


def evaluate(models: str | list[str], config: str | Path | dict, out: str | Path | None = None, *,
             device: str = "auto", cache_dir: str | Path | None = None, progress: bool = True):
    """Evaluate models (directories, ``builtin:`` names, hub ids) with an evaluation config (path or dict); results
    are cached by (model, protocol). Returns an :class:`~unmerge.evaluation.frames.EvaluationResult`: pandas
    DataFrames ``records`` (per example) and ``summary`` (per metric), and ``bundle``, the report bundle directory
    when ``out`` is given. ``records, summary = unmerge.evaluate(...)`` unpacks it."""
    from unmerge.evaluation.frames import EvaluationResult
    from unmerge.workflow import evaluate_models

    rows, records, bundle = evaluate_models([models] if isinstance(models, str) else list(models), config, out,
                                            device=device, cache_dir=cache_dir, progress=progress)
    return EvaluationResult.from_rows(rows, records, bundle)


def report(directory: str | Path, *, out: str | Path | None = None, selection: dict | None = None) -> Path:
    """Rebuild a report bundle from the results it holds (optionally with another selection rule)."""
    from unmerge.report.rebuild import rebuild_bundle

    return rebuild_bundle(directory, out, selection)


def verify(directory: str | Path) -> list[str]:
    """Problems found re-hashing a report bundle (empty when it is intact)."""
    from unmerge.report import verify as _verify

    return _verify(directory)
