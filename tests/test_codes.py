"""One registry of error codes: what a client gets, what metrics record, and what the README says agree."""

from __future__ import annotations

import re
from pathlib import Path

from extproc import codes, errors

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_constructor_answers_with_its_registered_status_and_outcome() -> None:
    made = [
        errors.invalid_request("x"),
        errors.invalid_request("x", kind=codes.INVALID_JSON),
        errors.model_not_found("m"),
        errors.unsupported_endpoint("x"),
        errors.model_not_allowed("m"),
        errors.body_too_large(1),
        errors.unsupported_media_type("text/plain"),
        errors.method_not_allowed("GET", "/"),
        errors.unauthorized("x"),
        errors.quota_store_unavailable(),
        errors.shed("interactive", "b", 1000, {}),
        errors.shed("batch", "b", 1000, {}),
        errors.internal_error("x"),
    ]
    for error in made:
        registered = codes.REGISTRY[error.reason]
        assert error.status == registered.status
        assert error.kind.outcome == registered.outcome
    assert errors.invalid_request("x").code is None  # OpenAI's plain validation errors carry `code: null`


def test_rule_codes_take_their_outcome_from_their_status() -> None:
    assert errors.rule_code(400, "prompt_too_long").outcome == "invalid"
    assert errors.rule_code(403, "no_batch_here").outcome == "forbidden"
    assert errors.rule_code(429, "slow_down").outcome == "rate_limited"
    assert errors.rule_code(503, "maintenance").outcome == "unavailable"


def test_upstream_statuses_map_to_outcomes() -> None:
    assert [codes.outcome_for_status(s) for s in (200, 400, 401, 403, 408, 429, 500, 503, 504)] == [
        "ok",
        "invalid",
        "unauthorized",
        "forbidden",
        "timeout",
        "rate_limited",
        "upstream_error",
        "upstream_error",
        "timeout",
    ]


def test_the_readme_error_table_lists_every_code_with_its_status() -> None:
    text = README.read_text()
    table = text[text.index("### Errors") :]
    table = table[: table.index("\n## ")]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].isdigit():
            for code in re.findall(r"`([a-z_]+)`", re.sub(r"\(.*?\)", "", cells[1])):
                rows[code] = int(cells[0])
    documented = {code: status for code, status in rows.items() if code != "null"}
    registered = {c.code: c.status for c in codes.REGISTRY.values() if c.body_code}
    assert documented == registered
