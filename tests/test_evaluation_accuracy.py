"""Multiple-choice accuracy on a hand-built bigram LM; classification accuracy and macro F1."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from unmerge.errors import DataError
from unmerge.evaluation._testing import word_tokenizer
from unmerge.evaluation.accuracy import classification_accuracy, macro_f1, multiple_choice_accuracy


class BigramLM(torch.nn.Module):
    """p(next | previous token) given by a table: logits[t] = log P[input_ids[t]]; no other context."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logp = torch.nn.Parameter(probs.log(), requires_grad=False)
        self.config = SimpleNamespace(n_positions=32)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logp[input_ids])


@pytest.fixture(scope="module")
def bigram():
    tok = word_tokenizer(vocab_size=64)
    v = tok.get_vocab()
    n = len(tok)
    probs = torch.full((n, n), 1.0)
    rows = {  # next-word probabilities after a word; the rest of each row is spread uniformly
        "cat": {"sat": 0.3, "ran": 0.5},
        "ran": {"fast": 0.3},
        "dog": {"sat": 0.6, "ran": 0.1},
    }
    for prev, nxt in rows.items():
        rest = (1.0 - sum(nxt.values())) / (n - len(nxt))
        probs[v[prev]] = rest
        for w, p in nxt.items():
            probs[v[prev], v[w]] = p
    probs = probs / probs.sum(-1, keepdim=True)
    return BigramLM(probs), tok


def test_multiple_choice_by_hand(bigram):
    model, tok = bigram
    items = [
        # sum: sat log .3 = -1.20 beats ran fast log .5 + log .3 = -1.90; per token: -1.20 vs -0.95 -> "ran fast"
        {"prompt": "the cat", "choices": [" sat", " ran fast"], "label": 1},
        # sat .6 vs ran fast .1 * .3: both variants pick "sat"
        {"prompt": "the dog ", "choices": ["sat", "ran fast"], "label": 0},
    ]
    metrics, recs = multiple_choice_accuracy(model, tok, items, batch_size=3, n_boot=50, progress=False)
    assert recs[0]["loglik"] == pytest.approx([math.log(0.3), math.log(0.5) + math.log(0.3)], abs=1e-5)
    assert recs[0]["n_tokens"] == [1, 2]
    assert recs[1]["loglik"] == pytest.approx([math.log(0.6), math.log(0.1) + math.log(0.3)], abs=1e-5)
    assert (recs[0]["pred_sum"], recs[0]["pred_norm"]) == (0, 1)
    assert (recs[1]["pred_sum"], recs[1]["pred_norm"]) == (0, 0)
    assert metrics["accuracy.sum"]["value"] == 0.5
    assert metrics["accuracy.norm"]["value"] == 1.0
    assert metrics["accuracy"] == metrics["accuracy.sum"]
    m_norm, _ = multiple_choice_accuracy(model, tok, items, normalize=True, n_boot=50, progress=False)
    assert m_norm["accuracy"]["value"] == 1.0
    with pytest.raises(DataError):
        multiple_choice_accuracy(model, tok, [{"prompt": "x", "choices": ["a"], "label": 3}], progress=False)


def test_macro_f1_by_hand():
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 -> 0
    assert macro_f1([0, 0, 1, 1, 2], [0, 1, 1, 1, 0]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_classification_accuracy_matches_unbatched():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=3)
    model = GPT2ForSequenceClassification(cfg).eval()
    tok = word_tokenizer(vocab_size=64)
    texts = ["the cat sat on the mat", "a dog", "hello world sun moon", "red", "you idiot", "big car on the road"]
    with torch.no_grad():
        preds = [int(model(torch.tensor([tok(t)["input_ids"]])).logits.argmax(-1)) for t in texts]
    labels = [preds[0], preds[1], (preds[2] + 1) % 3, preds[3], preds[4], (preds[5] + 1) % 3]
    m, recs = classification_accuracy(model, tok, texts, labels, batch_size=4, n_boot=50, progress=False)
    assert [r["pred"] for r in recs] == preds
    assert m["accuracy"]["value"] == pytest.approx(4 / 6)
    assert m["f1.macro"]["value"] == pytest.approx(macro_f1(labels, preds))
    assert model.config.pad_token_id is None  # restored
