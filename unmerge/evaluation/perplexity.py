"""Perplexity: corpus-level strided sliding window (the reported fluency number) and per-example losses.

Corpus perplexity (``docs/evaluation.md``): the documents are joined with a blank line (``"\\n\\n"``) and
tokenized once; windows of ``max_length`` tokens start every ``stride`` tokens; in each window only the tokens
not scored by an earlier window are scored (the others are context, label -100); the NLL is summed over scored
tokens and ``PPL = exp(total NLL / scored tokens)``. Every token except the corpus's first is scored exactly
once. With ``stride == max_length`` this is the plain non-overlapping chunk perplexity.

Overflow: a collapsed model can have a mean NLL above ~709 nats, where ``math.exp`` overflows; the perplexity is
then reported as ``float('inf')`` with ``overflow: True`` (a NaN NLL stays NaN). It is never silently capped.

``per_document_perplexity`` is a *different* number (the ``evaluate`` convention: each document scored on its
own, truncated to ``max_length``, perplexities averaged with equal weight per document) and is labelled
``perplexity.per_doc_mean``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from unmerge.evaluation.common import (
    EvaluationError,
    encode,
    model_context_length,
    pad_token_id,
    safe_exp,
    score_sequences,
    start_token_id,
)

logger = logging.getLogger(__name__)

SEPARATOR = "\n\n"


def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``; ``inf`` on overflow, NaN when nothing was scored."""
    if n_tokens <= 0:
        return float("nan")
    return safe_exp(float(total_nll) / n_tokens)


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, n_target)`` over ``n_tokens`` tokens: ``[begin, end)`` is fed to the model and its
    last ``n_target`` tokens are scored (those not covered by an earlier window), as in the transformers
    perplexity guide."""
    if max_length < 1 or stride < 1 or stride > max_length:
        raise EvaluationError(f"perplexity window: need 1 <= stride <= max_length, got stride={stride}, "
                              f"max_length={max_length}", "use a stride no larger than max_length")
    windows = []
    prev_end = 0
    for begin in range(0, max(n_tokens, 1), stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end >= n_tokens:
            break
    return windows


def _resolve_lengths(model: Any, max_length: int | None, stride: int | None) -> tuple[int, int]:
    max_length = int(max_length) if max_length else model_context_length(model)
    ctx = model_context_length(model, cap=None)
    if max_length > ctx:
        logger.warning("perplexity max_length %d exceeds the model context %d; using %d", max_length, ctx, ctx)
        max_length = ctx
    stride = int(stride) if stride else max(1, max_length // 2)
    return max_length, stride


def corpus_perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    separator: str = SEPARATOR,
    progress: bool = True,
) -> dict[str, Any]:
    """Corpus-level strided sliding-window perplexity (see the module docstring).

    ``max_length`` defaults to the model context capped at 1024; ``stride`` to ``max_length // 2``.
    Returns ``{perplexity, nll_sum, n_scored, n_tokens, max_length, stride, n_windows, n_documents, overflow}``.
    """
    texts = [t for t in texts if t is not None]
    if not texts:
        raise EvaluationError("perplexity: no texts given", "pass at least one non-empty document")
    max_length, stride = _resolve_lengths(model, max_length, stride)
    if stride > max_length:
        raise EvaluationError(f"perplexity: stride {stride} > max_length {max_length}",
                              "use a stride no larger than max_length")
    ids = encode(tokenizer, [separator.join(texts)])[0]
    n_tokens = len(ids)
    windows = sliding_windows(n_tokens, max_length, stride)
    seqs = [ids[b:e] for b, e, _ in windows]
    score_from = [(e - b) - t for b, e, t in windows]
    logps = score_sequences(model, seqs, score_from, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
                            progress=progress, desc="perplexity")
    nll_sum = float(-sum(lp.double().sum().item() for lp in logps))
    n_scored = int(sum(lp.numel() for lp in logps))
    ppl = perplexity_from_nll(nll_sum, n_scored)
    overflow = n_scored > 0 and not math.isnan(nll_sum) and math.isinf(ppl)
    if overflow:
        logger.warning("perplexity overflows (mean NLL %.1f nats): reported as inf", nll_sum / n_scored)
    return {
        "perplexity": ppl,
        "nll_sum": nll_sum,
        "n_scored": n_scored,
        "n_tokens": n_tokens,
        "max_length": max_length,
        "stride": stride,
        "n_windows": len(windows),
        "n_documents": len(texts),
        "overflow": bool(overflow),
    }


def example_token_logprobs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    add_start_token: bool = False,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each text on its own (truncated to its first ``max_length`` tokens).

    Token 0 has no context and is not scored unless ``add_start_token`` prepends bos/eos. Batched with right
    padding; the result does not depend on the batch size (up to float rounding).
    """
    max_length = int(max_length) if max_length else model_context_length(model)
    seqs = encode(tokenizer, texts)
    start = start_token_id(tokenizer) if add_start_token else None
    if start is not None:
        seqs = [[start] + s for s in seqs]
    truncated = sum(len(s) > max_length for s in seqs)
    if truncated:
        logger.info("%d of %d texts truncated to %d tokens", truncated, len(seqs), max_length)
    seqs = [s[:max_length] for s in seqs]
    return score_sequences(model, seqs, None, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
                           progress=progress, desc="per-example loss")


def per_example_loss(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Mean token NLL of each text (``{loss, nll_sum, n_tokens}``; loss NaN when fewer than 2 tokens)."""
    out = []
    for lp in example_token_logprobs(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                     progress=progress):
        n = lp.numel()
        s = float(-lp.double().sum()) if n else 0.0
        out.append({"loss": s / n if n else float("nan"), "nll_sum": s, "n_tokens": n})
    return out


def per_document_perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean over documents of each document's own perplexity (the ``evaluate`` convention; a *different* metric
    from corpus perplexity). Documents are truncated to ``max_length`` tokens and get a start token so their
    first token is scored. Returns ``{perplexity.per_doc_mean, per_doc: [...], n_documents}``."""
    lps = example_token_logprobs(model, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                                 add_start_token=True, progress=progress)
    per_doc = [perplexity_from_nll(float(-lp.double().sum()), lp.numel()) for lp in lps]
    finite = [p for p in per_doc if not math.isnan(p)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    return {"perplexity.per_doc_mean": mean, "per_doc": per_doc, "n_documents": len(finite)}
