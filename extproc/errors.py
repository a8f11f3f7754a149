"""OpenAI-shaped client errors.

A `GatewayError` carries everything the adapter needs to send an immediate
response: status, the `{"error": {...}}` body, and extra headers.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from extproc import codes, names
from extproc.codes import ErrorCode


class GatewayError(Exception):
    """A request the gateway refuses, with the status and body a client should see.

    `kind` is its entry in the code registry: the status, the body's `type` and `code`, and the
    outcome and reason the metrics record all derive from it.
    """

    def __init__(
        self,
        kind: ErrorCode,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = kind.status
        self.message = message
        self.type = type or kind.type
        self.code = kind.code if kind.body_code else None
        self.param = param
        self.headers = headers or {}

    @property
    def reason(self) -> str:
        return self.kind.code

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        }
        return orjson.dumps(payload)


def invalid_request(message: str, param: str | None = None, kind: ErrorCode = codes.INVALID_REQUEST) -> GatewayError:
    return GatewayError(kind, message, param=param)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        codes.MODEL_NOT_FOUND, f"The model `{model}` does not exist or you do not have access to it.", param="model"
    )


def unsupported_endpoint(message: str) -> GatewayError:
    return GatewayError(codes.UNSUPPORTED_ENDPOINT, message, param="model")


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(
        codes.MODEL_NOT_ALLOWED, f"Your organization does not have access to model `{model}`.", param="model"
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(codes.REQUEST_TOO_LARGE, f"Request body exceeds the gateway's limit of {limit} bytes.")


def unsupported_media_type(content_type: str) -> GatewayError:
    return GatewayError(
        codes.UNSUPPORTED_MEDIA_TYPE,
        f"Unsupported content type {content_type!r}: send the request body as application/json.",
    )


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(codes.METHOD_NOT_ALLOWED, f"Method {method} is not allowed on {path}.")


def unauthorized(message: str) -> GatewayError:
    return GatewayError(codes.INVALID_API_KEY, message)


def quota_store_unavailable() -> GatewayError:
    return GatewayError(codes.QUOTA_STORE_UNAVAILABLE, "The quota service is unavailable; please retry shortly.")


def retry_headers(wait_ms: int) -> dict[str, str]:
    """retry-after (whole seconds, at least 1) and retry-after-ms, as openai-python reads them."""
    return {names.RETRY_AFTER: str(max(1, math.ceil(wait_ms / 1000))), names.RETRY_AFTER_MS: str(wait_ms)}


def shed(
    traffic_class: str, backend: str, wait_ms: int, headers: dict[str, str], reason: str = "saturated"
) -> GatewayError:
    """Load shedding. Lower classes get 429: our priority policy refused them. Interactive traffic gets
    503: the service itself is overloaded. Both carry retry-after(-ms), which openai-python honours."""
    why = "is saturated" if reason == "saturated" else "has no room in its admission queue"
    if reason == "queue_timeout":
        why = "did not free a slot in time"
    if traffic_class == "interactive":
        return GatewayError(
            codes.BACKEND_OVERLOADED,
            f"The model backend {why}; please retry in {math.ceil(wait_ms / 1000)}s.",
            headers=headers,
        )
    return GatewayError(
        codes.SHED,
        f"The model backend {why} and {traffic_class} traffic is being shed; please retry in "
        f"{math.ceil(wait_ms / 1000)}s.",
        headers=headers,
    )


def rule_rejection(kind: ErrorCode, message: str) -> GatewayError:
    """A `routing.rules[].reject`: its code was registered when the policy compiled (`rule_code`)."""
    return GatewayError(kind, message)


def rule_code(status: int, code: str) -> ErrorCode:
    """The registry entry of a policy rule's own code (a code of ours keeps its meaning)."""
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return ErrorCode(code, status, error_type, codes.outcome_of(code, status))


def internal_error(message: str) -> GatewayError:
    return GatewayError(codes.INTERNAL_ERROR, message)
