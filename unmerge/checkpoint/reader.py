"""Lazy, tensor-by-tensor access to safetensors checkpoints (single file, HF directory, sharded index)."""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from unmerge.errors import CheckpointError, InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_path(spec: str | Path, allow_pickle: bool = False) -> Path:
    """Turn a local path or hub id into a local path; fail fast (no network) when offline."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    looks_like_hub = text.count("/") <= 1 and not text.startswith((".", "/", "~")) and not text.endswith(".safetensors")
    if not looks_like_hub:
        raise InputError(f"model path '{spec}' does not exist", "check the path, or give a Hugging Face hub id")
    if hub_offline():
        raise InputError(
            f"'{spec}' is not a local path and the hub is offline (HF_HUB_OFFLINE=1)",
            "download the model once while online (huggingface-cli download), or pass a local directory",
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:  # network / repo errors from the hub client
        raise InputError(f"could not fetch '{spec}' from the hub: {exc}", "check the id and your connection") from exc


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict, unpickled with ``weights_only=True`` (tensors and plain containers only: no code runs)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for objects other than tensors, RuntimeError/EOFError if truncated
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
        if "weights only load failed" in str(exc).lower():
            why = f"it holds objects other than tensors: {why}"
        raise CheckpointError(
            f"'{file}' cannot be loaded safely ({why})",
            "only plain tensor state dicts are loaded (weights_only=True); objects that run code are refused: "
            "convert the checkpoint to safetensors from a trusted environment",
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{file}' is not a state dict of tensors", "save model.state_dict() or use safetensors")
    return state


class Checkpoint:
    """A model or statistic on disk; tensors are read one at a time through ``safe_open`` (memory-mapped).

    ``path`` may be a ``.safetensors`` file, a directory with ``model.safetensors``, a directory with a sharded
    ``model.safetensors.index.json``, or a directory holding exactly one other ``*.safetensors`` file.
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = resolve_model_path(path, allow_pickle=allow_pickle)
        self.allow_pickle = allow_pickle
        self._pickle_state: dict[str, torch.Tensor] | None = None
        self._name_to_file = self._index()

    # -- layout -------------------------------------------------------------------------------------------
    def _index(self) -> dict[str, Path]:
        root = self.path
        if root.is_file():
            if root.suffix != ".safetensors":
                return self._pickle_index([root])
            return {name: root for name in self._keys(root)}
        indexes = [root / INDEX_FILE] if (root / INDEX_FILE).exists() else sorted(root.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{indexes[0]} is not a valid shard index: {exc}") from exc
            return {name: root / shard for name, shard in weight_map.items()}
        if (root / SINGLE_FILE).exists():
            return {name: root / SINGLE_FILE for name in self._keys(root / SINGLE_FILE)}
        files = sorted(root.glob("*.safetensors"))
        if len(files) == 1:
            return {name: files[0] for name in self._keys(files[0])}
        pickles = [root / f for f in PICKLE_FILES if (root / f).exists()]
        if pickles:
            return self._pickle_index(pickles)
        if not files:
            raise CheckpointError(
                f"no safetensors weights in '{root}'",
                "expected model.safetensors, a sharded model.safetensors.index.json, or a single .safetensors file",
            )
        raise CheckpointError(f"'{root}' holds several .safetensors files but no {INDEX_FILE}", "add the index file")

    def _pickle_index(self, files: list[Path]) -> dict[str, Path]:
        if not self.allow_pickle:
            raise CheckpointError(
                f"'{files[0]}' is a pickle checkpoint, which can execute code when loaded",
                "convert it to safetensors, or pass --allow-pickle if you trust its source",
            )
        state: dict[str, torch.Tensor] = {}
        for file in files:
            if file.suffix == ".json":
                try:
                    shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
                except (ValueError, KeyError, AttributeError) as exc:
                    raise CheckpointError(f"{file} is not a valid shard index: {exc}") from exc
                for shard in shards:
                    state.update(_load_pickle(file.parent / shard))
            else:
                state.update(_load_pickle(file))
        self._pickle_state = state
        return {name: files[0] for name in state}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"'{file}' is not a readable safetensors file ({exc})",
                "the file is truncated or corrupt: re-download or re-create it",
            ) from exc

    # -- access -------------------------------------------------------------------------------------------
    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def names(self) -> list[str]:
        return list(self._name_to_file)

    def __contains__(self, name: str) -> bool:
        return name in self._name_to_file

    def __len__(self) -> int:
        return len(self._name_to_file)

    def file_of(self, name: str) -> Path:
        """The file that stores tensor ``name``."""
        return self._name_to_file[name]

    def files(self) -> list[Path]:
        return sorted(set(self._name_to_file.values()))

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a copy owned by the caller)."""
        if name not in self._name_to_file:
            raise CheckpointError(f"tensor '{name}' is missing from '{self.path}'", "the checkpoints must share tensor names")
        if self._pickle_state is not None:
            return self._pickle_state[name]
        file = self._name_to_file[name]
        try:
            with safe_open(file, framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"cannot read tensor '{name}' from '{file}' ({exc})", "the file is truncated or corrupt: re-create it"
            ) from exc

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype without reading the data."""
        if self._pickle_state is not None:
            tensor = self._pickle_state[name]
            return tuple(tensor.shape), tensor.dtype
        with safe_open(self._name_to_file[name], framework="pt") as handle:
            sl = handle.get_slice(name)
            return tuple(sl.get_shape()), _DTYPES[sl.get_dtype()]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata of the first file (statistics store their description here)."""
        if self._pickle_state is not None:
            return {}
        with safe_open(self.files()[0], framework="pt") as handle:
            return dict(handle.metadata() or {})

    @cached_property
    def config(self) -> dict | None:
        file = self.directory / "config.json"
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except ValueError as exc:
            raise CheckpointError(f"'{file}' is not valid JSON: {exc}") from exc

    def __repr__(self) -> str:
        return f"Checkpoint('{self.path}', {len(self)} tensors)"


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
