"""Sans-IO quota planning: which limits apply, what to reserve, how to settle, what to say.

Windows are fixed and aligned (minute, UTC day, UTC month) so a counter is exactly
the sum of what was charged in it, across any number of gateway replicas.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Literal

from extproc import codes, names
from extproc.errors import GatewayError, retry_headers
from extproc.identity import Identity
from extproc.policy import LimitSpec, TokenCounts
from extproc.quota.store import AdmitResult, LimitRule

Metric = Literal["requests", "tokens", "day", "month", "concurrency"]
_MINUTE_MS = 60_000
_SLACK_MS = 60_000  # counters outlive their window a little: late settlements still land
_CONCURRENCY_RESET_MS = 1000  # a slot frees when some request ends: "try again in a second"

# What one request charges a rule, as an index into (1, prompt, completion, prompt + completion).
_ONE, _PROMPT, _COMPLETION, _TOTAL = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class PlannedRule:
    rule: LimitRule
    metric: Metric
    counts: TokenCounts  # for token metrics; budgets count the total
    scope: str  # "tenant", "key:<name>", "model:<name>"
    window_end_ms: int  # when this window starts over (0 for concurrency: no window)

    def reset_ms(self, now_ms: int) -> int:
        if self.metric == "concurrency":
            return _CONCURRENCY_RESET_MS
        return max(self.window_end_ms - now_ms, 0)


def _basis(metric: Metric, counts: TokenCounts) -> int:
    if metric == "requests" or metric == "concurrency":
        return _ONE
    if metric == "tokens" and counts == "input":
        return _PROMPT
    if metric == "tokens" and counts == "output":
        return _COMPLETION
    return _TOTAL


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The limits one caller (tenant, key, model) is held to in the current windows.

    The same object serves every request of that caller until the minute changes: only the
    costs are per request.
    """

    tag: str
    planned: tuple[PlannedRule, ...]
    store_rules: list[LimitRule]
    bases: tuple[int, ...]
    request_rules: tuple[int, ...]  # indices of the "requests" rules: x-ratelimit-*-requests
    token_rules: tuple[int, ...]  # indices of the "tokens" rules: x-ratelimit-*-tokens

    @classmethod
    def of(cls, tag: str, planned: list[PlannedRule]) -> RuleSet:
        return cls(
            tag,
            tuple(planned),
            [p.rule for p in planned],
            tuple(_basis(p.metric, p.counts) for p in planned),
            tuple(i for i, p in enumerate(planned) if p.metric == "requests"),
            tuple(i for i, p in enumerate(planned) if p.metric == "tokens"),
        )

    def costs(self, prompt_tokens: int, completion_tokens: int) -> list[int]:
        by_basis = (1, prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        return [by_basis[b] for b in self.bases]


@dataclass(slots=True, init=False)
class QuotaPlan:
    rule_set: RuleSet
    request_id: str
    costs: list[int]  # charged at admission, one per rule
    now_ms: int
    expires_at_ms: int  # the reservation's own lifetime

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, rule_set: RuleSet, request_id: str, costs: list[int], now_ms: int, expires_at_ms: int) -> None:
        self.rule_set = rule_set
        self.request_id = request_id
        self.costs = costs
        self.now_ms = now_ms
        self.expires_at_ms = expires_at_ms

    @property
    def tag(self) -> str:
        return self.rule_set.tag

    @property
    def rules(self) -> tuple[PlannedRule, ...]:
        return self.rule_set.planned

    @property
    def store_rules(self) -> list[LimitRule]:
        return self.rule_set.store_rules

    def actual_costs(self, prompt_tokens: int, completion_tokens: int) -> list[int]:
        """What each rule should finally hold for this request."""
        return self.rule_set.costs(prompt_tokens, completion_tokens)


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


def rule_set(identity: Identity, model_name: str, minute: int, prefix: str = "xp") -> RuleSet:
    """Every limit that applies to this caller and model in the windows of this minute."""
    tenant = identity.tenant
    tag = tenant.name
    base = f"{prefix}:{{{tag}}}"
    scopes: list[tuple[str, str, LimitSpec]] = [("tenant", base, tenant.spec.limits)]
    if identity.key_name is not None and tenant.spec.per_key_limits is not None:
        scopes.append((f"key:{identity.key_name}", f"{base}:k:{identity.key_name}", tenant.spec.per_key_limits))
    model_limits = tenant.spec.model_limits.get(model_name)
    if model_limits is not None:
        scopes.append((f"model:{model_name}", f"{base}:m:{model_name}", model_limits))

    minute_end = (minute + 1) * _MINUTE_MS
    day_id, day_end_ms, month_id, month_end_ms = _calendar(minute)
    planned: list[PlannedRule] = []
    for scope, key, spec in scopes:
        table: tuple[tuple[Metric, int | None, str, TokenCounts, int], ...] = (
            # metric, limit, key suffix, what it counts, window end
            ("requests", spec.requests_per_minute, f"rpm:{minute}", "total", minute_end),
            ("tokens", spec.tokens_per_minute, f"tpm:{minute}", spec.tokens_per_minute_counts, minute_end),
            ("day", spec.tokens_per_day, f"tpd:{day_id}", "total", day_end_ms),
            ("month", spec.tokens_per_month, f"tpmo:{month_id}", "total", month_end_ms),
            ("concurrency", spec.max_concurrent_requests, "conc", "total", 0),
        )
        for metric, limit, suffix, counted, window_end in table:
            if limit:
                if metric == "concurrency":
                    rule = LimitRule(f"{key}:{suffix}", "concurrency", limit, 0)
                else:
                    rule = LimitRule(f"{key}:{suffix}", "counter", limit, window_end + _SLACK_MS)
                planned.append(PlannedRule(rule, metric, counted, scope, window_end))
    return RuleSet.of(tag, planned)


class QuotaPlanner:
    """Plans admissions; the rule sets of the current minute are built once and shared."""

    def __init__(self, prefix: str = "xp", reservation_ttl_ms: int = 600_000, max_cached: int = 4096) -> None:
        self.prefix = prefix
        self.reservation_ttl_ms = reservation_ttl_ms
        self.max_cached = max_cached
        self._minute = -1
        self._cache: dict[tuple[str, str | None, str], RuleSet] = {}
        # Unique across replicas and restarts without a uuid per request: a random prefix, then a counter.
        self._id_prefix = os.urandom(6).hex() + "-"
        self._ids = itertools.count(1)

    def plan(
        self, identity: Identity, model_name: str, prompt_tokens: int, completion_tokens: int, now_ms: int
    ) -> QuotaPlan | None:
        """The admission to ask the store for, or None when no limit applies."""
        minute = now_ms // _MINUTE_MS
        if minute != self._minute or len(self._cache) >= self.max_cached:
            self._minute = minute
            self._cache.clear()
        cache_key = (identity.tenant.name, identity.key_name, model_name)
        rules = self._cache.get(cache_key)
        if rules is None:
            rules = self._cache[cache_key] = rule_set(identity, model_name, minute, self.prefix)
        if not rules.planned:
            return None
        return QuotaPlan(
            rules,
            f"{self._id_prefix}{next(self._ids)}",
            rules.costs(prompt_tokens, completion_tokens),
            now_ms,
            now_ms + self.reservation_ttl_ms,
        )


_WHOLE_SECONDS = [f"{n}s" for n in range(61)]


def format_duration(ms: int) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`, `2h3m4s`."""
    if 10_000 < ms < 60_000:  # within a minute window, the common case: no float formatting
        return _WHOLE_SECONDS[-(-ms // 1000)]
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{math.ceil(seconds)}s"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


_REQUEST_HEADERS = (
    names.RATELIMIT_LIMIT_REQUESTS,
    names.RATELIMIT_REMAINING_REQUESTS,
    names.RATELIMIT_RESET_REQUESTS,
)
_TOKEN_HEADERS = (names.RATELIMIT_LIMIT_TOKENS, names.RATELIMIT_REMAINING_TOKENS, names.RATELIMIT_RESET_TOKENS)


def rate_limit_headers(plan: QuotaPlan, result: AdmitResult) -> list[tuple[str, str]]:
    """x-ratelimit-* for the tightest request and token limits that apply."""
    headers: list[tuple[str, str]] = []
    planned, used = plan.rule_set.planned, result.used
    for indices, (limit_h, remaining_h, reset_h) in (
        (plan.rule_set.request_rules, _REQUEST_HEADERS),
        (plan.rule_set.token_rules, _TOKEN_HEADERS),
    ):
        if not indices:
            continue
        tightest = indices[0] if len(indices) == 1 else min(indices, key=lambda i: planned[i].rule.limit - used[i])
        rule = planned[tightest]
        limit = rule.rule.limit
        headers += [
            (limit_h, str(limit)),
            (remaining_h, str(max(limit - used[tightest], 0))),
            (reset_h, format_duration(rule.reset_ms(plan.now_ms))),
        ]
    return headers


def refusal(plan: QuotaPlan, result: AdmitResult) -> GatewayError:
    """The 429 a denied admission gets, shaped the way OpenAI clients expect."""
    assert result.denied_rule is not None
    denied = plan.rules[result.denied_rule]
    used = result.used[result.denied_rule]
    requested = plan.costs[result.denied_rule]
    reset_ms = denied.reset_ms(plan.now_ms)
    limit = denied.rule.limit
    headers = dict(rate_limit_headers(plan, result))
    scope = "" if denied.scope == "tenant" else f" ({denied.scope})"
    if denied.metric in ("day", "month"):
        period = "daily" if denied.metric == "day" else "monthly"
        headers[names.SHOULD_RETRY] = "false"
        return GatewayError(
            codes.INSUFFICIENT_QUOTA,
            f"You exceeded your {period} token budget{scope}: limit {limit}, used {used}, requested "
            f"{requested}. It resets in {format_duration(reset_ms)}.",
            headers=headers,
        )
    kind = "tokens" if denied.metric == "tokens" else "requests"
    if requested > limit:
        # It can never fit: retrying cannot help.
        headers[names.SHOULD_RETRY] = "false"
        return GatewayError(
            codes.RATE_LIMIT_EXCEEDED,
            f"Request too large{scope} on tokens per min (TPM): Limit {limit}, Requested {requested}. "
            "Lower max_tokens or the prompt.",
            type=kind,
            headers=headers,
        )
    wait_ms = reset_ms
    headers.update(retry_headers(wait_ms))
    label = {
        "tokens": "tokens per min (TPM)",
        "requests": "requests per min (RPM)",
        "concurrency": "concurrent requests",
    }[denied.metric]
    return GatewayError(
        codes.RATE_LIMIT_EXCEEDED,
        f"Rate limit reached{scope} on {label}: Limit {limit}, Used {used}, Requested {requested}. "
        f"Please try again in {format_duration(wait_ms)}.",
        type=kind,
        headers=headers,
    )
