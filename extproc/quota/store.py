"""The quota store interface: what the gateway asks of Redis (or memory).

A request is admitted against a list of `LimitRule`s with one cost per rule, in
one atomic step: either every rule has room and all are charged, or nothing is
charged. Later the same rules are settled with the real costs; a reservation
never settled (its gateway died) is released by the store once `expires_at_ms`
has passed. Rules hold no per-request data, so one list serves every request of
a caller within a window.

All keys of one admission share the tenant's hash tag (`{tenant}`), so one
Redis Cluster slot holds them and the Lua script may touch them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mypy_extensions import mypyc_attr


@dataclass(frozen=True, slots=True)
class LimitRule:
    key: str  # full store key, window included, e.g. "xp:{acme}:tpm:29312345"
    kind: Literal["counter", "concurrency"]
    limit: int
    expires_at_ms: int  # counter: when the key may go (window end + slack); concurrency: unused


@dataclass(slots=True, init=False)
class AdmitResult:  # built on every admission
    allowed: bool
    denied_rule: int | None  # index into rules of the first rule without room
    used: tuple[int, ...]  # per rule: usage after this admission (or current usage, when denied)

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, allowed: bool, denied_rule: int | None, used: tuple[int, ...]) -> None:
        self.allowed = allowed
        self.denied_rule = denied_rule
        self.used = used


@dataclass(slots=True, init=False)
class Settlement:  # built on every settlement
    tag: str
    request_id: str
    rules: list[LimitRule]
    actual: list[int]  # the real cost per rule
    # Set on a replay of a settlement that may have landed already (it was sent, no answer came):
    # without its reservation it changes no counter, so it can never be charged twice.
    only_if_reserved: bool

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(
        self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int], only_if_reserved: bool = False
    ) -> None:
        self.tag = tag
        self.request_id = request_id
        self.rules = rules
        self.actual = actual
        self.only_if_reserved = only_if_reserved

    def as_replay(self) -> Settlement:
        """This settlement, sent again when the first may have landed: it cannot charge twice."""
        return Settlement(self.tag, self.request_id, self.rules, self.actual, only_if_reserved=True)

    @classmethod
    def release(
        cls, tag: str, request_id: str, rules: list[LimitRule], *, only_if_reserved: bool = False
    ) -> Settlement:
        """Give a reservation back unused: every rule's real cost is zero."""
        return cls(tag, request_id, rules, [0] * len(rules), only_if_reserved)


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the policy decides fail-open or fail-closed."""


class StoreOutcomeUnknown(StoreUnavailable):
    """The call was sent but no answer came (timeout, connection lost): the store may have applied it."""


class QuotaStore(Protocol):
    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        """costs: one per rule, charged now (tokens or 1 for a counter; ignored for concurrency)."""
        ...

    async def settle(self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int]) -> None: ...

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        """Settle a batch in one exchange with the store; per item, the error it met, if any.

        Raises `StoreUnavailable` when the store could not be asked at all (nothing was written),
        `StoreOutcomeUnknown` when it was asked but did not answer (some may have been written);
        per-item errors mean the store refused that one settlement, or, as `StoreUnavailable`,
        could not take it now.
        """
        ...

    async def close(self) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
class SettlesInBatches:
    """Base for stores whose real settlement call is `settle_many`: `settle` is a batch of one."""

    async def settle(self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int]) -> None:
        (outcome,) = await self.settle_many([Settlement(tag, request_id, rules, actual)])
        if outcome is not None:
            raise outcome

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        raise NotImplementedError
