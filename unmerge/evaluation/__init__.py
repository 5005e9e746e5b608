"""Evaluation of causal LMs: toxicity, fluency perplexity, downstream accuracy, forget quality.

The single entry point is :func:`evaluate_model`; the building blocks live in the submodules
(``generation``, ``scorers``, ``toxicity``, ``bootstrap``, ``perplexity``, ``accuracy``, ``tasks``,
``forget_quality``, ``harness`` for lm_eval tasks) and each metric is also an ``evaluate`` module file under
``modules/`` (see :func:`module_path`). ``frames`` holds the DataFrame result of :func:`unmerge.evaluate`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from unmerge.errors import DataError, did_you_mean
from unmerge.evaluation.common import EvaluationError, ScorerError, check_keys, model_device
from unmerge.evaluation.forget_quality import auc_by_rank, min_k_percent, oracle_gap
from unmerge.evaluation.scorers import Scorer, available_scorers, get_scorer

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate_model", "rows_to_metrics", "oracle_gap", "module_path", "MODULES", "PROTOCOL_KEYS",
    "EvaluationError", "ScorerError", "Scorer", "get_scorer", "available_scorers", "auc_by_rank", "min_k_percent",
]

#: Keys that only describe where the data came from (resolved by the caller); recorded in the rows as given.
DATA_REFERENCE_KEYS = ("prompts", "data", "task", "holdout", "retain", "forget", "dataset", "split", "slice")

PROTOCOL_KEYS: dict[str, tuple[str, ...]] = {
    "toxicity": ("scorer", "samples_per_prompt", "max_new_tokens", "do_sample", "top_p", "top_k", "temperature",
                 "seed", "batch_size", "scorer_batch_size", "n_boot"),
    "perplexity": ("max_length", "stride", "batch_size", "per_document", "separator"),
    "accuracy": ("normalize", "batch_size", "max_length", "kind", "n_boot"),
    "forget_quality": ("k", "max_length", "stride", "batch_size", "n_boot", "separator"),
    "lm_eval": ("tasks", "num_fewshot", "limit", "include_path", "include_defaults", "batch_size", "max_length",
                "bootstrap_iters", "log_samples"),
}

MODULES = {"perplexity": "perplexity.py", "toxicity": "toxicity.py", "mc_accuracy": "mc_accuracy.py",
           "mia_auc": "mia_auc.py"}


def module_path(name: str) -> str:
    """Path of a shipped ``evaluate`` module file, for ``evaluate.load(module_path("perplexity"))`` (offline)."""
    if name not in MODULES:
        raise EvaluationError(f"unknown evaluate module '{name}'", did_you_mean(name, MODULES))
    return str(Path(__file__).with_name("modules") / MODULES[name])


def rows_to_metrics(rows: list[dict]) -> dict[str, float]:
    """``{metric: value}`` from summary rows (e.g. to feed :func:`oracle_gap`)."""
    return {r["metric"]: r["value"] for r in rows}


def _row(metric: str, est: Mapping[str, Any], protocol: str, params: Mapping[str, Any]) -> dict[str, Any]:
    extra = {k: v for k, v in est.items() if k not in ("value", "ci_low", "ci_high", "n")}
    return {"metric": metric, "value": est["value"], "ci_low": est.get("ci_low"), "ci_high": est.get("ci_high"),
            "n": est.get("n"), "protocol": protocol, **params, **extra}


def _need(data: Mapping[str, Any], key: str, protocol: str) -> Any:
    value = data.get(key)
    if value is None or len(value) == 0:
        raise DataError(f"protocol '{protocol}' needs data['{key}'], which is missing or empty",
                        f"load the {protocol} inputs into data['{key}'] or drop the protocol")
    return value


def _split(proto: Mapping[str, Any], protocol: str) -> tuple[dict, dict]:
    proto = dict(proto or {})
    refs = {k: proto.pop(k) for k in list(proto) if k in DATA_REFERENCE_KEYS}
    check_keys(proto, PROTOCOL_KEYS[protocol], f"the '{protocol}' protocol")
    return proto, refs


def _toxicity(model, tokenizer, proto, data, seed, progress):
    from unmerge.evaluation.generation import GENERATION_DEFAULTS, generate
    from unmerge.evaluation.toxicity import toxicity_metrics

    proto, refs = _split(proto, "toxicity")
    params = {**GENERATION_DEFAULTS, "seed": seed, **{k: v for k, v in proto.items() if k in GENERATION_DEFAULTS}}
    scorer = proto.get("scorer") or "profanity-check"
    if not isinstance(scorer, Scorer):
        device = model_device(model)
        kwargs = {"batch_size": int(proto["scorer_batch_size"])} if proto.get("scorer_batch_size") else {}
        scorer = get_scorer(scorer, device=str(device) if device.type == "cuda" else None, **kwargs)
    n_boot = int(proto.get("n_boot", 1000))
    prompts = list(_need(data, "prompts", "toxicity"))
    gens = generate(model, tokenizer, prompts, progress=progress, **params)
    scores = scorer([g["text"] for g in gens])
    for g, s in zip(gens, scores):
        g["score"] = s
    metrics = toxicity_metrics(gens, n_boot=n_boot, seed=params["seed"])
    recorded = {**refs, **params, "scorer": scorer.name, "n_boot": n_boot, "n_generations": len(gens)}
    rows = [_row(name, est, "toxicity", recorded) for name, est in metrics.items()]
    records = [{"kind": "generation", **g} for g in gens]
    records.append({"kind": "scorer", "name": scorer.name, "caveat": scorer.caveat, **scorer.info})
    return rows, records


def document_separator(tokenizer, separator: str | None) -> str:
    """The text joining documents for corpus perplexity: a blank line by default; ``eos`` means the tokenizer's eos
    token (for models trained on one document per sequence, where a blank line never occurred in training)."""
    if separator is None:
        return "\n\n"
    if separator == "eos":
        if tokenizer.eos_token is None:
            raise DataError("perplexity separator 'eos' was asked for, but the tokenizer has no eos token",
                            "use a literal separator string")
        return tokenizer.eos_token
    return separator


def _perplexity(model, tokenizer, proto, data, seed, progress):
    from unmerge.evaluation.perplexity import corpus_perplexity, per_document_perplexity

    proto, refs = _split(proto, "perplexity")
    texts = list(_need(data, "perplexity_texts", "perplexity"))
    bs = int(proto.get("batch_size", 4))
    separator = document_separator(tokenizer, proto.get("separator"))
    r = corpus_perplexity(model, tokenizer, texts, max_length=proto.get("max_length"), stride=proto.get("stride"),
                          batch_size=bs, separator=separator, progress=progress)
    recorded = {**refs, "separator": separator, "max_length": r["max_length"], "stride": r["stride"], "n_tokens": r["n_tokens"],
                "n_scored": r["n_scored"], "batch_size": bs, "overflow": r["overflow"]}
    nan = float("nan")
    rows = [_row("perplexity", {"value": r["perplexity"], "ci_low": nan, "ci_high": nan, "n": r["n_documents"]},
                 "perplexity", recorded)]
    records: list[dict] = []
    if proto.get("per_document"):
        d = per_document_perplexity(model, tokenizer, texts, max_length=r["max_length"], batch_size=bs,
                                    progress=progress)
        rows.append(_row("perplexity.per_doc_mean", {"value": d["perplexity.per_doc_mean"], "ci_low": nan,
                                                     "ci_high": nan, "n": d["n_documents"]},
                         "perplexity", {**refs, "max_length": r["max_length"], "batch_size": bs,
                                        "note": "mean of per-document perplexities; not corpus perplexity"}))
        records = [{"kind": "perplexity_doc", "index": i, "perplexity": p} for i, p in enumerate(d["per_doc"])]
    return rows, records


def _accuracy(model, tokenizer, proto, data, seed, progress):
    from unmerge.evaluation.accuracy import classification_accuracy, multiple_choice_accuracy

    proto, refs = _split(proto, "accuracy")
    items = list(_need(data, "accuracy_items", "accuracy"))
    kind = proto.get("kind") or ("multiple_choice" if "choices" in items[0] else "classification")
    n_boot = int(proto.get("n_boot", 1000))
    if kind == "multiple_choice":
        normalize = bool(proto.get("normalize", False))
        metrics, recs = multiple_choice_accuracy(
            model, tokenizer, items, normalize=normalize, batch_size=int(proto.get("batch_size", 16)),
            max_length=proto.get("max_length"), n_boot=n_boot, seed=seed, progress=progress)
        recorded = {**refs, "kind": kind, "normalize": normalize, "n_boot": n_boot}
    elif kind == "classification":
        missing = [i for i, it in enumerate(items) if "text" not in it or "label" not in it]
        if missing:
            raise DataError(f"classification accuracy: item {missing[0]} lacks 'text' or 'label'")
        metrics, recs = classification_accuracy(
            model, tokenizer, [it["text"] for it in items], [it["label"] for it in items],
            batch_size=int(proto.get("batch_size", 32)), max_length=proto.get("max_length"), n_boot=n_boot,
            seed=seed, progress=progress)
        recorded = {**refs, "kind": kind, "n_boot": n_boot}
    else:
        raise EvaluationError(f"unknown accuracy kind '{kind}'",
                              did_you_mean(str(kind), ["multiple_choice", "classification"]))
    rows = [_row(name, est, "accuracy", recorded) for name, est in metrics.items()]
    return rows, [{"kind": "accuracy", **r} for r in recs]


def _forget_quality(model, tokenizer, proto, data, seed, progress):
    from unmerge.evaluation.forget_quality import DEFAULT_K, forget_quality

    proto, refs = _split(proto, "forget_quality")
    forget = list(_need(data, "forget_texts", "forget_quality"))
    k = float(proto.get("k", DEFAULT_K))
    n_boot = int(proto.get("n_boot", 1000))
    metrics, recs = forget_quality(
        model, tokenizer, forget, data.get("retain_texts") or None, data.get("holdout_texts") or None, k=k,
        max_length=proto.get("max_length"), stride=proto.get("stride"), batch_size=int(proto.get("batch_size", 8)),
        n_boot=n_boot, seed=seed, separator=document_separator(tokenizer, proto.get("separator")), progress=progress)
    recorded = {**refs, "k": k, "n_boot": n_boot, "separator": document_separator(tokenizer, proto.get("separator"))}
    rows = [_row(name, est, "forget_quality", recorded) for name, est in metrics.items()]
    return rows, [{"kind": "membership", **r} for r in recs]


def _lm_eval(model, tokenizer, proto, data, seed, progress):
    from unmerge.evaluation.harness import LM_EVAL_DEFAULTS, lm_eval_version, results_to_rows, run_lm_eval, \
        samples_to_records

    proto, refs = _split(proto, "lm_eval")
    results = run_lm_eval(model, tokenizer, proto, seed=seed)
    opts = {**LM_EVAL_DEFAULTS, **proto}
    recorded = {**refs, "tasks": opts["tasks"], "limit": opts["limit"], "include_path": opts["include_path"],
                "bootstrap_iters": opts["bootstrap_iters"], "lm_eval_version": lm_eval_version()}
    rows = [{**row, "protocol": "lm_eval", **{k: v for k, v in recorded.items() if k not in row}}
            for row in results_to_rows(results)]
    return rows, samples_to_records(results)


_RUNNERS = {"toxicity": _toxicity, "perplexity": _perplexity, "accuracy": _accuracy,
            "forget_quality": _forget_quality, "lm_eval": _lm_eval}


def evaluate_model(
    model: Any,
    tokenizer: Any,
    protocols: dict,
    data: dict,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Run the protocols named in ``protocols`` on a causal LM and return ``(summary_rows, records)``.

    ``protocols`` maps ``toxicity`` / ``perplexity`` / ``accuracy`` / ``forget_quality`` / ``lm_eval`` to their
    parameters
    (see ``PROTOCOL_KEYS``; data-reference keys such as ``prompts: builtin:prompts`` are recorded as given);
    absent protocols are skipped. ``data`` holds the loaded inputs: ``prompts``, ``perplexity_texts``,
    ``accuracy_items`` (``{prompt, choices, label}`` or ``{text, label}``), ``forget_texts``, ``retain_texts``,
    ``holdout_texts``.

    Summary rows: ``{metric, value, ci_low, ci_high, n, protocol, seed, seconds, <protocol params>}``; metric
    names ``toxicity.mean``, ``toxicity.expected_max``, ``toxicity.probability``, ``toxicity.share_gt_0.8``,
    ``perplexity`` (+ ``perplexity.per_doc_mean``), ``accuracy``, ``accuracy.sum``, ``accuracy.norm``
    (``f1.macro`` for classifiers), ``forget.perplexity``, ``retain.perplexity``, ``forget.ppl_ratio``,
    ``mia.auc_loss``, ``mia.auc_mink``, ``lm_eval.<task>.<metric>`` (the ``lm_eval`` protocol, see
    :mod:`unmerge.evaluation.harness`). Records: dicts with a ``kind`` (``generation``, ``scorer``,
    ``perplexity_doc``, ``accuracy``, ``membership``, ``lm_eval``) and a ``protocol``.
    """
    unknown = [p for p in protocols if p not in _RUNNERS]
    if unknown:
        raise EvaluationError(f"unknown evaluation protocol '{unknown[0]}'", did_you_mean(unknown[0], _RUNNERS))
    rows: list[dict] = []
    records: list[dict] = []
    for name in _RUNNERS:
        if name not in protocols:
            continue
        proto = dict(protocols[name] or {})
        pseed = int(proto.get("seed", seed)) if name == "toxicity" else int(seed)
        t0 = time.perf_counter()
        logger.info("evaluation: %s", name)
        r, rec = _RUNNERS[name](model, tokenizer, proto, data, pseed, progress)
        seconds = time.perf_counter() - t0
        logger.info("evaluation: %s done in %.1f s", name, seconds)
        for row in r:
            row.setdefault("seed", pseed)
            row["seconds"] = round(seconds, 3)
        rows.extend(r)
        records.extend({**x, "protocol": name} for x in rec)
    return rows, records
