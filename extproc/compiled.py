"""Compiling a policy: every piece of I/O a decision would need, done once per policy load.

`compile_policy` reads key files, loads tokenizers and reads the clock; the result is
plain data that `extproc.core.Gateway` decides on without touching a file or a clock.
A reload compiles a new one (off the event loop) and swaps the gateway built from it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from extproc.identity import Authenticator, read_key_files
from extproc.policy import BackendPolicy, CapAction, ModelPolicy, Policy
from extproc.routing import RuleTable
from extproc.tokenizer import TokenCounter, counter_for


@dataclass(frozen=True, slots=True)
class Target:
    """One model as served by one backend: what is checked and written when a request goes there."""

    backend: str
    subset: str  # the routing header value
    served_name: str  # the model name written into the body
    endpoints: frozenset[str]
    max_model_len: int
    prompt_cap: int
    completion_cap: int
    default_completion: int
    fallbacks: tuple[str, ...]
    max_in_flight: int | None


@dataclass(frozen=True, slots=True)
class CompiledModel:
    """A policy model with every default and global ceiling already applied."""

    name: str
    backend: str  # its own backend, where a request goes unless a rule says otherwise
    counter: TokenCounter
    cap_action: CapAction
    allowed_params: frozenset[str] | None
    denied_params: frozenset[str]
    targets: dict[str, Target]  # by backend name: every backend a rule or a fallback may send it to
    max_model_len: int  # the window /v1/models advertises: its own backend's

    @property
    def own(self) -> Target:
        return self.targets[self.backend]

    @property
    def subset(self) -> str:
        return self.own.subset


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: Policy
    models: dict[str, CompiledModel]  # every public name and alias
    auth: Authenticator
    rules: RuleTable
    created: int  # the `created` stamp /v1/models shows
    digest: str  # sha256 of the normalized policy, to tell which one is in force


def target_for(spec: ModelPolicy, backend_name: str, backend: BackendPolicy, policy: Policy) -> Target:
    gw = policy.gateway
    own = backend_name == spec.backend

    def cap(*values: int | None) -> int:
        return min(v for v in values if v is not None)

    window = spec.max_model_len if own else (backend.max_model_len or spec.max_model_len)
    completion_cap = cap(spec.max_completion_tokens, backend.max_completion_tokens, gw.max_completion_tokens)
    if own:
        served = spec.served_name or backend.served_name or spec.name
    else:
        served = backend.served_name or spec.served_name or spec.name
    return Target(
        backend=backend_name,
        subset=policy.subset(backend_name),
        served_name=served,
        endpoints=frozenset(spec.endpoints if own or backend.endpoints is None else backend.endpoints),
        max_model_len=window,
        prompt_cap=cap(spec.max_prompt_tokens, backend.max_prompt_tokens, gw.max_prompt_tokens),
        completion_cap=completion_cap,
        default_completion=min(spec.default_max_tokens or gw.default_max_tokens, completion_cap),
        fallbacks=tuple(backend.fallbacks),
        max_in_flight=backend.max_in_flight,
    )


def compile_policy(
    policy: Policy,
    *,
    clock: Callable[[], float] = time.time,
    counter_factory: Callable[..., TokenCounter] = counter_for,
) -> CompiledPolicy:
    """All the I/O a policy needs (key files, tokenizers, the clock), done here and only here."""
    counters: dict[str, TokenCounter] = {}
    models: dict[str, CompiledModel] = {}
    for spec in policy.models:
        # Models sharing a tokenizer share its counter (and its remembered counts).
        tokenizer_key = spec.tokenizer.model_dump_json()
        counter = counters.get(tokenizer_key)
        if counter is None:
            counter = counters[tokenizer_key] = counter_factory(spec.tokenizer)
        compiled = CompiledModel(
            name=spec.name,
            backend=spec.backend,
            counter=counter,
            cap_action=spec.completion_cap or policy.gateway.completion_cap,
            allowed_params=frozenset(spec.params.allow) if spec.params.allow is not None else None,
            denied_params=frozenset(spec.params.deny),
            targets={name: target_for(spec, name, backend, policy) for name, backend in policy.backends.items()},
            max_model_len=spec.max_model_len,
        )
        for public in (spec.name, *spec.aliases):
            models[public] = compiled
    auth = Authenticator(policy, read_key_files(policy))
    return CompiledPolicy(
        policy=policy,
        models=models,
        auth=auth,
        rules=RuleTable(policy),
        created=int(clock()),
        digest=policy_digest(policy),
    )


def policy_digest(policy: Policy) -> str:
    return hashlib.sha256(orjson.dumps(policy.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()
