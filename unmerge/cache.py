"""Content-addressed stage outputs: ``<cache>/<stage>-<key>``; a stage whose output exists is done. Outputs are
written atomically; a file lock per output keeps two runs sharing a cache from computing or writing it twice."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def stage_key(stage: str, spec: Any) -> str:
    """sha256 of the stage name and its canonical JSON description (config + upstream keys)."""
    text = json.dumps({"stage": stage, "spec": spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("UNMERGE_CACHE", Path.home() / ".cache" / "unmerge"))


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str, key: str, suffix: str = "") -> Path:
        return self.root / f"{stage}-{key}{suffix}"

    @contextlib.contextmanager
    def lock(self, target: Path) -> Iterator[None]:
        """Exclusive lock for producing ``target`` (blocks while another process produces it)."""
        lock_file = target.with_name(f".{target.name}.lock")
        with open(lock_file, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
