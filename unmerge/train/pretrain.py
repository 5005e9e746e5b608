"""Training a small causal LM from scratch: a byte-level BPE tokenizer and a GPT-2 trained one example per sequence.

Used by ``python -m unmerge.data.build_models`` (the builtin ``tiny-lm`` and its oracle) and by the workflow's
``pretrain`` stage (a recipe's own base model and retrain oracle, :mod:`unmerge.pretrain_stage`).

Every example is ``bos + tokens + eos`` (truncated to the context), right-padded within a batch (padding label
-100). Training is deterministic: seeded initialisation and shuffling, AdamW with linear warmup and cosine decay to
``min_lr_ratio * lr``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmerge.data.builtin import SPECIAL_TOKEN, make_tokenizer


# ------------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """``bos + ids + eos`` per text (``tokenizer`` is a ``PreTrainedTokenizerFast``), truncated to ``max_length``."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [([bos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])[:max_length] for t in texts]


def batch_tensors(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of right-padded sequences."""
    from unmerge.train.finetune import collate_right_padded

    batch = collate_right_padded(seqs, pad_id)
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


# ------------------------------------------------------------------------------------------------- training

def gpt2_config(tokenizer, model_config: dict[str, Any]):
    """A ``GPT2Config`` for ``tokenizer`` (its vocabulary; ``<|endoftext|>`` as bos/eos/pad) and ``model_config``."""
    from transformers import GPT2Config

    tid = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    return GPT2Config(vocab_size=len(tokenizer), bos_token_id=tid, eos_token_id=tid, pad_token_id=tid,
                      **model_config)


def train_lm(config, examples: list[list[int]], steps: int, batch_size: int, lr: float, seed: int = 0,
             init_seed: int = 0, warmup: int = 0, min_lr_ratio: float = 1.0, weight_decay: float = 0.0,
             betas=(0.9, 0.999), grad_clip: float | None = None, model=None, progress: bool = True,
             callback=None):
    """Train (or continue training ``model``) on ``examples`` (token id lists), one example per sequence.

    Shuffling is a seeded permutation per epoch; the schedule is linear warmup then cosine decay to
    ``min_lr_ratio * lr`` (``min_lr_ratio=1`` and ``warmup=0`` give a constant rate). ``callback(step, model)``
    runs after every step (for monitoring; the model is in training mode). Returns (model, record).
    """
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    if model is None:
        torch.manual_seed(init_seed)
        model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []

    def next_batches() -> list[list[int]]:
        """One epoch of batches: a seeded permutation, cut into chunks of 64 batches; within a chunk the examples
        are sorted by length (less padding) and the chunk's batches are shuffled."""
        perm = torch.randperm(len(examples), generator=gen).tolist()
        out = []
        chunk = batch_size * 64
        for c in range(0, len(perm), chunk):
            part = sorted(perm[c:c + chunk], key=lambda i: (len(examples[i]), i))
            group = [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
            group = [g for g in group if len(g) == batch_size] or group
            out += [group[j] for j in torch.randperm(len(group), generator=gen).tolist()]
        return out

    losses = []
    pad_id = config.pad_token_id
    start = time.perf_counter()
    for step in tqdm(range(steps), disable=not progress, desc="train", mininterval=5):
        if not batches:
            batches = next_batches()
        idx = batches.pop(0)
        ids, mask, labels = batch_tensors([examples[i] for i in idx], pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step + 1, model)
    seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-50:]
    return model, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "examples": len(examples),
                   "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                   "final_loss_mean50": round(sum(tail) / len(tail), 4)}


# ------------------------------------------------------------------------------------------------- a recipe's model

@dataclass
class PretrainConfig:
    """Architecture and training of a model trained from scratch (the recipe's ``pretrain`` section)."""

    vocab_size: int = 2048
    model: dict[str, Any] = field(default_factory=lambda: {"n_layer": 4, "n_embd": 128, "n_head": 4,
                                                           "n_positions": 128})
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 5e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0

    def model_config(self) -> dict[str, Any]:
        """GPT-2 settings: no dropout and tied embeddings unless the recipe says otherwise."""
        return {"n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, "tie_word_embeddings": True, **self.model}

    def train_kwargs(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.learning_rate, "warmup": self.warmup,
                "min_lr_ratio": self.min_lr_ratio, "weight_decay": self.weight_decay, "betas": (0.9, 0.95),
                "grad_clip": self.grad_clip, "seed": self.seed, "init_seed": self.seed}


def pretrain(texts: list[str], tokenizer_json: str, out_dir: str | Path, config: PretrainConfig, *,
             description: dict[str, Any] | None = None, progress: bool = True) -> dict:
    """Train a GPT-2 from scratch on ``texts`` with the tokenizer ``tokenizer_json``; write it (HF layout,
    safetensors, tokenizer, ``pretrain_info.json``) to ``out_dir`` atomically. Returns the training record."""
    from transformers import GenerationConfig

    from unmerge.checkpoint import atomic_output_dir, write_json_atomic
    from unmerge.text import fingerprint_texts

    model_cfg = config.model_config()
    tokenizer = make_tokenizer(tokenizer_json, int(model_cfg["n_positions"]))
    gpt2 = gpt2_config(tokenizer, model_cfg)
    examples = encode(tokenizer, texts, gpt2.n_positions)
    model, record = train_lm(gpt2, examples, progress=progress, **config.train_kwargs())
    record.update({"params": sum(p.numel() for p in model.parameters()), "config": asdict(config),
                   "data_fingerprint": fingerprint_texts(texts), "tokens": sum(len(e) for e in examples),
                   **(description or {})})
    model.generation_config = GenerationConfig(bos_token_id=gpt2.bos_token_id, eos_token_id=gpt2.eos_token_id,
                                               pad_token_id=gpt2.pad_token_id)
    with atomic_output_dir(Path(out_dir), overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "pretrain_info.json", record)
    return record


def read_pretrain_info(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "pretrain_info.json").read_text())
