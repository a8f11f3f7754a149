"""Envoy bootstrap for local runs: the ext_proc filter from `extproc.filter_contract`, as in the mesh.

ext_proc sits before the router; one route per backend matches the routing header
the gateway sets; anything else goes to the default backend.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import yaml

from extproc import filter_contract

# The local stack's name for the gateway's cluster (the mesh uses Istio's own `outbound|...` name).
EXTPROC_CLUSTER = "extproc"


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
    # Where the ext_proc replicas and Envoy's admin listen. A host that is not an IP address is a DNS
    # name (a compose service): its cluster is STRICT_DNS. The admin stays on loopback unless a
    # container has to publish it.
    extproc_host: str = "127.0.0.1"
    admin_host: str = "127.0.0.1"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(
    name: str, host: str, ports: list[int], http2: bool = False, streams: int = 0, workload: str | None = None
) -> dict[str, Any]:
    endpoints: list[dict[str, Any]] = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}} for port in ports
    ]
    if workload is not None:
        for endpoint in endpoints:
            endpoint["metadata"] = {"filter_metadata": {"istio": {"workload": workload}}}
    dns = not _is_ip(host)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
    }
    if dns:
        # Every address behind the name is an endpoint (compose scales a service to several), re-resolved
        # as containers come and go. IPv4 only: compose networks have no IPv6 unless enabled, and AUTO
        # would ask for AAAA records first on every refresh.
        cluster["dns_lookup_family"] = "V4_ONLY"
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
        http_filters.append(filter_contract.ext_proc_filter(EXTPROC_CLUSTER, setup.message_timeout_ms))
    http_filters.append(
        {
            "name": filter_contract.ROUTER_FILTER,
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    hcm = {
        "@type": filter_contract.HCM_TYPE,
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "route_config": {
            "name": "llm",
            "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}],
        },
        "http_filters": http_filters,
        "local_reply_config": filter_contract.local_reply_config(setup.max_body_bytes),
    }
    if setup.extproc_port is not None:
        hcm["access_log"] = [filter_contract.stream_end_log(EXTPROC_CLUSTER, setup.backend_header)]
    clusters = [_cluster(f"backend_{u.name}", u.host, [u.port], workload=u.workload) for u in setup.upstreams]
    if setup.extproc_port is not None:
        ports = [setup.extproc_port, *setup.extra_extproc_ports]
        streams = setup.extproc_streams_per_connection
        clusters.append(_cluster(EXTPROC_CLUSTER, setup.extproc_host, ports, http2=True, streams=streams))
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": setup.admin_host, "port_value": setup.admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "llm",
                    "address": {"socket_address": {"address": setup.host, "port_value": setup.listen_port}},
                    "per_connection_buffer_limit_bytes": filter_contract.listener_buffer_limit(setup.max_body_bytes),
                    "filter_chains": [{"filters": [{"name": filter_contract.HCM_FILTER, "typed_config": hcm}]}],
                }
            ],
            "clusters": clusters,
        },
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)
