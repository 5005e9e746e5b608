"""Forget quality for unlearning: forget/retain perplexity, membership-inference AUC, gap to a retrain oracle.

Membership inference: the forget examples are the members (positives) and held-out examples of the same
distribution the non-members. Each example gets a *member score*, higher = more likely seen in training:

- ``mia.auc_loss``: minus the mean token NLL of the example;
- ``mia.auc_mink``: Min-k% Prob (Shi et al., 2023): the mean log-probability of the example's k% least likely
  tokens (``max(1, floor(n * k / 100))`` tokens; k = 20 by default).

AUC = P(score(member) > score(non-member)) + 0.5 P(tie), computed by ranks (Mann-Whitney U, ties get average
ranks). 0.5 means the forget set looks unseen; 1.0 that it is recognised perfectly; below 0.5 that it looks
*less* familiar than unseen data (a sign of over-forgetting). Intervals: stratified bootstrap (members and
non-members resampled separately).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from unmerge.evaluation.bootstrap import DEFAULT_N_BOOT, bootstrap_ci
from unmerge.evaluation.common import EvaluationError
from unmerge.evaluation.perplexity import corpus_perplexity, example_token_logprobs

logger = logging.getLogger(__name__)

DEFAULT_K = 20.0


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    ranks = np.empty(len(x), dtype=float)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc_by_rank(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC of scores where positives should score higher: ``(R+ - n+(n+ + 1)/2) / (n+ n-)`` with average
    ranks for ties (equals P(pos > neg) + 0.5 P(pos == neg)). NaN when a class is empty."""
    pos = np.asarray(positive, dtype=float)
    neg = np.asarray(negative, dtype=float)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise EvaluationError("AUC: scores must be finite", "drop examples with no scored tokens first")
    ranks = average_ranks(np.concatenate([pos, neg]))
    n_pos, n_neg = pos.size, neg.size
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_with_ci(positive: Sequence[float], negative: Sequence[float], *, n_boot: int = DEFAULT_N_BOOT,
                seed: int = 0) -> dict[str, float]:
    """``{value, ci_low, ci_high, n}`` for :func:`auc_by_rank` with a stratified bootstrap interval."""
    pos = np.asarray(positive, dtype=float)
    neg = np.asarray(negative, dtype=float)
    value = auc_by_rank(pos, neg)
    lo, hi = bootstrap_ci(lambda ip, ineg: auc_by_rank(pos[ip], neg[ineg]), (pos.size, neg.size),
                          n_boot=n_boot, seed=seed, vectorized=False)
    return {"value": value, "ci_low": lo, "ci_high": hi, "n": int(pos.size + neg.size)}


def min_k_percent(logprobs: torch.Tensor | Sequence[float], k: float = DEFAULT_K) -> float:
    """Mean of the ``max(1, floor(n*k/100))`` lowest token log-probabilities (NaN when there are none)."""
    lp = torch.as_tensor(logprobs, dtype=torch.float64).flatten()
    n = lp.numel()
    if n == 0:
        return float("nan")
    if not 0 < k <= 100:
        raise EvaluationError(f"Min-k%: k must be in (0, 100], got {k}")
    m = max(1, int(n * k / 100.0))
    return float(torch.topk(lp, m, largest=False).values.mean())


def member_scores(model: Any, tokenizer: Any, texts: Sequence[str], *, k: float = DEFAULT_K,
                  max_length: int | None = None, batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Per-example ``{loss, mink, n_tokens}`` (loss = mean token NLL; mink = Min-k% log-prob)."""
    out = []
    for lp in example_token_logprobs(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                     progress=progress):
        n = lp.numel()
        out.append({"loss": float(-lp.double().mean()) if n else float("nan"),
                    "mink": min_k_percent(lp, k), "n_tokens": int(n)})
    return out


def forget_quality(
    model: Any,
    tokenizer: Any,
    forget_texts: Sequence[str],
    retain_texts: Sequence[str] | None = None,
    holdout_texts: Sequence[str] | None = None,
    *,
    k: float = DEFAULT_K,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    separator: str = "\n\n",
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Forget-quality metrics and per-example records.

    Metrics (``{value, ci_low, ci_high, n, ...}``): ``forget.perplexity`` and ``retain.perplexity`` (corpus
    strided perplexity, with max_length/stride/n_tokens), ``forget.ppl_ratio`` (forget / retain), and, when
    ``holdout_texts`` are given, ``mia.auc_loss`` and ``mia.auc_mink``. Examples with fewer than two tokens
    cannot be scored and are left out of the AUCs (counted in the log).
    """
    if not forget_texts:
        raise EvaluationError("forget quality: no forget texts given", "pass data['forget_texts']")
    metrics: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    nan = float("nan")

    def ppl_entry(texts: Sequence[str]) -> dict[str, Any]:
        r = corpus_perplexity(model, tokenizer, texts, max_length=max_length, stride=stride,
                              batch_size=batch_size, separator=separator, progress=progress)
        return {"value": r["perplexity"], "ci_low": nan, "ci_high": nan, "n": r["n_documents"],
                "max_length": r["max_length"], "stride": r["stride"], "n_tokens": r["n_tokens"]}

    metrics["forget.perplexity"] = ppl_entry(forget_texts)
    if retain_texts:
        metrics["retain.perplexity"] = ppl_entry(retain_texts)
        f, r = metrics["forget.perplexity"]["value"], metrics["retain.perplexity"]["value"]
        ratio = f / r if r and math.isfinite(r) else nan
        metrics["forget.ppl_ratio"] = {"value": ratio, "ci_low": nan, "ci_high": nan,
                                       "n": metrics["forget.perplexity"]["n"]}
    if holdout_texts:
        fs = member_scores(model, tokenizer, forget_texts, k=k, max_length=max_length, batch_size=batch_size,
                           progress=progress)
        hs = member_scores(model, tokenizer, holdout_texts, k=k, max_length=max_length, batch_size=batch_size,
                           progress=progress)
        for split, texts, scores in (("forget", forget_texts, fs), ("holdout", holdout_texts, hs)):
            for i, s in enumerate(scores):
                records.append({"split": split, "index": i, "member": split == "forget", **s})
        ok_f = [s for s in fs if s["n_tokens"] > 0]
        ok_h = [s for s in hs if s["n_tokens"] > 0]
        dropped = len(fs) + len(hs) - len(ok_f) - len(ok_h)
        if dropped:
            logger.warning("membership inference: %d examples with fewer than 2 tokens left out", dropped)
        metrics["mia.auc_loss"] = auc_with_ci([-s["loss"] for s in ok_f], [-s["loss"] for s in ok_h],
                                              n_boot=n_boot, seed=seed)
        metrics["mia.auc_mink"] = auc_with_ci([s["mink"] for s in ok_f], [s["mink"] for s in ok_h],
                                              n_boot=n_boot, seed=seed)
        metrics["mia.auc_mink"]["k"] = k
    return metrics, records


def oracle_gap(candidate: Mapping[str, Any], oracle: Mapping[str, Any],
               metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Per-metric ``candidate - oracle`` for the metrics both have (or those listed in ``metrics``).

    Values may be numbers or ``{value: ...}`` dicts (as returned by the functions of this package); a positive
    gap means the candidate is higher than the model retrained without the forget data.
    """
    def val(x: Any) -> float:
        return float(x["value"]) if isinstance(x, Mapping) else float(x)

    names = list(metrics) if metrics is not None else [m for m in candidate if m in oracle]
    missing = [m for m in names if m not in candidate or m not in oracle]
    if missing:
        raise EvaluationError(f"oracle gap: metrics {missing} missing from the candidate or the oracle")
    return {m: val(candidate[m]) - val(oracle[m]) for m in names}
