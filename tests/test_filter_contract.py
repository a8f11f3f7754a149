"""One source for the ext_proc filter's shape: the local stack's Envoy and the mesh's EnvoyFilters agree."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import filter_contract
from extproc.policy import PolicyError, example_policy_path, load_policy, parse_policy
from extproc_dev import mesh_assets
from extproc_dev.envoy_config import EnvoySetup, Upstream, render

ENVOY_FILTERS = Path(mesh_assets.ROOT, "mesh/base/gateway/envoyfilter.yaml")


def _as_installed(http_filter: dict[str, Any]) -> dict[str, Any]:
    """The filter without what differs by site: the cluster's name, and whether it is scoped."""
    out = copy.deepcopy(http_filter)
    out["typed_config"]["grpc_service"]["envoy_grpc"].pop("cluster_name")
    out.pop("disabled", None)
    return out


def _unscoped(local_reply: dict[str, Any]) -> dict[str, Any]:
    """The mappers without their `:authority` condition (what scopes them to the LLM host)."""
    out = copy.deepcopy(local_reply)
    for mapper in out["mappers"]:
        conditions = mapper["filter"].get("and_filter", {}).get("filters", [mapper["filter"]])
        kept = [c for c in conditions if "header_filter" not in c]
        mapper["filter"] = kept[0] if len(kept) == 1 else {"and_filter": {"filters": kept}}
    return out


def _local_stack() -> dict[str, Any]:
    policy = load_policy(example_policy_path())
    setup = EnvoySetup(
        listen_port=10000,
        admin_port=9901,
        upstreams=[Upstream(policy.subset(name), 10001 + i) for i, name in enumerate(policy.backends)],
        extproc_port=50051,
        backend_header=policy.gateway.backend_header,
        max_body_bytes=policy.gateway.max_body_bytes,
        message_timeout_ms=filter_contract.message_timeout_ms(policy),
    )
    listener: dict[str, Any] = yaml.safe_load(render(setup))["static_resources"]["listeners"][0]
    return listener


def _patch(envoy_filter: dict[str, Any], apply_to: str) -> dict[str, Any]:
    patches = [p for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == apply_to]
    assert len(patches) == 1, f"{envoy_filter['metadata']['name']}: one {apply_to} patch expected"
    value: dict[str, Any] = patches[0]["patch"]["value"]
    return value


def test_the_local_stack_and_every_envoy_filter_install_the_same_filter() -> None:
    listener = _local_stack()
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    local_filter = next(f for f in hcm["http_filters"] if f["name"] == filter_contract.FILTER_NAME)
    # Right before the router, as the EnvoyFilters' INSERT_BEFORE the router puts it.
    names = [f["name"] for f in hcm["http_filters"]]
    assert names[names.index(filter_contract.FILTER_NAME) + 1] == filter_contract.ROUTER_FILTER

    envoy_filters = list(yaml.safe_load_all(ENVOY_FILTERS.read_text()))
    contexts = set()
    for envoy_filter in envoy_filters:
        inserted = _patch(envoy_filter, "HTTP_FILTER")
        assert _as_installed(inserted) == _as_installed(local_filter)
        # The mesh reaches the gateway through Istio's own mTLS cluster for its Service.
        assert inserted["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == mesh_assets.EXTPROC_CLUSTER
        # A mesh listener is shared: the filter is off but for the LLM's virtual host ...
        assert inserted["disabled"] is True
        site = mesh_assets.SITES[envoy_filter["spec"]["configPatches"][0]["match"]["context"]]
        (vhost_patch,) = [p for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == "VIRTUAL_HOST"]
        assert vhost_patch["match"]["routeConfiguration"]["vhost"]["name"] == site.virtual_host
        assert filter_contract.FILTER_NAME in vhost_patch["patch"]["value"]["typed_per_filter_config"]
        # ... and Envoy's error replies are restyled for that host only.
        merged = _patch(envoy_filter, "NETWORK_FILTER")["typed_config"]["local_reply_config"]
        assert merged != hcm["local_reply_config"]
        assert _unscoped(merged) == hcm["local_reply_config"]
        buffer = _patch(envoy_filter, "LISTENER")["per_connection_buffer_limit_bytes"]
        assert buffer == listener["per_connection_buffer_limit_bytes"]
        contexts.update(p["match"]["context"] for p in envoy_filter["spec"]["configPatches"])
    assert contexts == {"GATEWAY", "SIDECAR_OUTBOUND"}


def test_the_filter_fails_closed_with_a_timeout_that_outlasts_the_admission_queue() -> None:
    policy = load_policy(example_policy_path())
    config = filter_contract.ext_proc_filter("x", filter_contract.message_timeout_ms(policy))["typed_config"]
    assert config["failure_mode_allow"] is False
    assert config["allow_mode_override"] is True
    assert config["processing_mode"]["request_body_mode"] == "BUFFERED"
    timeout_s = float(config["message_timeout"].rstrip("s"))
    assert timeout_s * 1000 > policy.queue.max_wait_ms
    mappers = filter_contract.local_reply_config(policy.gateway.max_body_bytes)["mappers"]
    statuses = {
        m["filter"].get("status_code_filter", {}).get("comparison", {}).get("value", {}).get("default_value")
        for m in mappers
    }
    # Every status a mapper restyles without a response flag is one no gateway reply can carry.
    assert statuses - {None} <= filter_contract.RESERVED_STATUSES
    unavailable = next(m for m in mappers if m.get("status_code") == filter_contract.GATEWAY_UNAVAILABLE_STATUS)
    assert unavailable["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 506
    assert unavailable["status_code"] == 503
    assert unavailable["body_format_override"]["json_format"]["error"]["code"] == "gateway_unavailable"


@pytest.mark.parametrize("status", sorted(filter_contract.RESERVED_STATUSES))
def test_rules_cannot_reject_with_the_statuses_envoy_uses_for_the_gateway_itself(status: int) -> None:
    text = example_policy_path().read_text()
    data = yaml.safe_load(text)
    data["routing"]["rules"][0]["reject"]["status"] = status
    with pytest.raises(PolicyError, match="reserved"):
        parse_policy(data)
