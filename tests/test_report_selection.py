"""The selection rule: a safe hand-written grammar, evaluated on a hand-made metrics table."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from unmerge.errors import DataError, RecipeError
from unmerge.report import parse_rule, select
from unmerge.report.selection import parse_constraints


@pytest.fixture
def table() -> pd.DataFrame:
    # base ppl 20 -> "perplexity <= 1.05 * base" allows <= 21; base accuracy 0.70 -> ">= base - 0.02" allows >= 0.68
    return pd.DataFrame(
        {
            "toxicity.mean": [0.40, 0.80, 0.30, 0.20, 0.10, 0.25],
            "perplexity": [20.0, 22.0, 20.5, 21.0, 23.0, 20.8],
            "accuracy": [0.70, 0.66, 0.69, 0.67, 0.60, 0.70],
            "toxicity.share_gt_0.8": [0.10, 0.50, 0.05, 0.02, 0.00, 0.04],
        },
        index=["base", "forget", "ta@0.5", "ta@1.0", "ta@1.5", "ur@1.0"],
    )


ELIGIBLE = ["ta@0.5", "ta@1.0", "ta@1.5", "ur@1.0"]


def test_lowest_toxicity_within_five_percent_of_base_perplexity(table):
    sel = select(table, {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.05 * base"},
                 eligible=ELIGIBLE)
    # ta@1.5 is least toxic but its perplexity 23 > 21; ta@1.0 (ppl 21.0, exactly on the bound) wins with 0.20
    assert sel.candidate == "ta@1.0"
    assert sel.constraints == [{"constraint": "perplexity <= 1.05 * base", "metric": "perplexity", "op": "<=",
                                "bound": pytest.approx(21.0)}]
    col = "perplexity <= 1.05 * base"
    assert sel.table[col].to_dict() == {"base": True, "forget": False, "ta@0.5": True, "ta@1.0": True,
                                        "ta@1.5": False, "ur@1.0": True}
    assert sel.table["eligible"].to_dict() == {"base": False, "forget": False, "ta@0.5": True, "ta@1.0": True,
                                               "ta@1.5": True, "ur@1.0": True}
    assert sel.table["selected"].sum() == 1 and bool(sel.table.at["ta@1.0", "selected"])
    assert sel.table.at["ta@1.5", "toxicity.mean"] == 0.10
    assert list(sel.table.columns[:2]) == ["toxicity.mean", "perplexity"]
    assert "ta@1.0 has the lowest toxicity.mean (0.2)" in sel.reason
    assert "3 of 4 eligible" in sel.reason and "bound 21" in sel.reason and "0.4" in sel.reason


def test_two_relative_constraints(table):
    rule = {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.05 * base and accuracy >= base - 0.02"}
    sel = select(table, rule, eligible=ELIGIBLE)
    # ta@1.0 now fails accuracy (0.67 < 0.68); next best within both: ur@1.0 (0.25)
    assert sel.candidate == "ur@1.0"
    assert [c["bound"] for c in sel.constraints] == [pytest.approx(21.0), pytest.approx(0.68)]
    acc = sel.table["accuracy >= base - 0.02"]
    assert acc.to_dict() == {"base": True, "forget": False, "ta@0.5": True, "ta@1.0": False, "ta@1.5": False,
                             "ur@1.0": True}
    assert sel.table["satisfies"].to_dict() == {"base": True, "forget": False, "ta@0.5": True, "ta@1.0": False,
                                                "ta@1.5": False, "ur@1.0": True}


def test_subject_to_as_list_equals_and(table):
    a = select(table, {"minimize": "toxicity.mean", "subject_to": ["perplexity <= 1.05 * base",
                                                                   "accuracy >= base - 0.02"]}, eligible=ELIGIBLE)
    assert a.candidate == "ur@1.0"
    assert a.rule.subject_to == "perplexity <= 1.05 * base and accuracy >= base - 0.02"


def test_maximize_and_other_base_metric(table):
    # accuracy is maximised among candidates whose toxicity is at most half the base's toxicity (0.2)
    sel = select(table, {"maximize": "accuracy", "subject_to": "toxicity.mean <= 0.5 * base.toxicity.mean"},
                 eligible=ELIGIBLE)
    assert sel.candidate == "ta@1.0"
    assert sel.constraints[0]["bound"] == pytest.approx(0.2)
    # a base metric other than the constrained one: perplexity within accuracy-scaled room
    sel = select(table, {"minimize": "toxicity.mean", "subject_to": "perplexity < base + 10 * base.accuracy - 6"},
                 eligible=ELIGIBLE)
    assert sel.constraints[0]["bound"] == pytest.approx(21.0)
    assert sel.candidate == "ur@1.0"  # strict '<': ta@1.0 (exactly 21.0) fails


def test_dotted_metric_names_with_digits(table):
    sel = select(table, {"minimize": "toxicity.share_gt_0.8", "subject_to": "toxicity.share_gt_0.8 < base"},
                 eligible=ELIGIBLE)
    assert sel.candidate == "ta@1.5"
    (c,) = parse_constraints("toxicity.share_gt_0.8 <= 0.5*base")
    assert (c.metric, c.op) == ("toxicity.share_gt_0.8", "<=")
    assert c.bound({"toxicity.share_gt_0.8": 0.3}) == pytest.approx(0.15)


@pytest.mark.parametrize("text,expected", [
    ("x <= (1 + 2) * 3 - -1 / 2", 9.5),
    ("x <= 1 - 2 - 3", -4.0),
    ("x <= 8 / 4 / 2", 1.0),
    ("x <= 2 + 3 * 4", 14.0),
    ("x <= -(base - 5) * +2", -8.0),
    ("x <= 5e-1 * base + .5", 5.0),
    ("x >= base / base.y", 5.0),
])
def test_arithmetic(text, expected):
    (c,) = parse_constraints(text)
    assert c.bound({"x": 9.0, "y": 1.8}) == pytest.approx(expected)


def test_nothing_satisfies_gives_none_and_honest_reason(table):
    sel = select(table, {"minimize": "toxicity.mean", "subject_to": "perplexity < 0.9 * base"}, eligible=ELIGIBLE)
    assert sel.candidate is None
    assert not sel.table["selected"].any()
    assert sel.reason.startswith("No eligible candidate satisfies every constraint")
    assert "perplexity < 0.9 * base (bound 18) fails for 4 of 4" in sel.reason
    assert "Closest: ta@0.5" in sel.reason


def test_no_eligible_candidates(table):
    sel = select(table, {"minimize": "toxicity.mean"}, eligible=[])
    assert sel.candidate is None
    assert sel.reason == "No candidate was eligible for selection."


def test_default_eligible_excludes_base_only(table):
    sel = select(table, {"minimize": "perplexity"})
    assert sel.candidate == "ta@0.5"  # base (20.0) would win but is not eligible by default
    assert not sel.table.at["base", "eligible"] and sel.table.at["forget", "eligible"]


def test_tie_goes_to_first_and_missing_values_fail(table):
    t = table.copy()
    t.loc["ur@1.0", "toxicity.mean"] = 0.30  # ties with ta@0.5
    t.loc["ta@1.0", "perplexity"] = math.nan  # cannot be shown to satisfy the constraint
    sel = select(t, {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.05 * base"}, eligible=ELIGIBLE)
    assert sel.candidate == "ta@0.5"
    assert not sel.table.at["ta@1.0", "perplexity <= 1.05 * base"]


def test_undefined_bound_selects_nothing(table):
    t = table.assign(zero=0.0)
    sel = select(t, {"minimize": "toxicity.mean", "subject_to": "perplexity <= base / base.zero"}, eligible=ELIGIBLE)
    assert sel.candidate is None
    assert "bound is undefined" in sel.reason


@pytest.mark.parametrize("text,pos,fragment", [
    ("__import__('os')", 0, "'__import__' is not allowed"),
    ("perplexity <= __import__('os').system('ls')", 14, "'__import__' is not allowed"),
    ("open('/etc/passwd') <= 1", 5, "strings are not allowed"),
    ("open(1) <= 2", 4, "function calls are not allowed"),
    ("perplexity <= open(1)", 18, "function calls are not allowed"),
    ("perplexity <= base(1)", 18, "function calls are not allowed"),
    ("perplexity <= base.__class__", 19, "'__class__' is not allowed"),
    ("perplexity.__class__.__mro__ <= 1", 11, "'__class__' is not allowed"),
    ("perplexity <= (1).real", 17, "unexpected character '.'"),
    ("perplexity <= ().__class__", 16, "unexpected character '.'"),
    ("perplexity <= base..x", 19, "empty part"),
    ("perplexity <= \"1.05\"", 14, "strings are not allowed"),
    ("perplexity <= 1; import os", 15, "unexpected character ';'"),
    ("perplexity <= [1][0]", 14, "unexpected character '['"),
    ("perplexity <= lambda: 1", 20, "unexpected character ':'"),
    ("perplexity == base", 11, "unexpected '=='"),
    ("perplexity = base", 11, "unexpected '='"),
    ("perplexity <= 2 ** 3", 17, "expected a number"),
    ("perplexity <= accuracy", 14, "'accuracy' cannot appear on the right-hand side"),
    ("perplexity <= 1 or accuracy >= 0", 16, "'or' is not supported"),
    ("base <= 1", 0, "must be a candidate's metric"),
    ("perplexity <= 1.05base", 18, "after the number"),
    ("perplexity <= (1 + 2", 20, "expected ')'"),
    ("perplexity <=", 13, "found the end of the rule"),
    ("perplexity 1", 11, "expected one of <=, <, >=, >"),
    ("perplexity <= 1 accuracy >= 0", 16, "expected 'and' or the end"),
    ("perplexitè <= 1", 9, "unexpected character"),
])
def test_rejected(text, pos, fragment):
    with pytest.raises(RecipeError) as info:
        parse_rule({"minimize": "toxicity.mean", "subject_to": text})
    assert info.value.position == pos
    assert fragment in info.value.message
    assert f"at position {pos}" in info.value.message


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(RecipeError, match="nesting deeper"):
        parse_constraints("x <= " + "(" * 500 + "1" + ")" * 500)
    with pytest.raises(RecipeError, match="nesting deeper"):
        parse_constraints("x <= " + "-" * 500 + "1")


def test_rule_shape_errors(table):
    with pytest.raises(RecipeError, match="did you mean 'minimize'"):
        parse_rule({"minimise": "toxicity.mean"})
    with pytest.raises(RecipeError, match="exactly one of"):
        parse_rule({"minimize": "a", "maximize": "b"})
    with pytest.raises(RecipeError, match="exactly one of"):
        parse_rule({"subject_to": "a <= 1"})
    with pytest.raises(RecipeError):
        parse_rule({"minimize": "__import__('os')"})
    with pytest.raises(RecipeError, match="not a metric name"):
        parse_rule({"minimize": "toxicity mean"})
    with pytest.raises(RecipeError, match="must be a string"):
        parse_rule({"minimize": "a", "subject_to": 3})
    with pytest.raises(RecipeError, match="must be a mapping"):
        parse_rule("minimize toxicity")


def test_unknown_metrics_and_missing_base(table):
    with pytest.raises(RecipeError) as info:
        select(table, {"minimize": "toxicity.mean", "subject_to": "acuracy >= base - 0.02"})
    assert info.value.position == 0 and "did you mean 'accuracy'" in info.value.hint
    with pytest.raises(RecipeError) as info:
        select(table, {"minimize": "toxicity.mean", "subject_to": "accuracy >= base.perplexty"})
    assert info.value.position == 17 and "did you mean 'perplexity'" in info.value.hint
    with pytest.raises(RecipeError, match="did you mean 'toxicity.mean'"):
        select(table, {"minimize": "toxicity.maen"})
    with pytest.raises(RecipeError, match="no candidate 'base' was evaluated"):
        select(table.drop(index="base"), {"minimize": "toxicity.mean", "subject_to": "perplexity <= base"})
    with pytest.raises(DataError, match="have no metrics"):
        select(table, {"minimize": "toxicity.mean"}, eligible=["nope"])


def test_parse_rule_round_trip():
    rule = parse_rule({"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.05 * base"})
    assert rule.direction == "minimize" and rule.objective == "toxicity.mean"
    assert rule.metrics() == {"toxicity.mean", "perplexity"}
    assert rule.as_dict() == {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.05 * base"}
    assert parse_rule(rule) is rule
