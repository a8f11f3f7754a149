"""The quota store interface: what the gateway asks of Redis (or memory).

A request is admitted against a list of `LimitRule`s in one atomic step: either
every rule has room and all are charged, or nothing is charged. Later the same
rules are settled with the real cost; a reservation never settled (its gateway
died) is released by the store once `expires_at_ms` has passed.

All keys of one admission share the tenant's hash tag (`{tenant}`), so one
Redis Cluster slot holds them and the Lua script may touch them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class LimitRule:
    key: str  # full store key, window included, e.g. "xp:{acme}:tpm:29312345"
    kind: Literal["counter", "concurrency"]
    limit: int
    cost: int  # charged now: tokens or requests for a counter; ignored (always 1) for concurrency
    ttl_ms: int  # counter key lifetime (window length + slack); concurrency: unused


@dataclass(frozen=True, slots=True)
class AdmitResult:
    allowed: bool
    denied_rule: int | None  # index into rules of the first rule without room
    used: tuple[int, ...]  # per rule: usage after this admission (or current usage, when denied)


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the policy decides fail-open or fail-closed."""


class QuotaStore(Protocol):
    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], now_ms: int, expires_at_ms: int
    ) -> AdmitResult: ...

    async def settle(self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int]) -> None: ...

    async def close(self) -> None: ...
