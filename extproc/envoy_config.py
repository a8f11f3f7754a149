"""Envoy bootstrap for local runs: the same filter shape the mesh EnvoyFilter installs.

ext_proc sits before the router; one route per backend matches the routing header
the gateway sets; anything else goes to the default backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from extproc import names
from extproc.policy import Policy


@dataclass(frozen=True)
class Upstream:
    name: str  # the routing header value (the subset)
    port: int
    host: str = "127.0.0.1"
    # Endpoint metadata as Istio's EDS gives it (`istio.workload`: NAME;NAMESPACE;SERVICE;REVISION;CLUSTER),
    # so the local stack can show the version read from Envoy's upstream host attributes.
    workload: str | None = None


@dataclass(frozen=True)
class EnvoySetup:
    listen_port: int
    admin_port: int
    upstreams: list[Upstream]
    extproc_port: int | None = None  # None: no ext_proc filter at all (the physical floor)
    # More ext_proc replicas behind the same cluster (round robin), as in a multi-replica deployment.
    extra_extproc_ports: tuple[int, ...] = ()
    backend_header: str = "x-llm-backend"
    max_body_bytes: int = 1 << 20
    message_timeout_ms: int = 2000
    host: str = "127.0.0.1"
    # Streams per HTTP/2 connection to the ext_proc; 0: unlimited (one connection per Envoy worker).
    # Envoy ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS (envoyproxy/envoy#13933), so this is
    # the only way to make it open several connections, which SO_REUSEPORT workers need to share load.
    extproc_streams_per_connection: int = 0


def message_timeout_ms(policy: Policy) -> int:
    """Envoy's per-message ext_proc timeout for a policy: it must outlast the admission queue's wait.

    The reply to the request body is sent only when the request leaves the queue, so a message
    timeout at or below `queue.max_wait_ms` would turn every queued request into Envoy's 504.
    One second on top covers counting a long prompt; 2 s is the floor the local stack always had.
    """
    return max(2000, policy.queue.max_wait_ms + 1000)


def _cluster(
    name: str, host: str, ports: list[int], http2: bool = False, streams: int = 0, workload: str | None = None
) -> dict[str, Any]:
    endpoints: list[dict[str, Any]] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}} for port in ports
    ]
    if workload is not None:
        for endpoint in endpoints:
            endpoint["metadata"] = {"filter_metadata": {"istio": {"workload": workload}}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"max_concurrent_streams": streams} if streams else {}
                },
            }
        }
    return cluster


def _ext_proc_filter(setup: EnvoySetup) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "30s"},
            "failure_mode_allow": False,
            "message_timeout": f"{setup.message_timeout_ms / 1000}s",
            "allow_mode_override": True,
            "response_attributes": list(names.VERSION_ATTRIBUTES),
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",  # switched per response with mode_override
                "response_trailer_mode": "SKIP",
            },
        },
    }


def _local_reply_config(setup: EnvoySetup) -> dict[str, Any]:
    """Envoy's own error replies in the OpenAI error shape, so SDKs parse them."""

    def mapper(status: int, message: str, type_: str, code: str, flags: list[str] | None = None) -> dict[str, Any]:
        status_filter = {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": f"extproc_local_reply_{status}"},
                }
            }
        }
        the_filter: dict[str, Any] = status_filter
        if flags:
            the_filter = {"and_filter": {"filters": [status_filter, {"response_flag_filter": {"flags": flags}}]}}
        return {
            "filter": the_filter,
            "body_format_override": {
                "json_format": {"error": {"message": message, "type": type_, "param": None, "code": code}},
                "content_type": "application/json",
            },
        }

    return {
        "mappers": [
            # Our own 413 has the same text; this one covers bodies without content-length.
            mapper(
                413,
                f"Request body exceeds the gateway's limit of {setup.max_body_bytes} bytes.",
                "invalid_request_error",
                "request_too_large",
            ),
            mapper(
                503,
                "The model backend is unavailable.",
                "server_error",
                "backend_unavailable",
                ["UH", "UF", "UO", "URX", "NR"],
            ),
            mapper(504, "The model backend timed out.", "server_error", "backend_timeout", ["UT"]),
        ]
    }


def render(setup: EnvoySetup) -> str:
    routes: list[dict[str, Any]] = []
    for upstream in setup.upstreams:
        routes.append(
            {
                "match": {
                    "prefix": "/",
                    "headers": [{"name": setup.backend_header, "string_match": {"exact": upstream.name}}],
                },
                "route": {"cluster": f"backend_{upstream.name}", "timeout": "0s"},
            }
        )
    # No routing header (health checks, unknown paths): the first backend answers.
    routes.append(
        {
            "match": {"prefix": "/"},
            "route": {"cluster": f"backend_{setup.upstreams[0].name}", "timeout": "0s"},
        }
    )
    http_filters: list[dict[str, Any]] = []
    if setup.extproc_port is not None:
        http_filters.append(_ext_proc_filter(setup))
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "llm",
            "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
        "local_reply_config": _local_reply_config(setup),
    }
    clusters = [_cluster(f"backend_{u.name}", u.host, [u.port], workload=u.workload) for u in setup.upstreams]
    if setup.extproc_port is not None:
        ports = [setup.extproc_port, *setup.extra_extproc_ports]
        clusters.append(
            _cluster("extproc", "127.0.0.1", ports, http2=True, streams=setup.extproc_streams_per_connection)
        )
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": setup.admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "llm",
                    "address": {"socket_address": {"address": setup.host, "port_value": setup.listen_port}},
                    # BUFFERED bodies live in this buffer: it must hold the largest body we accept.
                    "per_connection_buffer_limit_bytes": setup.max_body_bytes + (64 << 10),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)
