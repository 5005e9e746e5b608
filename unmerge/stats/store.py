"""Statistics on disk: checkpoint-shaped safetensors plus ``statistic.json`` saying exactly how they were made."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unmerge.checkpoint import Checkpoint, ShardedWriter, atomic_output_dir, write_json_atomic
from unmerge.errors import StatisticError

META_FILE = "statistic.json"
VOLATILE_META = ("seconds", "model")  # in statistic.json only: not part of the weight file's bytes


class Statistic:
    """A statistic directory (or a bare ``.safetensors`` file) with its metadata."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise StatisticError(f"statistic '{path}' does not exist", "compute it with `unmerge fisher`")
        self.checkpoint = Checkpoint(path)
        self.path = path
        meta_file = self.checkpoint.directory / META_FILE
        if path.is_dir() and meta_file.exists():
            self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        else:
            header = self.checkpoint.metadata()
            self.meta = json.loads(header["unmerge"]) if "unmerge" in header else {}

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "fisher")

    @property
    def n(self) -> float | None:
        value = self.meta.get("N", self.meta.get("n_examples"))
        return float(value) if value is not None else None

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint

    def names(self) -> list[str]:
        return self.checkpoint.names()

    def check_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Reject NaN/Inf and (for Fisher-like statistics) negative values, naming the tensor."""
        if not torch.isfinite(tensor).all():
            raise StatisticError(f"statistic '{self.path}' has NaN or Inf in '{name}'", "re-estimate the statistic")
        if self.kind in ("fisher", "adam_v") and (tensor < 0).any():
            raise StatisticError(
                f"statistic '{self.path}' has negative values in '{name}'; a diagonal Fisher is a mean of squares",
                "re-estimate it with `unmerge fisher`",
            )


def save_statistic(tensors: dict[str, torch.Tensor], meta: dict[str, Any], out_dir: str | Path,
                   overwrite: bool = False) -> Path:
    """Write tensors (fp32) + ``statistic.json`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    # the weight file's header describes the statistic but leaves out how long it took and where its model lay, so
    # the same statistic is byte-identical wherever and whenever it is computed (statistic.json has everything).
    # The declared layout makes the writer build the header itself, in a fixed order (safetensors' own writer
    # orders the header metadata differently from one process to the next).
    header = {k: v for k, v in meta.items() if k not in VOLATILE_META}
    layout = [(name, tuple(tensor.shape), torch.float32) for name, tensor in tensors.items()]
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, metadata={"unmerge": json.dumps(header, sort_keys=True, default=str)},
                               prefix="statistic", layout=layout)
        for name, tensor in tensors.items():
            writer.add(name, tensor.float())
        writer.finish()
        write_json_atomic(tmp / META_FILE, meta)
    return out_dir
