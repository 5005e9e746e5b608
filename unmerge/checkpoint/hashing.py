"""Content hashes: sha256 of files and of whole directories (sorted relative paths + file hashes)."""
from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of a file, or of a directory as the hash of 'relpath sha256' lines in sorted order."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in skip or any(part.startswith(".") for part in file.relative_to(root).parts):
            continue
        digest.update(f"{rel} {sha256_file(file)}\n".encode())
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
