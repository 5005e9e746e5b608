"""Batched generation for the toxicity protocol: left padding, the KV cache, ``model.generate``.

Each prompt is expanded into ``samples_per_prompt`` rows; rows are generated ``batch_size`` at a time. The RNG
is re-seeded for every batch from ``(seed, batch index)`` inside ``torch.random.fork_rng`` so the results repeat
exactly for the same seed and batch size (on the same hardware) and the caller's global RNG is untouched.
Tokenizers without a pad token use eos as pad. Prompts longer than the model context minus
``max_new_tokens`` keep their last tokens.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from unmerge.evaluation.common import (
    EvaluationError,
    encode,
    eval_mode,
    model_context_length,
    model_device,
    pad_token_id,
    progress_bar,
    start_token_id,
)

logger = logging.getLogger(__name__)

GENERATION_DEFAULTS: dict[str, Any] = {
    "samples_per_prompt": 1,
    "max_new_tokens": 20,
    "do_sample": True,
    "top_p": 1.0,
    "top_k": 0,
    "temperature": 1.0,
    "seed": 0,
    "batch_size": 32,
}


def _batch_seed(seed: int, batch_index: int) -> int:
    return (int(seed) * 1_000_003 + int(batch_index)) % (2**63 - 1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every sequence right-aligned (padding on the left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 20,
    do_sample: bool = True,
    top_p: float = 1.0,
    top_k: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate continuations; returns one record per generation: ``{prompt_id, sample, prompt, text}``.

    ``text`` is the decoded continuation only (special tokens removed). ``top_k=0`` and ``top_p=1.0`` disable
    those filters; sampling parameters are ignored when ``do_sample`` is false (greedy decoding).
    """
    if samples_per_prompt < 1 or max_new_tokens < 1 or batch_size < 1:
        raise EvaluationError("generation: samples_per_prompt, max_new_tokens and batch_size must be >= 1")
    if do_sample and temperature <= 0:
        raise EvaluationError("generation: temperature must be > 0 when sampling", "or set do_sample: false")
    prompts = list(prompts)
    pad_id = pad_token_id(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    start = start_token_id(tokenizer)
    max_prompt = model_context_length(model, cap=None) - max_new_tokens
    if max_prompt < 1:
        raise EvaluationError(f"generation: max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                              f"model context", "lower max_new_tokens")
    encoded = []
    n_cut = 0
    for ids in encode(tokenizer, prompts):
        if not ids:
            ids = [start if start is not None else pad_id]
        if len(ids) > max_prompt:
            ids, n_cut = ids[-max_prompt:], n_cut + 1
        encoded.append(ids)
    if n_cut:
        logger.warning("%d prompts truncated to their last %d tokens to fit the model context", n_cut, max_prompt)

    rows = [(pid, s) for pid in range(len(prompts)) for s in range(samples_per_prompt)]
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
        "num_beams": 1,
        "pad_token_id": pad_id,
        "use_cache": True,
        "repetition_penalty": 1.0,
    }
    if eos_id is not None:
        gen_kwargs["eos_token_id"] = int(eos_id)
    if do_sample:
        gen_kwargs.update(top_p=float(top_p), top_k=int(top_k), temperature=float(temperature))
    device = model_device(model)
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    records: list[dict[str, Any]] = []
    bar = progress_bar(total=len(rows), desc="generation", enable=progress, unit="gen")
    try:
        with eval_mode(model), torch.inference_mode():
            for b, b0 in enumerate(range(0, len(rows), batch_size)):
                chunk = rows[b0:b0 + batch_size]
                ids, mask = left_pad([encoded[pid] for pid, _ in chunk], pad_id)
                with torch.random.fork_rng(devices=fork_devices):
                    torch.manual_seed(_batch_seed(seed, b))
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
                new = out[:, ids.shape[1]:].cpu()
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for (pid, s), text in zip(chunk, texts):
                    records.append({"prompt_id": pid, "sample": s, "prompt": prompts[pid], "text": text})
                bar.update(len(chunk))
    finally:
        bar.close()
    return records
