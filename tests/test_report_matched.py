"""The matched comparison of removal methods (unmerge/report/matched.py), on a hand-computed fixture."""
from __future__ import annotations

import pytest

from unmerge.report import write_bundle
from unmerge.report.matched import compare, describe, first_crossing

# base at (toxicity 0.5, perplexity 10); curves (alpha, toxicity, perplexity)
A = [(1.0, 0.3, 11.0), (2.0, 0.1, 14.0)]
B = [(0.5, 0.4, 10.2), (1.0, 0.2, 10.6), (2.0, 0.15, 12.0)]


def test_hand_computed_levels_budget_and_window():
    cmp = compare({"a": A, "b": B}, base_y=0.5, base_x=10.0, bound=12.0)
    # common reduction: max of the minima is b's 0.15, so R = 0.35; levels 0.5 - 0.175 and 0.15
    assert cmp.reduction == pytest.approx(0.35)
    assert cmp.levels[0.5] == pytest.approx(0.325) and cmp.levels[1.0] == pytest.approx(0.15)
    a, b = cmp.methods
    # a: 0.325 between (0, 0.5) and (1, 0.3): alpha 0.875, ppl 10.875; 0.15 between (1, 0.3) and (2, 0.1): alpha
    # 1.75, ppl 11 + 3 * 0.75
    assert a.at_level[0.5] == pytest.approx((0.875, 10.875))
    assert a.at_level[1.0] == pytest.approx((1.75, 13.25))
    # ppl exceeds 12 between (1, 11) and (2, 14): alpha 4/3, toxicity 0.3 - 0.2/3; window (4/3) / 1.75
    assert a.alpha_max == pytest.approx(4 / 3) and a.y_at_max == pytest.approx(0.3 - 0.2 / 3)
    assert a.window == pytest.approx((4 / 3) / 1.75)
    # b: 0.325 between (0.5, 0.4) and (1, 0.2): alpha 0.6875, ppl 10.35; 0.15 reached exactly at alpha 2 (ppl 12)
    assert b.at_level[0.5] == pytest.approx((0.6875, 10.35))
    assert b.at_level[1.0] == pytest.approx((2.0, 12.0))
    # ppl never exceeds 12 (12 is within the bound): no alpha_max, the window runs to the last alpha
    assert b.alpha_max is None and b.y_at_max == pytest.approx(0.15) and b.window == pytest.approx(1.0)
    assert cmp.best_at(0.5) == ("b", pytest.approx(10.35)) and cmp.best_at(1.0) == ("b", pytest.approx(12.0))
    text = describe(cmp, "toxicity", "perplexity")
    assert any(line.startswith("At toxicity 0.325 (50% of the common reduction), b costs the least") for line in text)
    assert any("a exceeds perplexity 12 at α ≈ 1.333" in line for line in text)
    # a reaches the 50% level at alpha 0.875, below its first grid point (1): said so; b's 0.6875 is on its grid
    assert "a 10.88 (α 0.875, below its first grid α: interpolated from the base)" in describe(
        cmp, "toxicity", "perplexity", fmt=lambda v: f"{v:.4g}")[1]
    assert "; b 10.35 (α 0.6875) (base 10)." in describe(cmp, "toxicity", "perplexity")[1]


def test_first_crossing_takes_the_first_of_a_non_monotone_curve():
    curve = [(0.0, 0.5, 1.0), (1.0, 0.2, 1.0), (2.0, 0.6, 1.0), (3.0, 0.1, 1.0)]
    assert first_crossing(curve, 1, 0.3, above=False) == (pytest.approx(2 / 3), 1)
    assert first_crossing(curve, 1, 0.05, above=False) is None


def test_no_common_reduction_is_said_plainly():
    cmp = compare({"a": A, "c": [(1.0, 0.6, 10.5)]}, base_y=0.5, base_x=10.0, bound=12.0)
    assert cmp.reduction == 0 and cmp.levels == {}  # c never goes below the base: its curve minimum is the base
    assert all(m.at_level == {} for m in cmp.methods)
    assert describe(cmp, "toxicity", "perplexity")[0].startswith("The methods do not reach a common toxicity")


def test_bundle_has_the_section_with_the_rule_bound(tmp_path):
    metrics = []
    for cand, method, alpha, tox, ppl in [("base", None, None, 0.5, 10.0), ("forget", None, None, 0.9, 10.1),
                                          *[(f"a@{a:g}", "a", a, t, p) for a, t, p in A],
                                          *[(f"b@{a:g}", "b", a, t, p) for a, t, p in B]]:
        for metric, value in (("toxicity.mean", tox), ("perplexity", ppl)):
            metrics.append(dict(candidate=cand, method=method, alpha=alpha, metric=metric, value=value,
                                ci_low=None, ci_high=None))
    run = {"title": "m", "metrics": metrics, "records": [], "base_candidate": "base",
           "selection": {"minimize": "toxicity.mean", "subject_to": "perplexity <= 1.2 * base"}}
    md = (write_bundle(tmp_path / "b", run) / "report.md").read_text()
    section = md.split("## Matched comparison")[1].split("\n## ")[0]
    assert "perplexity exceeds 12 (the selection rule's bound)" in section
    # the table row of a: grid, min, both levels, the budget and the window
    assert "| a | 1, 2 | 0.1 | 0.875 | 10.88 | 1.75 | 13.25 | 1.333 | 0.2333 | 0.7619 |" in section
    assert "| b | 0.5, 1, 2 | 0.15 | 0.6875 | 10.35 | 2 | 12 | &gt; 2 | 0.15 | 1+ |" in section


def test_a_reduction_inside_the_base_interval_is_flagged():
    cmp = compare({"a": A, "b": B}, base_y=0.5, base_x=10.0, bound=12.0)  # common reduction 0.35
    assert not any(line.startswith("Caution") for line in describe(cmp, "t", "p", noise=0.3))
    flagged = describe(cmp, "t", "p", noise=0.4)
    assert flagged[1].startswith("Caution: that reduction is smaller than the half-width") and "0.4" in flagged[1]


def test_rebuild_keeps_metric_details_and_timings(tmp_path):
    import json

    from unmerge.report.rebuild import rebuild_bundle

    metrics = [dict(candidate=c, method=None, alpha=None, metric="perplexity", value=v, ci_low=None, ci_high=None,
                    protocol="perplexity", n=17, seconds=s) for c, v, s in (("base", 10.0, 1.5), ("forget", 11.0, 2.5))]
    first = write_bundle(tmp_path / "b", {"title": "r", "metrics": metrics, "records": [], "base_candidate": "base"})
    details = (first / "metric_details.jsonl").read_text()
    timings = json.loads((first / "manifest.json").read_text())["metric_timings"]
    assert timings == {"base": {"perplexity": 1.5}, "forget": {"perplexity": 2.5}} and '"n": 17' in details
    again = rebuild_bundle(first, out=tmp_path / "again")
    assert (again / "metric_details.jsonl").read_text() == details
    assert json.loads((again / "manifest.json").read_text())["metric_timings"] == timings


def test_rebuild_elsewhere_records_the_new_location(tmp_path):
    import json

    from unmerge.report.rebuild import rebuild_bundle

    metrics = [dict(candidate="base", method=None, alpha=None, metric="perplexity", value=10.0, ci_low=None,
                    ci_high=None)]
    first = write_bundle(tmp_path / "b", {"title": "r", "metrics": metrics, "records": [], "base_candidate": "base",
                                          "resolved": {"name": "x", "report": {"dir": str(tmp_path / "b")}}})
    again = rebuild_bundle(first, out=tmp_path / "again")
    resolved = json.loads((again / "manifest.json").read_text())["recipe"]["resolved"]
    assert resolved == {"name": "x", "report": {"dir": str(tmp_path / "again")}}
    in_place = rebuild_bundle(first)
    assert json.loads((in_place / "manifest.json").read_text())["recipe"]["resolved"]["report"]["dir"] == \
        str(tmp_path / "b")
