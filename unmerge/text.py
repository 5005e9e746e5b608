"""How text becomes training/statistics examples: ``bos + tokens + eos``, truncated to the model context."""
from __future__ import annotations

import hashlib
import json

from unmerge.errors import DataError


def encode_examples(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text. A bos token is prepended (when the tokenizer has one and does not add it) and an eos
    appended, so every token of the text is predicted; sequences longer than ``max_length`` are truncated."""
    if not texts:
        raise DataError("the dataset is empty", "give at least one example")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if eos is not None and ids[-1] != eos:
            ids = ids + [eos]
        out.append(ids[:max_length])
    return out


def fingerprint_texts(texts: list[str]) -> str:
    """sha256 of the texts in order (a dataset fingerprint recorded with every statistic and metric)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def model_context(config) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 1024
