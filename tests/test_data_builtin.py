"""Builtin data sets: deterministic disjoint splits, sizes, cloze items, prompts, error messages."""
from __future__ import annotations

import hashlib
import json

import pytest

from unmerge.data import corpus, list_builtin, load_items, load_texts
from unmerge.errors import DataError, InputError, UnmergeError

TEXT_SETS = ["clean-train", "clean-demo", "heldout", "prompts", "toxic-prompts", "toxic-demo", "toxic-heldout",
             "toxic-admixture"]
SIZES = {"clean-demo": 3000, "heldout": 1000, "prompts": 100, "toxic-prompts": 100, "toxic-demo": 3000,
         "toxic-heldout": 1000}


def test_list_builtin_names():
    names = list_builtin()
    assert names["texts"] == [f"builtin:{n}" for n in TEXT_SETS]
    assert names["items"] == ["builtin:cloze"]
    assert names["models"] == ["builtin:tiny-lm", "builtin:tiny-lm-oracle", "builtin:smollm2-135m"]


@pytest.mark.parametrize("name", SIZES)
def test_sizes(name):
    assert len(load_texts(f"builtin:{name}")) == SIZES[name]
    assert len(load_texts(name)) == SIZES[name]  # the prefix is optional


def test_train_and_admixture_sizes():
    train, admix = load_texts("builtin:clean-train"), load_texts("builtin:toxic-admixture")
    assert 35000 < len(train) < 38000
    assert abs(len(admix) / (len(train) + len(admix)) - 0.05) < 0.001
    assert len(load_items("builtin:cloze")) == 300


def test_source_splits_are_disjoint_and_cover_the_clean_corpus():
    blocks = corpus.splits()
    seen: set[str] = set()
    for name, sentences in blocks.items():
        assert len(set(sentences)) == len(sentences), name
        assert not seen & set(sentences), f"{name} overlaps another split"
        seen |= set(sentences)
    assert seen == {s for _, s in corpus.corpus() if not corpus.has_lexicon_word(s)}


def test_loaded_sets_do_not_share_sentences():
    sets = {n: set(load_texts(n)) for n in ["clean-train", "clean-demo", "heldout", "toxic-demo", "toxic-heldout",
                                             "toxic-admixture"]}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b)
    cloze_sources = {it["prompt"] for it in load_items("cloze")}
    train_prefixes = {" ".join(s.split()[:-1]) for s in sets["clean-train"]}
    assert len(cloze_sources & train_prefixes) < 5  # only coincidental prefixes


def test_clean_sets_have_no_lexicon_words():
    for name in ["clean-train", "clean-demo", "heldout", "prompts"]:
        assert not any(corpus.has_lexicon_word(s) for s in load_texts(name)), name


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def test_splits_are_deterministic_across_processes():
    """The splits depend on the sentences only: a fresh interpreter computes the same ones."""
    import subprocess
    import sys

    code = ("import hashlib, json; from unmerge.data import load_texts, load_items; "
            "print(hashlib.sha256(json.dumps([load_texts(n) for n in ['heldout', 'toxic-demo', 'prompts', "
            "'clean-demo']] + [load_items('cloze')]).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    here = _digest([load_texts(n) for n in ["heldout", "toxic-demo", "prompts", "clean-demo"]] + [load_items("cloze")])
    assert out == here


def test_split_membership_follows_the_sentence_hash():
    heldout = load_texts("heldout")
    keys = [corpus.split_key(s) for s in heldout]
    assert keys == sorted(keys)
    assert max(keys) < min(corpus.split_key(s) for s in load_texts("clean-train"))


def test_returned_lists_are_copies():
    a = load_texts("heldout")
    a.clear()
    assert len(load_texts("heldout")) == 1000
    items = load_items("cloze")
    items[0]["choices"].append("x")
    assert len(load_items("cloze")[0]["choices"]) == 4


def test_cloze_items_well_formed():
    items = load_items("builtin:cloze")
    sources = {" ".join(s.split()[:-1]): s.split()[-1] for s in corpus.splits()["eval-pool"]}
    labels = [it["label"] for it in items]
    for it in items:
        assert set(it) == {"prompt", "choices", "label"}
        assert len(it["choices"]) == 4 and 0 <= it["label"] < 4
        assert all(c.startswith(" ") and not c.startswith("  ") and c.strip().isalpha() for c in it["choices"])
        assert len({c.lower() for c in it["choices"]}) == 4
        assert len(it["prompt"].split()) >= 5
        true = sources[it["prompt"]]
        assert it["choices"][it["label"]] == " " + true
    assert all(labels.count(k) > 40 for k in range(4))  # the order is shuffled


def test_prompts_are_short_prefixes_of_heldout_sentences():
    prompts = load_texts("prompts")
    pool = corpus.splits()["eval-pool"]
    for p in prompts:
        assert 3 <= len(p.split()) <= 4
        assert any(s.startswith(p + " ") for s in pool)
    cloze_src, prompt_src = corpus._eval_partition()
    assert not set(cloze_src) & set(prompt_src)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(DataError) as err:
        load_texts("builtin:toxic-dmeo")
    assert "builtin:toxic-demo" in str(err.value) and "did you mean" in err.value.hint
    with pytest.raises(DataError) as err:
        load_texts("builtin:cloze")
    assert "load_items" in err.value.hint
    with pytest.raises(DataError) as err:
        load_items("builtin:heldout")
    assert "load_texts" in err.value.hint
    with pytest.raises(DataError):
        load_items("clozee")


def test_unknown_model_name_suggests():
    from unmerge.data import builtin_model_path

    with pytest.raises(InputError) as err:
        builtin_model_path("builtin:tiny-lm-orcale")
    assert "tiny-lm-oracle" in err.value.hint
    with pytest.raises(UnmergeError):
        builtin_model_path("builtin:heldout")


def test_corpus_and_license_are_packaged():
    assert corpus.CORPUS_FILE.exists()
    assert len(corpus.corpus()) > 48000
    text = (corpus.DATA_DIR / "LICENSE-WordNet.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    lexnames = {lex for lex, _ in corpus.corpus()}
    assert "noun.animal" in lexnames and all("." in x for x in lexnames)
