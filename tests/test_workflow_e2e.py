"""End to end: the quickstart pipeline on a much smaller configuration (seconds), then the bundle and verify."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from unmerge.cli import main

TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "base_model": "builtin:tiny-lm",
    "oracle_model": "builtin:tiny-lm-oracle",
    "data": {"forget": "builtin:toxic-demo", "retain": "builtin:clean-demo", "forget_limit": 64, "synthetic": True},
    "finetune": {"max_steps": 8, "batch_size": 8, "max_length": 32},
    "fisher": {"base": {"examples": 16, "batch_size": 8, "max_length": 32},
               "forget": {"examples": 16, "batch_size": 8, "max_length": 32}},
    "removal": {"methods": ["uncertainty_removal", "negation", "fisher_negation"], "alpha": [0.5, 1.0],
                "params": {"uncertainty_removal": {"m_max": 5.0}}},
    "evaluate": {
        "toxicity": {"prompt_limit": 6, "samples_per_prompt": 2, "max_new_tokens": 6},
        "perplexity": {"limit": 40, "max_length": 32},
        "accuracy": {"limit": 12},
        "forget_quality": {"holdout": "builtin:toxic-heldout", "members": 16},
    },
    "select": {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.5 * base"},
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("e2e")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    env = {"UNMERGE_CACHE": str(root / "cache")}
    res = CliRunner(env=env).invoke(main, ["run", str(recipe), "--out", str(root / "report"), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return root / "report", recipe, env


def test_bundle_has_every_file_and_candidate(bundle):
    out, _, _ = bundle
    for name in ("manifest.json", "metrics.csv", "samples.jsonl", "report.md", "report.html", "tradeoff.png"):
        assert (out / name).is_file(), name
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["candidate", "method", "alpha", "metric", "value", "ci_low", "ci_high"]
    expected = {"base", "forget", "oracle"} | {f"{m}@{a:g}" for m in ("uncertainty_removal", "negation",
                                                                     "fisher_negation") for a in (0.5, 1.0)}
    assert set(metrics.candidate) == expected
    for metric in ("toxicity.mean", "perplexity", "accuracy", "forget.perplexity", "mia.auc_loss"):
        assert metric in set(metrics.metric), metric
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["given"]["name"] == "tiny"
    assert any(key.startswith("model:base") for key in manifest["inputs"])


def test_negation_follows_the_formula_direction(bundle):
    """Stronger negation moves further from the forget model: forget-set perplexity rises with α."""
    out, _, _ = bundle
    m = pd.read_csv(out / "metrics.csv")
    ppl = m[m.metric == "forget.perplexity"].set_index("candidate").value
    assert ppl["forget"] < ppl["base"] < ppl["negation@0.5"] < ppl["negation@1"]


def test_verify_passes_then_fails_on_a_changed_byte(bundle):
    out, _, _ = bundle
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0
    target = out / "metrics.csv"
    original = target.read_bytes()
    target.write_bytes(original[:-2] + bytes([original[-2] ^ 1]) + original[-1:])
    try:
        res = runner.invoke(main, ["verify", str(out)])
        assert res.exit_code == 1 and "metrics.csv" in res.output
    finally:
        target.write_bytes(original)


def test_rerun_uses_the_cache_and_dry_run_reports_it(bundle):
    out, recipe, env = bundle
    runner = CliRunner(env=env)
    res = runner.invoke(main, ["run", str(recipe), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "[to run]" not in res.output and res.output.count("[cached]") == 3 + 6 + 9


def test_evaluate_command_caches_and_report_rebuilds_with_another_rule(bundle, tmp_path):
    _, _, env = bundle
    config = tmp_path / "eval.yaml"
    config.write_text("evaluate:\n  perplexity: {limit: 20, max_length: 32, separator: eos}\n"
                      "  accuracy: {limit: 8}\n")
    runner = CliRunner(env=env)
    args = ["evaluate", "builtin:tiny-lm", "builtin:tiny-lm-oracle", "--config", str(config), "--quiet"]
    first = runner.invoke(main, args + ["--out", str(tmp_path / "ev1")])
    assert first.exit_code == 0, first.output + repr(first.exception)
    cache = Path(env["UNMERGE_CACHE"]) / "runs"
    evals = sorted(cache.glob("eval-*.json"))
    again = runner.invoke(main, args + ["--out", str(tmp_path / "ev2")])
    assert again.exit_code == 0 and sorted(cache.glob("eval-*.json")) == evals  # nothing new computed
    a = pd.read_csv(tmp_path / "ev1" / "metrics.csv")
    assert set(a.candidate) == {"builtin:tiny-lm", "builtin:tiny-lm-oracle"}
    assert a.equals(pd.read_csv(tmp_path / "ev2" / "metrics.csv"))
    res = runner.invoke(main, ["report", str(tmp_path / "ev1"), "--out", str(tmp_path / "rebuilt"),
                               "--select", "{maximize: accuracy}"])
    assert res.exit_code == 0, res.output
    # the first model is the reference ("base") of relative constraints, so the rule chooses among the others
    assert "Selected candidate: **builtin:tiny-lm-oracle**" in (tmp_path / "rebuilt" / "report.md").read_text()
    assert runner.invoke(main, ["verify", str(tmp_path / "rebuilt")]).exit_code == 0
