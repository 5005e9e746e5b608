"""``unmerge bench fisher`` and ``unmerge bench generate``: the fast path against the simple one, same model, same
inputs, one run, ratio printed."""
from __future__ import annotations

import torch

from unmerge.bench.inprocess import timed
from unmerge.data.builtin import builtin_model_path, load_texts
from unmerge.models import load_causal_lm
from unmerge.text import encode_examples


def _gpt2_small():
    """A randomly initialised GPT-2 small configuration (124M parameters) with the builtin tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = load_causal_lm(builtin_model_path("builtin:tiny-lm"))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), tokenizer


MODELS = {"tiny": lambda: load_causal_lm(builtin_model_path("builtin:tiny-lm")), "gpt2-small": _gpt2_small}


def bench_fisher(model_name: str, examples: int, batch_size: int, max_length: int = 64) -> dict:
    """Examples per second of the vmap path and of the batch-1 loop on the same examples (sampled labels)."""
    from unmerge.stats.fisher import diagonal_fisher

    model, tokenizer = MODELS[model_name]()
    data = encode_examples(tokenizer, load_texts("builtin:clean-demo")[:examples], max_length)
    runs = {}
    for path in ("loop", "vmap"):
        t = timed(lambda p=path: diagonal_fisher(model, data, batch_size=batch_size, path=p, progress=False))
        runs[path] = t
    fast, slow = runs["vmap"].result[0], runs["loop"].result[0]
    max_rel = max(float((fast[k] - slow[k]).abs().max() / slow[k].abs().max().clamp_min(1e-30)) for k in slow)
    return {"model": model_name, "params": sum(p.numel() for p in model.parameters()), "examples": len(data),
            "batch_size": batch_size, "threads": torch.get_num_threads(),
            "loop_ex_per_s": round(len(data) / runs["loop"].seconds, 2),
            "vmap_ex_per_s": round(len(data) / runs["vmap"].seconds, 2),
            "speedup": round(runs["loop"].seconds / runs["vmap"].seconds, 2),
            "loop_peak_anon_mb": round(runs["loop"].peak_anon_mb), "vmap_peak_anon_mb": round(runs["vmap"].peak_anon_mb),
            "max_rel_diff": f"{max_rel:.1e}"}


def bench_generate(prompts: int, samples: int, max_new_tokens: int, batch_size: int) -> dict:
    """New tokens per second of batched generation against one prompt at a time (same settings)."""
    from unmerge.evaluation.generation import generate

    model, tokenizer = MODELS["tiny"]()
    texts = load_texts("builtin:prompts")[:prompts]
    settings = {"samples_per_prompt": samples, "max_new_tokens": max_new_tokens, "top_p": 0.9, "seed": 0,
                "progress": False}
    batched = timed(lambda: generate(model, tokenizer, texts, batch_size=batch_size, **settings))
    single = timed(lambda: [generate(model, tokenizer, [t], batch_size=1, **settings) for t in texts])
    new_tokens = len(texts) * samples * max_new_tokens  # an upper bound when a sample stops at eos; same for both
    return {"prompts": len(texts), "samples_per_prompt": samples, "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "threads": torch.get_num_threads(),
            "batched_tok_per_s": round(new_tokens / batched.seconds), "single_tok_per_s": round(new_tokens / single.seconds),
            "speedup": round(single.seconds / batched.seconds, 2)}
