"""Lazy checkpoint access, atomic sharded writing and hashing."""
from unmerge.checkpoint.hashing import sha256_file
from unmerge.checkpoint.reader import Checkpoint, resolve_model_path
from unmerge.checkpoint.writer import ShardedWriter, atomic_output_dir, write_json_atomic

__all__ = [
    "Checkpoint",
    "ShardedWriter",
    "atomic_output_dir",
    "resolve_model_path",
    "sha256_file",
    "write_json_atomic",
]
