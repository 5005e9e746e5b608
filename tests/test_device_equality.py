"""Every registered method merges to the same tensors on a CUDA device as on the CPU (1e-6 of each tensor's scale).

Skipped without CUDA. ``UNMERGE_TEST_DEVICE=cpu`` runs the same comparison CPU against CPU, which checks this
harness (models, statistics of every kind, parameters of every method) on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import make_gpt2, perturbed
from unmerge.checkpoint import Checkpoint
from unmerge.engine import merge_checkpoints, required_stats
from unmerge.methods import all_methods, get_method
from unmerge.stats import Statistic
from unmerge.stats.fisher import diagonal_fisher
from unmerge.stats.gram import gram_statistics
from unmerge.stats.kfac import kfac_factors
from unmerge.stats.store import save_statistic

DEVICE = os.environ.get("UNMERGE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device (or UNMERGE_TEST_DEVICE=cpu to check the harness)")

EXAMPLES = [[(7 * i + 3 * j) % 64 for j in range(3 + i % 5)] for i in range(12)]
# extra parameter sets beyond each method's defaults: the other MaTS objectives, global TIES
VARIANTS = {"mats": [{}, {"objective": "regmean"}, {"objective": "kfac"}], "ties": [{}, {"scope": "global"}],
            "dare_ties": [{"density": 0.5, "seed": 3}]}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A tiny GPT-2 base, two fine-tunes, and every statistic kind for each (estimated on token ids)."""
    root = tmp_path_factory.mktemp("device")
    base = make_gpt2()
    models = {"base": base, "ft1": perturbed(base, 1), "ft2": perturbed(base, 2)}
    stats: dict[str, dict[str, Statistic]] = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        estimates = {"fisher": diagonal_fisher(model, EXAMPLES, batch_size=4, progress=False),
                     "gram": gram_statistics(model, EXAMPLES, batch_size=4, progress=False),
                     "kfac": kfac_factors(model, EXAMPLES, batch_size=4, progress=False)}
        for kind, (tensors, info) in estimates.items():
            save_statistic(tensors, {**info, "kind": kind, "N": float(len(EXAMPLES))}, root / f"{name}-{kind}")
            stats.setdefault(name, {})[kind] = Statistic(root / f"{name}-{kind}")
    return root, stats


def _cases() -> list[tuple[str, dict]]:
    return [(m.name, params) for m in all_methods() for params in VARIANTS.get(m.name, [{}])]


@pytest.mark.parametrize("method, params", _cases(), ids=lambda v: v if isinstance(v, str) else str(v or ""))
def test_every_method_merges_alike_on_the_device_and_the_cpu(pool, tmp_path, method, params):
    root, stats = pool
    spec = get_method(method)
    fts = ["ft1"] if spec.max_models == 1 else ["ft1", "ft2"]
    base = Checkpoint(root / "base") if spec.needs_base else None
    models = [Checkpoint(root / name) for name in fts]
    given = {}
    for kind in required_stats(spec, params):
        owners = ["base"] if kind.startswith("base_") else fts
        given[kind] = [stats[owner][kind.removeprefix("base_")] for owner in owners]
    outputs = {}
    for label, device in (("cpu", "cpu"), ("device", DEVICE)):
        merge_checkpoints(spec, base, models, tmp_path / label, params=params, stats=given, device=device,
                          progress=False)
        outputs[label] = Checkpoint(tmp_path / label)
    cpu, dev = outputs["cpu"], outputs["device"]
    assert sorted(dev.names()) == sorted(cpu.names())
    for name in cpu.names():
        want, got = cpu.get(name), dev.get(name)
        scale = float(want.abs().max()) if want.numel() else 0.0
        assert float((got - want).abs().max()) <= 1e-6 * scale + 1e-12, (method, params, name)
