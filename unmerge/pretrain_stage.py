"""The recipe's ``pretrain`` section: the workflow makes its own base model and retrain oracle.

    pretrain.data ─┬─ tokenizer (trained on data − forget) ─┬─ pretrain:base   (data, forget subset included)
                   └────────────────────────────────────────┴─ pretrain:oracle (data − forget: never sees it)

``base_model: pretrain:base`` and ``oracle_model: pretrain:oracle`` name the two outputs. Both models share the
tokenizer, the architecture, the seed and the number of steps (as the builtin ``tiny-lm`` and its oracle do); the
tokenizer is trained without the forget data, so nothing of it reaches the oracle. The oracle's data is the corpus
with every example equal to a forget example removed. Each of the three is a cached, content-addressed stage
(:mod:`unmerge.cache`): its key covers its configuration and the identities of its data.
"""
from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unmerge.cache import stage_key
from unmerge.checkpoint import write_json_atomic
from unmerge.errors import DataError, RecipeError, did_you_mean
from unmerge.train.pretrain import PretrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from unmerge.workflow import PlanStep, UnlearningRun

log = logging.getLogger(__name__)

PREFIX = "pretrain:"
ROLES = ("base", "oracle")
CONFIG_KEYS = tuple(f.name for f in fields(PretrainConfig))


def is_pretrain_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def split_forget(corpus: list[str], forget: list[str]) -> list[str]:
    """The corpus without the forget examples (every copy of each); every forget example must be in the corpus,
    or the base would not have seen it (and there would be nothing to remove)."""
    drop = set(forget)
    missing = drop - set(corpus)
    if missing:
        example = next(iter(sorted(missing)))[:80]
        raise DataError(f"{len(missing)} of the {len(drop)} forget examples are not in pretrain.data "
                        f"(for example {example!r})",
                        "pretrain.data must be the whole training corpus, forget subset included")
    kept = [t for t in corpus if t not in drop]
    if not kept:
        raise DataError("pretrain.data holds nothing but forget examples", "give a corpus with retain data too")
    return kept


class PretrainPlan:
    """Keys, paths and stage bodies of the ``pretrain`` section of one :class:`~unmerge.workflow.UnlearningRun`."""

    def __init__(self, run: "UnlearningRun"):
        self.run = run
        self.section: dict[str, Any] = run.recipe["pretrain"]
        self.config = self._config()
        data_key, forget_key = run.data_key(self.section["data"]), run.data_key(self.section["forget"])
        tok_spec = {"data": data_key, "forget": forget_key, "vocab_size": self.config.vocab_size}
        self.tokenizer_key = stage_key("tokenizer", tok_spec)
        self.tokenizer_path = run.cache.path("tokenizer", self.tokenizer_key, ".json")
        cfg = {k: v for k, v in vars(self.config).items() if k != "vocab_size"}
        self.keys = {
            "base": stage_key("pretrain", {"role": "base", "data": data_key, "tokenizer": self.tokenizer_key,
                                           "cfg": cfg}),
            "oracle": stage_key("pretrain", {"role": "oracle", "data": data_key, "forget": forget_key,
                                             "tokenizer": self.tokenizer_key, "cfg": cfg}),
        }

    def _config(self) -> PretrainConfig:
        cfg = {k: v for k, v in self.section.items() if k in CONFIG_KEYS and v is not None}
        cfg.setdefault("seed", self.run.recipe["seed"])
        try:
            config = PretrainConfig(**cfg)
        except TypeError as exc:  # a wrong type the dataclass refuses
            raise RecipeError(f"pretrain: {exc}", "see PretrainConfig in unmerge/train/pretrain.py") from None
        for key in ("steps", "batch_size", "vocab_size"):
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecipeError(f"pretrain.{key} must be a positive integer, got {value!r}")
        if not isinstance(config.model, dict) or "n_positions" not in config.model:
            raise RecipeError("pretrain.model must be a mapping of GPT-2 settings with n_positions",
                              "for example model: {n_layer: 4, n_embd: 128, n_head: 4, n_positions: 128}")
        return config

    # -- references ------------------------------------------------------------------------------------------
    def role(self, ref: str) -> str:
        role = ref[len(PREFIX):]
        if role not in ROLES:
            raise RecipeError(f"unknown model reference '{ref}'", did_you_mean(ref, [PREFIX + r for r in ROLES]))
        return role

    def key(self, ref: str) -> str:
        return f"{PREFIX}{self.role(ref)}@{self.keys[self.role(ref)]}"

    def path(self, ref: str) -> Path:
        role = self.role(ref)
        return self.run.cache.path("pretrain", self.keys[role])

    # -- data ------------------------------------------------------------------------------------------------
    def texts(self, role: str) -> list[str]:
        corpus = self.run.texts(self.section["data"])
        return corpus if role == "base" else split_forget(corpus, self.run.texts(self.section["forget"]))

    # -- stages ----------------------------------------------------------------------------------------------
    def steps(self) -> list["PlanStep"]:
        from unmerge.workflow import PlanStep

        out = [PlanStep("pretrain:tokenizer", f"BPE tokenizer ({self.config.vocab_size}) on pretrain.data − forget",
                        self.tokenizer_path, self._tokenizer)]
        for role in ROLES:
            what = f"{self.config.steps} steps from scratch on pretrain.data" + (" − forget" if role == "oracle" else "")
            out.append(PlanStep(f"pretrain:{role}", what, self.path(PREFIX + role),
                                lambda r=role: self._model(r)))
        return out

    def _tokenizer(self) -> None:
        from unmerge.train.pretrain import train_tokenizer

        tok = train_tokenizer(self.texts("oracle"), self.config.vocab_size)
        write_json_atomic(self.tokenizer_path, {"tokenizer": tok.to_str(), "vocab_size": self.config.vocab_size})

    def _model(self, role: str) -> None:
        from unmerge.text import fingerprint_texts
        from unmerge.train.pretrain import pretrain

        texts = self.texts(role)
        tokenizer_json = json.loads(self.tokenizer_path.read_text())["tokenizer"]
        forget = self.run.texts(self.section["forget"])
        drop = set(forget)
        description = {"role": role, "n_texts": len(texts), "forget_examples_seen": sum(t in drop for t in texts),
                       "forget_fingerprint": fingerprint_texts(forget), "tokenizer_key": self.tokenizer_key}
        record = pretrain(texts, tokenizer_json, self.path(PREFIX + role), self.config, description=description,
                          progress=self.run.progress)
        log.info("pretrain %s: %s", role, {k: record[k] for k in ("steps", "examples", "train_seconds",
                                                                  "final_loss_mean50")})
