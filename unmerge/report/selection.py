"""The recipe's selection rule: a small, safe grammar (hand-written tokenizer + recursive descent; never eval).

A rule is a mapping ``{minimize|maximize: METRIC, subject_to: "CONSTRAINT [and CONSTRAINT]..."}``::

    rule        := constraint ("and" constraint)* END
    constraint  := METRIC OP expr                 OP in <=, <, >=, >
    expr        := term (("+" | "-") term)*
    term        := unary (("*" | "/") unary)*
    unary       := ("-" | "+") unary | atom
    atom        := NUMBER | "base" | "base." METRIC | "(" expr ")"

``base`` is the base model's value of the constrained metric; ``base.METRIC`` is another of the base's metrics.
Metric names are letters, digits, dots and underscores, starting with a letter or underscore
(``toxicity.mean``, ``toxicity.share_gt_0.8``). Anything else (calls, strings, dunder names, other operators)
is a :class:`~unmerge.errors.RecipeError` naming the position. ``subject_to`` may also be a list of constraint
strings (joined with ``and``) or omitted.

When a candidate named ``oracle`` (a retrain oracle) was evaluated, the report offers every metric M also as
``oracle_gap.M`` (candidate − oracle) and ``oracle_absgap.M`` (its absolute value), so "closest to the oracle" is
``minimize: oracle_absgap.forget.perplexity`` (plain metric names: the grammar is unchanged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd

from unmerge.errors import DataError, RecipeError, did_you_mean

__all__ = ["Constraint", "Rule", "Selection", "parse_rule", "parse_constraints", "select"]

_OPS = ("<=", ">=", "<", ">")
_MAX_DEPTH = 32
_MAX_LENGTH = 2000
# relative tolerance for the non-strict comparisons, so "x <= 1.05 * base" is not lost to rounding
_REL_TOL = 1e-9


# ----------------------------------------------------------------------------------------------------------------
# errors


def _error(text: str, pos: int, what: str, hint: str | None = None) -> RecipeError:
    caret = " " * pos + "^"
    err = RecipeError(
        f"selection rule: {what} at position {pos}\n    {text}\n    {caret}",
        hint or "write constraints like \"perplexity <= 1.05 * base\" or \"accuracy >= base - 0.02\", "
                "joined with 'and'",
    )
    err.position = pos  # type: ignore[attr-defined]
    return err


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class _Tok:
    kind: str  # NUM, NAME, CMP, ARITH, LPAREN, RPAREN, AND, END
    text: str
    pos: int
    value: float | None = None


def _is_name_start(ch: str) -> bool:
    return ch.isascii() and (ch.isalpha() or ch == "_")


def _is_name_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in "_.")


def _scan_number(text: str, i: int) -> int:
    """End index of a number starting at ``i`` (digits, optional fraction, optional exponent)."""
    n = len(text)
    j = i
    while j < n and text[j].isascii() and text[j].isdigit():
        j += 1
    if j < n and text[j] == ".":
        j += 1
        while j < n and text[j].isascii() and text[j].isdigit():
            j += 1
    if j < n and text[j] in "eE":
        k = j + 1
        if k < n and text[k] in "+-":
            k += 1
        if k < n and text[k].isascii() and text[k].isdigit():
            while k < n and text[k].isascii() and text[k].isdigit():
                k += 1
            j = k
    return j


def _check_name(text: str, name: str, pos: int) -> None:
    if name.endswith(".") or ".." in name:
        offset = name.index("..") + 1 if ".." in name else len(name) - 1
        raise _error(text, pos + offset, f"a metric name cannot have an empty part ('{name}')")
    offset = 0
    for part in name.split("."):
        if part.startswith("__"):
            raise _error(text, pos + offset, f"'{part}' is not allowed in a metric name",
                         "names beginning with '__' are not metric names; attribute access is not supported")
        offset += len(part) + 1


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
        elif (ch.isascii() and ch.isdigit()) or (ch == "." and i + 1 < n and text[i + 1].isascii()
                                                 and text[i + 1].isdigit()):
            j = _scan_number(text, i)
            if j < n and (_is_name_start(text[j]) or text[j] == "."):
                raise _error(text, j, f"unexpected '{text[j]}' after the number '{text[i:j]}'",
                             "put an operator between a number and a name, e.g. '1.05 * base'")
            toks.append(_Tok("NUM", text[i:j], i, float(text[i:j])))
            i = j
        elif _is_name_start(ch):
            j = i
            while j < n and _is_name_char(text[j]):
                j += 1
            name = text[i:j]
            _check_name(text, name, i)
            if name == "and":
                toks.append(_Tok("AND", name, i))
            elif name in ("or", "not", "AND", "OR", "NOT"):
                raise _error(text, i, f"'{name}' is not supported", "only 'and' joins constraints")
            else:
                toks.append(_Tok("NAME", name, i))
            i = j
        elif ch in "<>":
            op = text[i:i + 2] if text[i + 1:i + 2] == "=" else ch
            toks.append(_Tok("CMP", op, i))
            i += len(op)
        elif ch in "=!":
            raise _error(text, i, f"unexpected '{text[i:i + 2] if text[i + 1:i + 2] == '=' else ch}'",
                         "comparisons are <=, <, >= and > (equality is not supported)")
        elif ch in "+-*/":
            toks.append(_Tok("ARITH", ch, i))
            i += 1
        elif ch == "(":
            toks.append(_Tok("LPAREN", ch, i))
            i += 1
        elif ch == ")":
            toks.append(_Tok("RPAREN", ch, i))
            i += 1
        elif ch in "'\"":
            raise _error(text, i, "strings are not allowed", "a constraint holds only metric names, numbers, "
                                                             "'base', + - * / and parentheses")
        else:
            raise _error(text, i, f"unexpected character {ch!r}")
    toks.append(_Tok("END", "", n))
    return toks


# ----------------------------------------------------------------------------------------------------------------
# syntax tree: ("num", value) | ("base", metric-or-None) | ("neg", node) | ("bin", op, left, right)


def _eval(node: tuple, metric: str, base: Mapping[str, float]) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "base":
        value = base.get(node[1] or metric, math.nan)
        return float(value) if value is not None else math.nan
    if kind == "neg":
        return -_eval(node[1], metric, base)
    op, left, right = node[1], _eval(node[2], metric, base), _eval(node[3], metric, base)
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        return math.nan
    return left / right


def _base_refs(node: tuple, metric: str) -> set[str]:
    kind = node[0]
    if kind == "num":
        return set()
    if kind == "base":
        return {node[1] or metric}
    if kind == "neg":
        return _base_refs(node[1], metric)
    return _base_refs(node[2], metric) | _base_refs(node[3], metric)


@dataclass(frozen=True)
class Constraint:
    """``metric op rhs``; ``text`` is the constraint as written, ``position`` its offset in the rule text."""

    metric: str
    op: str
    rhs: tuple
    text: str
    position: int

    def base_metrics(self) -> set[str]:
        """Metrics of the base that the right-hand side reads."""
        return _base_refs(self.rhs, self.metric)

    def bound(self, base: Mapping[str, float]) -> float:
        """The right-hand side evaluated on the base's metrics (NaN when undefined)."""
        return _eval(self.rhs, self.metric, base)

    def holds(self, value: float, bound: float) -> bool:
        if value is None or bound is None or not (math.isfinite(value) and math.isfinite(bound)):
            return False
        tol = _REL_TOL * max(1.0, abs(bound))
        if self.op == "<=":
            return value <= bound + tol
        if self.op == "<":
            return value < bound
        if self.op == ">=":
            return value >= bound - tol
        return value > bound


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def _advance(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def _describe(self, tok: _Tok) -> str:
        return "the end of the rule" if tok.kind == "END" else f"'{tok.text}'"

    def parse(self) -> list[Constraint]:
        out = [self.constraint()]
        while self.tok.kind == "AND":
            self._advance()
            out.append(self.constraint())
        if self.tok.kind != "END":
            tok = self.tok
            if tok.kind == "LPAREN":
                raise _error(self.text, tok.pos, "unexpected '(': function calls are not allowed")
            raise _error(self.text, tok.pos, f"expected 'and' or the end of the rule, found {self._describe(tok)}")
        return out

    def constraint(self) -> Constraint:
        start = self.tok
        if start.kind != "NAME":
            raise _error(self.text, start.pos, f"a constraint starts with a metric name, found {self._describe(start)}")
        if start.text == "base" or start.text.startswith("base."):
            raise _error(self.text, start.pos, "the left-hand side must be a candidate's metric, not the base",
                         "write the candidate's metric on the left: \"perplexity <= 1.05 * base\"")
        self._advance()
        if self.tok.kind == "LPAREN":
            raise _error(self.text, self.tok.pos, "unexpected '(': function calls are not allowed")
        if self.tok.kind != "CMP":
            raise _error(self.text, self.tok.pos, f"expected one of <=, <, >=, > after '{start.text}', "
                                                  f"found {self._describe(self.tok)}")
        op = self._advance().text
        rhs = self.expr()
        end = self.tok.pos
        return Constraint(start.text, op, rhs, self.text[start.pos:end].strip(), start.pos)

    def expr(self) -> tuple:
        node = self.term()
        while self.tok.kind == "ARITH" and self.tok.text in "+-":
            op = self._advance().text
            node = ("bin", op, node, self.term())
        return node

    def term(self) -> tuple:
        node = self.unary()
        while self.tok.kind == "ARITH" and self.tok.text in "*/":
            op = self._advance().text
            node = ("bin", op, node, self.unary())
        return node

    def unary(self) -> tuple:
        if self.tok.kind == "ARITH" and self.tok.text in "+-":
            tok = self._advance()
            self._enter(tok)
            try:
                inner = self.unary()
            finally:
                self.depth -= 1
            return ("neg", inner) if tok.text == "-" else inner
        return self.atom()

    def _enter(self, tok: _Tok) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _error(self.text, tok.pos, f"nesting deeper than {_MAX_DEPTH} levels")

    def atom(self) -> tuple:
        tok = self.tok
        if tok.kind == "NUM":
            self._advance()
            return ("num", tok.value)
        if tok.kind == "NAME":
            self._advance()
            if self.tok.kind == "LPAREN":
                raise _error(self.text, self.tok.pos, "unexpected '(': function calls are not allowed")
            if tok.text == "base":
                return ("base", None)
            if tok.text.startswith("base."):
                return ("base", tok.text[len("base."):])
            raise _error(self.text, tok.pos, f"'{tok.text}' cannot appear on the right-hand side",
                         f"write 'base' for the base model's value of the constrained metric, or "
                         f"'base.{tok.text}' for the base's {tok.text}")
        if tok.kind == "LPAREN":
            self._advance()
            self._enter(tok)
            node = self.expr()
            self.depth -= 1
            if self.tok.kind != "RPAREN":
                raise _error(self.text, self.tok.pos, f"expected ')', found {self._describe(self.tok)}")
            self._advance()
            return node
        raise _error(self.text, tok.pos, f"expected a number, 'base', 'base.METRIC' or '(', found {self._describe(tok)}")


def parse_constraints(text: str) -> list[Constraint]:
    """Parse ``"CONSTRAINT and CONSTRAINT ..."`` into constraints; RecipeError with the position on any error."""
    if not isinstance(text, str):
        raise RecipeError(f"selection rule: subject_to must be a string, got {type(text).__name__}",
                          "write it as a quoted string: subject_to: \"perplexity <= 1.05 * base\"")
    if len(text) > _MAX_LENGTH:
        raise RecipeError(f"selection rule: subject_to is longer than {_MAX_LENGTH} characters")
    if not text.strip():
        return []
    return _Parser(text).parse()


# ----------------------------------------------------------------------------------------------------------------
# the rule


@dataclass(frozen=True)
class Rule:
    """A parsed selection rule."""

    direction: str  # "minimize" | "maximize"
    objective: str
    constraints: tuple[Constraint, ...] = ()
    subject_to: str = ""

    def metrics(self) -> set[str]:
        """Every metric the rule reads (objective, constrained metrics, base metrics)."""
        out = {self.objective}
        for c in self.constraints:
            out.add(c.metric)
            out |= c.base_metrics()
        return out

    def describe(self) -> str:
        text = f"{self.direction} {self.objective}"
        return f"{text} subject to {self.subject_to}" if self.subject_to else text

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.direction: self.objective}
        if self.subject_to:
            out["subject_to"] = self.subject_to
        return out


_RULE_KEYS = ("minimize", "maximize", "subject_to")


def _check_metric_name(name: Any, key: str) -> str:
    if not isinstance(name, str) or not name:
        raise RecipeError(f"selection rule: '{key}' must name a metric, got {name!r}",
                          f"for example {key}: toxicity.mean")
    text = name.strip()
    toks = _tokenize(text)
    if len(toks) != 2 or toks[0].kind != "NAME" or text in ("base",) or text.startswith("base."):
        raise RecipeError(f"selection rule: '{key}: {name}' is not a metric name",
                          "metric names are letters, digits, dots and underscores, e.g. toxicity.mean")
    return text


def parse_rule(rule: Mapping[str, Any] | Rule) -> Rule:
    """Validate a rule mapping (``{minimize|maximize: METRIC, subject_to: ...}``) into a :class:`Rule`."""
    if isinstance(rule, Rule):
        return rule
    if not isinstance(rule, Mapping):
        raise RecipeError(f"selection rule must be a mapping, got {type(rule).__name__}",
                          "write select: {minimize: toxicity.mean, subject_to: \"perplexity <= 1.05 * base\"}")
    for key in rule:
        if key not in _RULE_KEYS:
            raise RecipeError(f"selection rule: unknown key '{key}'", did_you_mean(str(key), _RULE_KEYS))
    rule = {k: v for k, v in rule.items() if v is not None}  # a resolved recipe may carry 'maximize: null'
    directions = [k for k in ("minimize", "maximize") if k in rule]
    if len(directions) != 1:
        raise RecipeError("selection rule: give exactly one of 'minimize' or 'maximize'",
                          "for example select: {minimize: toxicity.mean}")
    direction = directions[0]
    objective = _check_metric_name(rule[direction], direction)
    raw = rule.get("subject_to") or ""
    if isinstance(raw, (list, tuple)):
        if not all(isinstance(item, str) for item in raw):
            raise RecipeError("selection rule: every item of subject_to must be a string")
        raw = " and ".join(item.strip() for item in raw if item.strip())
    constraints = parse_constraints(raw)
    return Rule(direction, objective, tuple(constraints), raw.strip() if isinstance(raw, str) else "")


# ----------------------------------------------------------------------------------------------------------------
# selection


@dataclass
class Selection:
    """The outcome of applying a rule: ``candidate`` (None when nothing qualifies), why, and the per-candidate table.

    ``table`` has one row per candidate (index) and the columns: the objective metric, each constrained metric,
    one boolean column per constraint (named by its text), ``eligible``, ``satisfies`` and ``selected``.
    ``constraints`` lists each constraint with its bound evaluated on the base.
    """

    candidate: str | None
    reason: str
    table: pd.DataFrame
    rule: Rule
    constraints: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.as_dict(),
            "candidate": self.candidate,
            "reason": self.reason,
            "constraints": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in c.items()} for c in self.constraints],
        }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def _unknown_metric(name: str, columns: Iterable[str], where: str, rule: Rule, position: int | None) -> RecipeError:
    columns = [str(c) for c in columns]
    if position is not None:
        err = _error(rule.subject_to, position, f"unknown metric '{name}'", did_you_mean(name, columns))
        return err
    return RecipeError(f"selection rule: unknown metric '{name}' in {where}", did_you_mean(name, columns))


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def select(metrics_wide: pd.DataFrame, rule: Mapping[str, Any] | Rule, base_candidate: str = "base",
           eligible: Iterable[str] | None = None) -> Selection:
    """Apply ``rule`` to ``metrics_wide`` (index = candidate, columns = metric).

    ``eligible`` lists the candidates that may be selected (default: every row except ``base_candidate``); every
    row still appears in the table. Ties on the objective go to the first candidate in table order. Returns a
    :class:`Selection` whose ``candidate`` is None, with the reason, when no eligible candidate satisfies the rule.
    """
    rule = parse_rule(rule)
    columns = [str(c) for c in metrics_wide.columns]
    # every metric named must exist
    if rule.objective not in columns:
        raise _unknown_metric(rule.objective, columns, f"'{rule.direction}'", rule, None)
    for c in rule.constraints:
        if c.metric not in columns:
            raise _unknown_metric(c.metric, columns, "subject_to", rule, c.position)
        for ref in c.base_metrics():
            if ref not in columns:
                pos = rule.subject_to.find(f"base.{ref}", c.position)
                raise _unknown_metric(ref, columns, "subject_to", rule, pos + len("base.") if pos >= 0 else None)
    index = [str(i) for i in metrics_wide.index]
    if len(set(index)) != len(index):
        raise DataError("selection: the metrics table has duplicate candidates")
    table_in = metrics_wide.copy()
    table_in.index = index
    table_in.columns = columns

    needs_base = any(c.base_metrics() for c in rule.constraints)
    if needs_base and base_candidate not in index:
        raise RecipeError(
            f"selection rule compares with the base, but no candidate '{base_candidate}' was evaluated",
            f"evaluate the base model too, or drop 'base' from subject_to; candidates: {', '.join(index)}")
    base_values = {m: _float(table_in.at[base_candidate, m]) for m in columns} if base_candidate in index else {}

    if eligible is None:
        eligible_list = [c for c in index if c != base_candidate]
    else:
        eligible_list = [str(c) for c in eligible]
        missing = [c for c in eligible_list if c not in index]
        if missing:
            raise DataError(f"selection: eligible candidates {missing} have no metrics",
                            f"candidates with metrics: {', '.join(index)}")
    eligible_set = set(eligible_list)

    constraint_info: list[dict[str, Any]] = []
    bounds: list[float] = []
    names: list[str] = []
    for c in rule.constraints:
        bound = c.bound(base_values)
        bounds.append(bound)
        name = c.text
        while name in names or name in columns:
            name += " "
        names.append(name)
        constraint_info.append({"constraint": c.text, "metric": c.metric, "op": c.op, "bound": bound})

    shown = [rule.objective] + [m for m in dict.fromkeys(c.metric for c in rule.constraints) if m != rule.objective]
    table = pd.DataFrame({m: [_float(table_in.at[i, m]) for i in index] for m in shown}, index=index)
    table.index.name = "candidate"
    passes = []
    for c, bound, name in zip(rule.constraints, bounds, names):
        col = [c.holds(_float(table_in.at[i, c.metric]), bound) for i in index]
        table[name] = col
        passes.append(col)
    satisfies = [all(p[k] for p in passes) for k in range(len(index))]
    table["eligible"] = [i in eligible_set for i in index]
    table["satisfies"] = satisfies

    sign = 1.0 if rule.direction == "minimize" else -1.0
    best: str | None = None
    best_value = math.inf
    qualifying = []
    for k, cand in enumerate(index):
        value = table.at[cand, rule.objective]
        if cand in eligible_set and satisfies[k] and math.isfinite(value):
            qualifying.append(cand)
            if sign * value < best_value:
                best, best_value = cand, sign * value
    table["selected"] = [i == best for i in index]

    word = "lowest" if rule.direction == "minimize" else "highest"
    bound_text = "; ".join(f"{info['constraint']} (bound {_fmt(info['bound'])})" for info in constraint_info)
    n_elig = len(eligible_list)
    if best is not None:
        value = table.at[best, rule.objective]
        reason = f"{best} has the {word} {rule.objective} ({_fmt(value)})"
        if rule.constraints:
            reason += f" among the {len(qualifying)} of {n_elig} eligible candidates that satisfy {bound_text}"
        else:
            reason += f" among the {n_elig} eligible candidates (no constraints)"
        if base_candidate in index and best != base_candidate:
            who = "the base model" if base_candidate == "base" else f"the base model ({base_candidate})"
            reason += f"; {who} has {_fmt(base_values.get(rule.objective))}"
        reason += "."
    elif n_elig == 0:
        reason = "No candidate was eligible for selection."
    else:
        parts = []
        for c, bound, name, info in zip(rule.constraints, bounds, names, constraint_info):
            fails = sum(1 for i in eligible_list if not table.at[i, name])
            if fails:
                extra = " (the bound is undefined: a base value is missing or a division by zero)" \
                    if not math.isfinite(bound) else ""
                parts.append(f"{info['constraint']} (bound {_fmt(bound)}) fails for {fails} of {n_elig}{extra}")
        if parts:
            reason = "No eligible candidate satisfies every constraint: " + "; ".join(parts) + "."
            # the closest miss on a single failing constraint is the most useful pointer
            if len(rule.constraints) == 1 and math.isfinite(bounds[0]):
                c = rule.constraints[0]
                vals = [(abs(_float(table_in.at[i, c.metric]) - bounds[0]), i) for i in eligible_list
                        if math.isfinite(_float(table_in.at[i, c.metric]))]
                if vals:
                    _, near = min(vals)
                    reason += f" Closest: {near} with {c.metric} {_fmt(table_in.at[near, c.metric])}."
        else:
            reason = (f"No eligible candidate has a value for {rule.objective}, so none could be selected.")
    return Selection(best, reason, table, rule, constraint_info)
