"""Multi-task merging: classifier fine-tuning (one body, a head per task), per-task heads on a merged body, the
``kind: merge`` recipe runner end to end (bundle accepted by ``unmerge verify``, resume from the cache), the
labelled-task splits and the α-curve plot."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from unmerge.errors import RecipeError
from unmerge.models import resolve_model
from unmerge.multitask.tasks import build_task
from unmerge.train import FinetuneConfig
from unmerge.train.classifier import (BODY_DIR, ClassificationTask, MultiHeadClassifier, head_file, last_token_index,
                                      load_classifier, train_classifier)

WORDS = {0: "apple pear plum fig", 1: "stone rock gravel sand"}


def toy_task(name: str, n: int, offset: int = 0) -> ClassificationTask:
    """Separable two-class texts: the class decides the vocabulary."""
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = WORDS[y].split()
        texts.append(" ".join(words[(i + offset + k) % 4] for k in range(2 + i % 3)))
        labels.append(y)
    return ClassificationTask(name, texts, labels, ["fruit", "rock"])


def accuracy(body, head, task: ClassificationTask) -> float:
    from transformers import AutoTokenizer

    from unmerge.evaluation.accuracy import classification_accuracy

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-lm"))
    metrics, _ = classification_accuracy(load_classifier(body, head, pad_id=0), tok, task.texts, task.labels,
                                         max_length=16, n_boot=0, progress=False)
    return metrics["accuracy"]["value"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "model"
    info = train_classifier(resolve_model("builtin:tiny-lm"), [toy_task("toy", 32)], out,
                            FinetuneConfig(max_steps=12, learning_rate=1e-2, batch_size=8), max_length=16,
                            device="cpu", progress=False)
    return out, info


def test_classifier_finetune_learns_a_separable_task(trained, tmp_path):
    from safetensors.torch import save_file

    from unmerge.train.classifier import base_body

    out, info = trained
    test = toy_task("toy", 20, offset=1)
    after = accuracy(out / BODY_DIR, head_file(out, "toy"), test)
    start = MultiHeadClassifier(resolve_model("builtin:tiny-lm"), {"toy": 2}, pad_id=0, seed=0)  # as training began
    save_file({start.head_param: start.heads[0].weight.detach().contiguous()}, str(tmp_path / "head0.safetensors"))
    before = accuracy(base_body(resolve_model("builtin:tiny-lm"), tmp_path / "base"), tmp_path / "head0.safetensors",
                      test)
    assert info["steps"] == 12 and info["train_loss"] < 0.69  # below chance-level cross-entropy ln 2
    assert after >= 0.9 and after > before + 0.2


def test_multihead_pooling_equals_the_transformers_classifier(trained):
    """The training model (body + per-task heads, last non-pad token) gives the logits of the standard
    GPT2ForSequenceClassification rebuilt from the saved body and head."""
    out, _ = trained
    base = resolve_model("builtin:tiny-lm")
    model = MultiHeadClassifier(base, {"a": 3, "b": 2}, pad_id=0, seed=1).eval()
    ids = torch.tensor([[0, 5, 9, 11, 0, 0], [0, 7, 3, 8, 12, 4]])
    mask = (torch.arange(6) < torch.tensor([[4], [6]])).long()
    assert last_token_index(ids, 0).tolist() == [3, 5]
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, task=torch.tensor([1, 1]))["logits"][0]
    from safetensors.torch import save_file

    from unmerge.train.classifier import write_body

    write_body(model.body_state(), base, out.parent / "mh-body")
    save_file({model.head_param: model.heads[1].weight.detach().contiguous()}, str(out.parent / "b.safetensors"))
    hf = load_classifier(out.parent / "mh-body", out.parent / "b.safetensors", pad_id=0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert theirs.shape == (2, 2) and torch.allclose(ours, theirs, atol=1e-5)


def test_task_splits_are_balanced_disjoint_and_drop_ambiguous_texts(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join([f"alpha {i}" for i in range(12)] + ["shared"]))
    (tmp_path / "b.txt").write_text("\n".join([f"beta {i}" for i in range(12)] + ["shared"]))
    spec = {"classes": ["a", "b"], "data": str(tmp_path / "{class}.txt"), "train_per_class": 8, "test_per_class": 4}
    splits = build_task("ab", spec)
    assert splits.train.label_names == ["a", "b"] and len(splits.train.texts) == 16 and len(splits.test.texts) == 8
    assert splits.train.labels == [0, 1] * 8 and "shared" not in splits.train.texts + splits.test.texts
    assert not set(splits.train.texts) & set(splits.test.texts)
    assert all(t.startswith("alpha" if y == 0 else "beta") for t, y in zip(splits.train.texts, splits.train.labels))
    assert build_task("ab", spec).train.texts == splits.train.texts  # deterministic
    words = build_task("wn", {"classes": {"noun": {"wordnet": "noun"}, "adv": {"wordnet": "adv"}},
                              "train_per_class": 3, "test_per_class": 2})
    assert words.test.n_labels == 2 and len(words.train.texts) == 6


def recipe(tmp_path) -> dict:
    for y, words in WORDS.items():
        (tmp_path / f"toy{y}.txt").write_text("\n".join(f"{words.split()[i % 4]} {words.split()[(i + 1) % 4]} {i}"
                                                        for i in range(20)))
    return {
        "kind": "merge", "name": "tiny-merge", "base_model": "builtin:tiny-lm",
        "tasks": {"toy": {"classes": {"fruit": str(tmp_path / "toy0.txt"), "rock": str(tmp_path / "toy1.txt")},
                          "train_per_class": 8, "test_per_class": 4},
                  "pos": {"classes": {"noun": {"wordnet": "noun"}, "adj": {"wordnet": "adj"}},
                          "train_per_class": 8, "test_per_class": 4}},
        "train": {"max_steps": 3, "batch_size": 8, "max_length": 12},
        "stats": {"examples": 8, "batch_size": 8, "base_fisher": {"examples": 8, "n": 1000, "max_length": 12}},
        "merge": {"methods": ["task_arithmetic", "uncertainty",
                              {"method": "mats", "label": "mats-kfac", "params": {"objective": "kfac",
                                                                                  "iterations": 5}}],
                  "alpha": [0.5, 1.0], "sweep": {"task_arithmetic": "lambda", "uncertainty": "alpha"}},
        "evaluate": {"n_boot": 20},
        "report": {"compress_samples": True},
    }


def test_merge_recipe_end_to_end_bundle_heads_and_resume(tmp_path, monkeypatch):
    from unmerge import api
    from unmerge.cli import main
    from unmerge.multitask.runner import MultiTaskRun

    monkeypatch.setenv("UNMERGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    spec = recipe(tmp_path)
    assert "kind: merge" in api.plan(spec, out=tmp_path / "report")
    bundle = api.run(spec, out=tmp_path / "report", progress=False)
    result = CliRunner().invoke(main, ["verify", str(bundle)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    metrics = pd.read_csv(bundle / "metrics.csv")
    candidates = ["base", "individual", "multitask", "task_arithmetic@0.5", "task_arithmetic@1", "uncertainty@0.5",
                  "uncertainty@1", "mats-kfac"]
    assert list(dict.fromkeys(metrics["candidate"])) == candidates
    assert set(metrics["metric"]) == {"accuracy.toy", "accuracy.pos", "accuracy.average"}
    wide = metrics.pivot(index="candidate", columns="metric", values="value")
    assert (wide["accuracy.average"] - (wide["accuracy.toy"] + wide["accuracy.pos"]) / 2).abs().max() < 1e-12
    assert (bundle / "alpha_curves.png").stat().st_size > 1000
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "alpha_curves.png" in manifest["outputs"]
    rules = manifest["protocol"]["tensor_rules"]["mats-kfac"]
    assert rules["init (embedding)"] == 2 and rules["cg"] == 16  # wte and wpe never go through the solver

    # per-task heads: task t is scored with the merged body and the head of t's individual model
    run = MultiTaskRun(spec, out=tmp_path / "again", progress=False)
    run.plan()
    merged = next(c for c in run.candidates if c["name"] == "task_arithmetic@1")
    for task in ("toy", "pos"):
        test = run.splits[task].test
        assert merged["heads"][task] == run.trained[task]
        by_hand = accuracy(merged["body"][task], head_file(run.trained[task], task), test)
        assert by_hand == pytest.approx(float(wide.at["task_arithmetic@1", f"accuracy.{task}"]))
        own = accuracy(run.trained[task] / BODY_DIR, head_file(run.trained[task], task), test)
        assert own == pytest.approx(float(wide.at["individual", f"accuracy.{task}"]))
    # task arithmetic with λ = 1 on the bodies is θ₀ + Σ τ_t, tensor by tensor
    from unmerge.checkpoint import Checkpoint

    out, base = Checkpoint(merged["body"]["toy"]), Checkpoint(run.body_base)
    bodies = [Checkpoint(run.trained[t] / BODY_DIR) for t in ("toy", "pos")]
    name = "transformer.h.0.attn.c_attn.weight"
    expected = base.get(name) + sum(b.get(name) - base.get(name) for b in bodies)
    assert torch.allclose(out.get(name), expected, atol=1e-6)

    # a second run comes entirely from the cache and writes the same results
    again = run.execute()
    assert (again / "metrics.csv").read_bytes() == (bundle / "metrics.csv").read_bytes()
    assert all(v == 0.0 for v in json.loads((again / "manifest.json").read_text())["timings"].values())


def test_merge_recipe_errors_name_the_key(tmp_path):
    from unmerge.multitask.runner import MultiTaskRun
    from unmerge.recipe import recipe_kind

    spec = recipe(tmp_path)
    with pytest.raises(RecipeError, match="unknown recipe kind 'marge'"):
        recipe_kind({**spec, "kind": "marge"})
    with pytest.raises(RecipeError, match="merge.alhpa"):
        MultiTaskRun({**spec, "merge": {**spec["merge"], "alhpa": [1]}})
    with pytest.raises(Exception, match="densty"):
        MultiTaskRun({**spec, "merge": {"methods": ["ties"], "params": {"ties": {"densty": 0.2}}}})
