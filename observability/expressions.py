"""Read the PromQL out of the observability assets, and the series names out of PromQL.

Standard library and PyYAML only, so tests and scripts can import it without Grafana's SDK:

    dashboard_expressions(path)  every target's `expr` (and every annotation query's) in a Grafana
                                 dashboard JSON, ready to send to Prometheus: template variables
                                 replaced by a value that matches everything
    alert_expressions(path)      every rule's `expr` in a Prometheus rule file (plain `groups:`,
                                 a PrometheusRule object, or a multi-document YAML stream of them)
    series_names(expr)           the metric names an expression reads

Import it by path (`importlib.util.spec_from_file_location`) or, from the repository root, as
`observability.expressions` (a namespace package).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "alert_expressions",
    "dashboard_expressions",
    "series_names",
    "substitute_variables",
]

MATCH_ALL = ".*"

# $name, ${name}, ${name:format}, [[name]], [[name:format]]
_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::[^}]*)?\}"
    r"|\[\[(?P<bracketed>\w+)(?::[^\]]*)?\]\]"
    r"|\$(?P<plain>[A-Za-z_]\w*)"
)
# A label matcher whose value is a template variable: `label="...$var..."` or `label!="..."`.
# Once the variable is `.*` the matcher must be a regex one to keep matching everything.
_EXACT_MATCHER_WITH_VARIABLE = re.compile(
    r"""(?P<label>[A-Za-z_]\w*)\s*(?P<op>!=|=)(?![=~])\s*(?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
)


def substitute_variables(expr: str, value: str = MATCH_ALL, interval: str = "1m", names: set[str] | None = None) -> str:
    """Replace Grafana template variables in `expr`.

    Grafana's interval and range variables (`$__rate_interval`, `$__interval`, `$__range`) become
    `interval`, their `_ms`/`_s` forms the same span as a number; other `$__...` built-ins are left
    alone. Every other variable (only those in `names`, when given) becomes `value` (default `.*`),
    and a `label="$var"` matcher becomes `label=~".*"` (`!=` becomes `!~`) so that the query still
    matches every series. `$1` (a regex group in label_replace) is not a variable.
    """
    seconds = _duration_seconds(interval)
    builtins = {
        "__rate_interval": interval,
        "__interval": interval,
        "__range": interval,
        "__interval_ms": str(int(seconds * 1000)),
        "__range_ms": str(int(seconds * 1000)),
        "__range_s": str(int(seconds)),
    }

    def is_user_variable(name: str) -> bool:
        return not name.startswith("__") and (names is None or name in names)

    def variable_name(match: re.Match[str]) -> str:
        return match.group("braced") or match.group("bracketed") or match.group("plain")

    def regexify(match: re.Match[str]) -> str:
        if not any(is_user_variable(variable_name(m)) for m in _VARIABLE.finditer(match.group("value"))):
            return match.group(0)
        op = "=~" if match.group("op") == "=" else "!~"
        return f"{match.group('label')}{op}{match.group('value')}"

    def replace(match: re.Match[str]) -> str:
        name = variable_name(match)
        if name in builtins:
            return builtins[name]
        if is_user_variable(name):
            return value
        return match.group(0)

    expr = _EXACT_MATCHER_WITH_VARIABLE.sub(regexify, expr)
    return _VARIABLE.sub(replace, expr)


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------- dashboards


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for child in node.values():
            yield from _walk(child)
    elif isinstance(node, list):
        for child in node:
            yield from _walk(child)


def dashboard_expressions(
    path: str | Path, *, value: str = MATCH_ALL, interval: str = "1m", raw: bool = False
) -> list[str]:
    """Every `expr` of every panel target (rows' nested panels included) and annotation query.

    The file may be a dashboard or an API envelope (`{"dashboard": {...}}`). Variables defined in
    the dashboard's templating list are replaced by `value` and the interval variables by
    `interval` (see substitute_variables); `raw=True` leaves the expressions as written. Order is
    document order; duplicates are kept.
    """
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    names: set[str] = set()
    found: list[str] = []
    for node in _walk(document):
        templating = node.get("templating")
        if isinstance(templating, dict) and isinstance(templating.get("list"), list):
            names.update(
                v["name"] for v in templating["list"] if isinstance(v, dict) and isinstance(v.get("name"), str)
            )
        queries: list[Any] = []
        targets = node.get("targets")
        if isinstance(targets, list):
            queries.extend(targets)
        annotations = node.get("annotations")
        if isinstance(annotations, dict) and isinstance(annotations.get("list"), list):
            queries.extend(annotations["list"])
        for query in queries:
            if isinstance(query, dict) and isinstance(query.get("expr"), str) and query["expr"].strip():
                found.append(query["expr"])
    if raw:
        return found
    return [substitute_variables(expr, value, interval, names) for expr in found]


# --------------------------------------------------------------------------- rule files


def _rule_groups(document: Any) -> list[Any]:
    if not isinstance(document, dict):
        return []
    if isinstance(document.get("groups"), list):
        return document["groups"]
    spec = document.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("groups"), list):  # a PrometheusRule object
        return spec["groups"]
    if document.get("kind") == "List" and isinstance(document.get("items"), list):
        return [group for item in document["items"] for group in _rule_groups(item)]
    return []


def alert_expressions(path: str | Path, *, include_records: bool = True) -> list[str]:
    """Every rule's `expr` in a rule file: alerting rules, and recording rules unless told not to."""
    found: list[str] = []
    with Path(path).open(encoding="utf-8") as handle:
        for document in yaml.safe_load_all(handle):
            for group in _rule_groups(document):
                for rule in (group or {}).get("rules") or []:
                    if not isinstance(rule, dict) or "expr" not in rule:
                        continue
                    if "record" in rule and not include_records:
                        continue
                    expr = rule["expr"]
                    found.append(str(expr).strip())
    return found


# --------------------------------------------------------------------------- PromQL

_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "atan2", "inf", "nan",
} | _AGGREGATIONS  # fmt: skip

# Strings (three quote styles) and comments, in one pass so a `#` inside a string stays text.
_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`|#[^\n]*')
_NAME_MATCHER = re.compile(r"\b__name__\s*=(?![=~])\s*\x00(\d+)\x00")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_TOKEN = re.compile(
    r"(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:[a-zA-Z]+\d*)*)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
)


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    if literal[0] == "`":
        return body
    return re.sub(r"\\(.)", r"\1", body)


def series_names(expr: str) -> set[str]:
    """The metric names `expr` selects.

    Skips functions and aggregation operators (anything followed by `(`), keywords, label names
    inside `{...}` and in `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` lists, strings,
    comments, numbers and durations. `{__name__="x"}` counts as `x`; a regex on `__name__` names
    nothing. A histogram's `_bucket`/`_sum`/`_count` series are returned as written.
    """
    strings: list[str] = []

    def stash(match: re.Match[str]) -> str:
        token = match.group(0)
        if token.startswith("#"):
            return " "
        strings.append(_unquote(token))
        return f"\x00{len(strings) - 1}\x00"

    text = _STRING_OR_COMMENT.sub(stash, expr)
    names = {strings[int(index)] for index in _NAME_MATCHER.findall(text)}
    # Drop what sits in braces (label matchers), in brackets (ranges, subqueries), the grouping
    # label lists and the stashed strings; what is left is names, numbers, operators and calls.
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\x00\d+\x00", " ", text)
    for match in _TOKEN.finditer(text):
        name = match.group("ident")
        if name is None:  # a number or a duration
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names
