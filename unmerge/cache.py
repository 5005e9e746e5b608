"""Content-addressed stage outputs: ``<cache>/<stage>-<key>``; a stage whose output exists is done. Outputs are
written atomically; a file lock per output keeps two runs sharing a cache from computing or writing it twice."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
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
        self.root = Path(root)  # created by the first lock: a dry run writes nothing

    def path(self, stage: str, key: str, suffix: str = "") -> Path:
        return self.root / f"{stage}-{key}{suffix}"

    @contextlib.contextmanager
    def lock(self, target: Path) -> Iterator[None]:
        """Exclusive lock for producing ``target`` (blocks while another process produces it). The kernel releases
        it when its holder dies, even by SIGKILL; the holder's half-written sibling then is removed here."""
        lock_file = target.with_name(f".{target.name}.lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if not target.exists():
                    self._remove_leftovers(target)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _remove_leftovers(target: Path) -> None:
        """Partial outputs of ``target`` left by a killed run (``.NAME.partial-PID``, ``.NAME.tmp-PID``). Only called
        under the target's lock: no live process is writing them."""
        for pattern in (f".{target.name}.partial-*", f".{target.name}.tmp-*"):
            for path in target.parent.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
