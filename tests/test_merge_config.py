"""mergekit-shaped configs: each method shared with mergekit parses from YAML and produces the tensors of the direct
formula; statistics paths, options and validation errors (with suggestions)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_gpt2, perturbed
from unmerge.checkpoint import Checkpoint
from unmerge.errors import MethodError, RecipeError
from unmerge.merge_config import load_config, merge, parse_config
from unmerge.methods.arithmetic import linear
from unmerge.methods.interpolation import slerp
from unmerge.methods.sparsify import breadcrumbs, combine, dare, della, tensor_seed, ties
from unmerge.stats import save_statistic


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """base/, ft1/, ft2/ (tiny GPT-2) and fisher0..2/ (random positive Fishers, N = 50) in one directory."""
    root = tmp_path_factory.mktemp("cfg")
    base = make_gpt2()
    for i, (name, model) in enumerate([("base", base), ("ft1", perturbed(base, 1)), ("ft2", perturbed(base, 2))]):
        model.save_pretrained(root / name)
        gen = torch.Generator().manual_seed(i)
        tensors = {n: 0.01 + torch.rand(t.shape, generator=gen)
                   for n, t in load_file(root / name / "model.safetensors").items()}
        save_statistic(tensors, {"kind": "fisher", "N": 50}, root / f"fisher{i}")
    return root


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _run(zoo: Path, text: str, tmp_path: Path, **options) -> dict[str, torch.Tensor]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "merge.yaml"
    config.write_text(text.replace("ZOO", str(zoo)))
    merge(config, tmp_path / "out", progress=False, device="cpu", **options)
    return _state(tmp_path / "out")


def _taus(zoo: Path):
    base, ft1, ft2 = (_state(zoo / n) for n in ("base", "ft1", "ft2"))
    return base, [ft1, ft2]


def _check(got: dict, want) -> None:
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want(name), rtol=1e-5, atol=1e-6, msg=name)


TIES_YAML = """
models:
  - model: ZOO/base
  - model: ZOO/ft1
    parameters: {density: 0.5, weight: 1.0}
  - model: ZOO/ft2
    parameters: {density: 0.3, weight: 0.5}
merge_method: ties
base_model: ZOO/base
parameters:
  normalize: true
  int8_mask: true
  COMPAT
dtype: float32
"""


@pytest.mark.parametrize("compat", ["paper", "mergekit"])
def test_ties(zoo, tmp_path, compat):
    got = _run(zoo, TIES_YAML.replace("COMPAT", f"compat: {compat}"), tmp_path)
    base, fts = _taus(zoo)
    _check(got, lambda n: ties(base[n], [f[n] for f in fts], [1.0, 0.5], [0.5, 0.3], 1.0, compat, True))


def test_linear_and_task_arithmetic(zoo, tmp_path):
    got = _run(zoo, """
merge_method: linear
models:
  - {model: ZOO/ft1, parameters: {weight: 1.0}}
  - {model: ZOO/ft2, parameters: {weight: 3.0}}
parameters: {normalize: true}
""", tmp_path / "lin")
    base, fts = _taus(zoo)
    _check(got, lambda n: linear([fts[0][n], fts[1][n]], [1.0, 3.0]))
    got = _run(zoo, """
merge_method: task_arithmetic
base_model: ZOO/base
models:
  - model: ZOO/base
  - {model: ZOO/ft1, parameters: {weight: 0.7}}
  - {model: ZOO/ft2, parameters: {weight: 0.3}}
parameters: {lambda: 0.5}
""", tmp_path / "ta")
    _check(got, lambda n: base[n] + 0.5 * (0.7 * (fts[0][n] - base[n]) + 0.3 * (fts[1][n] - base[n])))


SPARSE_YAML = """
merge_method: METHOD
base_model: ZOO/base
models:
  - model: ZOO/base
  - {model: ZOO/ft1, parameters: {weight: 1.0, density: 0.6}}
  - {model: ZOO/ft2, parameters: {weight: 0.5, density: 0.6}}
parameters: {EXTRA}
"""


def _sparse_expected(method: str, base, fts, name: str) -> torch.Tensor:
    taus = [f[name] - base[name] for f in fts]
    how = "ties" if method in ("dare_ties", "breadcrumbs_ties", "della") else "task_arithmetic"
    if method.startswith("dare"):
        deltas = [dare(t, 0.4, tensor_seed(3, name, i)) for i, t in enumerate(taus)]
    elif method.startswith("breadcrumbs"):
        deltas = [breadcrumbs(t, 0.6, 0.05) for t in taus]
    else:
        deltas = [della(t, 0.6, 0.1, tensor_seed(3, name, i)) for i, t in enumerate(taus)]
    return combine(base[name], deltas, [1.0, 0.5], how, 0.8, "paper", None)


@pytest.mark.parametrize("method, extra", [
    ("dare_ties", "seed: 3, lambda: 0.8"),
    ("dare_linear", "seed: 3, lambda: 0.8, rescale: true"),
    ("breadcrumbs", "gamma: 0.05, lambda: 0.8"),
    ("breadcrumbs_ties", "gamma: 0.05, lambda: 0.8"),
    ("della", "epsilon: 0.1, seed: 3, lambda: 0.8"),
    ("della_linear", "epsilon: 0.1, seed: 3, lambda: 0.8"),
])
def test_sparsified_methods(zoo, tmp_path, method, extra):
    got = _run(zoo, SPARSE_YAML.replace("METHOD", method).replace("EXTRA", extra), tmp_path)
    base, fts = _taus(zoo)
    _check(got, lambda n: _sparse_expected(method, base, fts, n))
    assert any(not torch.equal(got[n], base[n]) for n in base)


def test_slerp_with_a_layer_gradient(zoo, tmp_path):
    """mergekit's slerp: the base is one endpoint (t = 0); t: [0, 1] puts layer 0 at ft1 and layer 1 at ft2."""
    got = _run(zoo, """
merge_method: slerp
base_model: ZOO/ft1
models: [{model: ZOO/ft1}, {model: ZOO/ft2}]
parameters:
  t: [0.0, 1.0]
""", tmp_path)
    _, (ft1, ft2) = _taus(zoo)
    for name, tensor in got.items():
        at_first = ".0." in name or name.startswith(("transformer.wte", "transformer.wpe"))
        torch.testing.assert_close(tensor, ft1[name] if at_first else ft2[name], rtol=1e-5, atol=1e-6, msg=name)
    got = _run(zoo, """
merge_method: slerp
base_model: ZOO/ft1
models: [{model: ZOO/ft2}, {model: ZOO/ft1}]
parameters: {t: 0.3}
""", tmp_path / "mid")
    _check(got, lambda n: slerp(ft1[n], ft2[n], 0.3))


def test_model_stock(zoo, tmp_path):
    got = _run(zoo, """
merge_method: model_stock
base_model: ZOO/base
models: [{model: ZOO/base}, {model: ZOO/ft1}, {model: ZOO/ft2}]
""", tmp_path)
    base, fts = _taus(zoo)

    def cosine(name):
        a, b = (f[name] - base[name] for f in fts)
        return float((a * b).sum() / (a.norm() * b.norm()))

    def want(name):
        cos = max(cosine(name), 0.0)  # clamped: t stays in [0, 1]
        t = 2 * cos / (1 + cos)
        return t * (fts[0][name] + fts[1][name]) / 2 + (1 - t) * base[name]
    _check(got, want)
    assert any(cosine(n) > 0.05 for n in base) and any(cosine(n) < 0 for n in base)  # both branches exercised


def test_uncertainty_with_statistics_paths(zoo, tmp_path):
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "u.yaml"
    config.write_text(f"""
merge_method: uncertainty
base_model: {zoo}/base
base_fisher: {zoo}/fisher0
models:
  - {{model: {zoo}/ft1, fisher: {zoo}/fisher1, parameters: {{alpha: 0.5}}}}
  - {{model: {zoo}/ft2, fisher: {zoo}/fisher2}}
parameters: {{damping: 0.001}}
dtype: bfloat16
""")
    result = merge(config, tmp_path / "out", device="cpu", progress=False, out_shard_size="4KB")
    assert result.params["per_model"][1]["n"] == 50.0  # N read from the statistic
    merged = Checkpoint(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # sharded at 4KB
    base, fts = _taus(zoo)
    f = [load_file(zoo / f"fisher{i}" / "statistic.safetensors") for i in range(3)]
    for name in base:
        h0, h1, h2 = 50 * f[0][name] + 1e-3, 50 * f[1][name], 50 * f[2][name]
        denominator = h0 + 0.5 * h1 + h2
        want = base[name] + 0.5 * (h0 + h1) / denominator * (fts[0][name] - base[name]) \
            + (h0 + h2) / denominator * (fts[1][name] - base[name])
        got = merged.get(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_relative_paths_are_read_against_the_config_file(zoo, tmp_path):
    config = zoo / "relative.yaml"
    config.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: ft1}]\n"
                      "tokenizer_source: base\n")
    cfg = parse_config(*load_config(config))
    assert cfg.base_model == str(zoo / "base") and cfg.models[0].path == str(zoo / "ft1")
    assert cfg.tokenizer_source == str(zoo / "base")
    merge(config, tmp_path / "out", device="cpu", progress=False)
    base, fts = _taus(zoo)
    got = _state(tmp_path / "out")
    assert all(torch.equal(got[n], fts[0][n]) for n in got)  # λ = w = 1: θ₀ + τ₁ = θ₁


@pytest.mark.parametrize("config, error, fragment", [
    ({"merge_method": "tie", "models": []}, MethodError, "did you mean 'ties'"),
    ({"merge_methd": "ties"}, RecipeError, "did you mean 'merge_method'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"densty": 0.5}}]},
     MethodError, "did you mean 'density'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"lambda": 0.5}}]},
     MethodError, "global, not per model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "weight": 1}]},
     RecipeError, "under 'parameters'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "fishr": "f"}]},
     RecipeError, "did you mean 'fisher'"),
    ({"merge_method": "ties", "slices": []}, RecipeError, "slices"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "dtype": "bf61"}, RecipeError, "valid choices"),
    ({"merge_method": "fisher", "models": ["a", {"model": "c", "fisher": "f"}]}, RecipeError, "needs a 'fisher'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "fisher": "f"}]}, RecipeError,
     "does not use 'fisher'"),
    ({"merge_method": "uncertainty", "base_model": "b", "models": [{"model": "a", "fisher": "f"}]}, RecipeError,
     "needs a 'base_fisher'"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"compat": "mergekitt"}},
     MethodError, "did you mean 'mergekit'"),
    (["merge_method", "ties"], RecipeError, "must be a mapping"),
])
def test_validation_errors_name_the_problem(config, error, fragment):
    with pytest.raises(error) as info:
        parse_config(config)
    assert fragment in str(info.value)


def test_mergekit_base_entry_is_dropped_for_task_vector_methods():
    cfg = parse_config({"merge_method": "ties", "base_model": "b",
                        "models": [{"model": "b"}, {"model": "a", "parameters": {"density": 0.4}}]})
    assert [m.path for m in cfg.models] == ["a"] and cfg.base_model == "b"
    cfg = parse_config({"merge_method": "slerp", "base_model": "b", "models": ["a", "b"], "parameters": {"t": 0.2}})
    assert [m.path for m in cfg.models] == ["b", "a"] and cfg.base_model is None
    assert math.isclose(cfg.params["t"], 0.2)
