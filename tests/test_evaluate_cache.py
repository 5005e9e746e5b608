"""Evaluation results are cached by (model, protocol): a config that adds a protocol computes only that one, and a
changed protocol or model recomputes only what it touches."""
from __future__ import annotations

import pytest

import unmerge
from unmerge import evaluation

PPL = {"limit": 6, "max_length": 32, "separator": "eos"}


@pytest.fixture
def computed(monkeypatch, tmp_path):
    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "cache"))
    calls: list[tuple[str, ...]] = []
    real = evaluation.evaluate_model

    def counting(model, tokenizer, protocols, *args, **kwargs):
        calls.append(tuple(protocols))
        return real(model, tokenizer, protocols, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_model", counting)
    return calls


def test_adding_a_protocol_computes_only_it(computed):
    first = unmerge.evaluate("builtin:tiny-lm", {"evaluate": {"perplexity": PPL}}, progress=False).summary
    assert computed == [("perplexity",)]
    both = unmerge.evaluate("builtin:tiny-lm", {"evaluate": {"perplexity": PPL, "accuracy": {"limit": 4}}},
                            progress=False).summary
    assert computed == [("perplexity",), ("accuracy",)]
    assert both.set_index("metric").loc["perplexity", "value"] == first.set_index("metric").loc["perplexity", "value"]
    unmerge.evaluate("builtin:tiny-lm", {"evaluate": {"perplexity": {**PPL, "limit": 5}, "accuracy": {"limit": 4}}},
                     progress=False)
    assert computed[2:] == [("perplexity",)]  # a changed protocol: only it again
    unmerge.evaluate(["builtin:tiny-lm", "builtin:tiny-lm-oracle"], {"evaluate": {"accuracy": {"limit": 4}}},
                     progress=False)
    assert computed[3:] == [("accuracy",)]  # another model: only its results
