"""Content hashes: sha256 of files, read in 8 MB blocks into one reused buffer.

Large inputs (model weights) are hashed once per file version: with ``cached=True`` the digest is kept under
``<unmerge cache>/hashes/<device>-<inode>.json`` beside the file's size, ``st_mtime_ns`` and ``st_ctime_ns``, and
reused only while all three are unchanged. Any write to the file changes its mtime, and restoring an mtime (``touch
-r``, ``os.utime``) changes its ctime, which a user cannot set; so a reused digest is the digest of the current bytes.
A file changed less than ``RACY_SECONDS`` ago is hashed but not recorded: file times have the kernel clock's
resolution (a few ms), so a same-size rewrite within it could keep all three (git's "racy" rule).
``UNMERGE_HASH_CACHE=0`` turns the cache off; ``verify`` never uses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

_CHUNK = 8 << 20
RACY_SECONDS = 2.0


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def hash_cache_dir() -> Path | None:
    """Where cached file digests live; None when the cache is turned off."""
    if os.environ.get("UNMERGE_HASH_CACHE", "1") == "0":
        return None
    from unmerge.cache import default_cache_dir

    return default_cache_dir() / "hashes"


def _stamp(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def sha256_file(path: str | Path, cached: bool = False) -> str:
    """sha256 of a file's bytes (hex). ``cached``: reuse the digest recorded for this file version, if any, and
    record it otherwise (see the module docstring)."""
    path = Path(path)
    root = hash_cache_dir() if cached else None
    if root is None:
        return _digest(path)
    before = os.stat(path)
    entry = root / f"{before.st_dev}-{before.st_ino}.json"
    try:
        known = json.loads(entry.read_text())
        if {k: known.get(k) for k in ("size", "mtime_ns", "ctime_ns")} == _stamp(before):
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no entry, or an unreadable one: hash
    digest = _digest(path)
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > RACY_SECONDS * 1e9
    if settled and _stamp(os.stat(path)) == _stamp(before):  # not changed lately, nor while it was read
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"path": str(path.resolve()), **_stamp(before), "sha256": digest}))
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only cache only costs the speed-up
    return digest


def tree_sha256(directory: str | Path) -> str:
    """sha256 over the ``relative/path sha256`` lines of every file under ``directory`` (sorted); a missing
    directory hashes as its name, so a later error names it."""
    root = Path(directory)
    digest = hashlib.sha256()
    if not root.is_dir():
        return f"missing:{root}"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()} {sha256_file(path, cached=True)}\n".encode())
    return digest.hexdigest()
