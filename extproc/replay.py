"""`extproc replay`: what a policy change would do to traffic already served, from the access log alone.

Every logged inference request is re-decided from its logged features (tenant and key name,
requested class, model, endpoint, JSON mode, tools, quality, prompt tokens, messages, max_tokens):
no prompt text is needed. The same decision functions the gateway runs decide: model access,
the routing rules, the caps and the context window, then the quotas, replayed in log order on
an in-memory store at each request's logged time and settled with its logged usage.

What a replay cannot know: load (backends are taken as unsaturated, so no fallback and no
shedding: requests compare by the rules' pick, `routed_backend`, and requests refused for load or
by our own failure are not replayed), and a tokenizer change (the logged count is reused).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc import errors
from extproc.core import Gateway, check_prompt, completion_cap, context_check
from extproc.endpoints import BY_ENDPOINT
from extproc.errors import GatewayError
from extproc.identity import Identity
from extproc.quota.memory import MemoryStore
from extproc.quota.plan import refusal
from extproc.recorder import RequestRecord
from extproc.routing import RequestFacts


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a request went (backend) or why it was refused (code)."""

    backend: str | None
    code: str | None
    outcome: str

    def describe(self) -> str:
        return f"-> {self.backend}" if self.code is None else f"refused {self.code}"


@dataclass(slots=True)
class Change:
    tenant: str
    traffic_class: str
    before: Verdict
    after: Verdict

    @property
    def kind(self) -> str:
        if self.before.code is None and self.after.code is None:
            return "moved"
        if self.before.code is None:
            return "newly_limited" if self.after.outcome in ("rate_limited", "quota_exhausted") else "newly_refused"
        if self.after.code is None:
            return "newly_admitted"
        return "refusal_changed"


# Refusals that depend on load or on an outage at the time, not on the policy: a replay cannot redo them.
_NOT_REPLAYABLE = frozenset({"shed", "backend_overloaded", "quota_store_unavailable", "internal_error"})


@dataclass(slots=True)
class Report:
    replayed: int = 0
    skipped: int = 0  # lines that are no decided inference request, or whose refusal a replay cannot redo
    unchanged: int = 0
    changes: list[Change] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        kinds: Counter[str] = Counter(c.kind for c in self.changes)
        moves: Counter[str] = Counter(
            f"{c.before.describe()} => {c.after.describe()}" for c in self.changes if c.kind == "moved"
        )
        refusals: Counter[str] = Counter(
            f"{c.before.describe()} => {c.after.describe()}" for c in self.changes if c.kind != "moved"
        )
        by_tenant_class: Counter[str] = Counter(f"{c.tenant}/{c.traffic_class}: {c.kind}" for c in self.changes)
        return {
            "replayed": self.replayed,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "changed": len(self.changes),
            "by_kind": dict(sorted(kinds.items())),
            "moves": dict(moves.most_common()),
            "refusals": dict(refusals.most_common()),
            "by_tenant_and_class": dict(sorted(by_tenant_class.items())),
        }


def read_log(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any] | None]:
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            yield None
            continue
        yield entry if isinstance(entry, dict) else None


def logged_verdict(entry: dict[str, Any]) -> Verdict:
    """What the gateway decided when it served the request: only its own refusals carry a code.

    An admitted request compares by the rules' pick: a fallback under load is not the policy's doing.
    """
    code = entry.get("code")
    if code:
        return Verdict(None, code, entry.get("outcome") or "invalid")
    return Verdict(entry.get("routed_backend") or entry.get("backend"), None, "ok")


class Replayer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = MemoryStore()
        self._keys: dict[tuple[str, str | None], Identity] = {}

    def _identity(self, tenant_name: str | None, key: str | None) -> Identity | None:
        gateway = self.gateway
        if not gateway.auth.enabled:
            return None
        tenant = gateway.auth.tenants.get(tenant_name or "")
        if tenant is None:
            return None
        found = self._keys.get((tenant.name, key))
        if found is None:
            found = self._keys[(tenant.name, key)] = Identity(tenant, key, "api_key")
        return found

    async def decide(self, entry: dict[str, Any]) -> Verdict:
        try:
            return await self._decide(entry)
        except GatewayError as exc:
            return Verdict(None, exc.reason, exc.kind.outcome)

    async def _decide(self, entry: dict[str, Any]) -> Verdict:
        gateway = self.gateway
        endpoint = entry["endpoint"]
        translator = BY_ENDPOINT[endpoint]
        identity = self._identity(entry.get("tenant"), entry.get("key"))
        if gateway.auth.enabled and identity is None:
            raise errors.unauthorized("The tenant of this logged request is not in the new policy.")
        requested_model = entry["model"]
        scratch = RequestRecord(0.0, 0.0)  # the decision functions note what they learn; nothing reads it here
        model = gateway.model_for(identity, requested_model, endpoint, scratch)
        requested_class = entry.get("requested_class")
        traffic_class = gateway.traffic_class(identity, requested_class)
        prompt_tokens = int(entry.get("counted_prompt_tokens") or 0)
        facts = RequestFacts(
            tenant=identity.tenant.name if identity is not None else None,
            tier=identity.tenant.tier if identity is not None else None,
            traffic_class=traffic_class,
            endpoint=endpoint,
            requested_model=requested_model,
            model=model.name,
            json_mode=bool(entry.get("json_mode")),
            tools=bool(entry.get("tools")),
            quality=entry.get("quality") if entry.get("quality") in gateway.quality_values else None,
            prompt_tokens=prompt_tokens,
            messages=int(entry.get("messages") or 0),
        )
        _, target = gateway.route(facts, model, scratch)
        prompt_field = translator.prompt_field
        check_prompt(target, prompt_tokens, requested_model, prompt_field)
        completion = 0
        if translator.generates:
            requested = entry.get("max_tokens")
            completion = completion_cap(
                target,
                model,
                requested if isinstance(requested, int) else None,
                prompt_tokens,
                "max_tokens",
                requested_model,
            )
        context_check(target, prompt_tokens, completion, prompt_field)
        if identity is not None:
            await self._admit_quota(entry, identity, model.name, prompt_tokens, completion)
        return Verdict(target.backend, None, "ok")

    async def _admit_quota(
        self, entry: dict[str, Any], identity: Identity, model: str, prompt: int, completion: int
    ) -> None:
        now_ms = int(float(entry.get("ts") or 0) * 1000)
        plan = self.gateway.quota_planner.plan(identity, model, prompt, completion, now_ms)
        if plan is None:
            return
        result = await self.store.admit(
            plan.tag, plan.request_id, plan.store_rules, plan.costs, now_ms, plan.expires_at_ms
        )
        if not result.allowed:
            raise refusal(plan, result)
        used_prompt = int(entry.get("prompt_tokens") or 0) if entry.get("usage") != "none" else 0
        used_completion = int(entry.get("completion_tokens") or 0)
        await self.store.settle(
            plan.tag, plan.request_id, plan.store_rules, plan.actual_costs(used_prompt, used_completion)
        )


async def replay_async(gateway: Gateway, lines: Iterable[bytes | str]) -> Report:
    report = Report()
    replayer = Replayer(gateway)
    entries = []
    for entry in read_log(lines):
        if (
            entry is None
            or entry.get("endpoint") not in BY_ENDPOINT
            or not entry.get("model")
            or entry.get("code") in _NOT_REPLAYABLE
            # A bad key stays a bad key: nothing in a policy change alters that.
            or (entry.get("outcome") == "unauthorized" and entry.get("tenant") is None)
        ):
            report.skipped += 1
        else:
            entries.append(entry)
    # Lines are written as requests end; the quotas replay in the order requests arrived.
    entries.sort(key=lambda e: float(e.get("ts") or 0))
    for entry in entries:
        before = logged_verdict(entry)
        after = await replayer.decide(entry)
        report.replayed += 1
        if (before.backend, before.code) == (after.backend, after.code):
            report.unchanged += 1
        else:
            report.changes.append(
                Change(entry.get("tenant") or "anonymous", entry.get("class") or "interactive", before, after)
            )
    return report


def replay(gateway: Gateway, lines: Iterable[bytes | str]) -> Report:
    return asyncio.run(replay_async(gateway, lines))


def format_report(report: Report) -> str:
    summary = report.summary()
    out = [
        f"replayed {summary['replayed']} requests ({summary['skipped']} lines skipped): "
        f"{summary['unchanged']} unchanged, {summary['changed']} changed",
    ]
    for title, key in (
        ("by kind", "by_kind"),
        ("moves between backends", "moves"),
        ("refusals", "refusals"),
        ("by tenant and class", "by_tenant_and_class"),
    ):
        if summary[key]:
            out.append(f"{title}:")
            out += [f"  {count:6d}  {what}" for what, count in summary[key].items()]
    return "\n".join(out)
