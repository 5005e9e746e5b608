"""The file-digest cache: a reused digest is always the digest of the current bytes."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from unmerge.checkpoint import hashing
from unmerge.checkpoint.hashing import sha256_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "RACY_SECONDS", 0.0)
    return tmp_path / "cache" / "hashes"


def _later() -> None:
    time.sleep(0.05)  # beyond the file-time resolution (a kernel tick)


def test_cached_digest_is_reused_only_for_the_same_file_version(tmp_path, cache, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 10_000_000)  # more than one read block
    _later()
    want = hashlib.sha256(b"a" * 10_000_000).hexdigest()
    assert sha256_file(path) == want and not cache.exists()  # uncached by default
    assert sha256_file(path, cached=True) == want and len(list(cache.glob("*.json"))) == 1
    real = hashing._digest
    monkeypatch.setattr(hashing, "_digest", lambda p: pytest.fail("hashed again"))
    assert sha256_file(path, cached=True) == want  # from the cache
    monkeypatch.setattr(hashing, "_digest", real)
    stat = os.stat(path)
    with open(path, "r+b") as handle:  # same size, one byte changed
        handle.write(b"b")
    _later()
    assert sha256_file(path, cached=True) == hashlib.sha256(b"b" + b"a" * 9_999_999).hexdigest()
    with open(path, "r+b") as handle:  # changed back, and its mtime restored: the ctime still moves
        handle.write(b"a")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _later()
    assert sha256_file(path, cached=True) == want


def test_racy_files_and_a_disabled_cache_are_not_recorded(tmp_path, cache, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"xyz")
    monkeypatch.setattr(hashing, "RACY_SECONDS", 60.0)
    assert sha256_file(path, cached=True) == hashlib.sha256(b"xyz").hexdigest() and not cache.exists()
    monkeypatch.setattr(hashing, "RACY_SECONDS", 0.0)
    monkeypatch.setenv("UNMERGE_HASH_CACHE", "0")
    _later()
    assert sha256_file(path, cached=True) == hashlib.sha256(b"xyz").hexdigest() and not cache.exists()
