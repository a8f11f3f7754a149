"""Prometheus metrics. Every label value comes from the policy or a fixed set, so cardinality is bounded.

Each worker process serves its own registry on `--metrics-port + worker index`;
Prometheus scrapes them as separate targets (sum by pod in queries).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "extproc_requests",
    "Inference requests decided by the gateway, by outcome (ok or the error code returned).",
    ["model", "endpoint", "outcome"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "extproc_tokens",
    "Tokens settled from real usage (prompt, completion) and counted at admission (counted_prompt).",
    ["model", "tenant", "kind"],
    registry=REGISTRY,
)
RESPONSES = Counter(
    "extproc_upstream_responses",
    "Upstream responses seen, by status class.",
    ["model", "status_class"],
    registry=REGISTRY,
)
QUOTA_FAIL_OPEN = Counter(
    "extproc_quota_fail_open_admissions",
    "Admissions decided by per-process limits because the shared quota store was unreachable.",
    registry=REGISTRY,
)
QUOTA_UNAVAILABLE = Counter(
    "extproc_quota_store_unavailable",
    "Admissions refused with 503 because the quota store was unreachable (fail-closed).",
    registry=REGISTRY,
)
QUOTA_PENDING = Gauge(
    "extproc_quota_pending_settlements",
    "Settlements kept in memory while the quota store is unreachable, written when it returns.",
    registry=REGISTRY,
)

# Outcomes come from our own error codes; anything else is folded into "error" to keep the set closed.
_OUTCOMES = frozenset(
    {
        "ok",
        "invalid_json",
        "invalid_request",
        "model_not_found",
        "model_not_allowed",
        "context_length_exceeded",
        "prompt_too_long",
        "max_tokens_exceeded",
        "unsupported_endpoint",
        "request_too_large",
        "rate_limit_exceeded",
        "insufficient_quota",
        "quota_store_unavailable",
        "invalid_api_key",
        "internal_error",
    }
)


_children: dict[tuple[str, ...], Counter] = {}


def _child(metric: Counter, *labels: str) -> Counter:
    # prometheus_client's labels() takes a lock and builds a tuple per call; ours is one dict lookup.
    key = (metric._name, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def count_request(model: str, endpoint: str, code: str | None) -> None:
    _child(REQUESTS, model, endpoint, outcome_label(code)).inc()


def count_usage(model: str, tenant: str, prompt: int, completion: int) -> None:
    _child(TOKENS, model, tenant, "prompt").inc(prompt)
    _child(TOKENS, model, tenant, "completion").inc(completion)


def count_response(model: str, status: int) -> None:
    _child(RESPONSES, model, f"{status // 100}xx").inc()


def outcome_label(code: str | None) -> str:
    if code is None:
        return "invalid_request"
    return code if code in _OUTCOMES else "error"


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    start_http_server(port, addr=host, registry=REGISTRY)
