"""The lm_eval adapter, offline, on a task defined by a local YAML over a local jsonl: its log-likelihoods and
accuracies equal our own multiple-choice scoring of the same items with the same template (an independent
computation), and its results fold into the same summary rows and records."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_gpt2
from unmerge.errors import RecipeError
from unmerge.evaluation import EvaluationError, evaluate_model
from unmerge.evaluation._testing import word_tokenizer
from unmerge.evaluation.accuracy import multiple_choice_accuracy
from unmerge.evaluation.harness import metric_name, results_to_rows
from unmerge.recipe import load_recipe, resolve_recipe

ITEMS = [
    {"q": "the cat sat on the", "choices": ["mat", "sky", "big red car"], "label": 0},
    {"q": "the sun is in the", "choices": ["sky", "water"], "label": 0},
    {"q": "paris is the capital of", "choices": ["france", "london", "the moon"], "label": 0},
    {"q": "the dog ran very", "choices": ["fast", "slow", "blue"], "label": 1},
    {"q": "one two", "choices": ["three", "five", "a big tree"], "label": 0},
    {"q": "hello", "choices": ["world", "night"], "label": 1},
]
TEMPLATE = "question: {q} answer:"  # lm_eval: "question: {{q}} answer:" + target_delimiter " " + choice


def write_task(directory) -> None:
    with open(directory / "items.jsonl", "w") as handle:
        for item in ITEMS:
            handle.write(json.dumps(item) + "\n")
    (directory / "local_mc.yaml").write_text(
        "task: local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"question: {{q}} answer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def test_lm_eval_task_on_local_files_matches_our_scoring(tmp_path):
    pytest.importorskip("lm_eval")
    write_task(tmp_path)
    model, tok = make_gpt2(seed=3), word_tokenizer(vocab_size=64)
    proto = {"lm_eval": {"tasks": ["local_mc"], "include_path": str(tmp_path), "include_defaults": False,
                         "batch_size": 4, "bootstrap_iters": 10}}
    rows, records = evaluate_model(model, tok, proto, {}, seed=0, progress=False)

    ours_items = [{"prompt": TEMPLATE.format(q=it["q"]), "choices": [" " + c for c in it["choices"]],
                   "label": it["label"]} for it in ITEMS]
    ours, ours_recs = multiple_choice_accuracy(model, tok, ours_items, n_boot=0, progress=False)
    # per choice, lm_eval's log-likelihood is ours
    by_doc = {r["doc_id"]: r for r in records}
    assert sorted(by_doc) == list(range(len(ITEMS))) and all(r["kind"] == "lm_eval" for r in records)
    for i, rec in enumerate(ours_recs):
        assert [resp[0] for resp in by_doc[i]["responses"]] == pytest.approx(rec["loglik"], abs=1e-4)
        assert by_doc[i]["acc"] == float(rec["correct_sum"])
    # acc = our sum variant; acc_norm = argmax of log-likelihood per character of the choice (lm_eval's convention)
    by = {r["metric"]: r for r in rows}
    assert by["lm_eval.local_mc.acc"]["value"] == pytest.approx(ours["accuracy.sum"]["value"])
    char_norm = np.mean([int(np.argmax([ll / len(c) for ll, c in zip(rec["loglik"], it["choices"])])) == it["label"]
                         for rec, it in zip(ours_recs, ITEMS)])
    assert by["lm_eval.local_mc.acc_norm"]["value"] == pytest.approx(char_norm)
    row = by["lm_eval.local_mc.acc"]
    assert row["protocol"] == "lm_eval" and row["n"] == len(ITEMS) and row["task"] == "local_mc"
    acc = row["value"]
    stderr = math.sqrt(acc * (1 - acc) / (len(ITEMS) - 1))  # lm_eval's sample standard error of a mean
    assert row["stderr"] == pytest.approx(stderr)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((acc - 1.959964 * stderr, acc + 1.959964 * stderr))

    limited, _ = evaluate_model(model, tok, {"lm_eval": {**proto["lm_eval"], "limit": 2}}, {}, progress=False)
    assert {r["n"] for r in limited} == {2}
    with pytest.raises(EvaluationError, match="unknown task 'local_mcq'"):
        evaluate_model(model, tok, {"lm_eval": {**proto["lm_eval"], "tasks": ["local_mcq"]}}, {}, progress=False)


def test_rows_from_a_results_table():
    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                        "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"}},
               "n-samples": {"arc_easy": {"original": 10, "effective": 8}}, "n-shot": {"arc_easy": 5}}
    rows = results_to_rows(results)
    assert [r["metric"] for r in rows] == ["lm_eval.arc_easy.acc", "lm_eval.arc_easy.exact_match.strict_match"]
    assert rows[0]["ci_low"] == pytest.approx(0.5 - 0.1959964) and rows[0]["n"] == 8 and rows[0]["num_fewshot"] == 5
    assert math.isnan(rows[1]["ci_low"]) and math.isnan(rows[1]["stderr"])
    assert metric_name("mmlu-pro", "acc", "none") == "lm_eval.mmlu_pro.acc"


def test_recipe_runs_lm_eval_only_when_named():
    assert "lm_eval" not in resolve_recipe(load_recipe({"base_model": "x", "data": {"forget": "a", "retain": "b"}}))[
        "evaluate"]
    given = {"base_model": "x", "data": {"forget": "a", "retain": "b"}, "evaluate": {"lm_eval": {"tasks": ["t"]}}}
    resolved = resolve_recipe(load_recipe(given))["evaluate"]
    assert list(resolved) == ["lm_eval"] and resolved["lm_eval"]["bootstrap_iters"] == 1000
    with pytest.raises(RecipeError, match="evaluate.lm_eval.tasks"):
        load_recipe({**given, "evaluate": {"lm_eval": {"limit": 3}}})


def test_lm_eval_results_fold_into_the_bundle(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import pandas as pd

    import unmerge

    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "cache"))
    write_task(tmp_path)
    config = {"evaluate": {"accuracy": {"task": str(tmp_path / "ours.jsonl")},
                           "lm_eval": {"tasks": ["local_mc"], "include_path": str(tmp_path), "include_defaults": False,
                                       "bootstrap_iters": 10}}}
    with open(tmp_path / "ours.jsonl", "w") as handle:  # the same items as our own accuracy task
        for it in ITEMS:
            handle.write(json.dumps({"prompt": TEMPLATE.format(q=it["q"]), "choices": [" " + c for c in it["choices"]],
                                     "label": it["label"]}) + "\n")
    records, summary = unmerge.evaluate("builtin:tiny-lm", config, out=tmp_path / "bundle", progress=False)
    by = summary.set_index("metric")
    assert by.loc["lm_eval.local_mc.acc", "value"] == pytest.approx(by.loc["accuracy.sum", "value"])
    assert set(records.kind) == {"accuracy", "lm_eval"}
    csv = pd.read_csv(tmp_path / "bundle" / "metrics.csv")
    assert {"lm_eval.local_mc.acc", "lm_eval.local_mc.acc_norm", "accuracy.sum"} <= set(csv.metric)
    samples = (tmp_path / "bundle" / "samples.jsonl").read_text()
    assert samples.count('"kind": "lm_eval"') == len(ITEMS)
