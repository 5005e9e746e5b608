"""Downstream accuracy.

Causal LMs: multiple choice by log-likelihood. Each item is ``{prompt, choices: [str], label: int}``; every
choice is scored as ``sum log p(choice tokens | prompt)`` (``accuracy.sum``) and as that sum divided by the
number of choice tokens (``accuracy.norm``, length-normalized by tokens). As in lm-eval, the prompt and each
choice are tokenized separately and concatenated, trailing whitespace of the prompt moves to the choice
(write choices with their leading space, e.g. ``" Paris"``), an empty prompt becomes the bos/eos token, and
over-long inputs lose prompt tokens from the left. Ties go to the lowest choice index.

Sequence-classification models: argmax accuracy and macro F1 on labelled texts.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from unmerge.errors import DataError
from unmerge.evaluation.bootstrap import DEFAULT_N_BOOT, bootstrap_ci
from unmerge.evaluation.common import (
    encode,
    eval_mode,
    model_context_length,
    model_device,
    pad_token_id,
    progress_bar,
    score_sequences,
    start_token_id,
)

logger = logging.getLogger(__name__)


def _estimate(correct: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    lo, hi = bootstrap_ci(lambda idx: correct[idx].mean(axis=1), len(correct), n_boot=n_boot, seed=seed)
    return {"value": float(correct.mean()) if len(correct) else float("nan"), "ci_low": lo, "ci_high": hi,
            "n": int(len(correct))}


def _check_items(items: Sequence[dict]) -> None:
    if not items:
        raise DataError("accuracy: no items given", "pass a list of {prompt, choices, label}")
    for i, it in enumerate(items):
        missing = [k for k in ("prompt", "choices", "label") if k not in it]
        if missing:
            raise DataError(f"accuracy item {i} lacks {missing}", "each item needs prompt, choices and label")
        if not it["choices"]:
            raise DataError(f"accuracy item {i} has no choices")
        if not (0 <= int(it["label"]) < len(it["choices"])):
            raise DataError(f"accuracy item {i}: label {it['label']} out of range for {len(it['choices'])} "
                            "choices", "labels are 0-based indices into choices")


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
) -> list[list[tuple[float, int]]]:
    """``(sum log-likelihood, n choice tokens)`` of every choice of every item, in one batched pass."""
    max_length = int(max_length) if max_length else model_context_length(model)
    start = start_token_id(tokenizer)
    seqs, score_from, owner = [], [], []
    for i, it in enumerate(items):
        prompt = str(it["prompt"])
        stripped = prompt.rstrip()
        moved = prompt[len(stripped):]
        ctx = encode(tokenizer, [stripped])[0] if stripped else []
        if not ctx and start is not None:
            ctx = [start]
        conts = encode(tokenizer, [moved + str(c) for c in it["choices"]], add_special_tokens=False)
        for j, cont in enumerate(conts):
            if not cont:
                raise DataError(f"accuracy item {i}: choice {j} ({it['choices'][j]!r}) has no tokens")
            seq = (ctx + cont)[-max_length:]
            seqs.append(seq)
            score_from.append(len(seq) - len(cont))
            owner.append((i, j))
    lps = score_sequences(model, seqs, score_from, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
                          progress=progress, desc="multiple choice")
    out: list[list[tuple[float, int]]] = [[None] * len(it["choices"]) for it in items]  # type: ignore[list-item]
    for (i, j), lp in zip(owner, lps):
        out[i][j] = (float(lp.double().sum()), int(lp.numel()))
    return out


def multiple_choice_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    normalize: bool = False,
    batch_size: int = 16,
    max_length: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Multiple-choice accuracy by log-likelihood.

    Returns ``(metrics, records)``: ``metrics`` maps ``accuracy.sum``, ``accuracy.norm`` and ``accuracy`` (the
    variant chosen by ``normalize``) to ``{value, ci_low, ci_high, n}`` (bootstrap over items); ``records`` has
    one dict per item with the choice log-likelihoods, token counts, both predictions and correctness.
    """
    _check_items(items)
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size=batch_size, max_length=max_length,
                                progress=progress)
    records = []
    for i, (it, ll) in enumerate(zip(items, lls)):
        sums = [s for s, _ in ll]
        norms = [s / n for s, n in ll]
        pred_sum, pred_norm = int(np.argmax(sums)), int(np.argmax(norms))
        label = int(it["label"])
        records.append({"index": i, "label": label, "loglik": sums, "n_tokens": [n for _, n in ll],
                        "pred_sum": pred_sum, "pred_norm": pred_norm,
                        "correct_sum": pred_sum == label, "correct_norm": pred_norm == label})
    c_sum = np.array([r["correct_sum"] for r in records], dtype=float)
    c_norm = np.array([r["correct_norm"] for r in records], dtype=float)
    metrics = {"accuracy.sum": _estimate(c_sum, n_boot, seed), "accuracy.norm": _estimate(c_norm, n_boot, seed)}
    metrics["accuracy"] = dict(metrics["accuracy.norm" if normalize else "accuracy.sum"])
    return metrics, records


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred`` (F1 = 0 for a class
    with no true positives), as scikit-learn's ``f1_score(average='macro')``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    f1s = []
    for c in np.union1d(y_true, y_pred):
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def encode_for_classification(tokenizer: Any, texts: Sequence[str], max_length: int, pad: int) -> list[list[int]]:
    """Token ids of each text as a sequence classifier reads them: the tokenizer's own ids (no bos/eos added here),
    truncated to ``max_length``; an empty text becomes ``[pad]``. Training and statistics encode the same way."""
    return [s[:max_length] or [pad] for s in encode(tokenizer, texts)]


def classification_accuracy(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Argmax accuracy (bootstrap CI over examples) and macro F1 of a sequence-classification model.

    Inputs are right-padded; a model config without ``pad_token_id`` gets the tokenizer's (eos fallback) for
    the duration of the call, so the classifier pools the last real token.
    """
    if len(texts) != len(labels) or not texts:
        raise DataError("classification accuracy: need as many labels as texts (and at least one)")
    max_length = int(max_length) if max_length else min(model_context_length(model), 512)
    pad = pad_token_id(tokenizer)
    seqs = encode_for_classification(tokenizer, texts, max_length, pad)
    device = model_device(model)
    preds: list[int] = [0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    cfg = model.config
    old_pad = getattr(cfg, "pad_token_id", None)
    if old_pad is None:
        cfg.pad_token_id = pad
    bar = progress_bar(total=len(seqs), desc="classification", enable=progress, unit="ex")
    try:
        with eval_mode(model), torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                idx = order[b0:b0 + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(idx):
                    ids[row, :len(seqs[i])] = torch.as_tensor(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for i, p in zip(idx, logits.argmax(-1).cpu().tolist()):
                    preds[i] = int(p)
                bar.update(len(idx))
    finally:
        bar.close()
        if old_pad is None:
            cfg.pad_token_id = None
    labels = [int(x) for x in labels]
    correct = np.array([p == y for p, y in zip(preds, labels)], dtype=float)
    metrics = {"accuracy": _estimate(correct, n_boot, seed),
               "f1.macro": {"value": macro_f1(labels, preds), "ci_low": float("nan"), "ci_high": float("nan"),
                            "n": len(labels)}}
    records = [{"index": i, "label": y, "pred": p, "correct": p == y} for i, (p, y) in enumerate(zip(preds, labels))]
    return metrics, records
