"""`extproc route` and the rule checks of `extproc policy check`: the decision an SRE can ask for.

The dry run drives the very `Gateway` the server runs, with the load figures given on the
command line instead of scraped ones, and reports what the request would become.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.core import Admission, Gateway, NeedBody, Reply
from extproc.errors import GatewayError
from extproc.load import BackendLoad
from extproc.policy import Policy
from extproc.routing import shadowed_rules

_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"--header {text!r}: expected 'Name: value'")
    return name.strip().lower(), value.strip()


def parse_load(text: str) -> tuple[str, BackendLoad]:
    """`BACKEND:waiting=N,kv=F[,pods=P][,drain=R]`: N waiting per pod, F KV-cache use (0..1)."""
    backend, sep, spec = text.partition(":")
    if not sep or not backend:
        raise ValueError(f"--load {text!r}: expected BACKEND:waiting=N,kv=F")
    values: dict[str, float] = {}
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in ("waiting", "kv", "pods", "drain"):
            raise ValueError(f"--load {text!r}: {item!r} is not waiting=N, kv=F, pods=P or drain=R")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"--load {text!r}: {value!r} is not a number") from None
    if "waiting" not in values:
        raise ValueError(f"--load {text!r}: waiting=N is required")
    pods = int(values.get("pods", 1))
    return backend, BackendLoad(
        waiting_per_pod=values["waiting"],
        kv_cache=values.get("kv"),
        running=None,
        pods=pods,
        drain_per_s=values.get("drain"),
    )


@dataclass
class DryRun:
    """What the gateway would do with one request."""

    status: int
    decision: dict[str, Any]

    def text(self) -> str:
        d = self.decision
        if "error" in d:
            lines = [f"refused: {d['status']} {d['error']['code']}", f"  message : {d['error']['message']}"]
            for key in ("tenant", "class", "prompt_tokens"):
                if key in d:
                    lines.append(f"  {key:<8}: {d[key]}")
            if d.get("headers"):
                lines.append("  headers : " + ", ".join(f"{k}: {v}" for k, v in d["headers"].items()))
            return "\n".join(lines)
        lines = [
            f"routed to backend {d['backend']} (header {d['header']}: {d['subset']})",
            f"  rule          : {d['rule']}",
            f"  tenant        : {d['tenant']} (tier {d['tier']})",
            f"  class         : {d['class']}",
            f"  model         : {d['model']} -> {d['served_model']} upstream",
            f"  prompt tokens : {d['prompt_tokens']} (cap {d['prompt_cap']}, window {d['max_model_len']})",
            f"  completion cap: {d['completion_tokens']}",
            "  considered    : " + ("; ".join(f"{c['backend']}: {c['verdict']}" for c in d["considered"]) or "-"),
            "  normalized    : " + (", ".join(d["notes"]) or "nothing"),
            "  headers set   : " + ", ".join(f"{k}: {v}" for k, v in d["set_headers"]),
        ]
        if d["body"] is not None:
            lines.append(f"  body upstream : {orjson.dumps(d['body']).decode()}")
        return "\n".join(lines)


def route(
    policy: Policy, request: bytes, headers: dict[str, str], loads: dict[str, BackendLoad], endpoint: str = "chat"
) -> DryRun:
    gateway = Gateway.from_policy(policy)
    head = {":method": "POST", ":path": _PATHS[endpoint], "content-type": "application/json", **headers}
    verdict = gateway.on_request_headers(head)
    if isinstance(verdict, Reply):
        return _refused(verdict.status, orjson.loads(verdict.body), dict(verdict.headers), {})
    if not isinstance(verdict, NeedBody):
        return DryRun(0, {"passthrough": True})
    identity = verdict.identity
    facts: dict[str, Any] = {
        "tenant": identity.tenant.name if identity is not None else None,
        "class": verdict.traffic_class,
    }
    try:
        admission = gateway.on_request_body(verdict, request, loads)
    except GatewayError as exc:
        return _refused(exc.status, orjson.loads(exc.body()), exc.headers, facts)
    return DryRun(200, _admitted(gateway, admission))


def _refused(status: int, body: dict[str, Any], headers: dict[str, str], facts: dict[str, Any]) -> DryRun:
    headers = {k: v for k, v in headers.items() if k != "content-type"}
    return DryRun(status, {"status": status, **body, "headers": headers, **facts})


def _admitted(gateway: Gateway, admission: Admission) -> dict[str, Any]:
    target = admission.target
    identity = admission.identity
    body = orjson.loads(admission.body) if admission.body is not None else None
    return {
        "status": 200,
        "backend": target.backend,
        "header": gateway.backend_header,
        "subset": target.subset,
        "rule": admission.rule,
        "tenant": identity.tenant.name if identity is not None else None,
        "tier": identity.tenant.tier if identity is not None else None,
        "class": admission.traffic_class,
        "model": admission.model.name,
        "served_model": target.served_name,
        "prompt_tokens": admission.prompt_tokens,
        "prompt_cap": target.prompt_cap,
        "max_model_len": target.max_model_len,
        "completion_tokens": admission.completion_tokens,
        "considered": [{"backend": c.backend, "verdict": c.verdict} for c in admission.considered],
        "notes": admission.notes,
        "set_headers": admission.set_headers,
        "body": body,
    }


def rule_problems(policy: Policy) -> list[str]:
    """What `policy check` reports beyond schema errors: shadowed rules, fallbacks too small, and
    backends sent other models' traffic without saying what they serve."""
    problems = shadowed_rules(policy)
    sent_elsewhere = {rule.backend for rule in policy.routing.rules if rule.backend is not None}
    sent_elsewhere |= {f for backend in policy.backends.values() for f in backend.fallbacks}
    if policy.routing.default is not None:
        sent_elsewhere.add(policy.routing.default)
    for name in sorted(sent_elsewhere):
        spec = policy.backends[name]
        missing = [key for key in ("served_name", "max_model_len") if getattr(spec, key) is None]
        if missing:
            problems.append(
                f"backends[{name}] receives other models' traffic (a rule, routing.default or a fallback) but "
                f"sets no {' or '.join(missing)}: the requesting model's values are used for it"
            )
    gateway = Gateway.from_policy(policy)
    seen: set[int] = set()
    for model in gateway.models.values():
        if id(model) in seen:
            continue
        seen.add(id(model))
        names = {n for n, m in gateway.models.items() if m is model}
        reachable = {model.backend, policy.routing.default} | {
            rule.backend for rule in policy.routing.rules if rule.match.models is None or names & set(rule.match.models)
        }
        for backend in sorted(b for b in reachable if b is not None):
            target = model.targets[backend]
            for name in target.fallbacks:
                fallback = model.targets[name]
                # What the primary admits at most: its prompt cap and window.
                if fallback.max_model_len < target.max_model_len or fallback.prompt_cap < target.prompt_cap:
                    problems.append(
                        f"backends[{backend}].fallbacks: {name} (window {fallback.max_model_len}, prompt cap "
                        f"{fallback.prompt_cap}) cannot hold every request {backend} admits for model "
                        f"{model.name} (window {target.max_model_len}, prompt cap {target.prompt_cap}); "
                        "longer ones are not sent there, they queue on the primary or are shed"
                    )
    return problems
