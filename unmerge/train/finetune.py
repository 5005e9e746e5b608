"""Fine-tune a causal LM on the forget set with the transformers Trainer (fp32 on CPU), and keep AdamW's second
moment ``exp_avg_sq`` as a free (biased, recorded as such) Fisher proxy."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from unmerge.checkpoint import Checkpoint, atomic_output_dir, write_json_atomic
from unmerge.checkpoint.writer import check_output_location
from unmerge.engine import checkpoint_hash
from unmerge.errors import InputError
from unmerge.models import load_causal_lm
from unmerge.stats import save_statistic
from unmerge.stats.distributed import main_process_writes, per_process_batch
from unmerge.text import encode_examples, fingerprint_texts, model_context

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    epochs: float = 2.0
    max_steps: int = -1
    learning_rate: float = 5e-4
    batch_size: int = 16
    max_length: int = 128
    weight_decay: float = 0.0
    warmup: float = 0.0  # steps, or a fraction of all steps when < 1
    seed: int = 0
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, target_modules}: see unmerge.train.lora


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[list[int]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> list[int]:
        return self.examples[index]


def collate_right_padded(batch: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right padding; padded labels are -100 and masked out of attention."""
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _second_moments(trainer, model) -> dict[str, torch.Tensor]:
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    out = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        if "exp_avg_sq" in state:
            out[name] = state["exp_avg_sq"].detach().float().cpu()
    return out


def run_trainer(model, dataset, collator, config: FinetuneConfig, workdir: Path, *, device: str = "auto",
                progress: bool = True):
    """Train ``model`` on ``dataset`` with the transformers Trainer (AdamW, linear schedule, ``config``'s epochs/steps,
    learning rate, batch size, weight decay, warmup and seed); checkpoints go nowhere (``workdir`` holds the
    Trainer's scratch files only). Returns (trainer, train result, loss curve)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(workdir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=per_process_batch(config.batch_size),  # batch_size is the global batch
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="no",
        report_to=[],
        logging_steps=25,
        disable_tqdm=not progress,
        use_cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when the progress bar is off
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, result, losses


@contextlib.contextmanager
def _scratch(out_dir: Path) -> Iterator[Path]:
    """The Trainer's scratch directory of this process: a hidden sibling of the output
    (``.NAME.partial-PID-trainer``), removed afterwards; if the process is killed, the next run that builds the
    output removes it (``StageCache`` clears ``.NAME.partial-*``)."""
    path = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-trainer"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def finetune(model_path: str | Path, texts: list[str], out_dir: str | Path, config: FinetuneConfig | None = None,
             *, device: str = "auto", progress: bool = True, overwrite: bool = False) -> dict:
    """Train ``model_path`` on ``texts``; write the model (HF layout, safetensors), its tokenizer, the AdamW second
    moment (``adam_v/`` statistic) and ``training_info.json`` to ``out_dir`` atomically. Returns the info.

    With ``config.lora`` only low-rank adapters are trained and then merged into the saved model (see
    ``unmerge.train.lora``); ``adam_v`` is then not written (the optimizer saw the adapter factors only, not the
    merged weights). Under ``accelerate launch`` / ``torchrun`` every process trains on its share of each global
    batch (``batch_size`` is the global batch) and only the main process writes ``out_dir``."""
    from transformers import set_seed

    config = config or FinetuneConfig()
    out_dir = Path(out_dir)
    check_output_location(out_dir, [Path(model_path)], overwrite)  # every process, before the training starts
    set_seed(config.seed)
    model, tokenizer = load_causal_lm(model_path, device="cpu")
    if config.lora is not None:
        from unmerge.train.lora import with_lora

        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
            raise InputError("finetune.lora is not supported under FSDP (the adapters are merged in one process)",
                             "launch LoRA fine-tuning data-parallel (accelerate launch --multi_gpu): only the "
                             "adapters train, so the model fits on each device")
        model = with_lora(model, config.lora)
    max_length = min(config.max_length, model_context(model.config))
    examples = encode_examples(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    with _scratch(out_dir) as workdir:
        trainer, result, losses = run_trainer(model, _Examples(examples),
                                              lambda batch: collate_right_padded(batch, pad_id), config,
                                              workdir, device=device, progress=progress)
    model = trainer.model
    # FSDP: every process takes part in gathering the full weights; the main process saves them
    full_state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    info: dict[str, Any] = {
        "config": asdict(config),
        "n_examples": len(examples),
        "data_fingerprint": fingerprint_texts(texts),
        "base_model": str(model_path),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "loss_curve": losses,
        "seconds": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
    }
    if trainer.args.world_size > 1:
        info["processes"] = trainer.args.world_size
    adapter = None
    if config.lora is not None:
        from unmerge.train.lora import merge_lora

        model, info["lora"], adapter = merge_lora(model)
        info["adam_v"] = ("not written: with LoRA AdamW's second moments belong to the adapter factors A, B, "
                          "not to the merged weights")
    moments = {} if trainer.is_fsdp_enabled else _second_moments(trainer, model)
    if trainer.is_fsdp_enabled:
        info["adam_v"] = "not written: under FSDP the optimizer state is sharded over the processes"

    def write() -> dict:
        with atomic_output_dir(out_dir, inputs=[Path(model_path)], overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if adapter is not None:
                adapter.save(tmp / info["lora"]["adapter"])
            if moments:
                save_statistic(moments, {"kind": "adam_v", "estimator": "adam_exp_avg_sq", "N": len(examples),
                                         "n_examples": len(examples), "note": "AdamW exp_avg_sq after fine-tuning: "
                                         "a biased, decayed Fisher proxy, not a Fisher", "model_hash": None,
                                         "data_fingerprint": info["data_fingerprint"]}, tmp / "adam_v")
            info["model_hash"] = checkpoint_hash(Checkpoint(tmp))
            write_json_atomic(tmp / "training_info.json", info)
        return info

    info = main_process_writes(write)
    log.info("fine-tuned %s on %d examples in %.1fs", model_path, len(examples), info["seconds"])
    return info


def read_training_info(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "training_info.json").read_text())
