"""Check a report bundle against its manifest: every listed file present and unchanged, nothing unlisted."""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from unmerge.checkpoint.hashing import sha256_file
from unmerge.checkpoint.writer import MARKER

__all__ = ["verify"]

MANIFEST = "manifest.json"


def verify(directory: str | Path) -> list[str]:
    """Recompute the sha256 of every output listed in ``DIR/manifest.json``.

    Returns the problems found, each naming the file (``"<path>: <what is wrong>"``); an empty list means the
    bundle is intact. Never raises: an unreadable manifest or directory is reported as a problem too.
    """
    try:
        return _verify(Path(directory))
    except Exception as exc:  # verify must report, not crash
        return [f"{directory}: cannot be verified ({type(exc).__name__}: {exc})"]


def _verify(root: Path) -> list[str]:
    if not root.exists():
        return [f"{root}: no such directory"]
    if not root.is_dir():
        return [f"{root}: not a directory"]
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return [f"{MANIFEST}: missing (not a report bundle, or the manifest was deleted)"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{MANIFEST}: unreadable ({exc})"]
    outputs = manifest.get("outputs") if isinstance(manifest, dict) else None
    if not isinstance(outputs, dict):
        return [f"{MANIFEST}: has no 'outputs' mapping of file -> sha256"]

    problems: list[str] = []
    listed: set[str] = set()
    for name, expected in outputs.items():
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or ".." in rel.parts or str(rel) in ("", ".") or "\\" in str(name):
            problems.append(f"{name}: listed with a path outside the bundle; not checked")
            continue
        listed.add(rel.as_posix())
        path = root.joinpath(*rel.parts)
        if path.is_symlink():
            problems.append(f"{name}: is a symbolic link, not a file of the bundle")
        elif not path.exists():
            problems.append(f"{name}: missing")
        elif not path.is_file():
            problems.append(f"{name}: not a regular file")
        else:
            actual = sha256_file(path)
            if not isinstance(expected, str) or actual != expected.lower():
                problems.append(f"{name}: changed (sha256 {actual}, manifest says {expected})")

    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, MARKER) or rel in listed:
            continue
        problems.append(f"{rel}: present but not listed in {MANIFEST}")
    return problems
