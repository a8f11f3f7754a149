"""Load-aware choice of a backend: saturation, fallbacks, and shedding by traffic class.

Pure: the scraped figures come in as `BackendLoad` values, the verdict goes out as
plain data (the target chosen, every backend considered and why, or a shed error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from extproc import errors
from extproc.compiled import CompiledModel, Target
from extproc.errors import GatewayError
from extproc.load import BackendLoad
from extproc.policy import LoadPolicy

# Retry-after bounds: never "now" (clients would hammer), never past openai-python's 60 s window.
_MIN_RETRY_MS = 1000
_MAX_RETRY_MS = 60_000


class Considered:
    """One backend weighed for a request, and why it was taken or passed over.

    The reason is text only a dry run or a log reads, so the common case (an unsaturated primary)
    keeps the figures and formats them only when `verdict` is asked for.
    """

    __slots__ = ("_level", "_load", "_outcome", "_unknown_as", "backend")

    def __init__(
        self,
        backend: str,
        outcome: str,
        load: BackendLoad | None = None,
        level: float | None = None,
        unknown_as: str | None = None,
    ) -> None:
        self.backend = backend
        self._outcome = outcome  # with no figures to describe (unknown_as None), the whole verdict
        self._load = load
        self._level = level
        self._unknown_as = unknown_as

    @property
    def verdict(self) -> str:
        if self._unknown_as is None:
            return self._outcome
        if self._level is None:
            return f"{self._outcome}: figures unknown (taken as {self._unknown_as})"
        load = self._load
        assert load is not None and load.waiting_per_pod is not None
        kv = f", kv {load.kv_cache:.2f}" if load.kv_cache is not None else ""
        return f"{self._outcome}: queue {load.waiting_per_pod:g}/pod{kv}, level {self._level:.2f}"

    def __repr__(self) -> str:
        return f"Considered({self.backend!r}, {self.verdict!r})"


@dataclass(slots=True, init=False)
class Choice:
    target: Target
    considered: tuple[Considered, ...]

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, target: Target, considered: tuple[Considered, ...]) -> None:
        self.target = target
        self.considered = considered


def saturation_level(load: BackendLoad | None, policy: LoadPolicy) -> float | None:
    """max(queue per pod / its threshold, KV use / its threshold); 1.0 is saturated; None: unknown."""
    if load is None or load.pods == 0 or load.waiting_per_pod is None:
        return None
    level = load.waiting_per_pod / policy.saturation.queue_per_pod
    if load.kv_cache is not None:
        level = max(level, load.kv_cache / policy.saturation.kv_cache)
    return level


def _weigh(
    backend: str, outcome_if_below: str, load: BackendLoad | None, policy: LoadPolicy
) -> tuple[float, Considered]:
    """The level routing acts on (the policy says what unknown means) and the backend as weighed."""
    level = saturation_level(load, policy)
    effective = level if level is not None else (1.0 if policy.unknown == "saturated" else 0.0)
    outcome = outcome_if_below if effective < 1.0 else "saturated"
    return effective, Considered(backend, outcome, load, level, policy.unknown)


def holds(
    target: Target,
    endpoint: str,
    longest_prompt: int,
    total_prompt: int,
    requested_completion: int | None,
    generates: bool = True,
    rejects_over_cap: bool = False,
) -> str | None:
    """Why this target cannot take the request, or None when it can (a default completion shrinks to fit)."""
    if endpoint not in target.endpoints:
        return f"does not serve {endpoint}"
    if rejects_over_cap and requested_completion is not None and requested_completion > target.completion_cap:
        return f"max tokens {requested_completion} > its cap {target.completion_cap}"
    if total_prompt > target.prompt_cap:
        return f"prompt {total_prompt} > its cap {target.prompt_cap}"
    if not generates:
        completion = 0
    elif requested_completion is None:
        completion = 1
    else:
        completion = min(requested_completion, target.completion_cap)
    if longest_prompt + completion > target.max_model_len:
        return f"prompt {longest_prompt} + completion {completion} > its window {target.max_model_len}"
    return None


def choose(
    model: CompiledModel,
    primary: str,
    endpoint: str,
    traffic_class: str,
    longest_prompt: int,
    total_prompt: int,
    requested_completion: int | None,
    loads: Mapping[str, BackendLoad],
    policy: LoadPolicy,
    generates: bool = True,
) -> Choice:
    """The primary unless it is saturated; then the first fallback that is not and can hold the prompt.

    When none can, the class decides: a class whose shed level the primary has reached is refused
    with a retry hint; a higher class still goes to the primary (it queues there, as on any busy server).
    """
    target = model.targets[primary]
    level, weighed = _weigh(primary, "chosen", loads.get(primary), policy)
    if level < 1.0:
        return Choice(target, (weighed,))
    considered = [weighed]
    for name in target.fallbacks:
        fallback = model.targets[name]
        problem = holds(
            fallback,
            endpoint,
            longest_prompt,
            total_prompt,
            requested_completion,
            generates,
            model.cap_action == "reject",
        )
        if problem is not None:
            considered.append(Considered(name, "cannot take it: " + problem))
            continue
        fallback_level, fallback_weighed = _weigh(name, "chosen", loads.get(name), policy)
        considered.append(fallback_weighed)
        if fallback_level < 1.0:
            return Choice(fallback, tuple(considered))
    shed_at = getattr(policy.shed_at, traffic_class)
    if level >= shed_at:
        raise shed_error(traffic_class, primary, loads.get(primary), level)
    considered[0] = Considered(primary, f"chosen while saturated (level {level:.2f} < {traffic_class} shed level)")
    return Choice(target, tuple(considered))


def retry_after_ms(load: BackendLoad | None) -> int:
    """How long the backend's queue takes to drain at its current rate, within sane bounds."""
    if load is None or load.waiting_per_pod is None or not load.drain_per_s:
        return _MIN_RETRY_MS
    queued = load.waiting_per_pod * max(load.pods, 1)
    return max(_MIN_RETRY_MS, min(_MAX_RETRY_MS, math.ceil(1000 * queued / load.drain_per_s)))


def shed_error(traffic_class: str, backend: str, load: BackendLoad | None, level: float) -> GatewayError:
    """Lower classes get 429 (this is our priority policy at work); interactive gets 503 (we are overloaded)."""
    wait_ms = retry_after_ms(load)
    return errors.shed(traffic_class, backend, wait_ms, errors.retry_headers(wait_ms))


def queue_shed_error(traffic_class: str, backend: str, reason: str, wait_ms: int) -> GatewayError:
    wait_ms = max(_MIN_RETRY_MS, min(_MAX_RETRY_MS, wait_ms))
    return errors.shed(traffic_class, backend, wait_ms, errors.retry_headers(wait_ms), reason=reason)
