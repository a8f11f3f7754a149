"""Identity and quota planning: sans-IO, no store."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from extproc.core import Gateway, NeedBody, Reply
from extproc.errors import GatewayError
from extproc.identity import Authenticator, hash_key, spiffe_id
from extproc.policy import PolicyError, parse_policy
from extproc.quota.plan import QuotaPlan, QuotaPlanner, format_duration, rate_limit_headers, refusal
from extproc.quota.store import AdmitResult

BASE: dict[str, Any] = {
    "backends": {"small": {}},
    "models": [
        {"name": "m1", "aliases": ["m1-alias"], "backend": "small", "max_model_len": 4096},
        {"name": "m2", "backend": "small", "max_model_len": 4096},
    ],
    "tenants": {
        "acme": {
            "tier": "gold",
            "traffic_class": "batch",
            "keys": [{"name": "ci", "sha256": hash_key("sk-acme")}],
            "spiffe_ids": ["spiffe://cluster.local/ns/acme/sa/app"],
            "limits": {
                "requests_per_minute": 10,
                "tokens_per_minute": 1000,
                "tokens_per_day": 5000,
                "max_concurrent_requests": 2,
            },
            "per_key_limits": {"tokens_per_minute": 400, "tokens_per_minute_counts": "output"},
            "model_limits": {"m2": {"tokens_per_month": 100}},
        },
        "solo": {"allowed_models": ["m1-alias"], "keys": [{"name": "k", "sha256": hash_key("sk-solo")}]},
    },
}


def policy(**overrides: Any) -> Any:
    return parse_policy({**BASE, **overrides})


def test_keys_resolve_to_tenants_via_either_header() -> None:
    auth = Authenticator(policy())
    assert auth.identify({"authorization": "Bearer sk-acme"}).tenant.name == "acme"
    assert auth.identify({"x-api-key": "sk-solo"}).key_name == "k"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk-wrong"},
        {"authorization": "Basic abc"},
        {"x-api-key": " "},
        {"x-llm-tenant": "acme"},
    ],
)
def test_missing_or_unknown_keys_are_401(headers: dict[str, str]) -> None:
    with pytest.raises(GatewayError) as caught:
        Authenticator(policy()).identify(headers)
    assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
    assert "sk-wrong" not in caught.value.message


def test_mesh_identity_only_when_trusted() -> None:
    xfcc = "By=spiffe://cluster.local/ns/llm/sa/gw;Hash=abc;URI=spiffe://cluster.local/ns/acme/sa/app"
    assert spiffe_id(xfcc) == "spiffe://cluster.local/ns/acme/sa/app"
    with pytest.raises(GatewayError):
        Authenticator(policy()).identify({"x-forwarded-client-cert": xfcc})
    trusting = Authenticator(policy(auth={"trust_spiffe": True, "jwt_tenant_header": "x-jwt-tenant"}))
    assert trusting.identify({"x-forwarded-client-cert": xfcc}).source == "spiffe"
    assert trusting.identify({"x-jwt-tenant": "solo"}).tenant.name == "solo"
    with pytest.raises(GatewayError):
        trusting.identify({"x-jwt-tenant": "nobody"})
    header = Authenticator(policy(auth={"trust_tenant_header": True}))
    assert header.identify({"x-llm-tenant": "acme"}).source == "header"


def test_keys_from_a_mounted_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "keys.yaml"
    secret.write_text(yaml.safe_dump([{"tenant": "solo", "name": "file-key", "sha256": hash_key("sk-file")}]))
    auth = Authenticator.load(policy(auth={"key_files": [str(secret)]}))
    assert auth.identify({"authorization": "Bearer sk-file"}).key_name == "file-key"
    secret.write_text(yaml.safe_dump([{"tenant": "ghost", "name": "x", "sha256": hash_key("x")}]))
    with pytest.raises(PolicyError, match="unknown tenant 'ghost'"):
        Authenticator.load(policy(auth={"key_files": [str(secret)]}))


def test_policy_rejects_plain_keys_and_unknown_models() -> None:
    with pytest.raises(PolicyError, match="sha256 must be 64"):
        policy(tenants={"t": {"keys": [{"name": "k", "sha256": "sk-plain-text"}]}})
    with pytest.raises(PolicyError, match="allowed_models: 'nope'"):
        policy(tenants={"t": {"allowed_models": ["nope"]}})


def _gateway() -> Gateway:
    return Gateway.from_policy(policy())


def test_models_and_allowed_models_per_tenant() -> None:
    gateway = _gateway()
    reply = gateway.on_request_headers({":path": "/v1/models", ":method": "GET", "x-api-key": "sk-solo"})
    assert isinstance(reply, Reply)
    assert {m["id"] for m in orjson.loads(reply.body)["data"]} == {"m1", "m1-alias"}
    unauth = gateway.on_request_headers({":path": "/v1/models", ":method": "GET"})
    assert isinstance(unauth, Reply) and unauth.status == 401

    head = {":path": "/v1/chat/completions", ":method": "POST", "x-api-key": "sk-solo"}
    verdict = gateway.on_request_headers(head)
    assert isinstance(verdict, NeedBody)
    body = {"model": "m2", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(GatewayError) as caught:
        gateway.on_request_body(verdict, orjson.dumps(body))
    assert (caught.value.status, caught.value.code) == (403, "model_not_allowed")
    admission = gateway.on_request_body(verdict, orjson.dumps({**body, "model": "m1"}))
    assert ("x-llm-tenant", "solo") in admission.set_headers
    assert admission.remove_headers == ["authorization", "x-api-key"]


def test_health_checks_need_no_key() -> None:
    verdict = _gateway().on_request_headers({":path": "/health", ":method": "GET"})
    assert not isinstance(verdict, Reply)


NOW = int(datetime(2026, 11, 28, 10, 15, 30, tzinfo=UTC).timestamp() * 1000)


def _plan(model: str = "m2", prompt: int = 100, completion: int = 50) -> QuotaPlan:
    identity = Authenticator(policy()).identify({"x-api-key": "sk-acme"})
    plan = QuotaPlanner(reservation_ttl_ms=600_000).plan(identity, model, prompt, completion, NOW)
    assert plan is not None
    return plan


def test_plan_covers_tenant_key_and_model_scopes_in_one_hash_slot() -> None:
    plan = _plan()
    by_key = {p.rule.key: p for p in plan.rules}
    minute = NOW // 60_000
    assert set(by_key) == {
        f"xp:{{acme}}:rpm:{minute}",
        f"xp:{{acme}}:tpm:{minute}",
        "xp:{acme}:tpd:20261128",
        "xp:{acme}:conc",
        f"xp:{{acme}}:k:ci:tpm:{minute}",
        "xp:{acme}:m:m2:tpmo:202611",
    }
    costs = {p.rule.key.split(":", 2)[2]: cost for p, cost in zip(plan.rules, plan.costs, strict=True)}
    assert costs[f"tpm:{minute}"] == 150  # total
    assert costs[f"k:ci:tpm:{minute}"] == 50  # output only
    assert costs[f"rpm:{minute}"] == 1
    assert plan.actual_costs(90, 10) == [1, 100, 100, 1, 10, 100]
    assert by_key[f"xp:{{acme}}:tpm:{minute}"].reset_ms(NOW) == 30_000
    assert by_key["xp:{acme}:tpd:20261128"].reset_ms(NOW) == (13 * 3600 + 44 * 60 + 30) * 1000
    assert plan.expires_at_ms == NOW + 600_000


def test_planner_shares_rule_sets_within_a_minute_and_rebuilds_them_after() -> None:
    auth = Authenticator(policy())
    acme = auth.identify({"x-api-key": "sk-acme"})
    planner = QuotaPlanner()
    first = planner.plan(acme, "m2", 10, 5, NOW)
    second = planner.plan(acme, "m2", 20, 8, NOW + 1_000)
    assert first is not None and second is not None
    assert first.rule_set is second.rule_set  # built once per caller and minute
    assert first.request_id != second.request_id
    assert second.costs != first.costs  # only the costs are per request
    next_minute = planner.plan(acme, "m2", 10, 5, NOW + 60_000)
    assert next_minute is not None and next_minute.rule_set is not first.rule_set
    assert next_minute.rules[0].rule.key.endswith(f":rpm:{NOW // 60_000 + 1}")
    # Counter keys expire a minute after their window; the reservation after the configured TTL.
    assert first.rules[0].rule.expires_at_ms == (NOW // 60_000 + 1) * 60_000 + 60_000
    # A tenant with no limits needs no admission at all.
    assert planner.plan(auth.identify({"x-api-key": "sk-solo"}), "m1", 10, 5, NOW) is None


def test_planner_cache_is_bounded() -> None:
    acme = Authenticator(policy()).identify({"x-api-key": "sk-acme"})
    planner = QuotaPlanner(max_cached=3)
    for i in range(10):
        planner.plan(acme, f"model-{i}", 1, 1, NOW)
    assert len(planner._cache) <= 3


def test_success_headers_show_the_tightest_limits() -> None:
    plan = _plan()
    headers = dict(rate_limit_headers(plan, AdmitResult(True, None, (3, 150, 150, 1, 50, 150))))
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "30s",
        # per-key TPM (400, 50 used) leaves 350; tenant TPM (1000, 150 used) leaves 850.
        "x-ratelimit-limit-tokens": "400",
        "x-ratelimit-remaining-tokens": "350",
        "x-ratelimit-reset-tokens": "30s",
    }


def test_refusals() -> None:
    plan = _plan()
    tokens = refusal(plan, AdmitResult(False, 1, (3, 900, 150, 1, 50, 150)))
    assert (tokens.status, tokens.type, tokens.code) == (429, "tokens", "rate_limit_exceeded")
    assert tokens.headers["retry-after"] == "30" and tokens.headers["retry-after-ms"] == "30000"
    assert "Limit 1000, Used 900, Requested 150" in tokens.message
    budget = refusal(plan, AdmitResult(False, 2, (3, 150, 4990, 1, 50, 150)))
    assert (budget.type, budget.code, budget.headers["x-should-retry"]) == (
        "insufficient_quota",
        "insufficient_quota",
        "false",
    )
    huge = refusal(_plan(prompt=900, completion=900), AdmitResult(False, 1, (1, 0, 0, 0, 0, 0)))
    assert huge.headers["x-should-retry"] == "false" and "Request too large" in huge.message


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (20, "20ms"),
        (1500, "1.5s"),
        (30_000, "30s"),
        (59_001, "60s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_duration_format(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_only_the_headers_a_decision_reads_are_wanted() -> None:
    gateway = Gateway.from_policy(policy(auth={"jwt_tenant_header": "x-jwt-tenant", "trust_spiffe": True}))
    assert {"authorization", "x-api-key", "x-jwt-tenant", "x-forwarded-client-cert"} <= gateway.request_header_names
    assert {":path", ":method", "content-type", "content-length", "x-llm-backend"} <= gateway.request_header_names
    assert "user-agent" not in gateway.request_header_names
    with pytest.raises(PolicyError, match="jwt_tenant_header must be a lower-case"):
        policy(auth={"jwt_tenant_header": "X-Jwt-Tenant"})
