"""Prometheus metrics. Every label value comes from the policy or a fixed set, so cardinality is bounded.

Each worker process serves its own registry on `--metrics-port + worker index`;
Prometheus scrapes them as separate targets (sum by pod in queries).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()


class HotCounter(Collector):
    """A labelled counter for per-request events, kept as plain ints.

    prometheus_client's own Counter takes a lock per increment; these are bumped a few times
    per request from the event loop thread only, so one dict update is enough. The scrape
    thread copies the dict (atomic under the GIL) and exports the usual `<name>_total`.
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labels)


REQUESTS = HotCounter(
    "extproc_requests",
    "Inference requests decided by the gateway, by outcome (ok or the error code returned).",
    ["model", "endpoint", "outcome"],
    registry=REGISTRY,
)
TOKENS = HotCounter(
    "extproc_tokens",
    "Tokens settled from real usage (prompt, completion).",
    ["model", "tenant", "kind"],
    registry=REGISTRY,
)
RESPONSES = HotCounter(
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
QUOTA_DROPPED = Counter(
    "extproc_quota_dropped_settlements",
    "Settlements given up (queue full during a long outage, or refused by the store): their usage is lost.",
    registry=REGISTRY,
)
QUOTA_PENDING = Gauge(
    "extproc_quota_pending_settlements",
    "Settlements kept in memory while the quota store is unreachable, written when it returns.",
    registry=REGISTRY,
)

POLICY_RELOADS = HotCounter(
    "extproc_policy_reloads",
    "Policy reloads by result: ok, or refused (the last good policy stays in force).",
    ["result"],
    registry=REGISTRY,
)


def count_reload(result: object) -> None:
    POLICY_RELOADS.inc(("ok" if getattr(result, "ok", False) else "refused",))


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
        "method_not_allowed",
        "unsupported_media_type",
        "shed",
        "backend_overloaded",
    }
)


_STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


def count_request(model: str, endpoint: str, code: str | None) -> None:
    REQUESTS.inc((model, endpoint, outcome_label(code)))


def count_usage(model: str, tenant: str, prompt: int, completion: int) -> None:
    TOKENS.inc((model, tenant, "prompt"), prompt)
    TOKENS.inc((model, tenant, "completion"), completion)


def count_response(model: str, status: int) -> None:
    RESPONSES.inc((model, _STATUS_CLASSES.get(status // 100, "other")))


def outcome_label(code: str | None) -> str:
    if code is None:
        return "invalid_request"
    return code if code in _OUTCOMES else "error"


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    start_http_server(port, addr=host, registry=REGISTRY)
