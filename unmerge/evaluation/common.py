"""Shared helpers for the evaluation package: errors, devices, tokenizer padding, batched token scoring.

Everything that runs a model goes through :func:`score_sequences`, one batched forward pass per batch of
right-padded token sequences; no per-token Python loops.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable, Iterator, Sequence

import torch

from unmerge.errors import UnmergeError

logger = logging.getLogger(__name__)

#: Default cap on the evaluation window when the model's context is longer (or unknown).
DEFAULT_CONTEXT_CAP = 1024


class EvaluationError(UnmergeError):
    """A bad evaluation protocol, scorer or input (message names the key; hint says what to do)."""


class ScorerError(EvaluationError):
    """Unknown or unusable toxicity scorer."""


# --------------------------------------------------------------------------------------------- model helpers
def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for parameterless modules)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_context_length(model: Any, cap: int | None = DEFAULT_CONTEXT_CAP) -> int:
    """The model's maximum sequence length from its config (``n_positions``, ``max_position_embeddings``...),
    capped at ``cap``; ``cap`` itself (or 1024) when the config does not say."""
    cfg = getattr(model, "config", None)
    ctx = None
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        val = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(val, int) and val > 0:
            ctx = val
            break
    if ctx is None:
        ctx = cap or DEFAULT_CONTEXT_CAP
    return min(ctx, cap) if cap else ctx


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put the model in eval mode (no dropout) for the block, restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to eos (then bos, then 0) for tokenizers without a pad token."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        val = getattr(tokenizer, attr, None)
        if val is not None:
            return int(val)
    return 0


def start_token_id(tokenizer: Any) -> int | None:
    """Token used as context when a text has none (bos, else eos): lets the first real token be scored."""
    for attr in ("bos_token_id", "eos_token_id"):
        val = getattr(tokenizer, attr, None)
        if val is not None:
            return int(val)
    return None


def encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, without padding or truncation (no length warnings)."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=add_special_tokens, padding=False, truncation=False,
                    verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enable: bool = True, unit: str = "it"):
    """A tqdm bar (rate and ETA) or a silent pass-through when ``enable`` is false."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enable, unit=unit, leave=False)


# ------------------------------------------------------------------------------------------ batched scoring
def score_sequences(
    model: Any,
    sequences: Sequence[Sequence[int]],
    score_from: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
    desc: str = "scoring",
) -> list[torch.Tensor]:
    """Log-probabilities of tokens given their prefix, for many sequences in batched forward passes.

    For sequence ``s`` the result holds ``log p(s[j] | s[:j])`` for ``j`` in ``[max(1, score_from[i]), len(s))``
    as a float32 CPU tensor (empty when nothing is scored). Sequences are sorted by length, right-padded with an
    attention mask (padding after the last real token cannot change a causal LM's logits for real tokens) and
    returned in input order.
    """
    n = len(sequences)
    starts = [1] * n if score_from is None else [max(1, int(s)) for s in score_from]
    if len(starts) != n:
        raise ValueError("score_from must have one entry per sequence")
    results: list[torch.Tensor | None] = [None] * n
    order = sorted(range(n), key=lambda i: -len(sequences[i]))
    device = model_device(model)
    batch_size = max(1, int(batch_size))
    bar = progress_bar(total=n, desc=desc, enable=progress, unit="seq")
    try:
        with eval_mode(model), torch.inference_mode():
            for b0 in range(0, n, batch_size):
                idx = order[b0:b0 + batch_size]
                lengths = [len(sequences[i]) for i in idx]
                width = max(lengths) if lengths else 0
                if width < 2:
                    for i in idx:
                        results[i] = torch.zeros(0, dtype=torch.float32)
                    bar.update(len(idx))
                    continue
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, :lengths[row]] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
                    mask[row, :lengths[row]] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                # position t predicts token t+1
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tgt = ids[:, 1:].to(device)
                tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu()
                for row, i in enumerate(idx):
                    s, e = starts[i], lengths[row]
                    results[i] = tok_lp[row, s - 1:e - 1].clone() if e > s else torch.zeros(0, dtype=torch.float32)
                bar.update(len(idx))
                del logits, logp
    finally:
        bar.close()
    return [r if r is not None else torch.zeros(0) for r in results]


def safe_exp(x: float) -> float:
    """``exp(x)`` that returns ``inf`` instead of raising OverflowError (NaN stays NaN)."""
    if math.isnan(x):
        return float("nan")
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def check_keys(given: dict, allowed: Iterable[str], where: str) -> None:
    """Raise an :class:`EvaluationError` naming the first unknown key of ``given`` with a 'did you mean' hint."""
    from unmerge.errors import did_you_mean

    allowed = list(allowed)
    for key in given:
        if key not in allowed:
            raise EvaluationError(f"unknown key '{key}' in {where}", did_you_mean(str(key), allowed))
