"""The Istio VirtualService fields the mesh uses, translated into Envoy routes as istiod would.

Istio cannot run here, so the repository checks its VirtualServices through a real Envoy instead:
this module turns them (with their DestinationRules) into the route configuration and cluster
names istiod would send a proxy, and the tests run that in Envoy 1.40. Only the fields listed in
`HTTP_FIELDS` and below are understood; anything else is a ValueError, so a manifest can never
rely on a field whose effect the tests silently leave out.

What istiod does and is copied here (pilot/pkg/networking/core/route):
- one Envoy route per `match[]` entry, in order; no `match` matches every path (prefix "/");
- cluster names `outbound|PORT|SUBSET|HOST`, SUBSET empty without one; short host names are
  completed in the resource's namespace;
- a single destination takes all traffic (weight 100): a plain `cluster`; destinations with
  weight 0 are left out of `weighted_clusters`;
- no `timeout`: "0s" (no route timeout at all, not Envoy's 15 s default);
- no `retries`: istiod's default policy (2 retries on connect failures, refused streams,
  `unavailable`, `cancelled` and 503, preferring other hosts); `attempts: 0` turns retries off;
  status codes inside `retryOn` become `retriable_status_codes`;
- `mirrorPercentage` is a percentage with decimals (denominator MILLION); no percentage mirrors
  everything, an explicit 0 mirrors nothing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from typing import Any, Final

# Every field of a VirtualService this translation knows; the rest are refused.
SPEC_FIELDS: Final = frozenset({"hosts", "gateways", "http"})
HTTP_FIELDS: Final = frozenset({"name", "match", "route", "mirror", "mirrorPercentage", "timeout", "retries"})
MATCH_FIELDS: Final = frozenset({"headers", "uri"})
HEADER_MATCH_KINDS: Final = frozenset({"exact", "prefix", "regex"})
URI_MATCH_KINDS: Final = frozenset({"exact", "prefix"})
ROUTE_FIELDS: Final = frozenset({"destination", "weight"})
DESTINATION_FIELDS: Final = frozenset({"host", "subset", "port"})
PORT_FIELDS: Final = frozenset({"number"})
RETRY_FIELDS: Final = frozenset({"attempts", "perTryTimeout", "retryOn"})
MIRROR_PERCENTAGE_FIELDS: Final = frozenset({"value"})

DEFAULT_NAMESPACE: Final = "default"
CLUSTER_DOMAIN: Final = "svc.cluster.local"
# istiod's default retry policy (route/retry/retry.go, DefaultPolicy), used when `retries` is absent.
DEFAULT_RETRY_ON: Final = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_NUM_RETRIES: Final = 2
DEFAULT_RETRIABLE_STATUS_CODES: Final = (503,)
HOST_SELECTION_RETRY_MAX_ATTEMPTS: Final = 5
PREVIOUS_HOSTS_PREDICATE: Final = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}
NO_TIMEOUT: Final = "0s"

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NANOS: Final = {
    "ns": Decimal(1),
    "us": Decimal(10**3),
    "µs": Decimal(10**3),
    "ms": Decimal(10**6),
    "s": Decimal(10**9),
    "m": Decimal(60 * 10**9),
    "h": Decimal(3600 * 10**9),
}


@dataclass(frozen=True)
class ClusterRef:
    """One Envoy cluster a VirtualService sends traffic (or mirrored copies) to."""

    name: str  # Istio's: outbound|PORT|SUBSET|HOST
    host: str  # fully qualified
    subset: str  # "" without one
    port: int
    # The DestinationRule subset's pod labels ({} without a subset): which pods stand behind it.
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


def cluster_name(host: str, subset: str, port: int) -> str:
    return f"outbound|{port}|{subset}|{host}"


def fqdn(host: str, namespace: str) -> str:
    """A Service host as istiod completes it: `svc` and `svc.ns` are names in the cluster domain."""
    if not host or "*" in host:
        raise ValueError(f"destination host {host!r}: a Service host is required (no wildcards)")
    dots = host.count(".")
    if dots == 0:
        return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
    if dots == 1:
        return f"{host}.{CLUSTER_DOMAIN}"
    return host


def envoy_duration(value: object, where: str) -> str:
    """An Istio duration ("2s", "1.5s", "500ms", "1m30s") as Envoy's seconds string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a duration such as '10s', got {value!r}")
    position, nanos = 0, Decimal(0)
    for part in _DURATION_PART.finditer(value):
        if part.start() != position:
            break
        try:
            nanos += Decimal(part.group(1)) * _NANOS[part.group(2)]
        except InvalidOperation as exc:  # pragma: no cover - the pattern only lets numbers through
            raise ValueError(f"{where}: bad duration {value!r}") from exc
        position = part.end()
    if position != len(value):
        raise ValueError(f"{where}: bad duration {value!r} (use e.g. '10s', '1.5s', '500ms')")
    whole = int(nanos)
    if whole != nanos:
        raise ValueError(f"{where}: duration {value!r} is finer than a nanosecond")
    seconds, rest = divmod(whole, 10**9)
    return f"{seconds}.{rest:09d}".rstrip("0").rstrip(".") + "s"


def _mapping(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _only(value: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(
            f"{where}: unsupported field(s) {', '.join(unknown)}; the Envoy translation "
            f"(extproc_dev.istio_routes) knows only {', '.join(sorted(allowed))}"
        )


def _int(value: object, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def _namespace(resource: Mapping[str, Any]) -> str:
    metadata = resource.get("metadata") or {}
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    return namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE


def _name(resource: Mapping[str, Any]) -> str:
    metadata = resource.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"{resource.get('kind', '?')}/{name}" if isinstance(name, str) else str(resource.get("kind", "?"))


def _spec(resource: Mapping[str, Any], kind: str) -> dict[str, Any]:
    if resource.get("kind") != kind:
        raise ValueError(f"expected a {kind}, got kind {resource.get('kind')!r}")
    return _mapping(resource.get("spec"), f"{_name(resource)}.spec")


def _virtual_service_http(virtual_service: Mapping[str, Any]) -> list[dict[str, Any]]:
    where = _name(virtual_service)
    spec = _spec(virtual_service, "VirtualService")
    _only(spec, SPEC_FIELDS, f"{where}.spec")
    entries = _list(spec.get("http"), f"{where}.spec.http")
    out = []
    for index, entry in enumerate(entries):
        at = f"{where}.spec.http[{index}]"
        http = _mapping(entry, at)
        _only(http, HTTP_FIELDS, at)
        out.append(http)
    return out


def _subsets(destination_rules: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, str]]]:
    """host -> subset name -> pod labels, from every DestinationRule."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for rule in destination_rules:
        where = _name(rule)
        spec = _spec(rule, "DestinationRule")
        host = fqdn(_string(spec.get("host"), f"{where}.spec.host"), _namespace(rule))
        known = out.setdefault(host, {})
        for index, subset in enumerate(_list(spec.get("subsets") or [], f"{where}.spec.subsets")):
            subset = _mapping(subset, f"{where}.spec.subsets[{index}]")
            name = _string(subset.get("name"), f"{where}.spec.subsets[{index}].name")
            labels = _mapping(subset.get("labels") or {}, f"{where}.spec.subsets[{index}].labels")
            known[name] = {str(k): str(v) for k, v in labels.items()}
    return out


def _destination(
    value: object, where: str, namespace: str, port: int, subsets: Mapping[str, Mapping[str, Mapping[str, str]]]
) -> ClusterRef:
    destination = _mapping(value, where)
    _only(destination, DESTINATION_FIELDS, where)
    host = fqdn(_string(destination.get("host"), f"{where}.host"), namespace)
    subset = _string(destination.get("subset", ""), f"{where}.subset")
    if "port" in destination:
        port_spec = _mapping(destination["port"], f"{where}.port")
        _only(port_spec, PORT_FIELDS, f"{where}.port")
        port = _int(port_spec.get("number"), f"{where}.port.number", minimum=1)
    labels: Mapping[str, str] = {}
    if subset:
        defined = subsets.get(host, {})
        if subset not in defined:
            known = ", ".join(sorted(defined)) or "none"
            raise ValueError(
                f"{where}: subset {subset!r} of host {host} is not defined by any DestinationRule (defined: {known})"
            )
        labels = defined[subset]
    return ClusterRef(cluster_name(host, subset, port), host, subset, port, labels)


def _weighted_destinations(
    http: Mapping[str, Any], where: str, namespace: str, port: int, subsets: Mapping[str, Any]
) -> list[tuple[ClusterRef, int]]:
    routes = _list(http.get("route"), f"{where}.route")
    if not routes:
        raise ValueError(f"{where}.route: at least one destination is required")
    out = []
    for index, entry in enumerate(routes):
        at = f"{where}.route[{index}]"
        entry = _mapping(entry, at)
        _only(entry, ROUTE_FIELDS, at)
        cluster = _destination(entry.get("destination"), f"{at}.destination", namespace, port, subsets)
        # A lone destination takes everything whatever it says; among several, a missing weight is 0.
        weight = 100 if len(routes) == 1 else _int(entry.get("weight", 0), f"{at}.weight")
        out.append((cluster, weight))
    if sum(weight for _, weight in out) == 0:
        raise ValueError(f"{where}.route: the destinations' weights add up to 0")
    return out


def _mirror(
    http: Mapping[str, Any], where: str, namespace: str, port: int, subsets: Mapping[str, Any]
) -> tuple[ClusterRef, Decimal] | None:
    if "mirrorPercentage" in http and "mirror" not in http:
        raise ValueError(f"{where}: mirrorPercentage without a mirror")
    if "mirror" not in http:
        return None
    cluster = _destination(http["mirror"], f"{where}.mirror", namespace, port, subsets)
    percent = Decimal(100)
    if "mirrorPercentage" in http:
        spec = _mapping(http["mirrorPercentage"], f"{where}.mirrorPercentage")
        _only(spec, MIRROR_PERCENTAGE_FIELDS, f"{where}.mirrorPercentage")
        value = spec.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 100:
            raise ValueError(f"{where}.mirrorPercentage.value: expected a percentage 0-100, got {value!r}")
        percent = Decimal(str(value))
    return cluster, percent


def _header_matchers(value: object, where: str) -> list[dict[str, Any]]:
    headers = _mapping(value, where)
    out = []
    for name, spec in headers.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"{at}: header names must be lower case, as Istio requires")
        spec = _mapping(spec, at)
        _only(spec, HEADER_MATCH_KINDS, at)
        if len(spec) != 1:
            raise ValueError(f"{at}: exactly one of exact, prefix, regex is required")
        ((kind, text),) = spec.items()
        text = _string(text, f"{at}.{kind}")
        string_match: dict[str, Any] = {"safe_regex": {"regex": text}} if kind == "regex" else {kind: text}
        out.append({"name": name, "string_match": string_match})
    return out


def _route_match(value: object, where: str) -> dict[str, Any]:
    match = _mapping(value, where)
    _only(match, MATCH_FIELDS, where)
    out: dict[str, Any] = {"prefix": "/"}
    if "uri" in match:
        uri = _mapping(match["uri"], f"{where}.uri")
        _only(uri, URI_MATCH_KINDS, f"{where}.uri")
        if len(uri) != 1:
            raise ValueError(f"{where}.uri: exactly one of exact, prefix is required")
        ((kind, text),) = uri.items()
        text = _string(text, f"{where}.uri.{kind}")
        out = {"path": text} if kind == "exact" else {"prefix": text}
    if "headers" in match:
        out["headers"] = _header_matchers(match["headers"], f"{where}.headers")
    return out


def _retry_on(text: str) -> tuple[str, list[int]]:
    """Split `retryOn` as istiod does: HTTP status codes go to retriable_status_codes."""
    conditions, codes = [], []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.isdigit() and int(part) in HTTPStatus._value2member_map_:
            codes.append(int(part))
        else:
            conditions.append(part)
    joined = ",".join(conditions)
    if codes and "retriable-status-codes" not in joined:
        joined = f"{joined},retriable-status-codes" if joined else "retriable-status-codes"
    return joined, codes


def _retry_policy(http: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    policy: dict[str, Any] = {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": DEFAULT_NUM_RETRIES,
        "retry_host_predicate": [PREVIOUS_HOSTS_PREDICATE],
        "host_selection_retry_max_attempts": HOST_SELECTION_RETRY_MAX_ATTEMPTS,
        "retriable_status_codes": list(DEFAULT_RETRIABLE_STATUS_CODES),
    }
    if "retries" not in http:
        return policy
    retries = _mapping(http["retries"], f"{where}.retries")
    _only(retries, RETRY_FIELDS, f"{where}.retries")
    attempts = _int(retries.get("attempts", 0), f"{where}.retries.attempts")
    if attempts == 0:
        return None  # istiod: an explicit (or missing) 0 turns retries off
    policy["num_retries"] = attempts
    if "retryOn" in retries:
        retry_on, codes = _retry_on(_string(retries["retryOn"], f"{where}.retries.retryOn"))
        policy["retry_on"] = retry_on
        policy["retriable_status_codes"] = codes
        if not codes:
            del policy["retriable_status_codes"]
    if "perTryTimeout" in retries:
        policy["per_try_timeout"] = envoy_duration(retries["perTryTimeout"], f"{where}.retries.perTryTimeout")
    return policy


def _fraction(percent: Decimal) -> dict[str, Any]:
    # istiod: uint32(value * 10000) parts per million, so two decimals of a percent survive.
    return {"default_value": {"numerator": int(percent * 10_000), "denominator": "MILLION"}}


def _translate(
    virtual_service: Mapping[str, Any], destination_rules: list[dict[str, Any]], port: int
) -> tuple[list[dict[str, Any]], list[ClusterRef]]:
    namespace = _namespace(virtual_service)
    subsets = _subsets(destination_rules)
    where = f"{_name(virtual_service)}.spec.http"
    routes: list[dict[str, Any]] = []
    used: dict[str, ClusterRef] = {}
    for index, http in enumerate(_virtual_service_http(virtual_service)):
        at = f"{where}[{index}]"
        destinations = [(c, w) for c, w in _weighted_destinations(http, at, namespace, port, subsets) if w]
        action: dict[str, Any] = {}
        if len(destinations) == 1:
            action["cluster"] = destinations[0][0].name
        else:
            action["weighted_clusters"] = {
                "clusters": [{"name": cluster.name, "weight": weight} for cluster, weight in destinations]
            }
        action["timeout"] = envoy_duration(http["timeout"], f"{at}.timeout") if "timeout" in http else NO_TIMEOUT
        retry_policy = _retry_policy(http, at)
        if retry_policy is not None:
            action["retry_policy"] = retry_policy
        targets = [cluster for cluster, _ in destinations]
        mirror = _mirror(http, at, namespace, port, subsets)
        if mirror is not None and mirror[1] > 0:
            action["request_mirror_policies"] = [{"cluster": mirror[0].name, "runtime_fraction": _fraction(mirror[1])}]
            targets.append(mirror[0])
        for cluster in targets:
            used.setdefault(cluster.name, cluster)
        matches = (_list(http["match"], f"{at}.match") if "match" in http else None) or [{}]
        for match_index, match in enumerate(matches):
            route: dict[str, Any] = {}
            if "name" in http:
                route["name"] = _string(http["name"], f"{at}.name")
            route["match"] = _route_match(match, f"{at}.match[{match_index}]")
            route["route"] = copy.deepcopy(action)  # shared dicts would become YAML aliases
            routes.append(route)
    return routes, list(used.values())


def envoy_routes(
    virtual_service: Mapping[str, Any], destination_rules: list[dict[str, Any]], port: int
) -> list[dict[str, Any]]:
    """Envoy routes for a VirtualService, in its order; `port` is the Service port it is reached on."""
    return _translate(virtual_service, destination_rules, port)[0]


def clusters_used(
    virtual_service: Mapping[str, Any], destination_rules: list[dict[str, Any]], port: int
) -> list[ClusterRef]:
    """Every cluster the routes send traffic or mirrored copies to, each once, in first-use order.

    The whole VirtualService is checked as for `envoy_routes`: a cluster list for something the
    translation refuses would be no use.
    """
    return _translate(virtual_service, destination_rules, port)[1]


def virtual_host(
    virtual_service: Mapping[str, Any], destination_rules: list[dict[str, Any]], port: int
) -> dict[str, Any]:
    """The virtual host for the VirtualService's hosts (with any port, as at a gateway listener)."""
    where = f"{_name(virtual_service)}.spec.hosts"
    spec = _spec(virtual_service, "VirtualService")
    hosts = [_string(h, where) for h in _list(spec.get("hosts"), where)]
    if not hosts:
        raise ValueError(f"{where}: at least one host is required")
    domains = [domain for host in hosts for domain in (host, f"{host}:*")]
    return {
        "name": str((virtual_service.get("metadata") or {}).get("name", "vs")),
        "domains": domains,
        "routes": envoy_routes(virtual_service, destination_rules, port),
    }
