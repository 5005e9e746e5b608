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
    """Refuse an output equal to, inside or around an input, a non-empty directory without ``overwrite``, and a
    directory holding any file this tool did not write (it is never replaced, even with ``overwrite``)."""
    resolved = out.resolve()
    for item in inputs:
        item = Path(item).resolve()
        base = item if item.is_dir() else item.parent
        if resolved == base or base in resolved.parents:
            raise OutputError(
                f"output '{out}' is inside the input '{item}'", "choose an output directory outside every input"
            )
        if resolved in item.parents:
            raise OutputError(f"the input '{item}' is inside the output '{out}'",
                              "choose an output directory that holds no input")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output '{out}' exists and is a file", "choose a directory path")
        entries = [p for p in out.iterdir()]
        if not entries:
            return
        if not (out / MARKER).exists():
            raise OutputError(
                f"output directory '{out}' is not empty and unmerge did not write it (it holds "
                f"'{sorted(p.name for p in entries)[0]}')",
                "choose a new or empty directory: unmerge never deletes files it did not write",
            )
        if not overwrite:
            raise OutputError(f"output directory '{out}' is not empty: it holds an earlier unmerge output",
                              "choose a new directory, or pass --overwrite to replace it")
        foreign = _foreign_files(out)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise OutputError(
                f"output directory '{out}' holds files that unmerge did not write: "
                f"{', '.join(repr(f) for f in foreign[:3])}{more}",
                "move them away or choose a new directory: --overwrite never deletes files unmerge did not write",
            )


def _written_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER)


def _foreign_files(out: Path) -> list[str]:
    """Files under ``out`` that are not listed in its marker (a marker without a list predates the list: none)."""
    listed = (out / MARKER).read_text(encoding="utf-8", errors="replace").splitlines()[1:]
    if not listed:
        return []
    known = set(listed)
    return [f for f in _written_files(out) if f not in known]


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
        # the marker lists what was written: a later --overwrite replaces the directory only if nothing was added
        (tmp / MARKER).write_text("written by unmerge\n" + "".join(f"{f}\n" for f in _written_files(tmp)))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = exc if isinstance(exc, OSError) else exc.__cause__  # a writer's OutputError keeps the OSError
        if isinstance(full, OSError) and full.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" (at '{Path(str(full.filename)).name}')" if full.filename else ""
            raise OutputError(f"disk full while writing '{out}'{where}; nothing was written, the partial output "
                              "was removed", "free some space (or choose an output on another disk) and re-run"
                              ) from full
        raise


TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype


def _safetensors_dtypes() -> dict[torch.dtype, str]:
    from safetensors.torch import _TYPES  # the names safetensors itself reads and writes

    return {dtype: name for name, dtype in _TYPES.items()}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=dtype).element_size()


def shard_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class _StreamShard:
    """One safetensors file written in place: the header (from the declared shapes and dtypes) first, then each
    tensor's bytes at its offset as it arrives. Built under a temporary name, renamed when every tensor is in."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        names = _safetensors_dtypes()
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self.slots: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in specs:
            if dtype not in names:
                raise OutputError(f"cannot write '{name}': safetensors has no dtype {dtype}")
            size = _nbytes(shape, dtype)
            header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.slots[name] = (offset, size, tuple(shape), dtype)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # pad to 8 bytes (as safetensors does): tensor data stays aligned
        self.prefix = len(text).to_bytes(8, "little") + text
        self.size = len(self.prefix) + offset
        self.missing = set(self.slots)
        self.fd: int | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, size, shape, dtype = self.slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise OutputError(f"tensor '{name}' is {list(tensor.shape)} {tensor.dtype} but was declared as "
                              f"{list(shape)} {dtype}")
        if name not in self.missing:
            raise OutputError(f"tensor '{name}' was written twice")
        if self.fd is None:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(self.fd, memoryview(self.prefix), 0, self.path)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            _pwrite_all(self.fd, memoryview(data.numpy()), len(self.prefix) + offset, self.path)
        self.missing.discard(name)
        if not self.missing:
            self.close()

    def close(self) -> None:
        if self.fd is None:  # a shard of empty tensors only
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _pwrite_all(self.fd, memoryview(self.prefix), 0, self.path)
        os.ftruncate(self.fd, self.size)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path | None = None) -> None:
    data = data.cast("B")
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            if path is not None and not exc.filename:
                exc.filename = str(path)
            where = f" '{path.name}'" if path is not None else " the output"
            raise OutputError(f"disk full while writing{where}",
                              "free some space (or choose an output on another disk) and re-run") from exc
        raise


class ShardedWriter:
    """Write tensors into size-capped safetensors shards, each built under a temporary name and renamed when done.

    With a ``layout`` (every tensor's name, shape and dtype, in the order to store them), the shards are planned up
    front and every tensor is written to its file the moment it is added (any order): nothing is held in memory.
    Without one, at most one shard's worth of tensors is held and each shard is written when full.
    ``finish`` names the shards HF-style and writes the index when there is more than one.
    """

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None,
                 prefix: str = "model", layout: list[TensorSpec] | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.prefix = prefix
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._streams: list[_StreamShard] | None = None
        self._where: dict[str, _StreamShard] = {}
        if layout is not None:
            self._plan(layout)

    def _plan(self, layout: list[TensorSpec]) -> None:
        seen: set[str] = set()
        for name, _, _ in layout:
            if name in seen:
                raise OutputError(f"tensor '{name}' is declared twice")
            seen.add(name)
        groups: list[list[TensorSpec]] = []
        size = 0
        for spec in layout:
            nbytes = _nbytes(spec[1], spec[2])
            if not groups or (groups[-1] and size + nbytes > self.max_shard_bytes):
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += nbytes
        names = shard_names(len(groups), self.prefix) if groups else []
        self._streams = [_StreamShard(self.directory / name, group, self.metadata)
                         for name, group in zip(names, groups)]
        self._where = {name: shard for shard in self._streams for name in shard.slots}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._streams is not None:
            if name not in self._where:
                raise OutputError(f"tensor '{name}' was not declared in the writer's layout")
            try:
                self._where[name].write(name, tensor)
            except BaseException:
                self.abort()
                raise
            self.total_bytes += size
            return
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def abort(self) -> None:
        """Remove the partial shards (declared layout); called on errors."""
        for shard in self._streams or ():
            shard.abort()

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
        if self._streams is not None:
            missing = [name for shard in self._streams for name in sorted(shard.missing)]
            if missing:
                self.abort()
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise OutputError(f"the output is incomplete: '{', '.join(missing[:3])}'{more} never written")
            final = [shard.path for shard in self._streams]
            weight_map = {name: shard.path.name for shard in self._streams for name in shard.slots}
        else:
            self._flush()
            count = len(self._shards)
            final = []
            weight_map = {}
            for (path, names), name in zip(self._shards, shard_names(count, self.prefix) if count else []):
                os.replace(path, self.directory / name)
                final.append(self.directory / name)
                weight_map.update({n: name for n in names})
        if len(final) > 1:
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
