"""Strided corpus perplexity against plain and manual sliding-window computations; batching invariance."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_gpt2
from unmerge.evaluation._testing import word_tokenizer
from unmerge.evaluation.common import EvaluationError
from unmerge.evaluation.perplexity import (
    corpus_perplexity,
    example_token_logprobs,
    per_document_perplexity,
    per_example_loss,
    perplexity_from_nll,
    sliding_windows,
)

DOCS = ["the cat sat on the mat", "a big red dog ran fast on the road", "hello world",
        "the sun and the moon and the sky", "one two three four five", "paris is the capital of france"]


@pytest.fixture(scope="module")
def lm():
    return make_gpt2(), word_tokenizer(vocab_size=64)


def _ids(tok):
    return torch.tensor(tok("\n\n".join(DOCS))["input_ids"])


def test_windows_by_hand():
    assert sliding_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert sliding_windows(3, 8, 4) == [(0, 3, 3)]
    with pytest.raises(EvaluationError):
        sliding_windows(10, 4, 5)


def test_stride_equal_max_length_is_plain_chunked(lm):
    model, tok = lm
    ids = _ids(tok)
    n = ids.numel()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, n, 8):  # independent non-overlapping chunks, HF's own mean loss
            chunk = ids[b:b + 8].unsqueeze(0)
            if chunk.shape[1] < 2:
                continue
            loss = model(chunk, labels=chunk).loss.item()
            total += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    r = corpus_perplexity(model, tok, DOCS, max_length=8, stride=8, batch_size=3, progress=False)
    assert r["n_tokens"] == n and r["max_length"] == 8 and r["stride"] == 8
    assert r["n_scored"] == count
    assert r["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_equals_manual_sliding_window(lm):
    model, tok = lm
    ids = _ids(tok).unsqueeze(0)
    n = ids.shape[1]
    max_length, stride = 12, 5
    nll, scored, prev_end = 0.0, 0, 0
    with torch.no_grad():  # the transformers perplexity-guide loop, written out
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            trg = end - prev_end
            inp = ids[:, begin:end]
            labels = inp.clone()
            labels[:, :-trg] = -100
            valid = int((labels[:, 1:] != -100).sum())
            nll += model(inp, labels=labels).loss.item() * valid
            scored += valid
            prev_end = end
            if end == n:
                break
    r = corpus_perplexity(model, tok, DOCS, max_length=max_length, stride=stride, batch_size=2, progress=False)
    assert r["n_scored"] == scored == n - 1  # every token but the first scored once
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-5)
    # defaults: model context (32) and half of it; batch size does not matter
    d1 = corpus_perplexity(model, tok, DOCS, batch_size=1, progress=False)
    d4 = corpus_perplexity(model, tok, DOCS, batch_size=4, progress=False)
    assert (d1["max_length"], d1["stride"]) == (32, 16)
    assert d1["perplexity"] == pytest.approx(d4["perplexity"], rel=1e-6)


def test_per_example_loss_independent_of_batching(lm):
    model, tok = lm
    one = per_example_loss(model, tok, DOCS, batch_size=1)
    many = per_example_loss(model, tok, DOCS, batch_size=4)
    with torch.no_grad():
        for text, a, b in zip(DOCS, one, many):
            ids = torch.tensor([tok(text)["input_ids"]])
            ref = model(ids, labels=ids).loss.item()  # unpadded, HF's own loss
            assert a["loss"] == pytest.approx(ref, abs=1e-5)
            assert b["loss"] == pytest.approx(ref, abs=1e-5)
            assert a["n_tokens"] == b["n_tokens"] == ids.shape[1] - 1
    lp1 = example_token_logprobs(model, tok, DOCS, batch_size=1)
    lp6 = example_token_logprobs(model, tok, DOCS, batch_size=6)
    for x, y in zip(lp1, lp6):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_per_document_mean_and_overflow(lm):
    model, tok = lm
    d = per_document_perplexity(model, tok, DOCS[:2], progress=False)
    with torch.no_grad():
        refs = []
        for text in DOCS[:2]:
            ids = torch.tensor([[tok.bos_token_id] + tok(text)["input_ids"]])
            refs.append(math.exp(model(ids, labels=ids).loss.item()))
    assert d["per_doc"] == pytest.approx(refs, rel=1e-5)
    assert d["perplexity.per_doc_mean"] == pytest.approx(sum(refs) / 2, rel=1e-5)
    assert perplexity_from_nll(1e6, 10) == float("inf")
    assert math.isnan(perplexity_from_nll(0.0, 0))
    assert perplexity_from_nll(math.log(7.0) * 3, 3) == pytest.approx(7.0)
