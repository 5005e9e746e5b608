"""Accuracy over any labelled dataset: items from a template and verbalizers, scored like hand-written items."""
from __future__ import annotations

import json

import pytest

from unmerge.errors import DataError
from unmerge.evaluation.tasks import fill_template, labelled_items
from unmerge.sources import load_items

ROWS = [{"text": "the cat sat", "label": 1, "topic": "pets"}, {"text": "red car", "label": 0, "topic": "cars"}]


def test_template_and_verbalizers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spec = {"path": str(path), "template": "{{{topic}}} {text} is", "verbalizers": [" bad", " good"]}
    assert load_items(spec) == [{"prompt": "{pets} the cat sat is", "choices": [" bad", " good"], "label": 1},
                                {"prompt": "{cars} red car is", "choices": [" bad", " good"], "label": 0}]
    by_name = labelled_items([{"text": "x", "y": "pos"}, {"text": "z", "y": "neg"}],
                             {"label_column": "y", "verbalizers": {"neg": " no", "pos": " yes"}})
    assert [(i["choices"], i["label"]) for i in by_name] == [([" no", " yes"], 1), ([" no", " yes"], 0)]
    per_row = labelled_items([{"q": "2+2", "options": [" 3", " 4"], "answer": 1}],
                             {"template": "{q} =", "choices_column": "options", "label_column": "answer"})
    assert per_row == [{"prompt": "2+2 =", "choices": [" 3", " 4"], "label": 1}]


def test_template_is_data_not_code():
    assert fill_template("{text}", {"text": "{label}"}) == "{label}"  # substituted once, never re-read
    for bad in ("{text.__class__}", "{text[0]}", "{text!r}", "{missing}", "a } b"):
        with pytest.raises(DataError):
            fill_template(bad, {"text": "t"})
    with pytest.raises(DataError, match="exactly one"):
        labelled_items(ROWS, {"template": "{text}"})
    with pytest.raises(DataError, match="out of range"):
        labelled_items([{"text": "a", "label": 2}], {"verbalizers": [" x", " y"]})
    with pytest.raises(DataError, match="verbalizers"):
        labelled_items([{"text": "a", "label": "maybe"}], {"verbalizers": {"yes": " y", "no": " n"}})
    with pytest.raises(DataError) as err:
        labelled_items(ROWS, {"verbaliser": [" x"]})
    assert "verbalizers" in err.value.hint
