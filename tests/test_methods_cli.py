"""`unmerge methods` and `unmerge methods NAME` are generated from the registered methods' schemas."""
from __future__ import annotations

from click.testing import CliRunner

from unmerge.cli import main
from unmerge.methods import all_methods, get_method


def test_methods_list_and_detail_come_from_the_schemas():
    runner = CliRunner()
    listing = runner.invoke(main, ["methods"])
    assert listing.exit_code == 0, listing.output
    for method in all_methods():
        assert f"{method.name:22s} {method.formula}" in listing.output
        for param in method.params:
            assert f"{param.name}={param.default!r}" in listing.output
    detail = runner.invoke(main, ["methods", "dare_ties"])
    ties = get_method("dare_ties")
    assert detail.exit_code == 0 and detail.output.startswith(f"{ties.name}: {ties.summary}")
    assert all(p.describe() in detail.output for p in ties.params)
    unknown = runner.invoke(main, ["methods", "tie"])
    assert unknown.exit_code == 2 and "ties" in unknown.output
