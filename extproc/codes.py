"""Every error code the gateway answers with, and what it means for metrics: one registry.

A refusal's status, OpenAI `type`, the `outcome` label of `extproc_requests_total` and the
`reason` label of `extproc_rejections_total` all come from here, so a new code cannot be
exported as something else by accident. Policy rules bring their own codes
(`routing.rules[].reject.code`); those take their outcome from their status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Outcome = Literal[
    "ok",
    "invalid",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "quota_exhausted",
    "shed",
    "upstream_error",
    "timeout",
    "cancelled",
    "unavailable",
    "internal_error",
]
OUTCOMES: Final[tuple[Outcome, ...]] = Outcome.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str  # the `code` field of the error body; also the rejection reason
    status: int
    type: str  # OpenAI's `type` field
    outcome: Outcome
    body_code: bool = True  # False: the body says `"code": null`, as OpenAI does for plain validation errors


INVALID_REQUEST: Final = ErrorCode("invalid_request", 400, "invalid_request_error", "invalid", body_code=False)
INVALID_JSON: Final = ErrorCode("invalid_json", 400, "invalid_request_error", "invalid")
UNSUPPORTED_ENDPOINT: Final = ErrorCode("unsupported_endpoint", 400, "invalid_request_error", "invalid")
PROMPT_TOO_LONG: Final = ErrorCode("prompt_too_long", 400, "invalid_request_error", "invalid")
MAX_TOKENS_EXCEEDED: Final = ErrorCode("max_tokens_exceeded", 400, "invalid_request_error", "invalid")
CONTEXT_LENGTH_EXCEEDED: Final = ErrorCode("context_length_exceeded", 400, "invalid_request_error", "invalid")
INVALID_API_KEY: Final = ErrorCode("invalid_api_key", 401, "invalid_request_error", "unauthorized")
MODEL_NOT_ALLOWED: Final = ErrorCode("model_not_allowed", 403, "invalid_request_error", "forbidden")
MODEL_NOT_FOUND: Final = ErrorCode("model_not_found", 404, "invalid_request_error", "invalid")
METHOD_NOT_ALLOWED: Final = ErrorCode("method_not_allowed", 405, "invalid_request_error", "invalid")
REQUEST_TOO_LARGE: Final = ErrorCode("request_too_large", 413, "invalid_request_error", "invalid")
UNSUPPORTED_MEDIA_TYPE: Final = ErrorCode("unsupported_media_type", 415, "invalid_request_error", "invalid")
RATE_LIMIT_EXCEEDED: Final = ErrorCode("rate_limit_exceeded", 429, "requests", "rate_limited")
INSUFFICIENT_QUOTA: Final = ErrorCode("insufficient_quota", 429, "insufficient_quota", "quota_exhausted")
SHED: Final = ErrorCode("shed", 429, "requests", "shed")
INTERNAL_ERROR: Final = ErrorCode("internal_error", 500, "server_error", "internal_error")
QUOTA_STORE_UNAVAILABLE: Final = ErrorCode("quota_store_unavailable", 503, "server_error", "unavailable")
BACKEND_OVERLOADED: Final = ErrorCode("backend_overloaded", 503, "server_error", "shed")

REGISTRY: Final[dict[str, ErrorCode]] = {
    c.code: c
    for c in (
        INVALID_REQUEST,
        INVALID_JSON,
        UNSUPPORTED_ENDPOINT,
        PROMPT_TOO_LONG,
        MAX_TOKENS_EXCEEDED,
        CONTEXT_LENGTH_EXCEEDED,
        INVALID_API_KEY,
        MODEL_NOT_ALLOWED,
        MODEL_NOT_FOUND,
        METHOD_NOT_ALLOWED,
        REQUEST_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        RATE_LIMIT_EXCEEDED,
        INSUFFICIENT_QUOTA,
        SHED,
        INTERNAL_ERROR,
        QUOTA_STORE_UNAVAILABLE,
        BACKEND_OVERLOADED,
    )
}

OTHER: Final = "other"


def outcome_for_status(status: int) -> Outcome:
    """The outcome of a status that carries no code of ours: a rule's rejection or the upstream's answer."""
    if status < 400:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 403:
        return "forbidden"
    if status in (408, 504):
        return "timeout"
    if status == 429:
        return "rate_limited"
    if status < 500:
        return "invalid"
    return "upstream_error"


def upstream_outcome(status: int) -> Outcome:
    """The outcome of an upstream's error status. Its 429 is the backend refusing, not a tenant's
    limit, so it is an upstream error; its other 4xx say the request was invalid after all."""
    if status == 429:
        return "upstream_error"
    return outcome_for_status(status)


def outcome_of(code: str, status: int) -> Outcome:
    known = REGISTRY.get(code)
    if known is not None:
        return known.outcome
    # A policy rule's own code: its status says what kind of refusal it is; a 5xx rule is the
    # operator making a backend unavailable, not the upstream failing.
    outcome = outcome_for_status(status)
    return "unavailable" if outcome in ("upstream_error", "timeout") else outcome
