"""One registry of error codes: what a client gets, what metrics record, and what the README says agree."""

from __future__ import annotations

import re
from pathlib import Path

from extproc import codes, errors

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_constructor_answers_with_the_status_code_and_outcome_a_client_and_a_dashboard_expect() -> None:
    expected = [
        (errors.invalid_request("x"), 400, None, "invalid"),
        (errors.invalid_request("x", kind=codes.INVALID_JSON), 400, "invalid_json", "invalid"),
        (errors.model_not_found("m"), 404, "model_not_found", "invalid"),
        (errors.unsupported_endpoint("x"), 400, "unsupported_endpoint", "invalid"),
        (errors.model_not_allowed("m"), 403, "model_not_allowed", "forbidden"),
        (errors.body_too_large(1), 413, "request_too_large", "invalid"),
        (errors.unsupported_media_type("text/plain"), 415, "unsupported_media_type", "invalid"),
        (errors.method_not_allowed("GET", "/"), 405, "method_not_allowed", "invalid"),
        (errors.unauthorized("x"), 401, "invalid_api_key", "unauthorized"),
        (errors.quota_store_unavailable(), 503, "quota_store_unavailable", "unavailable"),
        (errors.shed("interactive", "b", 1000, {}), 503, "backend_overloaded", "shed"),
        (errors.shed("batch", "b", 1000, {}), 429, "shed", "shed"),
        (errors.internal_error("x"), 500, "internal_error", "internal_error"),
    ]
    for error, status, body_code, outcome in expected:
        assert (error.status, error.code, error.kind.outcome) == (status, body_code, outcome), error.reason
        assert error.reason in codes.REGISTRY  # the metrics' reason label is a registered code
    assert errors.invalid_request("x").reason == "invalid_request"  # `code: null` in the body, a named reason


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
