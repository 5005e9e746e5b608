"""Every recipe in recipes/ dry-runs (issue 6.3): `unmerge run RECIPE --dry-run` validates it and prints its plan
(stages, models, data, sizes where known, cached or not) without loading a model, a hub dataset or the network, and
without writing anything: the stage cache and the report directory stay untouched; the only file a dry run may add
under $UNMERGE_CACHE is a digest memo of a local input file (``hashes/``, unmerge.checkpoint.hashing), which records
what the file hashes to, not a result. Unlearning recipes are checked stage by stage against their counts; recipes
of another kind (``kind: merge``) for validity, a consistent stage list and no writes."""
from __future__ import annotations

import re
import socket
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def expected_stages(recipe: dict) -> Counter:
    """The stage counts a recipe implies: fine-tune, both Fishers, one merge per (method, α), one evaluation per
    candidate (base, forget model, oracle when given, every merge), and the pretrain stages when it has them."""
    from unmerge.recipe import resolve_recipe

    r = resolve_recipe(recipe)
    merges = sum(len(r["removal"]["alphas"].get(m, r["removal"]["alpha"])) for m in r["removal"]["methods"])
    stages = Counter({"finetune": 1, "fisher:base": 1, "fisher:forget": 1, "merge": merges,
                      "evaluate": 2 + bool(r["oracle_model"]) + merges})
    if r.get("pretrain"):
        stages.update({"pretrain:tokenizer": 1, "pretrain:base": 1, "pretrain:oracle": 1})
    return stages


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load, hub dataset load or network connection fails the test."""
    import datasets
    import transformers

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"a dry run must not {what}")
        return fail

    monkeypatch.setattr(socket.socket, "connect", refuse("open a network connection"))
    monkeypatch.setattr(datasets, "load_dataset", refuse("load a hub dataset"))
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
                 transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse(f"load {auto.__name__}"))


def test_every_recipe_is_found():
    assert {"quickstart.yaml", "detox-gpt2.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_run_lists_its_stages_and_writes_nothing(path, tmp_path, monkeypatch, no_loading):
    from unmerge.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("UNMERGE_CACHE", str(cache))
    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--out", str(report),
                                       "--cache-dir", str(cache / "runs")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = result.output
    recipe = yaml.safe_load(path.read_text())
    assert re.search(rf"^recipe '{re.escape(recipe['name'])}'( \(kind: \w+\))? is valid", out, re.M)
    listed = Counter(m.group(2) for m in re.finditer(r"^  \[(to run|cached)\] (\S+)", out, re.M))
    assert f"{sum(listed.values())} stages (+ report):" in out and sum(listed.values()) > 0
    assert "[cached]" not in out  # an empty cache: nothing is cached
    if recipe.get("kind", "unlearning") == "unlearning":
        assert listed == expected_stages(recipe)
        assert re.search(r"^base model: .+ \(.+\)$", out, re.M)  # its status: bundled / hub / not installed
        assert re.search(r"^finetune: .*global batch \d+", out, re.M)
    written = sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    assert all(p.parent == cache / "hashes" and p.suffix == ".json" for p in written), written
    assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())
    assert not report.exists()


def test_detox_gpt2_records_the_protocol(no_loading, tmp_path, monkeypatch):
    """The paper's protocol for online users: GPT-2, Civil Comments toxicity > 0.8, Detoxify, WikiText-103."""
    from unmerge.workflow import describe_plan

    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path))
    path = next(p for p in RECIPES if p.name == "detox-gpt2.yaml")
    recipe = yaml.safe_load(path.read_text())
    assert recipe["base_model"] in ("gpt2", "openai-community/gpt2")
    assert recipe["data"]["forget"]["dataset"] == "google/civil_comments"
    assert recipe["data"]["forget"]["where"] == {"toxicity": {"gt": 0.8}}
    assert recipe["evaluate"]["toxicity"]["scorer"] == "detoxify:original"
    assert recipe["evaluate"]["perplexity"]["data"]["config"] == "wikitext-103-raw-v1"
    assert recipe["evaluate"]["perplexity"]["data"]["split"] == "test"
    plan = describe_plan(path, cache_dir=tmp_path / "runs")
    assert "base model: openai-community/gpt2 (hub model, not loaded)" in plan
    assert "data.forget: " in plan and "(hub dataset, not loaded)" in plan
    assert "evaluate.toxicity: recipes/detox-prompts.txt" in plan


def test_dry_run_shows_lora(tmp_path, monkeypatch, no_loading):
    from unmerge.workflow import describe_plan

    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "cache"))
    recipe = yaml.safe_load(next(p for p in RECIPES if p.name == "quickstart.yaml").read_text())
    recipe["finetune"]["lora"] = {"r": 4, "target_modules": ["c_attn"]}
    plan = describe_plan(recipe, out=tmp_path / "r", cache_dir=tmp_path / "cache" / "runs")
    assert "LoRA r=4 alpha=16 dropout=0 on c_attn, merged into the forget model" in plan
    recipe["finetune"]["lora"] = {"r": 0}
    from unmerge.errors import RecipeError

    with pytest.raises(RecipeError, match="finetune.lora.r is 0"):
        describe_plan(recipe, out=tmp_path / "r", cache_dir=tmp_path / "cache" / "runs")
    recipe["finetune"]["lora"] = {"rank": 4}
    with pytest.raises(RecipeError, match="unknown recipe key 'finetune.lora.rank'"):
        describe_plan(recipe, out=tmp_path / "r", cache_dir=tmp_path / "cache" / "runs")
