"""Sans-IO quota planning: which limits apply, what to reserve, how to settle, what to say.

Windows are fixed and aligned (minute, UTC day, UTC month) so a counter is exactly
the sum of what was charged in it, across any number of gateway replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Literal

from extproc import names
from extproc.errors import GatewayError
from extproc.identity import Identity
from extproc.policy import LimitSpec, TokenCounts
from extproc.quota.store import AdmitResult, LimitRule

Metric = Literal["requests", "tokens", "day", "month", "concurrency"]
_MINUTE_MS = 60_000
_SLACK_MS = 60_000  # counters outlive their window a little: late settlements still land


@dataclass(frozen=True, slots=True)
class PlannedRule:
    rule: LimitRule
    metric: Metric
    counts: TokenCounts  # for token metrics; budgets count the total
    scope: str  # "tenant", "key:<name>", "model:<name>"
    reset_ms: int  # until this window starts over


@dataclass(slots=True)
class QuotaPlan:
    tag: str
    request_id: str
    rules: list[PlannedRule]
    expires_at_ms: int

    @property
    def store_rules(self) -> list[LimitRule]:
        return [planned.rule for planned in self.rules]

    def actual_costs(self, prompt_tokens: int, completion_tokens: int) -> list[int]:
        """What each rule should finally hold for this request."""
        return [_cost(p.metric, p.counts, prompt_tokens, completion_tokens) for p in self.rules]


def _cost(metric: Metric, counts: TokenCounts, prompt: int, completion: int) -> int:
    if metric == "requests" or metric == "concurrency":
        return 1
    if metric == "tokens" and counts == "input":
        return prompt
    if metric == "tokens" and counts == "output":
        return completion
    return prompt + completion


@lru_cache(maxsize=4)
def _calendar(minute: int) -> tuple[str, int, str, int]:
    """Day and month window ids and their ends (ms), computed once per minute, not per request."""
    now = datetime.fromtimestamp(minute * 60, UTC)
    day_start = datetime(now.year, now.month, now.day, tzinfo=UTC)
    month_end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return (
        f"{now.year:04d}{now.month:02d}{now.day:02d}",
        int(day_start.timestamp() * 1000) + 86_400_000,
        f"{now.year:04d}{now.month:02d}",
        int(month_end.timestamp() * 1000),
    )


def plan_quota(
    identity: Identity,
    model_name: str,
    request_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    now_ms: int,
    reservation_ttl_ms: int,
    prefix: str = "xp",
) -> QuotaPlan:
    tenant = identity.tenant
    tag = tenant.name
    base = f"{prefix}:{{{tag}}}"
    scopes: list[tuple[str, str, LimitSpec]] = [("tenant", base, tenant.spec.limits)]
    if identity.key_name is not None and tenant.spec.per_key_limits is not None:
        scopes.append((f"key:{identity.key_name}", f"{base}:k:{identity.key_name}", tenant.spec.per_key_limits))
    model_limits = tenant.spec.model_limits.get(model_name)
    if model_limits is not None:
        scopes.append((f"model:{model_name}", f"{base}:m:{model_name}", model_limits))

    minute = now_ms // _MINUTE_MS
    minute_reset = (minute + 1) * _MINUTE_MS - now_ms
    day_id, day_end_ms, month_id, month_end_ms = _calendar(minute)
    total = prompt_tokens + completion_tokens
    rules: list[PlannedRule] = []
    for scope, key, spec in scopes:
        counts = spec.tokens_per_minute_counts
        table: tuple[tuple[Metric, int | None, str, TokenCounts, int, int], ...] = (
            # metric, limit, key suffix, what it counts, cost now, ms until the window resets
            ("requests", spec.requests_per_minute, f"rpm:{minute}", "total", 1, minute_reset),
            (
                "tokens",
                spec.tokens_per_minute,
                f"tpm:{minute}",
                counts,
                _cost("tokens", counts, prompt_tokens, completion_tokens),
                minute_reset,
            ),
            ("day", spec.tokens_per_day, f"tpd:{day_id}", "total", total, day_end_ms - now_ms),
            ("month", spec.tokens_per_month, f"tpmo:{month_id}", "total", total, month_end_ms - now_ms),
            ("concurrency", spec.max_concurrent_requests, "conc", "total", 1, 1000),
        )
        for metric, limit, suffix, counted, cost, reset in table:
            if limit:
                kind: Literal["counter", "concurrency"] = "concurrency" if metric == "concurrency" else "counter"
                rule = LimitRule(f"{key}:{suffix}", kind, limit, cost, reset + _SLACK_MS)
                rules.append(PlannedRule(rule, metric, counted, scope, reset))
    return QuotaPlan(tag, request_id, rules, now_ms + reservation_ttl_ms)


def format_duration(ms: int) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`, `2h3m4s`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{math.ceil(seconds)}s"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def rate_limit_headers(plan: QuotaPlan, result: AdmitResult) -> list[tuple[str, str]]:
    """x-ratelimit-* for the tightest request and token limits that apply."""
    headers: list[tuple[str, str]] = []
    for metric, limit_h, remaining_h, reset_h in (
        (
            "requests",
            names.RATELIMIT_LIMIT_REQUESTS,
            names.RATELIMIT_REMAINING_REQUESTS,
            names.RATELIMIT_RESET_REQUESTS,
        ),
        ("tokens", names.RATELIMIT_LIMIT_TOKENS, names.RATELIMIT_REMAINING_TOKENS, names.RATELIMIT_RESET_TOKENS),
    ):
        candidates = [
            (p.rule.limit - used, p) for p, used in zip(plan.rules, result.used, strict=True) if p.metric == metric
        ]
        if not candidates:
            continue
        remaining, tightest = min(candidates, key=lambda c: c[0])
        headers += [
            (limit_h, str(tightest.rule.limit)),
            (remaining_h, str(max(remaining, 0))),
            (reset_h, format_duration(tightest.reset_ms)),
        ]
    return headers


def refusal(plan: QuotaPlan, result: AdmitResult) -> GatewayError:
    """The 429 a denied admission gets, shaped the way OpenAI clients expect."""
    assert result.denied_rule is not None
    denied = plan.rules[result.denied_rule]
    used = result.used[result.denied_rule]
    limit = denied.rule.limit
    headers = dict(rate_limit_headers(plan, result))
    scope = "" if denied.scope == "tenant" else f" ({denied.scope})"
    if denied.metric in ("day", "month"):
        period = "daily" if denied.metric == "day" else "monthly"
        headers[names.SHOULD_RETRY] = "false"
        return GatewayError(
            429,
            f"You exceeded your {period} token budget{scope}: limit {limit}, used {used}, requested "
            f"{denied.rule.cost}. It resets in {format_duration(denied.reset_ms)}.",
            type="insufficient_quota",
            code="insufficient_quota",
            headers=headers,
        )
    kind = "tokens" if denied.metric == "tokens" else "requests"
    if denied.rule.cost > limit:
        # It can never fit: retrying cannot help.
        headers[names.SHOULD_RETRY] = "false"
        return GatewayError(
            429,
            f"Request too large{scope} on tokens per min (TPM): Limit {limit}, Requested {denied.rule.cost}. "
            "Lower max_tokens or the prompt.",
            type=kind,
            code="rate_limit_exceeded",
            headers=headers,
        )
    wait_ms = denied.reset_ms
    headers[names.RETRY_AFTER] = str(max(1, math.ceil(wait_ms / 1000)))
    headers[names.RETRY_AFTER_MS] = str(wait_ms)
    label = {
        "tokens": "tokens per min (TPM)",
        "requests": "requests per min (RPM)",
        "concurrency": "concurrent requests",
    }[denied.metric]
    return GatewayError(
        429,
        f"Rate limit reached{scope} on {label}: Limit {limit}, Used {used}, Requested {denied.rule.cost}. "
        f"Please try again in {format_duration(wait_ms)}.",
        type=kind,
        code="rate_limit_exceeded",
        headers=headers,
    )
