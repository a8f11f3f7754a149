"""The ext_proc filter the gateway expects from Envoy: the one source of its shape.

Processing modes, `allow_mode_override`, the failure mode, the message timeout, the listener
buffer and Envoy's own error replies are decided here. Everything that configures an Envoy for
the gateway is rendered from these functions: the local stack's bootstrap
(`extproc_dev.envoy_config`), the compose stack's `docker/envoy.yaml` and the mesh's
EnvoyFilters (`mesh/base/gateway/envoyfilter.yaml`); tests hold each of them equal to it. The
replies that switch a response's body mode (`mode_override`) live here too, since they only
work with the modes and `allow_mode_override` set below.

Failure mode: closed. `failure_mode_allow: false` because the gateway is what enforces
authentication, quotas and the token caps; failing open would hand an unauthenticated, unlimited
path to the GPUs whenever the gateway is down, and no routing header would be set either. A
client instead gets a 503 in the OpenAI error shape (`status_on_error` + the local reply mapper
below), which the OpenAI SDKs retry.
"""

from __future__ import annotations

from typing import Any, Final

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import names, wire
from extproc.core import BodyMode
from extproc.policy import Policy

FILTER_NAME: Final = "envoy.filters.http.ext_proc"
FILTER_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
ROUTER_FILTER: Final = "envoy.filters.http.router"
HCM_FILTER: Final = "envoy.filters.network.http_connection_manager"
HCM_TYPE: Final = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

# Headers are sent so /v1/models and non-inference paths are answered or waved through early;
# the request body is BUFFERED so routing can depend on it (header mutation + clear_route_cache
# in the body reply); the response body mode is chosen per response with `mode_override`.
PROCESSING_MODE: Final = {
    "request_header_mode": "SEND",
    "request_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SEND",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}
ALLOW_MODE_OVERRIDE: Final = True
FAILURE_MODE_ALLOW: Final = False
# What Envoy answers when the gateway cannot be reached or breaks the protocol. Envoy's default is
# a bare 500; its ext_proc errors carry no response flag, so nothing would tell them from the
# gateway's own 503s (immediate responses are local replies too). They get a status that no
# reply of the gateway uses instead, which the local reply mapper turns into the client's JSON
# 503. A message timeout is always Envoy's 504, which the gateway's replies never use either
# (policy rules may not reject with these: `RESERVED_STATUSES`).
STATUS_ON_ERROR: Final = 506
GATEWAY_UNAVAILABLE_STATUS: Final = 503
RESERVED_STATUSES: Final = frozenset({504, STATUS_ON_ERROR})
# How soon a client may retry when the gateway is unreachable (OpenAI SDKs honour retry-after).
GATEWAY_RETRY_AFTER_S: Final = 1
# The gRPC stream's own deadline is not a request deadline for ext_proc (streams live as long as
# their request); the per-message timeout below is what bounds the gateway's answers.
GRPC_TIMEOUT: Final = "30s"
# BUFFERED request bodies live in the listener's per-connection buffer: it must hold the largest
# body the policy accepts, plus the request head.
BUFFER_HEADROOM_BYTES: Final = 64 << 10
MIN_MESSAGE_TIMEOUT_MS: Final = 2000

_Mode = processing_mode_pb2.ProcessingMode
RESPONSE_BODY_MODES: Final = {
    BodyMode.STREAMED: _Mode(response_body_mode=_Mode.STREAMED, response_trailer_mode=_Mode.SKIP),
    # BUFFERED_PARTIAL: a JSON body over Envoy's buffer limit is passed on rather than failed with 500.
    BodyMode.BUFFERED: _Mode(response_body_mode=_Mode.BUFFERED_PARTIAL, response_trailer_mode=_Mode.SKIP),
}
# The `mode_override` field that switches the body mode, and the plain response-headers reply
# carrying it, serialized once.
MODE_OVERRIDES: Final = {mode: wire.mode_override(override) for mode, override in RESPONSE_BODY_MODES.items()}
RESPONSE_HEADERS_WITH_MODE: Final = {
    mode: pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString() + field
    for mode, field in MODE_OVERRIDES.items()
}


def message_timeout_ms(policy: Policy) -> int:
    """Envoy's per-message ext_proc timeout for a policy: it must outlast the admission queue's wait.

    The reply to the request body is sent only when the request leaves the queue, so a message
    timeout at or below `queue.max_wait_ms` would turn every queued request into Envoy's 504.
    One second on top covers counting a long prompt; 2 s is the floor.
    """
    return max(MIN_MESSAGE_TIMEOUT_MS, policy.queue.max_wait_ms + 1000)


def listener_buffer_limit(max_body_bytes: int) -> int:
    return max_body_bytes + BUFFER_HEADROOM_BYTES


def ext_proc_filter(cluster_name: str, timeout_ms: int) -> dict[str, Any]:
    """The HTTP filter entry (name + typed_config) that goes right before the router."""
    return {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": FILTER_TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}, "timeout": GRPC_TIMEOUT},
            "failure_mode_allow": FAILURE_MODE_ALLOW,
            "status_on_error": {"code": STATUS_ON_ERROR},
            "message_timeout": f"{timeout_ms / 1000}s",
            "allow_mode_override": ALLOW_MODE_OVERRIDE,
            "response_attributes": list(names.VERSION_ATTRIBUTES),
            "processing_mode": dict(PROCESSING_MODE),
        },
    }


def _error_mapper(
    status: int,
    message: str,
    type_: str,
    code: str,
    flags: list[str] | None = None,
    *,
    rewrite_to: int | None = None,
    retry_after_s: int | None = None,
) -> dict[str, Any]:
    value = {"default_value": status, "runtime_key": f"extproc_local_reply_{status}"}
    status_filter = {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}
    the_filter: dict[str, Any] = status_filter
    if flags:
        the_filter = {"and_filter": {"filters": [status_filter, {"response_flag_filter": {"flags": flags}}]}}
    mapper: dict[str, Any] = {"filter": the_filter}
    if rewrite_to is not None:
        mapper["status_code"] = rewrite_to
    if retry_after_s is not None:
        mapper["headers_to_add"] = [
            {
                "header": {"key": names.RETRY_AFTER, "value": str(retry_after_s)},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    mapper["body_format_override"] = {
        "json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}},
        "content_type": names.JSON_CONTENT_TYPE,
    }
    return mapper


def local_reply_config(max_body_bytes: int) -> dict[str, Any]:
    """Envoy's own error replies in the OpenAI error shape, so SDKs parse them.

    Local replies are also how the gateway's own refusals leave Envoy (ext_proc immediate
    responses), so every mapper names the response flags that tell Envoy's errors apart from
    ours: a mapper without flags would overwrite the gateway's own 503 and 504 bodies.
    """
    return {
        "mappers": [
            # The gateway's own 413 has the same text; this one covers bodies without content-length.
            _error_mapper(
                413,
                f"Request body exceeds the gateway's limit of {max_body_bytes} bytes.",
                "invalid_request_error",
                "request_too_large",
            ),
            _error_mapper(
                503,
                "The model backend is unavailable.",
                "server_error",
                "backend_unavailable",
                ["UH", "UF", "UO", "URX", "NR"],
            ),
            _error_mapper(504, "The model backend timed out.", "server_error", "backend_timeout", ["UT"]),
            # The gateway itself: unreachable, or broke the protocol (STATUS_ON_ERROR) ...
            _error_mapper(
                STATUS_ON_ERROR,
                "The LLM gateway is unavailable; retry shortly.",
                "server_error",
                "gateway_unavailable",
                rewrite_to=GATEWAY_UNAVAILABLE_STATUS,
                retry_after_s=GATEWAY_RETRY_AFTER_S,
            ),
            # ... or too slow to answer a message (Envoy's message_timeout).
            _error_mapper(504, "The LLM gateway timed out deciding on the request.", "server_error", "gateway_timeout"),
        ]
    }
