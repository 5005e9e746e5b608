"""Toxicity metrics on a fixed score table, bootstrap intervals, and the scorer registry."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from unmerge.errors import UnmergeError
from unmerge.evaluation.bootstrap import bootstrap_ci
from unmerge.evaluation.common import ScorerError
from unmerge.evaluation.scorers import available_scorers, get_scorer, resolve_label
from unmerge.evaluation.toxicity import toxicity_metrics

# prompt -> scores of its generations
TABLE = {"A": [0.1, 0.6], "B": [0.2, 0.3], "C": [0.9, 0.85], "D": [0.4, 0.5], "E": [0.05]}
RECORDS = [{"prompt_id": p, "score": s} for p, scores in TABLE.items() for s in scores]


def test_metrics_by_hand():
    m = toxicity_metrics(RECORDS, n_boot=200, seed=0)
    assert m["toxicity.mean"]["value"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3 + 0.9 + 0.85 + 0.4 + 0.5 + 0.05) / 9)
    assert m["toxicity.expected_max"]["value"] == pytest.approx((0.6 + 0.3 + 0.9 + 0.5 + 0.05) / 5)
    assert m["toxicity.probability"]["value"] == pytest.approx(3 / 5)  # A, C, D (0.5 counts: >= 0.5)
    assert m["toxicity.share_gt_0.8"]["value"] == pytest.approx(2 / 9)  # 0.9 and 0.85
    assert all(e["n"] == 5 for e in m.values())
    # same table as a DataFrame gives the same numbers and intervals
    m_df = toxicity_metrics(pd.DataFrame(RECORDS), n_boot=200, seed=0)
    assert m_df == m


def test_bootstrap_contains_point_and_repeats():
    rng = np.random.default_rng(1)
    recs = [{"prompt_id": p, "score": float(s)} for p in range(40) for s in rng.beta(1, 1.5, size=3)]
    a = toxicity_metrics(recs, n_boot=500, seed=7)
    b = toxicity_metrics(recs, n_boot=500, seed=7)
    c = toxicity_metrics(recs, n_boot=500, seed=8)
    assert a == b
    assert a["toxicity.mean"]["ci_low"] != c["toxicity.mean"]["ci_low"]
    for name, e in a.items():
        assert e["ci_low"] <= e["value"] <= e["ci_high"], name
        assert e["ci_low"] < e["ci_high"], name

    x = rng.normal(size=50)
    lo, hi = bootstrap_ci(lambda idx: x[idx].mean(axis=1), len(x), n_boot=1000, seed=3)
    assert lo < x.mean() < hi
    assert (lo, hi) == bootstrap_ci(lambda idx: x[idx].mean(axis=1), len(x), n_boot=1000, seed=3)
    # the loop form draws the same indices, so gives the same interval
    assert (lo, hi) == pytest.approx(bootstrap_ci(lambda idx: x[idx].mean(), len(x), n_boot=1000, seed=3,
                                                  vectorized=False))


def test_profanity_check_scorer():
    scorer = get_scorer("profanity-check")
    insult, neutral = scorer(["you are a stupid fucking idiot", "the weather is nice and the park is green today"])
    assert insult > 0.5 > neutral
    assert scorer([]) == []
    assert "word" in scorer.caveat


def test_unknown_scorer_suggests():
    with pytest.raises(ScorerError) as err:
        get_scorer("profanity_check")
    assert isinstance(err.value, UnmergeError)
    assert "profanity-check" in err.value.hint
    with pytest.raises(ScorerError):
        get_scorer("hf")  # needs a model
    assert "hf:<model path or id>[@label]" in available_scorers()


def test_detoxify_missing():
    import importlib.util

    if importlib.util.find_spec("detoxify") is not None:
        pytest.skip("detoxify is installed (its local checkpoints are tested below)")
    with pytest.raises(ScorerError) as err:
        get_scorer("detoxify:original")
    assert "detoxify" in err.value.hint


def _tiny_detoxify(root, model_type: str | None):
    """A detoxify checkpoint (its format: {config: {arch, dataset}, state_dict}) of a tiny random BERT, beside the
    config and tokenizer files of its architecture; ``model_type`` None records that directory as the architecture
    name, else the given hub name."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] you are an idiot the cat sat on mat hello world stupid".split()
    root.mkdir()
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3,
                        initializer_range=0.5)  # large random weights: scores spread over (0, 1)
    model = BertForSequenceClassification(config).eval()
    tokenizer.save_pretrained(root)
    config.save_pretrained(root)
    arch = {"model_type": model_type or str(root), "model_name": "BertForSequenceClassification",
            "tokenizer_name": "BertTokenizerFast", "num_classes": 3}
    torch.save({"config": {"arch": {"args": arch}, "dataset": {"args": {"classes": ["obscene", "toxic", "insult"]}}},
                "state_dict": model.state_dict()}, root / "tiny.ckpt")
    return model, tokenizer


def test_detoxify_local_checkpoint_scores_are_the_models(tmp_path):
    pytest.importorskip("detoxify")
    import torch

    texts = ["you are an idiot", "the cat sat on the mat", "hello stupid world"]
    model, tok = _tiny_detoxify(tmp_path / "own", None)
    with torch.no_grad():  # detoxify's score: sigmoid of the logit of its 'toxicity' class ('toxic', column 1)
        want = torch.sigmoid(model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 1]).tolist()
    assert max(want) - min(want) > 0.05
    by_file = get_scorer(f"detoxify:{tmp_path / 'own' / 'tiny.ckpt'}")
    assert by_file(texts) == pytest.approx(want, abs=1e-6)
    assert by_file.info["classes"] == ["obscene", "toxicity", "insult"]
    # a checkpoint naming a hub architecture (as the released ones do) loads offline from its directory
    _tiny_detoxify(tmp_path / "released", "bert-base-uncased")
    assert get_scorer(f"detoxify:{tmp_path / 'released'}", batch_size=2)(texts) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ScorerError) as err:  # the file alone needs the hub (offline in tests)
        get_scorer(f"detoxify:{tmp_path / 'released' / 'tiny.ckpt'}")
    assert "detoxify:/path/to/dir" in err.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScorerError, match="holds 0 .ckpt files"):
        get_scorer(f"detoxify:{tmp_path / 'empty'}")


def test_hf_scorer_on_local_classifier(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from unmerge.evaluation._testing import word_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=2,
                     id2label={0: "clean", 1: "toxic"}, label2id={"clean": 0, "toxic": 1}, pad_token_id=0)
    model = GPT2ForSequenceClassification(cfg).eval()
    tok = word_tokenizer(vocab_size=64)
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    texts = ["you stupid idiot", "the cat sat on the mat"]
    by_name = get_scorer(f"hf:{tmp_path / 'clf'}@toxic")(texts)
    guessed = get_scorer(f"hf:{tmp_path / 'clf'}")(texts)
    with torch.no_grad():
        ref = [torch.softmax(model(torch.tensor([tok(t)["input_ids"]])).logits, -1)[0, 1].item() for t in texts]
    assert by_name == pytest.approx(ref, abs=1e-5)
    assert guessed == pytest.approx(ref, abs=1e-5)
    assert resolve_label({0: "clean", 1: "toxic"}, "1") == 1
    with pytest.raises(ScorerError):
        get_scorer(f"hf:{tmp_path / 'clf'}@toxc")
    with pytest.raises(ScorerError):
        get_scorer(f"hf:{tmp_path / 'missing'}")
