"""Estimate a statistic of a model on a text dataset and store it with its full description."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from unmerge import __version__
from unmerge.checkpoint import Checkpoint
from unmerge.engine import checkpoint_hash, resolve_device
from unmerge.models import load_causal_lm, resolve_model
from unmerge.stats.fisher import diagonal_fisher
from unmerge.stats.store import save_statistic
from unmerge.text import encode_examples, fingerprint_texts, model_context


def estimate_fisher(model_spec: str | Path, texts: list[str], out_dir: str | Path, *, examples: int | None = None,
                    estimator: str = "sampled", level: str = "sequence", batch_size: int = 8, seed: int = 0,
                    max_length: int = 128, n: float | None = None, device: str = "auto", path: str = "auto",
                    progress: bool = True, overwrite: bool = False, data_name: str = "") -> dict:
    """Diagonal Fisher of ``model_spec`` on the first ``examples`` texts, saved to ``out_dir``; returns the metadata.

    N (the data-size scale of H = N·F) defaults to the size of the dataset given, before the ``examples`` cut.
    """
    model_dir = resolve_model(model_spec)
    dev = resolve_device(device)
    model, tokenizer = load_causal_lm(model_dir, device=str(dev))
    used = texts[:examples] if examples else texts
    encoded = encode_examples(tokenizer, used, min(max_length, model_context(model.config)))
    start = time.perf_counter()
    fisher, info = diagonal_fisher(model, encoded, estimator=estimator, level=level, batch_size=batch_size,
                                   seed=seed, path=path, progress=progress)
    names = set(Checkpoint(model_dir).names())
    missing = [k for k in fisher if k not in names]
    fisher = {k: v for k, v in fisher.items() if k in names}
    meta = {
        "kind": "fisher",
        **info,
        "N": float(n) if n is not None else float(len(texts)),
        "n_dataset": len(texts),
        "max_length": max_length,
        "data": data_name,
        "data_fingerprint": fingerprint_texts(used),
        "model": str(model_spec),
        "model_hash": checkpoint_hash(Checkpoint(model_dir)),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 3),
        "unmerge_version": __version__,
        "not_in_checkpoint": missing,
    }
    save_statistic(fisher, meta, out_dir, overwrite=overwrite)
    return meta
