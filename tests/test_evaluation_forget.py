"""Membership-inference AUC against brute force, Min-k%, forget quality on a tiny model, oracle gap."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import make_gpt2
from unmerge.evaluation._testing import word_tokenizer
from unmerge.evaluation.forget_quality import (
    auc_by_rank,
    auc_with_ci,
    average_ranks,
    forget_quality,
    min_k_percent,
    oracle_gap,
)
from unmerge.evaluation.perplexity import corpus_perplexity, per_example_loss


def brute_force_auc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        pos = np.round(rng.normal(0.3, 1, size=rng.integers(1, 30)), 1)  # rounding makes ties
        neg = np.round(rng.normal(0.0, 1, size=rng.integers(1, 30)), 1)
        assert auc_by_rank(pos, neg) == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)
    assert auc_by_rank([3, 4], [1, 2]) == 1.0
    assert auc_by_rank([1, 2], [3, 4]) == 0.0
    assert auc_by_rank([1, 1], [1, 1, 1]) == 0.5
    assert list(average_ranks([10, 20, 10, 30])) == [1.5, 3.0, 1.5, 4.0]


def test_auc_interval_repeats():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(0.5, 1, 40), rng.normal(0, 1, 40)
    a = auc_with_ci(pos, neg, n_boot=300, seed=5)
    assert a == auc_with_ci(pos, neg, n_boot=300, seed=5)
    assert a["ci_low"] <= a["value"] <= a["ci_high"] and a["n"] == 80


def test_min_k_percent_by_hand():
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]
    assert min_k_percent(lp, 20) == pytest.approx(-9.5)  # the 2 lowest
    assert min_k_percent(lp, 5) == pytest.approx(-10.0)  # at least one token
    assert min_k_percent(lp, 100) == pytest.approx(-5.5)
    assert np.isnan(min_k_percent([], 20))


def test_forget_quality_on_tiny_model():
    model, tok = make_gpt2(), word_tokenizer(vocab_size=64)
    forget = ["you stupid idiot", "idiot you are bad", "stupid bad dog", "you idiot"]
    retain = ["the cat sat on the mat", "a big red car", "hello world"]
    holdout = ["bad stupid you", "you are an idiot", "stupid idiot", "bad you bad"]
    m, recs = forget_quality(model, tok, forget, retain, holdout, k=20, n_boot=100, progress=False)
    f_ppl = corpus_perplexity(model, tok, forget, progress=False)["perplexity"]
    r_ppl = corpus_perplexity(model, tok, retain, progress=False)["perplexity"]
    assert m["forget.perplexity"]["value"] == pytest.approx(f_ppl)
    assert m["forget.ppl_ratio"]["value"] == pytest.approx(f_ppl / r_ppl)
    lf = [r["loss"] for r in per_example_loss(model, tok, forget)]
    lh = [r["loss"] for r in per_example_loss(model, tok, holdout)]
    assert m["mia.auc_loss"]["value"] == pytest.approx(brute_force_auc([-x for x in lf], [-x for x in lh]))
    assert 0.0 <= m["mia.auc_mink"]["value"] <= 1.0
    assert [r["split"] for r in recs] == ["forget"] * 4 + ["holdout"] * 4
    assert [r["loss"] for r in recs[:4]] == pytest.approx(lf)
    # without holdout texts: no AUCs; without retain texts: no ratio
    m2, _ = forget_quality(model, tok, forget, None, None, progress=False)
    assert set(m2) == {"forget.perplexity"}


def test_oracle_gap():
    cand = {"toxicity.mean": 0.2, "perplexity": {"value": 120.0}, "only_candidate": 1.0}
    oracle = {"toxicity.mean": 0.05, "perplexity": 100.0}
    gap = oracle_gap(cand, oracle)
    assert gap == pytest.approx({"toxicity.mean": 0.15, "perplexity": 20.0})
    with pytest.raises(Exception):
        oracle_gap(cand, oracle, metrics=["only_candidate"])
