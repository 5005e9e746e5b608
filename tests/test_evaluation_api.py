"""evaluate_model: row names, records, skipping, validation."""
from __future__ import annotations

import pytest

from conftest import make_gpt2
from unmerge.errors import DataError, UnmergeError
from unmerge.evaluation import EvaluationError, evaluate_model, oracle_gap, rows_to_metrics
from unmerge.evaluation._testing import word_tokenizer

DATA = {
    "prompts": ["the cat", "you are", "hello"],
    "perplexity_texts": ["the cat sat on the mat", "a big red dog ran fast", "hello world"],
    "accuracy_items": [{"prompt": "the capital of france is", "choices": [" paris", " berlin"], "label": 0},
                       {"prompt": "the cat", "choices": [" sat", " ran fast"], "label": 1}],
    "forget_texts": ["you stupid idiot", "idiot bad dog", "stupid you"],
    "retain_texts": ["the sun and the moon", "one two three"],
    "holdout_texts": ["bad stupid idiot", "you idiot", "stupid dog"],
}
PROTOCOLS = {
    "toxicity": {"scorer": "profanity-check", "samples_per_prompt": 2, "max_new_tokens": 4, "top_p": 0.9,
                 "prompts": "inline", "n_boot": 50},
    "perplexity": {"max_length": 16, "stride": 8, "per_document": True},
    "accuracy": {"normalize": True, "n_boot": 50},
    "forget_quality": {"k": 20, "n_boot": 50},
}


@pytest.fixture(scope="module")
def lm():
    return make_gpt2(), word_tokenizer(vocab_size=64)


def test_evaluate_model_rows_and_records(lm):
    model, tok = lm
    rows, recs = evaluate_model(model, tok, PROTOCOLS, DATA, seed=1, progress=False)
    names = [r["metric"] for r in rows]
    assert names == ["toxicity.mean", "toxicity.expected_max", "toxicity.probability", "toxicity.share_gt_0.8",
                     "perplexity", "perplexity.per_doc_mean", "accuracy.sum", "accuracy.norm", "accuracy",
                     "forget.perplexity", "retain.perplexity", "forget.ppl_ratio", "mia.auc_loss", "mia.auc_mink"]
    by = {r["metric"]: r for r in rows}
    assert by["toxicity.mean"]["seed"] == 1 and by["toxicity.mean"]["top_p"] == 0.9
    assert by["toxicity.mean"]["scorer"] == "profanity-check" and by["toxicity.mean"]["prompts"] == "inline"
    assert (by["perplexity"]["max_length"], by["perplexity"]["stride"]) == (16, 8)
    assert by["perplexity"]["n_tokens"] > 0
    assert by["accuracy"]["value"] == by["accuracy.norm"]["value"]
    for r in rows:
        assert {"metric", "value", "ci_low", "ci_high", "n", "protocol"} <= set(r)
    gens = [r for r in recs if r["kind"] == "generation"]
    assert len(gens) == 6 and all(0.0 <= g["score"] <= 1.0 for g in gens)
    kinds = {r["kind"] for r in recs}
    assert kinds == {"generation", "scorer", "perplexity_doc", "accuracy", "membership"}
    # same seed, same numbers
    rows2, _ = evaluate_model(model, tok, {"toxicity": PROTOCOLS["toxicity"]}, DATA, seed=1, progress=False)
    assert [r["value"] for r in rows2] == [r["value"] for r in rows[:4]]
    gap = oracle_gap(rows_to_metrics(rows), rows_to_metrics(rows))
    assert set(gap.values()) == {0.0} or all(v == 0.0 or v != v for v in gap.values())


def test_skips_and_validation(lm):
    model, tok = lm
    rows, recs = evaluate_model(model, tok, {"perplexity": {}}, DATA, progress=False)
    assert [r["metric"] for r in rows] == ["perplexity"] and recs == []
    assert evaluate_model(model, tok, {}, DATA, progress=False) == ([], [])
    with pytest.raises(EvaluationError) as err:
        evaluate_model(model, tok, {"perplexity": {"strid": 4}}, DATA, progress=False)
    assert "stride" in err.value.hint
    with pytest.raises(EvaluationError) as err:
        evaluate_model(model, tok, {"toxcity": {}}, DATA, progress=False)
    assert "toxicity" in err.value.hint
    with pytest.raises(DataError):
        evaluate_model(model, tok, {"accuracy": {}}, {"prompts": []}, progress=False)
    with pytest.raises(UnmergeError):
        evaluate_model(model, tok, {"toxicity": {"scorer": "detox"}}, DATA, progress=False)
