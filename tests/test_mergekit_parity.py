"""Optional cross-check against mergekit itself (golden test 7 of methods.md: an independent implementation).

Skipped unless ``UNMERGE_MERGEKIT_BIN`` names a ``mergekit-yaml`` executable (mergekit is a benchmark-only
comparison, never a dependency; install it in its own virtualenv, e.g.
``python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch mergekit``, then
``UNMERGE_MERGEKIT_BIN=/tmp/mkvenv/bin/mergekit-yaml pytest tests/test_mergekit_parity.py``).

The same mergekit-shaped config runs through both tools on synthetic Llama checkpoints; our TIES runs with
``compat: mergekit``. Task arithmetic must agree to float tolerance everywhere. TIES must too, except at entries
whose magnitude ties with a model's top-k threshold: mergekit keeps the k largest by ``torch.argsort``, whose order
among equal values is unspecified (it is not even stable on the CPU), while we keep the first ones by position; so
there, and only there, an entry may be kept by one tool and dropped by the other.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from unmerge.bench.merge import llama_shape, write_synthetic
from unmerge.checkpoint import Checkpoint
from unmerge.merge_config import merge

MERGEKIT = os.environ.get("UNMERGE_MERGEKIT_BIN")
pytestmark = pytest.mark.skipif(not MERGEKIT or not Path(MERGEKIT).is_file(),
                                reason="set UNMERGE_MERGEKIT_BIN to a mergekit-yaml executable to run")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit-parity")
    config = llama_shape(8 * 1024**2, hidden=64)
    config["num_hidden_layers"] = 2
    write_synthetic(root / "base", config, seed=0)
    for i in (1, 2):
        write_synthetic(root / f"ft{i}", config, seed=i, base=root / "base")
    return root


def _both(zoo: Path, tmp_path: Path, method: str, params: dict, per_model: list[dict]) -> tuple[Checkpoint, Checkpoint]:
    config = {"merge_method": method, "base_model": str(zoo / "base"), "dtype": "float32",
              "models": [{"model": str(zoo / f"ft{i + 1}"), "parameters": p} for i, p in enumerate(per_model)],
              "parameters": params}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    done = subprocess.run([MERGEKIT, str(tmp_path / "config.yaml"), str(tmp_path / "mergekit"), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(json.dumps(config))
    if method == "ties":
        ours["parameters"]["compat"] = "mergekit"
    merge(ours, tmp_path / "unmerge", device="cpu", progress=False)
    return Checkpoint(tmp_path / "unmerge"), Checkpoint(tmp_path / "mergekit")


@pytest.mark.parametrize("params", [{"normalize": False}, {"normalize": True, "lambda": 0.7}])
def test_task_arithmetic_equals_mergekit(zoo, tmp_path, params):
    ours, theirs = _both(zoo, tmp_path, "task_arithmetic", params, [{"weight": 0.5}, {"weight": 1.3}])
    assert sorted(ours.names()) == sorted(theirs.names())
    for name in ours.names():
        torch.testing.assert_close(ours.get(name), theirs.get(name), rtol=1e-6, atol=1e-7, msg=name)


def _threshold_ties(base: torch.Tensor, models: list[torch.Tensor], density: list[float]) -> torch.Tensor:
    """Entries where some model's |τ| equals its mergekit top-k threshold (the k-th largest, k = max(1, ⌊d·n⌋))."""
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for model, d in zip(models, density):
        magnitude = (model - base).abs()
        k = max(1, int(d * magnitude.numel()))
        if d >= 1 or k >= magnitude.numel():
            continue
        value = magnitude.flatten().topk(k).values[-1]
        tied |= magnitude == value
    return tied


@pytest.mark.parametrize("params, density", [
    ({}, [0.5, 0.4]),
    ({"normalize": False, "lambda": 0.8}, [0.3, 0.3]),
    ({"rescale": True}, [0.2, 0.6]),
])
def test_ties_equals_mergekit_up_to_threshold_ties(zoo, tmp_path, params, density):
    weights = [0.5, 1.3]
    ours, theirs = _both(zoo, tmp_path, "ties", params,
                         [{"weight": w, "density": d} for w, d in zip(weights, density)])
    base = Checkpoint(zoo / "base")
    models = [Checkpoint(zoo / f"ft{i}") for i in (1, 2)]
    for name in ours.names():
        a, b = ours.get(name), theirs.get(name)
        tied = _threshold_ties(base.get(name), [m.get(name) for m in models], density)
        # (with rescale, a tie decided differently also moves that model's L1 factor: hence rtol, not equality)
        torch.testing.assert_close(a[~tied], b[~tied], rtol=1e-5, atol=1e-7, msg=name)
        assert int(tied.sum()) <= 64, name  # the ties are a handful of entries
