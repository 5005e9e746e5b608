"""Loading models and tokenizers safely: safetensors only unless asked, no remote code unless asked."""
from __future__ import annotations

from pathlib import Path

import torch

from unmerge.checkpoint import Checkpoint
from unmerge.errors import InputError


def resolve_model(spec: str | Path, cache_dir: str | Path | None = None, allow_pickle: bool = False) -> Path:
    """A model reference (``builtin:NAME``, local directory, or hub id) as a local directory."""
    text = str(spec)
    if text.startswith("builtin:"):
        from unmerge.data.builtin import builtin_model_path

        return builtin_model_path(text, cache_dir=cache_dir)
    return Checkpoint(text, allow_pickle=allow_pickle).directory


def load_causal_lm(spec: str | Path, device: str = "cpu", trust_remote_code: bool = False,
                   allow_pickle: bool = False, cache_dir: str | Path | None = None):
    """(model in fp32 eval mode on ``device``, tokenizer with a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec, cache_dir=cache_dir, allow_pickle=allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     use_safetensors=not allow_pickle)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model at '{path}': {exc}", "give an HF model directory with "
                         "config.json, safetensors weights and tokenizer files") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def is_sequence_classifier_dir(path: str | Path) -> bool:
    """Whether a model directory's config.json names a ``*ForSequenceClassification`` architecture."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def load_sequence_classifier(spec: str | Path, device: str = "cpu", trust_remote_code: bool = False,
                             allow_pickle: bool = False, cache_dir: str | Path | None = None):
    """(``AutoModelForSequenceClassification`` in fp32 eval mode on ``device``, tokenizer). A config without
    ``pad_token_id`` gets the tokenizer's pad id (eos fallback), so that batches pool the last real token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from unmerge.evaluation.common import pad_token_id

    path = resolve_model(spec, cache_dir=cache_dir, allow_pickle=allow_pickle)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the sequence classifier at '{path}': {exc}", "give an HF model directory "
                         "with config.json, safetensors weights and tokenizer files") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id(tokenizer)
    return model.to(device).eval(), tokenizer
