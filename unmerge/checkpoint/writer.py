"""Atomic outputs: a directory is built under a temporary name and renamed into place only when complete."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from unmerge.errors import OutputError

MARKER = ".unmerge-output"  # written into every directory this tool creates; only such directories are replaced


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def check_output_location(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output equal to or inside an input, or a non-empty directory this tool did not write."""
    resolved = out.resolve()
    for item in inputs:
        item = Path(item).resolve()
        base = item if item.is_dir() else item.parent
        if resolved == base or base in resolved.parents:
            raise OutputError(
                f"output '{out}' is inside the input '{item}'", "choose an output directory outside every input"
            )
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output '{out}' exists and is a file", "choose a directory path")
        entries = [p for p in out.iterdir()]
        if entries and not overwrite:
            raise OutputError(f"output directory '{out}' is not empty", "choose a new directory, or pass --overwrite")
        if entries and not (out / MARKER).exists():
            raise OutputError(
                f"output directory '{out}' holds files that unmerge did not write",
                "unmerge only replaces directories it created; choose a new directory",
            )


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, inputs: list[Path] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out``, on any failure it is removed."""
    out = Path(out)
    check_output_location(out, list(inputs), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / MARKER).write_text("written by unmerge\n")
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardedWriter:
    """Collect tensors into size-capped safetensors shards written directly (each shard atomically).

    At most one shard's worth of tensors is held in memory. ``finish`` names the shards HF-style and writes the
    index when there is more than one.
    """

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None,
                 prefix: str = "model"):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.prefix = prefix
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(self._pending, str(tmp), metadata=self.metadata)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise OutputError(f"disk full while writing '{self.directory}'", "free space and re-run") from exc
            raise
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        self._flush()
        count = len(self._shards)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards):
            name = f"{self.prefix}.safetensors" if count == 1 else f"{self.prefix}-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / name)
            final.append(self.directory / name)
            weight_map.update({n: name for n in names})
        if count > 1:
            write_json_atomic(
                self.directory / f"{self.prefix}.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        return final


def parse_size(text: str | int) -> int:
    """'2GB' -> 2*1024**3; plain integers are bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    clean = text.strip().upper()
    for unit, factor in units.items():
        if clean.endswith(unit):
            number = clean[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    try:
        return int(clean)
    except ValueError:
        raise OutputError(f"cannot read the size '{text}'", "write it like 500MB or 2GB") from None
