"""The top-level Python API: ``import unmerge`` stays cheap; ``unmerge.merge`` and ``unmerge.evaluate`` work from a
dict, and evaluate returns DataFrames (records and summary) equal to what the bundle holds."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import unmerge


def test_import_is_cheap_and_exports_the_api():
    code = "import sys, unmerge; assert 'torch' not in sys.modules; print(sorted(unmerge.API))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "merge" in out and "evaluate" in out
    assert unmerge.merge is unmerge.api.merge and unmerge.evaluate is unmerge.api.evaluate
    with pytest.raises(AttributeError):
        unmerge.no_such_function  # noqa: B018


def test_merge_from_a_dict(tiny_gpt2_dirs, tmp_path):
    base, ft1, ft2 = tiny_gpt2_dirs
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(ft1), "parameters": {"weight": 0.5}},
                         {"model": str(ft2), "parameters": {"weight": -0.25}}]}
    result = unmerge.merge(config, tmp_path / "out", device="cpu", progress=False)
    assert result.method == "task_arithmetic"
    got = load_file(tmp_path / "out" / "model.safetensors")
    b, f1, f2 = (load_file(d / "model.safetensors") for d in (base, ft1, ft2))
    for name, tensor in got.items():
        want = b[name] + 0.5 * (f1[name] - b[name]) - 0.25 * (f2[name] - b[name])
        torch.testing.assert_close(tensor, want, rtol=1e-6, atol=1e-6, msg=name)


def test_evaluate_returns_dataframes(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "cache"))
    config = {"evaluate": {"perplexity": {"limit": 6, "max_length": 32, "separator": "eos"},
                           "accuracy": {"limit": 4}}}
    records, summary = unmerge.evaluate("builtin:tiny-lm", config, progress=False)
    assert isinstance(records, pd.DataFrame) and isinstance(summary, pd.DataFrame)
    assert list(summary.columns[:9]) == ["candidate", "method", "alpha", "metric", "value", "ci_low", "ci_high", "n",
                                         "protocol"]
    assert set(summary.metric) == {"perplexity", "accuracy", "accuracy.sum", "accuracy.norm"}
    assert set(records.kind) == {"accuracy"} and len(records) == 4
    # the accuracy is the mean of the per-item records
    acc = summary.set_index("metric").loc["accuracy.sum", "value"]
    assert acc == pytest.approx(records.correct_sum.mean())
    result = unmerge.evaluate(["builtin:tiny-lm"], config, out=tmp_path / "bundle", progress=False)
    assert result.bundle == tmp_path / "bundle" and result.summary.equals(summary)  # second call: from the cache
    csv = pd.read_csv(tmp_path / "bundle" / "metrics.csv").set_index("metric")
    assert csv.loc["accuracy.sum", "value"] == pytest.approx(acc)
