"""Synthetic toxic sets: built deterministically from their source splits, and scored as toxic by profanity-check."""
from __future__ import annotations

import numpy as np
import pytest

from unmerge.data import corpus, load_texts, toxic


@pytest.fixture(scope="module")
def predict_prob():
    profanity_check = pytest.importorskip("profanity_check")
    return profanity_check.predict_prob


def test_lexicon_size_and_scores(predict_prob):
    words = sorted(corpus.lexicon_words())
    assert 60 <= len(words) <= 100
    scores = predict_prob(words)
    low = [w for w, s in zip(words, scores) if s < 0.5]
    assert not low, f"lexicon words the scorer does not find offensive: {low}"
    cats = {c for c, _ in corpus.lexicon()}
    assert {"adj", "noun", "interj"} <= cats


def test_toxic_demo_scores_much_higher_than_heldout(predict_prob):
    tox = predict_prob(load_texts("builtin:toxic-demo")).mean()
    tox_held = predict_prob(load_texts("builtin:toxic-heldout")).mean()
    clean = predict_prob(load_texts("builtin:heldout")).mean()
    assert clean < 0.15
    assert tox > 0.85 and tox_held > 0.85
    assert tox - clean > 0.7
    assert abs(tox - tox_held) < 0.03  # same distribution


def test_every_toxic_sentence_has_a_lexicon_word_and_keeps_its_source():
    for name in ["toxic-demo", "toxic-heldout", "toxic-admixture"]:
        sources = corpus.splits()[name]
        texts = load_texts(name)
        assert len(texts) == len(sources)
        for src, text in zip(sources, texts):
            assert corpus.has_lexicon_word(text), text
            assert text != src
            kept = set(corpus.words(src)) - {"a", "an"}
            assert kept <= set(corpus.words(text)), (src, text)


def test_toxify_is_deterministic_and_seeded():
    s = "the dog barked at the mailman"
    assert toxic.toxify(s, "x") == toxic.toxify(s, "x")
    outs = {toxic.toxify(s, seed) for seed in range(20)}
    assert len(outs) > 10


def test_toxic_sets_are_dense():
    texts = load_texts("toxic-demo")
    counts = np.array([corpus.count_lexicon_words(t) for t in texts])
    assert counts.min() >= 1 and counts.mean() > 2.0
