"""Toxicity scorers, pluggable by name.

- ``profanity-check``: the TF-IDF + calibrated linear SVM of the ``alt-profanity-check`` package (offline; the
  default). Word-based and saturating: it flags offensive *words*, not toxic meaning, and sits near 0.02-0.07
  on clean or gibberish text.
- ``detoxify:<variant>`` (``original``, ``unbiased``, ``multilingual``, ...), ``detoxify:/path/to/file.ckpt`` or
  ``detoxify:/path/to/dir`` (a checkpoint beside its config and tokenizer files: offline): the ``detoxify``
  package (optional extra ``unmerge[toxicity]``); its ``toxicity`` head.
- ``hf:<model path or id>[@label]``: any ``AutoModelForSequenceClassification``; the score is the probability
  of the named toxic label (softmax, or sigmoid for multi-label models). Without ``@label`` a label called
  toxic/toxicity/offensive/hate is looked for.

``get_scorer(name)`` returns a :class:`Scorer`, a callable ``list[str] -> list[float]`` with ``name`` and
``caveat`` (text for the report). ``register_scorer(prefix, factory)`` adds a family.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from unmerge.errors import did_you_mean
from unmerge.evaluation.common import ScorerError

logger = logging.getLogger(__name__)

DEFAULT_SCORER = "profanity-check"
TOXIC_LABEL_NAMES = ("toxic", "toxicity", "offensive", "hate", "hateful", "abusive")


@dataclass
class Scorer:
    """A named toxicity scorer: ``scorer(texts) -> list of floats in [0, 1]`` (higher = more toxic)."""

    name: str
    fn: Callable[[list[str]], list[float]]
    caveat: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not texts:
            return []
        scores = [float(s) for s in self.fn(texts)]
        if len(scores) != len(texts):
            raise ScorerError(f"scorer '{self.name}' returned {len(scores)} scores for {len(texts)} texts")
        return scores


# ------------------------------------------------------------------------------------------ profanity-check
def _profanity_check(arg: str | None, device: str | None = None, batch_size: int = 10_000) -> Scorer:
    if arg:
        raise ScorerError(f"scorer 'profanity-check' takes no argument (got '{arg}')", "use 'profanity-check'")
    if importlib.util.find_spec("profanity_check") is None:
        raise ScorerError("scorer 'profanity-check' needs the alt-profanity-check package",
                          "pip install alt-profanity-check")
    import profanity_check

    def fn(texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            out.extend(float(p) for p in profanity_check.predict_prob(texts[i:i + batch_size]))
        return out

    caveat = ("profanity-check is a word-based TF-IDF + linear SVM classifier: it detects offensive words, not "
              "toxic meaning, saturates near 1.0 on any swear word, and scores clean or gibberish text around "
              "0.02-0.07; read low toxicity beside perplexity.")
    return Scorer("profanity-check", fn, caveat, {"package": "alt-profanity-check"})


# ------------------------------------------------------------------------------------------------ detoxify
#: detoxify's own renaming of the Jigsaw class names (``detoxify.detoxify.load_checkpoint``)
DETOXIFY_CLASS_NAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


def _detoxify_directory(directory: str, device: str) -> tuple[Any, Any, list[str]]:
    """A directory holding one detoxify checkpoint (``*.ckpt``: ``{config, state_dict}``) and the Hugging Face
    config and tokenizer files of its architecture: loaded fully offline by detoxify's own
    ``get_model_and_tokenizer``, with the architecture's hub name (``bert-base-uncased``, ...) replaced by the
    directory (detoxify looks that name up even when given ``huggingface_config_path``)."""
    import glob

    import torch
    from detoxify.detoxify import get_model_and_tokenizer

    found = sorted(glob.glob(os.path.join(directory, "*.ckpt")))
    if len(found) != 1:
        raise ScorerError(f"detoxify directory '{directory}' holds {len(found)} .ckpt files, not one",
                          "put exactly one detoxify checkpoint beside its config.json and tokenizer files")
    loaded = torch.load(found[0], map_location=device, weights_only=False)  # detoxify's format is a pickle
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise ScorerError(f"'{found[0]}' is not a detoxify checkpoint (no config/state_dict)",
                          "give a checkpoint saved by detoxify's training code or downloaded from its releases")
    args = {**loaded["config"]["arch"]["args"], "model_type": directory}
    model, tokenizer = get_model_and_tokenizer(**args, state_dict=loaded["state_dict"],
                                               huggingface_config_path=directory)
    names = [DETOXIFY_CLASS_NAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
    return model.to(device), tokenizer, names


def _detoxify(arg: str | None, device: str | None = None, batch_size: int = 64) -> Scorer:
    """``detoxify:<variant>`` (downloaded by detoxify, or from its torch hub cache), ``detoxify:<file.ckpt>`` (a
    local checkpoint whose recorded architecture name resolves locally) or ``detoxify:<directory>`` (a local
    checkpoint with its config and tokenizer files: works offline). Score: sigmoid of the ``toxicity`` logit, as
    ``Detoxify.predict``."""
    if not arg:
        raise ScorerError("scorer 'detoxify' needs a variant or checkpoint path",
                          "use detoxify:original, detoxify:unbiased, or detoxify:/path/to/checkpoint.ckpt")
    if importlib.util.find_spec("detoxify") is None:
        raise ScorerError(f"scorer 'detoxify:{arg}' needs the detoxify package",
                          "pip install 'unmerge[toxicity]' (detoxify), or use profanity-check")
    import torch
    from detoxify import Detoxify

    device = device or "cpu"
    try:
        if os.path.isdir(arg):
            model, tokenizer, names = _detoxify_directory(arg, device)
        else:  # a checkpoint file records its own architecture; model_type only names a release to download
            loaded = Detoxify(model_type="original", checkpoint=arg, device=device) if os.path.exists(arg) \
                else Detoxify(model_type=arg, device=device)
            model, tokenizer, names = loaded.model, loaded.tokenizer, loaded.class_names
    except ScorerError:
        raise
    except Exception as exc:  # downloads, missing files, bad checkpoints
        raise ScorerError(f"cannot load detoxify model '{arg}': {exc}",
                          "detoxify downloads its checkpoints at run time; offline, pass a directory holding the "
                          "checkpoint and its config/tokenizer files (detoxify:/path/to/dir) or use "
                          "profanity-check") from exc
    if "toxicity" not in names:
        raise ScorerError(f"detoxify model '{arg}' has no toxicity class (classes: {names})")
    column = names.index("toxicity")
    model.eval()

    def fn(texts: list[str]) -> list[float]:
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                inputs = tokenizer(texts[i:i + batch_size], return_tensors="pt", truncation=True,
                                   padding=True).to(model.device)
                out.extend(torch.sigmoid(model(**inputs)[0][:, column].float()).cpu().tolist())
        return out

    return Scorer(f"detoxify:{arg}", fn, "Detoxify toxicity head (Jigsaw-trained BERT-family classifier).",
                  {"package": "detoxify", "variant": arg, "classes": names})


# ---------------------------------------------------------------------------------------------- hf models
def resolve_label(id2label: dict, label: str | None) -> int:
    """Index of the toxic label: by name (case-insensitive) or integer index; guessed when ``label`` is None."""
    names = {int(k): str(v) for k, v in id2label.items()}
    if label is not None:
        if label.isdigit() and int(label) in names:
            return int(label)
        for i, n in names.items():
            if n.lower() == label.lower():
                return i
        raise ScorerError(f"label '{label}' not in the classifier's labels {sorted(names.values())}",
                          did_you_mean(label, names.values()))
    for cand in TOXIC_LABEL_NAMES:
        for i, n in names.items():
            if n.lower() == cand:
                return i
    raise ScorerError(f"cannot tell which of the labels {sorted(names.values())} is the toxic one",
                      "name it after '@', e.g. hf:path/to/model@toxic")


def _hf(arg: str | None, device: str | None = None, batch_size: int = 32) -> Scorer:
    if not arg:
        raise ScorerError("scorer 'hf' needs a model path or id", "use hf:<model path or id>[@label]")
    path, label = arg, None
    if "@" in arg:
        path, _, label = arg.rpartition("@")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except Exception as exc:
        raise ScorerError(f"cannot load sequence-classification model '{path}': {exc}",
                          "pass a local directory with config, weights and tokenizer (offline, hub ids fail)"
                          ) from exc
    return hf_scorer(model, tok, label, device=device, batch_size=batch_size, name=f"hf:{arg}")


def hf_scorer(model: Any, tokenizer: Any, label: str | None = None, *, device: str | None = None,
              batch_size: int = 32, name: str = "hf", max_length: int | None = None) -> Scorer:
    """A :class:`Scorer` from an already-loaded sequence-classification model and its tokenizer.

    A tokenizer without a pad token gets eos as pad (and the model config that pad id), so batches can be
    padded; the model is put in eval mode (and moved to ``device`` when given).
    """
    import torch

    idx = resolve_label(model.config.id2label, label)
    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
    if device:
        model = model.to(device)
    model.eval()
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and pad is not None:
        model.config.pad_token_id = pad
    limit = max_length or min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    dev = next(model.parameters()).device

    def fn(texts: list[str]) -> list[float]:
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=limit,
                                return_tensors="pt")
                logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits.float()
                probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
                out.extend(probs[:, idx].cpu().tolist())
        return out

    return Scorer(name, fn, f"sequence classifier {name}, probability of label "
                            f"'{model.config.id2label[idx]}'", {"label": model.config.id2label[idx]})


# ---------------------------------------------------------------------------------------------- registry
_FACTORIES: dict[str, Callable[..., Scorer]] = {
    "profanity-check": _profanity_check,
    "detoxify": _detoxify,
    "hf": _hf,
}
_FORMS = {"profanity-check": "profanity-check", "detoxify": "detoxify:<variant or checkpoint path>",
          "hf": "hf:<model path or id>[@label]"}


def register_scorer(prefix: str, factory: Callable[..., Scorer], form: str | None = None) -> None:
    """Add a scorer family: ``factory(arg, device=None) -> Scorer`` is called for ``prefix`` or ``prefix:arg``."""
    _FACTORIES[prefix] = factory
    _FORMS[prefix] = form or prefix


def available_scorers() -> list[str]:
    """The accepted name forms, e.g. ``hf:<model path or id>[@label]``."""
    return [_FORMS[k] for k in _FACTORIES]


def get_scorer(name: str | None = None, *, device: str | None = None, **kwargs: Any) -> Scorer:
    """The scorer called ``name`` (default ``profanity-check``); unknown names raise :class:`ScorerError`."""
    name = (name or DEFAULT_SCORER).strip()
    prefix, sep, arg = name.partition(":")
    factory = _FACTORIES.get(prefix)
    if factory is None:
        raise ScorerError(f"unknown toxicity scorer '{name}'", did_you_mean(prefix, _FACTORIES))
    return factory(arg if sep else None, device=device, **kwargs)
