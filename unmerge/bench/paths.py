"""``unmerge bench fisher`` and ``unmerge bench generate``: the fast path against the simple one, same model, same
inputs, one run, ratio printed."""
from __future__ import annotations

import torch

from unmerge.bench.inprocess import Timed, timed
from unmerge.bench.monitor import median_run
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


def bench_fisher(model_name: str, examples: int, batch_size: int, max_length: int = 64,
                 paths: tuple[str, ...] = ("loop", "hooks", "vmap"), level: str = "sequence",
                 repeat: int = 1) -> list[dict]:
    """Examples per second of each Fisher path on the same examples (sampled labels), side by side in one process:
    one row per path with its ratio to the batch-1 loop (wall time and thread CPU time), its peak anonymous memory
    and its largest relative difference from the loop. Each path first runs once on two examples (warm-up, not
    timed); with ``repeat`` > 1 the paths take turns that many times and each row holds the path's median run
    (a machine's passing load then hits every path alike)."""
    from unmerge.stats.fisher import diagonal_fisher

    model, tokenizer = MODELS[model_name]()
    data = encode_examples(tokenizer, load_texts("builtin:clean-demo")[:examples], max_length)
    order = ["loop"] + [p for p in paths if p != "loop"]
    for path in order:
        diagonal_fisher(model, data[:2], batch_size=2, path=path, level=level, progress=False)
    rounds: dict[str, list[Timed]] = {path: [] for path in order}
    for _ in range(max(1, repeat)):
        for path in order:
            rounds[path].append(timed(lambda p=path: diagonal_fisher(model, data, batch_size=batch_size, path=p,
                                                                     level=level, progress=False)))
    runs = {path: median_run(done, lambda run: run.seconds) for path, done in rounds.items()}
    slow = runs["loop"].result[0]
    rows = []
    for path, run in runs.items():
        fisher, info = run.result
        max_rel = max(float((fisher[k] - slow[k]).abs().max() / slow[k].abs().max().clamp_min(1e-30)) for k in slow)
        rows.append({"model": model_name, "params": sum(p.numel() for p in model.parameters()), "path": path,
                     "path_used": info["path"], "level": level, "examples": len(data), "batch_size": batch_size,
                     "threads": torch.get_num_threads(), "ex_per_s": round(len(data) / run.seconds, 2),
                     "x_loop": round(runs["loop"].seconds / run.seconds, 2),
                     "x_loop_cpu": round(runs["loop"].cpu_seconds / run.cpu_seconds, 2),
                     "peak_anon_mb": round(max(r.peak_anon_mb for r in rounds[path])), "repeat": len(rounds[path]),
                     "max_rel_diff_vs_loop": f"{max_rel:.1e}"})
    return rows


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
