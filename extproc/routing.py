"""Routing rules, compiled once per policy and evaluated per request as plain data.

The first rule that matches wins; the policy's default (or the requested model's own
backend) applies last. Evaluation memoizes the rules that survive a request's discrete
facts (tenant, tier, class, endpoint, model, JSON mode, tools, quality), so a request
only checks the ranges (prompt tokens, message count) of the few rules left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extproc.codes import ErrorCode
from extproc.errors import rule_code
from extproc.policy import TRAFFIC_CLASSES, Policy, Range, RulePolicy

# Shedding and queueing order: a lower number goes first and is shed last.
CLASS_PRIORITY: dict[str, int] = {name: rank for rank, name in enumerate(TRAFFIC_CLASSES)}
CLASS_OF_PRIORITY: dict[int, str] = {rank: name for name, rank in CLASS_PRIORITY.items()}
_NO_LIMIT = 1 << 62
_MEMO_MAX = 4096


@dataclass(slots=True, init=False)
class RequestFacts:
    """What a rule can match on, taken from the request and its caller."""

    tenant: str | None
    tier: str | None
    traffic_class: str
    endpoint: str
    requested_model: str  # as sent: a public name or an alias
    model: str  # the canonical public name
    json_mode: bool
    tools: bool
    quality: str | None
    prompt_tokens: int
    messages: int

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(
        self,
        tenant: str | None,
        tier: str | None,
        traffic_class: str,
        endpoint: str,
        requested_model: str,
        model: str,
        json_mode: bool,
        tools: bool,
        quality: str | None,
        prompt_tokens: int,
        messages: int,
    ) -> None:
        self.tenant = tenant
        self.tier = tier
        self.traffic_class = traffic_class
        self.endpoint = endpoint
        self.requested_model = requested_model
        self.model = model
        self.json_mode = json_mode
        self.tools = tools
        self.quality = quality
        self.prompt_tokens = prompt_tokens
        self.messages = messages

    def discrete(self) -> tuple[object, ...]:
        return (
            self.tenant,
            self.tier,
            self.traffic_class,
            self.endpoint,
            self.requested_model,
            self.model,
            self.json_mode,
            self.tools,
            self.quality,
        )


@dataclass(slots=True, init=False)
class RouteTo:
    """A rule's action: one instance per rule, handed to every request the rule takes (never change it)."""

    backend: str
    rule: str  # the rule that matched, or "default"

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, backend: str, rule: str) -> None:
        self.backend = backend
        self.rule = rule


@dataclass(frozen=True, slots=True)
class RejectWith:
    kind: ErrorCode  # the rule's status and code, registered as the policy compiled
    message: str
    rule: str

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def code(self) -> str:
        return self.kind.code


Action = RouteTo | RejectWith


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    tenants: frozenset[str] | None
    tiers: frozenset[str] | None
    classes: frozenset[str] | None
    endpoints: frozenset[str] | None
    models: frozenset[str] | None  # names as written; a canonical name also stands for its aliases
    canonical_models: frozenset[str] | None
    json_mode: bool | None
    tools: bool | None
    quality: frozenset[str] | None
    prompt_tokens: tuple[int, int] | None
    messages: tuple[int, int] | None
    action: Action

    def matches_discrete(self, facts: RequestFacts) -> bool:
        return (
            (self.tenants is None or facts.tenant in self.tenants)
            and (self.tiers is None or facts.tier in self.tiers)
            and (self.classes is None or facts.traffic_class in self.classes)
            and (self.endpoints is None or facts.endpoint in self.endpoints)
            and (
                self.models is None
                or facts.requested_model in self.models
                or (self.canonical_models is not None and facts.model in self.canonical_models)
            )
            and (self.json_mode is None or facts.json_mode == self.json_mode)
            and (self.tools is None or facts.tools == self.tools)
            and (self.quality is None or facts.quality in self.quality)
        )


def _range(value: Range | None) -> tuple[int, int] | None:
    if value is None:
        return None
    return (value.min if value.min is not None else 0, value.max if value.max is not None else _NO_LIMIT)


def _optional_set(values: Sequence[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _compile_rule(rule: RulePolicy, canonical_names: frozenset[str]) -> _Rule:
    match = rule.match
    action: Action
    if rule.backend is not None:
        action = RouteTo(rule.backend, rule.name)
    else:
        assert rule.reject is not None
        reject = rule.reject
        action = RejectWith(rule_code(reject.status, reject.code), reject.message, rule.name)
    models = _optional_set(match.models)
    return _Rule(
        name=rule.name,
        tenants=_optional_set(match.tenants),
        tiers=_optional_set(match.tiers),
        classes=_optional_set(match.classes),
        endpoints=_optional_set(match.endpoints),
        models=models,
        canonical_models=None if models is None else models & canonical_names,
        json_mode=match.json_mode,
        tools=match.tools,
        quality=_optional_set(match.quality),
        prompt_tokens=_range(match.prompt_tokens),
        messages=_range(match.messages),
        action=action,
    )


# A candidate left after the discrete facts: its ranges (None: always) and what it does.
_Candidate = tuple[tuple[int, int] | None, tuple[int, int] | None, Action]


class RuleTable:
    """The policy's rules, ready to evaluate."""

    def __init__(self, policy: Policy) -> None:
        canonical = frozenset(model.name for model in policy.models)
        self.rules = tuple(_compile_rule(rule, canonical) for rule in policy.routing.rules)
        self.default_backend = policy.routing.default
        self.reads_quality = any(rule.quality is not None for rule in self.rules)
        self._memo: dict[tuple[object, ...], tuple[_Candidate, ...]] = {}

    def evaluate(self, facts: RequestFacts, model_backend: str) -> Action:
        key = facts.discrete()
        candidates = self._memo.get(key)
        if candidates is None:
            candidates = self._candidates(facts, key)
        prompt, messages = facts.prompt_tokens, facts.messages
        for prompt_range, messages_range, action in candidates:
            if prompt_range is not None and not prompt_range[0] <= prompt <= prompt_range[1]:
                continue
            if messages_range is not None and not messages_range[0] <= messages <= messages_range[1]:
                continue
            return action
        return RouteTo(self.default_backend or model_backend, "default")

    def _candidates(self, facts: RequestFacts, key: tuple[object, ...]) -> tuple[_Candidate, ...]:
        found: list[_Candidate] = []
        for rule in self.rules:
            if rule.matches_discrete(facts):
                found.append((rule.prompt_tokens, rule.messages, rule.action))
                if rule.prompt_tokens is None and rule.messages is None:
                    break  # it always matches: nothing after it can be reached
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        candidates = self._memo[key] = tuple(found)
        return candidates


def shadowed_rules(policy: Policy) -> list[str]:
    """Rules that can never match because an earlier rule matches everything they would."""
    problems: list[str] = []
    rules = policy.routing.rules
    # A rule naming a model's canonical name matches its aliases too.
    aliases = {model.name: set(model.aliases) for model in policy.models}
    for i, later in enumerate(rules):
        for earlier in rules[:i]:
            if _covers(earlier, later, aliases):
                problems.append(
                    f"routing.rules[{later.name}] is shadowed by routing.rules[{earlier.name}]: "
                    "every request it matches is matched first by the earlier rule"
                )
                break
    return problems


def _covers(earlier: RulePolicy, later: RulePolicy, aliases: dict[str, set[str]]) -> bool:
    """True when every request `later` matches is also matched by `earlier`."""
    a, b = earlier.match, later.match
    for field in ("tenants", "tiers", "classes", "endpoints", "models", "quality"):
        wide, narrow = getattr(a, field), getattr(b, field)
        if wide is None:
            continue
        covered = set(wide)
        if field == "models":
            covered |= {alias for name in wide for alias in aliases.get(name, ())}
        if narrow is None or not set(narrow) <= covered:
            return False
    for field in ("json_mode", "tools"):
        wide, narrow = getattr(a, field), getattr(b, field)
        if wide is not None and wide != narrow:
            return False
    for field in ("prompt_tokens", "messages"):
        wide_range, narrow_range = _range(getattr(a, field)), _range(getattr(b, field))
        if wide_range is None:
            continue
        if narrow_range is None or not (wide_range[0] <= narrow_range[0] and narrow_range[1] <= wide_range[1]):
            return False
    return True
