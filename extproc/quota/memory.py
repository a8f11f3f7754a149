"""Quota state in this process's memory: the store of a single replica, and the fail-open fallback.

Same semantics as `RedisStore`, key for key. Every method runs to completion without
awaiting, so on one event loop each call is as atomic as the Lua script it mirrors.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.quota.store import AdmitResult, LimitRule, Settlement

# Expired reservations released per admission: bounds the latency one call can pay for others' crashes.
MAX_RELEASES_PER_ADMIT = 100


@dataclass(slots=True)
class _Counter:
    value: int
    expires_at_ms: int


@dataclass(slots=True, init=False)
class _Reservation:
    expires_at_ms: int
    rules: list[LimitRule]
    charged: list[int]  # per rule: what the admission added (0 for concurrency and free rules)

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, expires_at_ms: int, rules: list[LimitRule], charged: list[int]) -> None:
        self.expires_at_ms = expires_at_ms
        self.rules = rules
        self.charged = charged


@dataclass(slots=True)
class _TagReservations:
    by_id: dict[str, _Reservation] = field(default_factory=dict)
    # Min-heap of (expires_at_ms, request_id). Settling does not remove the entry (a heap cannot, cheaply):
    # stale entries are skipped when popped, and the heap is rebuilt when they outnumber live ones.
    expiry: list[tuple[int, str]] = field(default_factory=list)

    def compact(self) -> None:
        if len(self.expiry) > 2 * len(self.by_id) + 64:
            self.expiry = [(r.expires_at_ms, rid) for rid, r in self.by_id.items()]
            heapq.heapify(self.expiry)


class MemoryStore:
    def __init__(self, *, purge_every: int = 1024) -> None:
        self._counters: dict[str, _Counter] = {}
        self._slots: dict[str, dict[str, int]] = {}  # concurrency key -> request_id -> expires_at_ms
        self._tags: dict[str, _TagReservations] = {}
        self._purge_every = purge_every
        self._calls = 0

    @property
    def size(self) -> int:
        """Counters, concurrency sets and reservations held: what a purge keeps bounded."""
        return len(self._counters) + len(self._slots) + sum(len(t.by_id) for t in self._tags.values())

    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        return self.admit_now(tag, request_id, rules, costs, now_ms, expires_at_ms)

    def admit_now(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        self._tick(now_ms)
        reservations = self._tags.get(tag)
        if reservations is None:
            reservations = self._tags[tag] = _TagReservations()
        elif reservations.expiry and reservations.expiry[0][0] <= now_ms:
            self._release_expired(tag, now_ms, MAX_RELEASES_PER_ADMIT)
        used: list[int] = []
        counters: list[_Counter | None] = []
        denied: int | None = None
        for index, rule in enumerate(rules):
            if rule.kind == "counter":
                counter = self._counter(rule.key, now_ms)
                counters.append(counter)
                current = 0 if counter is None else counter.value
                cost = costs[index]
                if denied is None and cost > 0 and current + cost > rule.limit:
                    denied = index
            else:
                counters.append(None)
                current = self._slot_count(rule.key, rule.limit, now_ms)
                if denied is None and current + 1 > rule.limit:
                    denied = index
            used.append(current)
        if denied is not None:
            return AdmitResult(False, denied, tuple(used))

        charged = [0] * len(rules)
        for index, rule in enumerate(rules):
            if rule.kind == "counter":
                cost = costs[index]
                if cost <= 0:
                    continue
                counter = counters[index]
                if counter is None:  # a key named by an earlier rule of this call may exist by now
                    counter = self._counter(rule.key, now_ms)
                if counter is None:
                    counter = self._counters[rule.key] = _Counter(0, max(rule.expires_at_ms, now_ms + 1))
                counter.value += cost
                used[index] = counter.value
                charged[index] = cost
            else:
                slots = self._slots.get(rule.key)
                if slots is None:
                    slots = self._slots[rule.key] = {}
                slots[request_id] = expires_at_ms
                used[index] = len(slots)
        reservations.by_id[request_id] = _Reservation(expires_at_ms, rules, charged)
        heapq.heappush(reservations.expiry, (expires_at_ms, request_id))
        return AdmitResult(True, None, tuple(used))

    async def settle(self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int]) -> None:
        self.settle_now(tag, request_id, rules, actual, int(time.time() * 1000))

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        now_ms = int(time.time() * 1000)
        outcomes: list[BaseException | None] = []
        for item in settlements:
            try:
                self.settle_now(item.tag, item.request_id, item.rules, item.actual, now_ms, item.only_if_reserved)
            except ValueError as exc:
                outcomes.append(exc)
            else:
                outcomes.append(None)
        return outcomes

    def settle_now(
        self,
        tag: str,
        request_id: str,
        rules: list[LimitRule],
        actual: list[int],
        now_ms: int,
        only_if_reserved: bool = False,
    ) -> None:
        if len(actual) != len(rules):
            raise ValueError(f"settle got {len(actual)} costs for {len(rules)} rules")
        self._tick(now_ms)
        reservations = self._tags.get(tag)
        reservation = reservations.by_id.pop(request_id, None) if reservations is not None else None
        if reservation is not None and reservation.rules is rules:  # the planner's shared list: rule by rule
            for rule, cost, charged in zip(rules, actual, reservation.charged, strict=True):
                if rule.kind == "counter":
                    self._add(rule.key, cost - charged, rule.expires_at_ms, now_ms)
                else:
                    self._leave(rule.key, request_id)
            return
        if reservation is None and only_if_reserved:  # settled before: only give back slots still held
            for rule in rules:
                if rule.kind == "concurrency":
                    self._leave(rule.key, request_id)
            return
        reserved: dict[str, int] = {}
        if reservation is not None:
            for rule, charged in zip(reservation.rules, reservation.charged, strict=True):
                if rule.kind == "counter":
                    reserved[rule.key] = reserved.get(rule.key, 0) + charged
        for rule, cost in zip(rules, actual, strict=True):
            if rule.kind == "counter":
                # pop: a key named by two rules has its reservation taken back once.
                self._add(rule.key, cost - reserved.pop(rule.key, 0), rule.expires_at_ms, now_ms)
            else:
                self._leave(rule.key, request_id)

    async def close(self) -> None:
        self._counters.clear()
        self._slots.clear()
        self._tags.clear()

    def purge(self, now_ms: int | None = None) -> None:
        """Drop what has expired everywhere; admissions only clean up what they touch."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        for tag in list(self._tags):
            self._release_expired(tag, now, None)
            reservations = self._tags[tag]
            if reservations.by_id:
                reservations.compact()
            else:
                del self._tags[tag]
        self._counters = {k: c for k, c in self._counters.items() if c.expires_at_ms > now}
        for key in list(self._slots):
            self._live_slots(key, now)

    def _tick(self, now_ms: int) -> None:
        self._calls += 1
        if self._calls % self._purge_every == 0:
            self.purge(now_ms)

    def _counter(self, key: str, now_ms: int) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.expires_at_ms <= now_ms:
            del self._counters[key]
            return None
        return counter

    def _slot_count(self, key: str, limit: int, now_ms: int) -> int:
        """Live slots of a key; expired ones are swept only when they could change the answer."""
        slots = self._slots.get(key)
        if slots is None:
            return 0
        if len(slots) < limit:
            return len(slots)  # even counting the expired ones there is room
        return len(self._live_slots(key, now_ms))

    def _live_slots(self, key: str, now_ms: int) -> dict[str, int]:
        slots = self._slots.get(key)
        if slots is None:
            return {}
        for request_id in [r for r, expires_at in slots.items() if expires_at <= now_ms]:
            del slots[request_id]
        if not slots:
            del self._slots[key]
        return slots

    def _leave(self, key: str, request_id: str) -> None:
        slots = self._slots.get(key)
        if slots is not None:
            slots.pop(request_id, None)
            if not slots:
                del self._slots[key]

    def _add(self, key: str, delta: int, expires_at_ms: int, now_ms: int) -> None:
        """Move a counter by delta: never below zero, and never create it by subtracting."""
        if delta == 0:
            return
        counter = self._counter(key, now_ms)
        if counter is None:
            if delta > 0:
                self._counters[key] = _Counter(delta, max(expires_at_ms, now_ms + 1))
            return
        counter.value = max(counter.value + delta, 0)

    def _release_expired(self, tag: str, now_ms: int, limit: int | None) -> None:
        reservations = self._tags.get(tag)
        if reservations is None:
            return
        heap = reservations.expiry
        released = 0
        while heap and heap[0][0] <= now_ms and (limit is None or released < limit):
            expires_at_ms, request_id = heapq.heappop(heap)
            reservation = reservations.by_id.get(request_id)
            # The same request_id may have been settled, or admitted again with a later expiry.
            if reservation is None or reservation.expires_at_ms != expires_at_ms:
                continue
            del reservations.by_id[request_id]
            released += 1
            for rule, charged in zip(reservation.rules, reservation.charged, strict=True):
                if rule.kind == "counter":
                    self._add(rule.key, -charged, 0, now_ms)
                else:
                    self._leave(rule.key, request_id)
        reservations.compact()
