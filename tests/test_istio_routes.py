"""The VirtualService → Envoy route translation (extproc_dev.istio_routes), field by field.

Each expected value is what istiod generates for the same field; every route is also parsed
into Envoy's own `Route` message, so a misspelt Envoy field fails here and not only in Envoy.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401  (registers the Any type)
from google.protobuf import json_format

from extproc_dev.istio_routes import (
    DEFAULT_RETRY_ON,
    PREVIOUS_HOSTS_PREDICATE,
    ClusterRef,
    clusters_used,
    envoy_duration,
    envoy_routes,
    virtual_host,
)

NS = "llm-serving"
PORT = 8000


def host(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


def vs(*http: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "llm", "namespace": NS},
        "spec": {"hosts": [host("llm")], **spec, "http": list(http)},
    }


def dr(name: str, **subsets: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "host": host(name),
            "subsets": [{"name": subset, "labels": {"version": version}} for subset, version in subsets.items()],
        },
    }


def to(name: str, subset: str | None = None, weight: int | None = None, port: int | None = None) -> dict[str, Any]:
    destination: dict[str, Any] = {"host": host(name)}
    if subset is not None:
        destination["subset"] = subset
    if port is not None:
        destination["port"] = {"number": port}
    entry: dict[str, Any] = {"destination": destination}
    if weight is not None:
        entry["weight"] = weight
    return entry


def by_header(value: str) -> list[dict[str, Any]]:
    return [{"headers": {"x-llm-backend": {"exact": value}}}]


# The routing contract's shape: a canary split, a mirror, a plain backend, then the catch-all.
CONTRACT_VS = vs(
    {
        "name": "default-8b",
        "match": by_header("default-8b"),
        "route": [to("vllm-default-8b", "stable", 90), to("vllm-default-8b", "canary", 10)],
    },
    {
        "name": "strict-json-model",
        "match": by_header("strict-json-model"),
        "route": [to("vllm-strict-json-model", "stable")],
        "mirror": {"host": host("vllm-strict-json-model"), "subset": "candidate"},
        "mirrorPercentage": {"value": 10},
    },
    {"name": "embeddings", "match": by_header("embeddings"), "route": [to("vllm-embeddings")]},
    {"name": "default", "route": [to("vllm-default-8b")]},
    gateways=["mesh", f"{NS}/llm-gateway"],
)
CONTRACT_DRS = [
    dr("vllm-default-8b", stable="v1", canary="v2"),
    dr("vllm-strict-json-model", stable="v1", candidate="v2"),
]


def as_envoy(route: dict[str, Any]) -> route_components_pb2.Route:
    return json_format.ParseDict(route, route_components_pb2.Route())


def test_contract_virtual_service_translates_in_order_with_istio_cluster_names() -> None:
    routes = envoy_routes(CONTRACT_VS, CONTRACT_DRS, PORT)
    for route in routes:
        as_envoy(route)
    assert [r["name"] for r in routes] == ["default-8b", "strict-json-model", "embeddings", "default"]
    canary, mirrored, plain, fallback = routes
    assert canary["match"] == {
        "prefix": "/",
        "headers": [{"name": "x-llm-backend", "string_match": {"exact": "default-8b"}}],
    }
    assert canary["route"]["weighted_clusters"] == {
        "clusters": [
            {"name": f"outbound|8000|stable|{host('vllm-default-8b')}", "weight": 90},
            {"name": f"outbound|8000|canary|{host('vllm-default-8b')}", "weight": 10},
        ]
    }
    assert mirrored["route"]["cluster"] == f"outbound|8000|stable|{host('vllm-strict-json-model')}"
    assert plain["route"]["cluster"] == f"outbound|8000||{host('vllm-embeddings')}"
    assert fallback["match"] == {"prefix": "/"}
    assert fallback["route"]["cluster"] == f"outbound|8000||{host('vllm-default-8b')}"


def test_clusters_used_lists_each_destination_and_mirror_once_with_subset_labels() -> None:
    used = clusters_used(CONTRACT_VS, CONTRACT_DRS, PORT)
    assert [(c.host, c.subset, c.port) for c in used] == [
        (host("vllm-default-8b"), "stable", PORT),
        (host("vllm-default-8b"), "canary", PORT),
        (host("vllm-strict-json-model"), "stable", PORT),
        (host("vllm-strict-json-model"), "candidate", PORT),
        (host("vllm-embeddings"), "", PORT),
        (host("vllm-default-8b"), "", PORT),
    ]
    assert [dict(c.labels) for c in used[:4]] == [{"version": v} for v in ("v1", "v2", "v1", "v2")]
    assert used[4] == ClusterRef(f"outbound|8000||{host('vllm-embeddings')}", host("vllm-embeddings"), "", PORT)


def test_header_matches_exact_prefix_and_regex() -> None:
    service = vs(
        {
            "match": [
                {
                    "headers": {
                        "x-llm-backend": {"exact": "a"},
                        "x-team": {"prefix": "ml-"},
                        "x-build": {"regex": "v[0-9]+"},
                    }
                }
            ],
            "route": [to("a")],
        }
    )
    (route,) = envoy_routes(service, [], PORT)
    as_envoy(route)
    assert route["match"]["headers"] == [
        {"name": "x-llm-backend", "string_match": {"exact": "a"}},
        {"name": "x-team", "string_match": {"prefix": "ml-"}},
        {"name": "x-build", "string_match": {"safe_regex": {"regex": "v[0-9]+"}}},
    ]


def test_uri_exact_and_prefix() -> None:
    service = vs({"match": [{"uri": {"exact": "/v1/models"}}, {"uri": {"prefix": "/v1/"}}], "route": [to("a")]})
    exact, prefix = envoy_routes(service, [], PORT)
    assert exact["match"] == {"path": "/v1/models"}
    assert prefix["match"] == {"prefix": "/v1/"}


def test_several_matches_become_several_routes_with_the_same_action() -> None:
    service = vs(
        {
            "name": "either",
            "match": [
                {"headers": {"x-llm-backend": {"exact": "a"}}},
                {"uri": {"prefix": "/a/"}, "headers": {"x-llm-class": {"exact": "batch"}}},
            ],
            "route": [to("a")],
        },
        {"route": [to("b")]},
    )
    first, second, rest = envoy_routes(service, [], PORT)
    assert first["name"] == second["name"] == "either"
    assert first["route"] == second["route"]
    assert first["route"] is not second["route"]  # no shared objects: YAML would write them as aliases
    assert first["match"]["headers"] == [{"name": "x-llm-backend", "string_match": {"exact": "a"}}]
    assert second["match"] == {
        "prefix": "/a/",
        "headers": [{"name": "x-llm-class", "string_match": {"exact": "batch"}}],
    }
    assert "name" not in rest
    assert rest["match"] == {"prefix": "/"}


def test_weights() -> None:
    drs = [dr("a", x="v1", y="v2", z="v3")]
    (lone,) = envoy_routes(vs({"route": [to("a", "x", weight=30)]}), drs, PORT)
    assert lone["route"]["cluster"] == f"outbound|8000|x|{host('a')}"  # a lone destination takes everything
    (split,) = envoy_routes(vs({"route": [to("a", "x", 70), to("a", "y", 30), to("a", "z", 0)]}), drs, PORT)
    assert split["route"]["weighted_clusters"]["clusters"] == [
        {"name": f"outbound|8000|x|{host('a')}", "weight": 70},
        {"name": f"outbound|8000|y|{host('a')}", "weight": 30},
    ]
    with pytest.raises(ValueError, match="add up to 0"):
        envoy_routes(vs({"route": [to("a", "x"), to("a", "y")]}), drs, PORT)


def test_destination_port_and_short_host_names() -> None:
    service = vs({"route": [{"destination": {"host": "a", "port": {"number": 9000}}}]})
    (route,) = envoy_routes(service, [], PORT)
    assert route["route"]["cluster"] == f"outbound|9000||{host('a')}"
    service = vs({"route": [{"destination": {"host": "a.other"}}]})
    (route,) = envoy_routes(service, [], PORT)
    assert route["route"]["cluster"] == "outbound|8000||a.other.svc.cluster.local"


def test_timeout_default_is_none_and_durations_convert() -> None:
    (default,) = envoy_routes(vs({"route": [to("a")]}), [], PORT)
    assert default["route"]["timeout"] == "0s"
    (set_,) = envoy_routes(vs({"route": [to("a")], "timeout": "1m30s"}), [], PORT)
    assert set_["route"]["timeout"] == "90s"
    assert envoy_duration("1.5s", "t") == "1.5s"
    assert envoy_duration("250ms", "t") == "0.25s"
    assert envoy_duration("1h", "t") == "3600s"
    for bad in ("10", "s", "1 s", "-1s", "1.5d", 10):
        with pytest.raises(ValueError, match="duration"):
            envoy_duration(bad, "t")


def test_retries_default_explicit_and_off() -> None:
    (default,) = envoy_routes(vs({"route": [to("a")]}), [], PORT)
    assert default["route"]["retry_policy"] == {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": 2,
        "retry_host_predicate": [PREVIOUS_HOSTS_PREDICATE],
        "host_selection_retry_max_attempts": 5,
        "retriable_status_codes": [503],
    }
    as_envoy(default)
    retries = {"attempts": 3, "perTryTimeout": "2s", "retryOn": "connect-failure,refused-stream"}
    (explicit,) = envoy_routes(vs({"route": [to("a")], "retries": retries}), [], PORT)
    as_envoy(explicit)
    policy = explicit["route"]["retry_policy"]
    assert (policy["num_retries"], policy["per_try_timeout"], policy["retry_on"]) == (
        3,
        "2s",
        "connect-failure,refused-stream",
    )
    assert "retriable_status_codes" not in policy
    (codes,) = envoy_routes(vs({"route": [to("a")], "retries": {"attempts": 1, "retryOn": "5xx,429"}}), [], PORT)
    assert codes["route"]["retry_policy"]["retry_on"] == "5xx,retriable-status-codes"
    assert codes["route"]["retry_policy"]["retriable_status_codes"] == [429]
    (off,) = envoy_routes(vs({"route": [to("a")], "retries": {"attempts": 0}}), [], PORT)
    assert "retry_policy" not in off["route"]


def test_mirror_fraction_is_parts_per_million() -> None:
    drs = [dr("a", stable="v1", candidate="v2")]

    def mirror_of(**extra: Any) -> dict[str, Any] | None:
        http = {"route": [to("a", "stable")], "mirror": {"host": host("a"), "subset": "candidate"}, **extra}
        (route,) = envoy_routes(vs(http), drs, PORT)
        as_envoy(route)
        policies = route["route"].get("request_mirror_policies")
        if policies is None:
            return None
        (policy,) = policies
        assert policy["cluster"] == f"outbound|8000|candidate|{host('a')}"
        return policy["runtime_fraction"]["default_value"]

    assert mirror_of(mirrorPercentage={"value": 10}) == {"numerator": 100_000, "denominator": "MILLION"}
    assert mirror_of(mirrorPercentage={"value": 0.5}) == {"numerator": 5_000, "denominator": "MILLION"}
    assert mirror_of(mirrorPercentage={"value": 12.25}) == {"numerator": 122_500, "denominator": "MILLION"}
    assert mirror_of() == {"numerator": 1_000_000, "denominator": "MILLION"}  # no percentage: everything
    assert mirror_of(mirrorPercentage={"value": 0}) is None  # an explicit 0: nothing
    with pytest.raises(ValueError, match="percentage"):
        mirror_of(mirrorPercentage={"value": 120})
    with pytest.raises(ValueError, match="mirrorPercentage without a mirror"):
        envoy_routes(vs({"route": [to("a")], "mirrorPercentage": {"value": 5}}), drs, PORT)


def test_unknown_subset_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"subset 'canary' of host vllm-a\.llm-serving.* \(defined: stable\)"):
        envoy_routes(vs({"route": [to("vllm-a", "canary")]}), [dr("vllm-a", stable="v1")], PORT)
    with pytest.raises(ValueError, match=r"subset 'stable'.*\(defined: none\)"):
        clusters_used(vs({"route": [to("vllm-a", "stable")]}), [], PORT)
    mirror = {"route": [to("vllm-a", "stable")], "mirror": {"host": host("vllm-a"), "subset": "shadow"}}
    with pytest.raises(ValueError, match=r"mirror: subset 'shadow'"):
        clusters_used(vs(mirror), [dr("vllm-a", stable="v1")], PORT)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "tcp"), [{}]),
        (("spec", "exportTo"), ["."]),
        (("spec", "http", 0, "fault"), {"abort": {"httpStatus": 500}}),
        (("spec", "http", 0, "rewrite"), {"uri": "/"}),
        (("spec", "http", 0, "headers"), {"request": {"set": {"a": "b"}}}),
        (("spec", "http", 0, "mirror_percent"), 5),
        (("spec", "http", 0, "mirrors"), [{"destination": {"host": "a"}}]),
        (("spec", "http", 0, "match", 0, "method"), {"exact": "GET"}),
        (("spec", "http", 0, "match", 0, "name"), "m"),
        (("spec", "http", 0, "match", 0, "headers", "x-llm-backend", "suffix"), "b"),
        (("spec", "http", 0, "match", 0, "uri", "regex"), "/.*"),
        (("spec", "http", 0, "route", 0, "headers"), {"request": {"set": {"a": "b"}}}),
        (("spec", "http", 0, "route", 0, "destination", "port", "name"), "http"),
        (("spec", "http", 0, "retries"), {"attempts": 1, "retryRemoteLocalities": True}),
    ],
)
def test_unsupported_fields_are_errors(path: tuple[str | int, ...], value: object) -> None:
    service = vs(
        {
            "match": [{"headers": {"x-llm-backend": {"exact": "a"}}, "uri": {"prefix": "/"}}],
            "route": [{"destination": {"host": host("a"), "port": {"number": 8000}}}],
        }
    )
    envoy_routes(service, [], PORT)  # valid before the change
    broken = copy.deepcopy(service)
    target: Any = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match="unsupported field"):
        envoy_routes(broken, [], PORT)
    with pytest.raises(ValueError, match="unsupported field"):
        clusters_used(broken, [], PORT)


def test_malformed_values_are_errors() -> None:
    with pytest.raises(ValueError, match="lower case"):
        envoy_routes(vs({"match": [{"headers": {"X-LLM-Backend": {"exact": "a"}}}], "route": [to("a")]}), [], PORT)
    with pytest.raises(ValueError, match="at least one destination"):
        envoy_routes(vs({"route": []}), [], PORT)
    with pytest.raises(ValueError, match="expected a VirtualService"):
        envoy_routes({**vs({"route": [to("a")]}), "kind": "Gateway"}, [], PORT)
    with pytest.raises(ValueError, match="weight: expected an integer"):
        envoy_routes(vs({"route": [to("a", weight=50), {**to("b"), "weight": "50"}]}), [], PORT)


def test_virtual_host_domains_are_the_hosts_on_any_port() -> None:
    vhost = virtual_host(vs({"route": [to("a")]}, hosts=[host("llm"), "llm.example.com"]), [], PORT)
    assert vhost["name"] == "llm"
    assert vhost["domains"] == [host("llm"), f"{host('llm')}:*", "llm.example.com", "llm.example.com:*"]
    assert json_format.ParseDict(vhost, route_components_pb2.VirtualHost()).routes[0].route.cluster == (
        f"outbound|8000||{host('a')}"
    )
