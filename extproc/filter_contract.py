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

from extproc import errors, names, wire
from extproc.codes import Outcome
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
# 503. A message timeout is always Envoy's 504, which the gateway's replies never use either; and
# Envoy's own 413 takes the gateway's 413 text (policy rules may reject with none of these:
# `RESERVED_STATUSES`).
STATUS_ON_ERROR: Final = 506
GATEWAY_UNAVAILABLE_STATUS: Final = 503
RESERVED_STATUSES: Final = frozenset({413, 504, STATUS_ON_ERROR})
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
CONTINUE_RESPONSE_HEADERS: Final = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()
RESPONSE_HEADERS_WITH_MODE: Final = {mode: CONTINUE_RESPONSE_HEADERS + field for mode, field in MODE_OVERRIDES.items()}


def message_timeout_ms(policy: Policy) -> int:
    """Envoy's per-message ext_proc timeout for a policy: it must outlast the admission queue's wait.

    The reply to the request body is sent only when the request leaves the queue, so a message
    timeout at or below `queue.max_wait_ms` would turn every queued request into Envoy's 504.
    One second on top covers counting a long prompt; 2 s is the floor.
    """
    return max(MIN_MESSAGE_TIMEOUT_MS, policy.queue.max_wait_ms + 1000)


def listener_buffer_limit(max_body_bytes: int) -> int:
    return max_body_bytes + BUFFER_HEADROOM_BYTES


def ext_proc_filter(cluster_name: str, timeout_ms: int, *, scoped: bool = False) -> dict[str, Any]:
    """The HTTP filter entry (name + typed_config) that goes right before the router.

    `scoped`: off by default, on only where a route or virtual host enables it (`ENABLED_HERE`).
    A mesh listener is shared by every service on its port (a sidecar's outbound `0.0.0.0_8000`
    carries all of the mesh's port-8000 HTTP traffic), so the gateway must see the LLM host's
    requests only: no other service's body rewritten, none failed when the gateway is down.
    """
    entry: dict[str, Any] = {"name": FILTER_NAME}
    if scoped:
        entry["disabled"] = True
    return entry | {
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


# A virtual host's (or route's) `typed_per_filter_config` that turns a scoped filter on there.
PER_ROUTE_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
ENABLED_HERE: Final = {FILTER_NAME: {"@type": PER_ROUTE_TYPE, "overrides": {}}}


def _status_is(status: int) -> dict[str, Any]:
    value = {"default_value": status, "runtime_key": f"extproc_local_reply_{status}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _error_mapper(
    status: int,
    message: str,
    type_: str,
    code: str,
    *,
    flags: list[str] | None = None,
    authorities: str | None = None,
    rewrite_to: int | None = None,
    retry_after_s: int | None = None,
) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = [_status_is(status)]
    if flags:
        conditions.append({"response_flag_filter": {"flags": flags}})
    if authorities is not None:
        # Mappers apply to the whole connection manager: on a shared listener, only the LLM host's
        # replies are rewritten (the request's :authority; another service keeps Envoy's own replies).
        matcher = {"name": ":authority", "string_match": {"safe_regex": {"regex": authorities}}}
        conditions.append({"header_filter": {"header": matcher}})
    the_filter = conditions[0] if len(conditions) == 1 else {"and_filter": {"filters": conditions}}
    mapper: dict[str, Any] = {"filter": the_filter}
    if rewrite_to is not None:
        mapper["status_code"] = rewrite_to
    if retry_after_s is not None:
        header = {"key": names.RETRY_AFTER, "value": str(retry_after_s)}
        mapper["headers_to_add"] = [{"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    mapper["body_format_override"] = {
        "json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}},
        "content_type": names.JSON_CONTENT_TYPE,
    }
    return mapper


def local_reply_config(max_body_bytes: int, *, authorities: str | None = None) -> dict[str, Any]:
    """Envoy's own error replies in the OpenAI error shape, so SDKs parse them.

    Local replies are also how the gateway's own refusals leave Envoy (ext_proc immediate
    responses), so no mapper may match one of those: Envoy's upstream errors are told apart by
    their response flags, the gateway's own failures by statuses no gateway reply uses
    (`RESERVED_STATUSES`); the 413 has the gateway's own text. `authorities`: an RE2 regex of
    the `:authority` values the mappers apply to (a listener shared with other services).
    """
    too_large = errors.body_too_large(max_body_bytes)
    return {
        "mappers": [
            # Envoy's own 413 (a body without content-length over the listener's buffer) reads as the gateway's.
            _error_mapper(
                too_large.status, too_large.message, too_large.type, too_large.reason, authorities=authorities
            ),
            _error_mapper(
                503,
                "The model backend is unavailable.",
                "server_error",
                "backend_unavailable",
                flags=["UH", "UF", "UO", "URX", "NR"],
                authorities=authorities,
            ),
            _error_mapper(
                504,
                "The model backend timed out.",
                "server_error",
                "backend_timeout",
                flags=["UT"],
                authorities=authorities,
            ),
            # The gateway itself: unreachable, or broke the protocol (STATUS_ON_ERROR) ...
            _error_mapper(
                STATUS_ON_ERROR,
                "The LLM gateway is unavailable; retry shortly.",
                "server_error",
                "gateway_unavailable",
                rewrite_to=GATEWAY_UNAVAILABLE_STATUS,
                retry_after_s=GATEWAY_RETRY_AFTER_S,
                authorities=authorities,
            ),
            # ... or too slow to answer a message (Envoy's message_timeout).
            _error_mapper(
                504,
                "The LLM gateway timed out deciding on the request.",
                "server_error",
                "gateway_timeout",
                authorities=authorities,
            ),
        ]
    }


# How a stream ended, as Envoy's access log tells it. The ext_proc stream ends the same way for a
# client that hung up and for an upstream that reset mid-response (Envoy cancels it), so Envoy
# reports such ends over gRPC (its HTTP access log service) to the gateway's own port, where
# `extproc.stream_ends` takes them. Flags in order of precedence: an upstream reset outranks the
# downstream reset Envoy then causes. Each: Envoy's short name (the access log filter), the field
# of `envoy.data.accesslog.v3.ResponseFlags` it sets, and the outcome the request gets.
STREAM_END_LOG_NAME: Final = "extproc-stream-ends"
STREAM_END_FLAGS: Final[tuple[tuple[str, str, Outcome], ...]] = (
    ("UR", "upstream_remote_reset", "upstream_error"),
    ("UC", "upstream_connection_termination", "upstream_error"),
    ("UPE", "upstream_protocol_error", "upstream_error"),
    ("UT", "upstream_request_timeout", "timeout"),
    ("UMSDR", "upstream_max_stream_duration_reached", "timeout"),
    ("SI", "stream_idle_timeout", "timeout"),
    ("DT", "duration_timeout", "timeout"),
    ("DC", "downstream_connection_termination", "cancelled"),
    ("DR", "downstream_remote_reset", "cancelled"),
)
NO_STREAM_END_REPORT: Final = "none"  # the metric label of a cut stream no report came for
ACCESS_LOGGER: Final = "envoy.access_loggers.http_grpc"
ACCESS_LOGGER_TYPE: Final = "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"


def stream_end_log(cluster_name: str, backend_header: str) -> dict[str, Any]:
    """The connection manager's access log entry that reports cut streams to the gateway.

    Only requests the gateway routed (they carry its routing header) and only ends with one of
    `STREAM_END_FLAGS`: a handful of entries, never the traffic. Sent one by one as they happen
    (`buffer_size_bytes: 0`), since the gateway holds the request's outcome until one arrives.
    """
    flags = [short for short, _field, _outcome in STREAM_END_FLAGS]
    routed = {"header": {"name": backend_header, "present_match": True}}
    return {
        "name": ACCESS_LOGGER,
        "filter": {"and_filter": {"filters": [{"response_flag_filter": {"flags": flags}}, {"header_filter": routed}]}},
        "typed_config": {
            "@type": ACCESS_LOGGER_TYPE,
            "common_config": {
                "log_name": STREAM_END_LOG_NAME,
                "transport_api_version": "V3",
                # No timeout: one long-lived stream per Envoy worker thread.
                "grpc_service": {"envoy_grpc": {"cluster_name": cluster_name}},
                "buffer_size_bytes": 0,
            },
        },
    }
