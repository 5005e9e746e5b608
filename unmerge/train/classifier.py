"""Sequence classifiers that share one body: fine-tuned per task from a causal-LM base (one head each), or trained
jointly on several tasks (multi-task: one shared body, a head per task), with the transformers Trainer.

The model is the base's transformer body (``AutoModelForSequenceClassification``'s ``base_model``) plus a bias-free
linear head per task on the hidden state of the rightmost non-padding token, exactly as transformers'
``*ForSequenceClassification`` pools (``config.pad_token_id``); the loss is the mean cross-entropy over the batch,
each example through its own task's head. Texts are encoded as the classification evaluation encodes them
(``unmerge.evaluation.accuracy.encode_for_classification``).

A trained classifier directory holds::

    body/                 the shared body as a checkpoint: model.safetensors with the base's own tensor names
                          (``transformer.*`` for GPT-2), the base's config.json and tokenizer files; this is what
                          a multi-task merge merges
    heads/<task>.safetensors   the task's head, keyed as in the ``*ForSequenceClassification`` model (``score.weight``)
    heads.json            {task: {n_labels, labels}}
    training_info.json    config, examples per task, steps, loss curve, seconds, threads, hashes

``load_classifier(body_dir, head_file)`` rebuilds a standard ``*ForSequenceClassification`` model from any body
(a merged one included) and a head.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unmerge.checkpoint import Checkpoint, atomic_output_dir, write_json_atomic
from unmerge.engine import COPIED_FILES, TOKENIZER_FILES, checkpoint_hash
from unmerge.errors import DataError, InputError
from unmerge.text import fingerprint_texts
from unmerge.train.finetune import FinetuneConfig, run_trainer

log = logging.getLogger(__name__)

BODY_DIR = "body"
HEADS_DIR = "heads"
HEADS_FILE = "heads.json"


@dataclass
class ClassificationTask:
    """Labelled texts of one task; labels are indices into ``label_names``."""

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str] = field(default_factory=list)

    @property
    def n_labels(self) -> int:
        return len(self.label_names) or (max(self.labels) + 1)

    def check(self) -> "ClassificationTask":
        if not self.texts or len(self.texts) != len(self.labels):
            raise DataError(f"task '{self.name}' has {len(self.texts)} texts and {len(self.labels)} labels",
                            "give one integer label per text, and at least one example")
        bad = [y for y in self.labels if not 0 <= int(y) < self.n_labels]
        if bad:
            raise DataError(f"task '{self.name}' has label {bad[0]} outside 0..{self.n_labels - 1}",
                            "labels are 0-based indices into the label names")
        return self


def _sequence_classifier(base_dir: Path, n_labels: int):
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=n_labels, dtype=torch.float32,
                                                                  use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot build a sequence classifier from '{base_dir}': {exc}",
                         "give an HF causal-LM directory (config.json, safetensors weights)") from exc


def head_names(model) -> list[str]:
    """Parameters of a ``*ForSequenceClassification`` model outside its body (``base_model_prefix``)."""
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def last_token_index(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The rightmost non-padding position of each row, as transformers' sequence classifiers pool."""
    positions = torch.arange(ids.shape[-1], device=ids.device)
    return (positions * (ids != pad_id)).argmax(-1)


class MultiHeadClassifier(torch.nn.Module):
    """A shared body with one bias-free linear head per task (``tasks``: name → number of labels)."""

    def __init__(self, base_dir: Path, tasks: dict[str, int], pad_id: int, seed: int = 0):
        super().__init__()
        reference = _sequence_classifier(base_dir, 1)
        self.prefix = reference.base_model_prefix
        self.body = reference.base_model
        self.config = reference.config
        names = head_names(reference)
        if len(names) != 1 or not names[0].endswith(".weight"):
            raise InputError(f"the sequence classifier of '{base_dir}' has head parameters {names}",
                             "only models with one bias-free linear head are supported")
        self.head_param = names[0]
        self.pad_id = pad_id
        self.task_names = list(tasks)
        hidden = self.body.get_input_embeddings().weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        std = float(getattr(self.config, "initializer_range", 0.02))
        self.heads = torch.nn.ModuleList()
        for n_labels in tasks.values():
            head = torch.nn.Linear(hidden, n_labels, bias=False)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
            self.heads.append(head)

    def forward(self, input_ids, attention_mask, labels=None, task=None):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(input_ids, self.pad_id)]
        loss = pooled.new_zeros(())
        logits = []
        for t, head in enumerate(self.heads):
            rows = (task == t).nonzero().squeeze(-1)
            if rows.numel():
                out = head(pooled[rows])
                logits.append(out)
                if labels is not None:
                    loss = loss + torch.nn.functional.cross_entropy(out, labels[rows], reduction="sum")
        return {"loss": loss / hidden.shape[0], "logits": logits}

    def body_state(self) -> dict[str, torch.Tensor]:
        """The body's tensors under the base checkpoint's names (``<prefix>.<name>``)."""
        return {f"{self.prefix}.{k}": v.detach().float().contiguous() for k, v in self.body.state_dict().items()}


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, rows: list[tuple[list[int], int, int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[int], int, int]:
        return self.rows[index]


def collate_labelled(batch: list[tuple[list[int], int, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding with ``pad_id``; labels and task indices as tensors."""
    width = max(len(ids) for ids, _, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (seq, _, _) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y, _ in batch]),
            "task": torch.tensor([t for _, _, t in batch])}


def write_body(state: dict[str, torch.Tensor], base_dir: Path, out: Path) -> None:
    """A body checkpoint: the tensors, the base's config and tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in COPIED_FILES + TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, out / name)


def base_body(base_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The base model's body (the tensors a sequence classifier built from it shares) as a body checkpoint."""
    base_dir = Path(base_dir)
    reference = _sequence_classifier(base_dir, 1)
    prefix = reference.base_model_prefix
    state = {f"{prefix}.{k}": v.detach().float().contiguous() for k, v in reference.base_model.state_dict().items()}
    with atomic_output_dir(Path(out_dir), inputs=[base_dir], overwrite=overwrite) as tmp:
        write_body(state, base_dir, tmp)
    return Path(out_dir)


def train_classifier(base_dir: str | Path, tasks: list[ClassificationTask], out_dir: str | Path,
                     config: FinetuneConfig | None = None, *, max_length: int = 64, device: str = "auto",
                     progress: bool = True, overwrite: bool = False) -> dict:
    """Train one body with a head per task on the union of the tasks' examples (one task: an ordinary fine-tune);
    write body/, heads/ and training_info.json to ``out_dir`` atomically. Returns the info."""
    from transformers import AutoTokenizer, set_seed

    from unmerge.evaluation.accuracy import encode_for_classification
    from unmerge.evaluation.common import pad_token_id

    config = config or FinetuneConfig()
    base_dir = Path(base_dir)
    tasks = [t.check() for t in tasks]
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad_id = pad_token_id(tokenizer)
    model = MultiHeadClassifier(base_dir, {t.name: t.n_labels for t in tasks}, pad_id, seed=config.seed)
    rows = []
    for index, task in enumerate(tasks):
        encoded = encode_for_classification(tokenizer, task.texts, max_length, pad_id)
        rows += [(ids, int(y), index) for ids, y in zip(encoded, task.labels)]
    start = time.perf_counter()
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, inputs=[base_dir], overwrite=overwrite) as tmp:
        trainer, result, losses = run_trainer(model, _Labelled(rows), lambda b: collate_labelled(b, pad_id), config,
                                              tmp / "trainer", device=device, progress=progress)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model = trainer.model.cpu()
        write_body(model.body_state(), base_dir, tmp / BODY_DIR)
        (tmp / HEADS_DIR).mkdir()
        heads = {}
        for task, head in zip(tasks, model.heads):
            save_file({model.head_param: head.weight.detach().float().contiguous()},
                      str(tmp / HEADS_DIR / f"{task.name}.safetensors"), metadata={"format": "pt"})
            heads[task.name] = {"n_labels": task.n_labels, "labels": task.label_names}
        write_json_atomic(tmp / HEADS_FILE, heads)
        info = {
            "config": asdict(config),
            "max_length": max_length,
            "tasks": {t.name: {"n_examples": len(t.texts), "n_labels": t.n_labels,
                               "data_fingerprint": fingerprint_texts(t.texts)} for t in tasks},
            "base_model": str(base_dir),
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "loss_curve": losses,
            "seconds": round(time.perf_counter() - start, 2),
            "torch_threads": torch.get_num_threads(),
            "body_hash": checkpoint_hash(Checkpoint(tmp / BODY_DIR)),
        }
        write_json_atomic(tmp / "training_info.json", info)
    log.info("trained a classifier on %s in %.1fs", ", ".join(t.name for t in tasks), info["seconds"])
    return info


def read_heads(classifier_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(classifier_dir) / HEADS_FILE).read_text())


def head_file(classifier_dir: str | Path, task: str) -> Path:
    path = Path(classifier_dir) / HEADS_DIR / f"{task}.safetensors"
    if not path.exists():
        raise InputError(f"classifier '{classifier_dir}' has no head for task '{task}'",
                         f"its heads: {', '.join(read_heads(classifier_dir))}")
    return path


def load_classifier(body_dir: str | Path, head: str | Path, *, pad_id: int | None = None, device: str = "cpu"):
    """A ``*ForSequenceClassification`` model (fp32, eval mode) from a body checkpoint and a head file; its
    ``config.pad_token_id`` is the body config's (or ``pad_id``), so it pools the last real token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    body_dir = Path(body_dir)
    head_tensors = load_file(str(head))
    (head_param, weight), = head_tensors.items()
    config = AutoConfig.from_pretrained(body_dir)
    config.num_labels = int(weight.shape[0])
    if pad_id is not None:
        config.pad_token_id = pad_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    body = Checkpoint(body_dir)
    state = {**{name: body.get(name) for name in body.names()}, head_param: weight}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"body '{body_dir}' + head '{head}' do not fit {type(model).__name__}: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}", "use a body and head of the same base model")
    return model.to(device).eval()
