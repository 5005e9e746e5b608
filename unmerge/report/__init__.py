"""Report bundle: selection rule, tables, plots, Markdown/HTML rendering, manifest and verification."""
from unmerge.report.bundle import write_bundle
from unmerge.report.selection import Rule, Selection, parse_rule, select
from unmerge.report.verify import verify

__all__ = ["Rule", "Selection", "parse_rule", "select", "verify", "write_bundle"]
