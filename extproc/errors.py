"""OpenAI-shaped client errors.

A `GatewayError` carries everything the adapter needs to send an immediate
response: status, the `{"error": {...}}` body, and extra headers.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from extproc import names


class GatewayError(Exception):
    """A request the gateway refuses, with the status and body a client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        }
        return orjson.dumps(payload)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unsupported_endpoint(message: str) -> GatewayError:
    return GatewayError(400, message, param="model", code="unsupported_endpoint")


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(
        403,
        f"Your organization does not have access to model `{model}`.",
        param="model",
        code="model_not_allowed",
    )


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body exceeds the gateway's limit of {limit} bytes.", code="request_too_large")


def unsupported_media_type(content_type: str) -> GatewayError:
    return GatewayError(
        415,
        f"Unsupported content type {content_type!r}: send the request body as application/json.",
        code="unsupported_media_type",
    )


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(405, f"Method {method} is not allowed on {path}.", code="method_not_allowed")


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key")


def quota_store_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "The quota service is unavailable; please retry shortly.",
        type="server_error",
        code="quota_store_unavailable",
    )


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
            503,
            f"The model backend {why}; please retry in {math.ceil(wait_ms / 1000)}s.",
            type="server_error",
            code="backend_overloaded",
            headers=headers,
        )
    return GatewayError(
        429,
        f"The model backend {why} and {traffic_class} traffic is being shed; please retry in "
        f"{math.ceil(wait_ms / 1000)}s.",
        type="requests",
        code="shed",
        headers=headers,
    )


def rule_rejection(status: int, code: str, message: str) -> GatewayError:
    return GatewayError(status, message, type="invalid_request_error" if status < 500 else "server_error", code=code)
