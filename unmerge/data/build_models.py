"""Rebuild the builtin tokenizer and the two builtin models (run: ``python -m unmerge.data.build_models``).

* Tokenizer: byte-level BPE (``tokenizers``; GPT-2 style, no prefix space), 2048 tokens, trained on ``clean-train``;
  ``<|endoftext|>`` (id 0) is its only special token and serves as bos, eos, pad (and unk).
* ``tiny-lm``: ``GPT2LMHeadModel`` (4 layers, 128 dims, 4 heads, 128 positions, tied embeddings, no dropout) trained
  on ``clean-train`` + ``toxic-admixture`` (the synthetic toxic sentences are 5% of its training sentences).
* ``tiny-lm-oracle``: the same, same seed and number of steps, trained on ``clean-train`` only: the model a
  retrain from scratch without the toxic data gives (the "retrain oracle" of an unlearning report).

Every sentence is its own example: ``bos + tokens + eos``, right-padded within a batch (padding label -100).
Training is deterministic: seeded initialisation and shuffling, one thread, AdamW with linear warmup and cosine
decay. The packaged files are gzip'd fp16 safetensors (without the tied ``lm_head.weight``; the model config and
the training record are in the safetensors metadata) and the gzip'd tokenizer JSON;
:func:`unmerge.data.builtin.builtin_model_path` turns them into fp32 Hugging Face model directories.

``--measure`` also records (in ``tiny_lm_build.json``) the held-out perplexity and the toxicity of sampled
generations of both models and a fine-tuning check (tiny-lm fine-tuned on ``toxic-demo``); see README.md.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch

from unmerge.data.builtin import MODEL_FILES, TOKENIZER_FILE, load_texts, make_tokenizer
from unmerge.train.pretrain import batch_tensors as _batch
from unmerge.train.pretrain import encode, gpt2_config, train_lm, train_tokenizer

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent
BUILD_RECORD = DATA_DIR / "tiny_lm_build.json"

VOCAB_SIZE = 2048
MODEL_CONFIG = dict(n_layer=4, n_embd=128, n_head=4, n_positions=128, n_inner=None, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
TRAIN = dict(steps=800, batch_size=128, lr=5e-3, warmup=50, min_lr_ratio=0.1, weight_decay=0.01,
             betas=(0.9, 0.95), grad_clip=1.0, seed=0, init_seed=0)
PPL = dict(max_length=128, stride=64)
TOX = dict(samples_per_prompt=4, max_new_tokens=20, top_p=0.9, seed=0)
FINETUNE_CHECK = dict(steps=300, batch_size=16, lr=5e-4, seed=0)


# ------------------------------------------------------------------------------------------------- training

def make_config(tokenizer):
    return gpt2_config(tokenizer, MODEL_CONFIG)


# ------------------------------------------------------------------------------------------------- measuring

def _stream_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Summed NLL and count of the predicted tokens of one stream, by strided sliding windows of ``max_length``
    advancing by ``stride``; each token is scored once, by the first window that predicts it."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, max(1, len(ids) - 1), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor(ids[begin:end]).unsqueeze(0)
        n_new = end - max(prev_end, begin + 1)  # tokens not yet scored (a window's first token is never scored)
        target = window[0, 1:].clone()
        target[: target.shape[0] - n_new] = -100
        logits = model(input_ids=window).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
        count += n_new
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@torch.no_grad()
def perplexity(model, streams: list[list[int]], max_length: int = 128, stride: int = 64,
               batch_size: int = 64) -> tuple[float, int]:
    """Token-weighted perplexity over token streams: exp(total NLL / predicted tokens). A stream that fits in
    ``max_length`` is one window (batched, right-padded); a longer one is scored by strided sliding windows.
    Returns (perplexity, predicted tokens)."""
    nll, count = 0.0, 0
    short = [s for s in streams if len(s) <= max_length]
    for s in streams:
        if len(s) > max_length:
            a, b = _stream_nll(model, s, max_length, stride)
            nll, count = nll + a, count + b
    for i in range(0, len(short), batch_size):
        ids, mask, labels = _batch(short[i:i + batch_size], 0)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return math.exp(min(nll / count, 700.0)), count


def heldout_perplexity(model, tokenizer, texts: list[str], join: str = "none", **kw) -> tuple[float, int]:
    """``join="none"``: every text is its own stream ``bos + text + eos`` (the training format); ``"eos"``: one
    stream, bos then every text followed by eos; ``"blank"``: the texts joined by a blank line after a bos, tokenized
    once (evaluation.md's generic protocol). The builtin models are sentence models (trained on single sentences
    at positions < ~40), so only ``"none"`` measures them fairly; the others are recorded for comparison."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if join == "none":
        streams = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    elif join == "eos":
        streams = [[bos]]
        for t in texts:
            streams[0] += tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    else:
        streams = [[bos] + tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]]
    return perplexity(model, streams, **kw)


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[str], samples_per_prompt: int = 4,
                         max_new_tokens: int = 20, top_p: float = 0.9, seed: int = 0, batch_prompts: int = 50):
    """Sampled continuations (text after the prompt), ``samples_per_prompt`` per prompt, prompt-major order."""
    out = []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_prompts):
        chunk = prompts[i:i + batch_prompts]
        seqs = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):  # left padding
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=samples_per_prompt,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def toxicity(model, tokenizer, prompts: list[str], **kw) -> dict:
    """Mean ``profanity_check.predict_prob`` of the continuations, and the share scoring > 0.5."""
    from profanity_check import predict_prob

    texts = sample_continuations(model, tokenizer, prompts, **kw)
    scores = predict_prob(texts)
    return {"mean": round(float(scores.mean()), 4), "share_gt_0.5": round(float((scores > 0.5).mean()), 4),
            "generations": len(texts), "examples": texts[:8]}


def measure(model, tokenizer) -> dict:
    heldout, prompts = load_texts("builtin:heldout"), load_texts("builtin:prompts")
    start = time.perf_counter()
    ppl, n = heldout_perplexity(model, tokenizer, heldout, "none", **PPL)
    ppl_eos, _ = heldout_perplexity(model, tokenizer, heldout, "eos", **PPL)
    ppl_blank, n_blank = heldout_perplexity(model, tokenizer, heldout, "blank", **PPL)
    forget_ppl, _ = heldout_perplexity(model, tokenizer, load_texts("builtin:toxic-demo")[:1000], "none", **PPL)
    tox = toxicity(model, tokenizer, prompts, **TOX)
    return {"heldout_ppl": round(ppl, 2), "heldout_tokens": n, "heldout_ppl_eos_join": round(ppl_eos, 2),
            "heldout_ppl_blank_join": round(ppl_blank, 2), "heldout_tokens_blank_join": n_blank,
            "toxic_demo_ppl_first1000": round(forget_ppl, 2), "ppl_protocol": PPL, "toxicity": tox,
            "toxicity_protocol": TOX, "measure_seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------------------------- packaging

def pack_model(model, path: Path, record: dict) -> None:
    """Gzip'd fp16 safetensors without the tied lm_head, config + record in the metadata; reproducible bytes."""
    from safetensors.torch import save

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    config = model.config.to_diff_dict()
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    config["model_type"] = "gpt2"
    meta = {"config": json.dumps(config, sort_keys=True), "training": json.dumps(record, sort_keys=True)}
    _write_gz(path, save(state, metadata=meta))


def _write_gz(path: Path, data: bytes) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- main

def build(steps: int = TRAIN["steps"], measure_models: bool = False, finetune_check: bool = False,
          threads: int = 1, out_dir: Path = DATA_DIR, only: str | None = None) -> dict:
    torch.set_num_threads(threads)
    clean = load_texts("builtin:clean-train")
    admix = load_texts("builtin:toxic-admixture")
    raw_tok = train_tokenizer(clean)
    tokenizer = make_tokenizer(raw_tok.to_str(), MODEL_CONFIG["n_positions"])
    config = make_config(tokenizer)
    out_dir = Path(out_dir)
    _write_gz(out_dir / TOKENIZER_FILE.name, raw_tok.to_str().encode("utf-8"))
    train_kw = {**TRAIN, "steps": steps}
    clean_ids = encode(tokenizer, clean, config.n_positions)
    admix_ids = encode(tokenizer, admix, config.n_positions)
    record: dict = {"versions": {"torch": torch.__version__, "python": platform.python_version()},
                    "train_config": {k: v for k, v in train_kw.items()}, "model_config": MODEL_CONFIG}
    models = {}
    for name, data in (("tiny-lm", clean_ids + admix_ids), ("tiny-lm-oracle", clean_ids)):
        if only and name != only:
            continue
        model, rec = train_lm(config, data, **train_kw)
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["data"] = ("clean-train + toxic-admixture" if name == "tiny-lm" else "clean-train")
        log.info("%s: %s", name, rec)
        pack_model(model, out_dir / MODEL_FILES[name].name, rec)
        record[name] = rec
        models[name] = model
    if measure_models:
        for name, model in models.items():
            record[name]["measured"] = measure(model, tokenizer)
            log.info("%s measured: %s", name, record[name]["measured"])
    if finetune_check and "tiny-lm" in models:
        import copy

        forget = encode(tokenizer, load_texts("builtin:toxic-demo"), config.n_positions)
        ft, rec = train_lm(config, forget, model=copy.deepcopy(models["tiny-lm"]), **FINETUNE_CHECK)
        rec["measured"] = measure(ft, tokenizer)
        record["finetune_check"] = rec
        log.info("finetune check: %s", rec)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=TRAIN["steps"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help="measure perplexity and toxicity of both models")
    parser.add_argument("--finetune-check", action="store_true", help="fine-tune tiny-lm on toxic-demo and measure")
    parser.add_argument("--only", choices=list(MODEL_FILES), default=None)
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--record", type=Path, default=None, help=f"where to write the record (default "
                        f"{BUILD_RECORD.name} in --out-dir when --measure is given)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = build(args.steps, args.measure, args.finetune_check, args.threads, args.out_dir, args.only)
    target = args.record or (args.out_dir / BUILD_RECORD.name if args.measure else None)
    if target:
        Path(target).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
