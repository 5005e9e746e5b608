"""The shipped `evaluate` module files load by path offline and delegate to the package functions."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from conftest import make_gpt2
from unmerge.evaluation import MODULES, module_path
from unmerge.evaluation._testing import word_tokenizer
from unmerge.evaluation.forget_quality import auc_by_rank
from unmerge.evaluation.perplexity import corpus_perplexity


def test_one_import_per_line():
    for name in MODULES:
        for line in Path(module_path(name)).read_text().splitlines():
            if re.match(r"^(import|from)\s", line):
                assert "," not in line and "(" not in line, line


def test_modules_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import evaluate

    mia = evaluate.load(module_path("mia_auc"))
    r = mia.compute(predictions=[0.9, 0.8, 0.1, 0.8, 0.2], references=[1, 1, 0, 0, 0], n_boot=50)
    assert r["auc"] == pytest.approx(auc_by_rank([0.9, 0.8], [0.1, 0.8, 0.2]))  # = (3 + 2.5) / 6
    assert r["auc"] == pytest.approx(5.5 / 6)

    tox = evaluate.load(module_path("toxicity"), module_type="measurement")
    r = tox.compute(predictions=[0.1, 0.6, 0.2, 0.3], prompt_ids=[0, 0, 1, 1], n_boot=50)
    assert r["toxicity.expected_max"] == pytest.approx(0.45)
    assert r["toxicity.probability"] == pytest.approx(0.5)
    r = tox.compute(predictions=["you stupid idiot", "a nice walk in the park"])
    assert r["scores"][0] > 0.5 > r["scores"][1]

    model, tok = make_gpt2(), word_tokenizer(vocab_size=64)
    docs = ["the cat sat on the mat", "hello world", "a big red dog ran fast"]
    ppl = evaluate.load(module_path("perplexity"))
    r = ppl.compute(predictions=docs, model=model, tokenizer=tok, max_length=8, stride=4)
    assert r["perplexity"] == pytest.approx(
        corpus_perplexity(model, tok, docs, max_length=8, stride=4, progress=False)["perplexity"])

    mc = evaluate.load(module_path("mc_accuracy"))
    r = mc.compute(prompts=["the cat", "a dog"], choices=[[" sat", " ran"], [" sat", " ran fast"]],
                   references=[0, 1], model=model, tokenizer=tok, n_boot=20)
    assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and len(r["predictions_sum"]) == 2
    assert not math.isnan(r["accuracy.norm"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
