"""Estimate a statistic of a model on a text dataset and store it with its full description.

``estimate_fisher`` (diagonal Fisher, keyed by parameter), ``estimate_gram`` (RegMean input Grams) and
``estimate_kfac`` (K-FAC factors), the latter two keyed per layer (``<module>.gram``, ``<module>.A``/``.G``; see
``unmerge.stats.gram``). They share the loading, encoding and metadata code below.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from unmerge import __version__
from unmerge.checkpoint import Checkpoint
from unmerge.engine import checkpoint_hash, resolve_device
from unmerge.errors import StatisticError
from unmerge.models import is_sequence_classifier_dir, load_causal_lm, load_sequence_classifier, resolve_model
from unmerge.stats.distributed import data_parallel, main_process_writes, processes
from unmerge.stats.fisher import diagonal_fisher
from unmerge.stats.gram import WEIGHT_SUFFIX, gram_statistics, module_of
from unmerge.stats.kfac import kfac_factors
from unmerge.stats.store import save_statistic
from unmerge.text import encode_examples, fingerprint_texts, model_context

KINDS = ("fisher", "gram", "kfac")


@dataclass
class EstimationRun:
    """A model loaded for estimation and the encoded examples."""

    spec: str
    model_dir: Path
    device: torch.device
    model: Any
    texts: list[str]
    used: list[str]
    encoded: list[list[int]]
    max_length: int
    start: float = 0.0


def _prepare(model_spec: str | Path, texts: list[str], examples: int | None, max_length: int,
             device: str) -> EstimationRun:
    processes()  # joins a data-parallel process group first: on GPUs that selects this process's device
    model_dir = resolve_model(model_spec)
    dev = resolve_device(device)
    used = texts[:examples] if examples else texts
    if is_sequence_classifier_dir(model_dir):  # encoded as the classification evaluation reads texts
        from unmerge.evaluation.accuracy import encode_for_classification

        model, tokenizer = load_sequence_classifier(model_dir, device=str(dev))
        encoded = encode_for_classification(tokenizer, used, min(max_length, model_context(model.config)),
                                            int(model.config.pad_token_id))
    else:
        model, tokenizer = load_causal_lm(model_dir, device=str(dev))
        encoded = encode_examples(tokenizer, used, min(max_length, model_context(model.config)))
    return EstimationRun(str(model_spec), model_dir, dev, model, texts, used, encoded, max_length,
                         time.perf_counter())


def store_statistic(run: EstimationRun, kind: str, tensors: dict[str, torch.Tensor], info: dict,
                    out_dir: str | Path, *, parameter_of: Callable[[str], str], n: float | None, data_name: str,
                    overwrite: bool) -> dict:
    """Keep the tensors whose parameter is in the checkpoint (``parameter_of`` maps a statistic key to it), write
    them with the shared metadata, return the metadata."""
    names = set(Checkpoint(run.model_dir).names())
    missing = [k for k in tensors if parameter_of(k) not in names]
    tensors = {k: v for k, v in tensors.items() if parameter_of(k) in names}
    if not tensors:
        raise StatisticError(f"no {kind} statistic matches a tensor of the checkpoint '{run.model_dir}'")
    if "layers" in info:  # per-layer statistics: describe only the layers kept
        info = {**info, "layers": {m: d for m, d in info["layers"].items() if m + WEIGHT_SUFFIX in names}}
    meta = {
        "kind": kind,
        **info,
        "N": float(n) if n is not None else float(len(run.texts)),
        "n_dataset": len(run.texts),
        "max_length": run.max_length,
        "data": data_name,
        "data_fingerprint": fingerprint_texts(run.used),
        "model": run.spec,
        "model_hash": checkpoint_hash(Checkpoint(run.model_dir)),
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - run.start, 3),
        "unmerge_version": __version__,
        "not_in_checkpoint": missing,
    }
    main_process_writes(lambda: save_statistic(tensors, meta, out_dir, overwrite=overwrite))
    return meta


def _kfac_count(name: str, info: dict) -> str:
    """The count a K-FAC factor is a mean over: tokens, except G of a classifier (per example)."""
    return "n_examples" if name.endswith(".G") and info.get("g_normalization") == "per_example" else "n_tokens"


def layer_parameter(key: str) -> str:
    """``<module>.<factor>`` → ``<module>.weight``."""
    return module_of(key) + WEIGHT_SUFFIX


def fisher_data(model_spec: str | Path, data: Any, estimator: str = "sampled") -> tuple[list[str], list[int] | None]:
    """(texts, labels) for ``estimate_fisher``: the empirical Fisher of a sequence classifier reads the data's
    ``label`` column (``unmerge.sources.load_labelled``); everything else reads texts only."""
    from unmerge.sources import load_labelled, load_texts

    if estimator == "empirical" and is_sequence_classifier_dir(resolve_model(model_spec)):
        return load_labelled(data)
    return load_texts(data), None


def estimate_fisher(model_spec: str | Path, texts: list[str], out_dir: str | Path, *, examples: int | None = None,
                    estimator: str = "sampled", level: str = "sequence", batch_size: int = 8, seed: int = 0,
                    max_length: int = 128, n: float | None = None, device: str = "auto", path: str = "auto",
                    progress: bool = True, overwrite: bool = False, data_name: str = "",
                    labels: list[int] | None = None) -> dict:
    """Diagonal Fisher of ``model_spec`` on the first ``examples`` texts, saved to ``out_dir``; returns the metadata.

    N (the data-size scale of H = N·F) defaults to the size of the dataset given, before the ``examples`` cut.
    A sequence-classification model directory (config.json architectures) gives the Fisher of log p(y | x);
    ``labels`` (one class index per text) are needed for estimator='empirical'.
    """
    if labels is not None and len(labels) != len(texts):
        raise StatisticError(f"{len(labels)} labels for {len(texts)} texts", "give one label per text")
    run = _prepare(model_spec, texts, examples, max_length, device)
    classifier = is_sequence_classifier_dir(run.model_dir)
    used_labels = labels[: len(run.encoded)] if labels is not None else None

    def shard_fisher(shard: list[list[int]], offset: int):
        # classifier examples are never empty (min_length 1), so offsets index the labels too
        own = used_labels[offset : offset + len(shard)] if used_labels is not None else None
        return diagonal_fisher(run.model, shard, estimator=estimator, level=level, batch_size=batch_size, seed=seed,
                               path=path, progress=progress, offset=offset, labels=own)

    fisher, info = data_parallel(shard_fisher, run.encoded, min_length=1 if classifier else 2, count="n_examples")
    return store_statistic(run, "fisher", fisher, info, out_dir, parameter_of=lambda k: k, n=n, data_name=data_name,
                           overwrite=overwrite)


def estimate_gram(model_spec: str | Path, texts: list[str], out_dir: str | Path, *, examples: int | None = None,
                  batch_size: int = 8, max_length: int = 128, n: float | None = None, device: str = "auto",
                  progress: bool = True, overwrite: bool = False, data_name: str = "") -> dict:
    """Input Gram E[x xᵀ] of every linear layer (``<module>.gram``), saved to ``out_dir``; returns the metadata."""
    run = _prepare(model_spec, texts, examples, max_length, device)
    tensors, info = data_parallel(
        lambda shard, _: gram_statistics(run.model, shard, batch_size=batch_size, progress=progress),
        run.encoded, min_length=1, count="n_tokens", summed=("n_examples",))
    return store_statistic(run, "gram", tensors, info, out_dir, parameter_of=layer_parameter, n=n, data_name=data_name,
                           overwrite=overwrite)


def estimate_kfac(model_spec: str | Path, texts: list[str], out_dir: str | Path, *, examples: int | None = None,
                  estimator: str = "sampled", batch_size: int = 8, seed: int = 0, max_length: int = 128,
                  n: float | None = None, device: str = "auto", progress: bool = True, overwrite: bool = False,
                  data_name: str = "") -> dict:
    """K-FAC factors A, G of every linear layer (``<module>.A``, ``<module>.G``), saved to ``out_dir``."""
    run = _prepare(model_spec, texts, examples, max_length, device)
    tensors, info = data_parallel(
        lambda shard, offset: kfac_factors(run.model, shard, estimator=estimator, batch_size=batch_size, seed=seed,
                                           progress=progress, offset=offset),
        run.encoded, min_length=1, count=_kfac_count, summed=("n_examples", "n_predicted_tokens"))
    return store_statistic(run, "kfac", tensors, info, out_dir, parameter_of=layer_parameter, n=n, data_name=data_name,
                           overwrite=overwrite)


ESTIMATE = {"fisher": estimate_fisher, "gram": estimate_gram, "kfac": estimate_kfac}


def estimate_statistic(kind: str, model_spec: str | Path, texts: list[str], out_dir: str | Path,
                       **options: Any) -> dict:
    """Dispatch to ``estimate_<kind>``."""
    if kind not in ESTIMATE:
        from unmerge.errors import did_you_mean

        raise StatisticError(f"unknown statistic kind '{kind}'", did_you_mean(kind, KINDS))
    return ESTIMATE[kind](model_spec, texts, out_dir, **options)
