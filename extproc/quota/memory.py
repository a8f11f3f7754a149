"""Quota state in this process's memory: the store of a single replica, and the fail-open fallback.

Same semantics as `RedisStore`, key for key. Every method runs to completion without
awaiting, so on one event loop each call is as atomic as the Lua script it mirrors.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from extproc.quota.store import AdmitResult, LimitRule

# Expired reservations released per admission: bounds the latency one call can pay for others' crashes.
MAX_RELEASES_PER_ADMIT = 100


@dataclass(slots=True)
class _Counter:
    value: int
    expires_at_ms: int


@dataclass(slots=True)
class _Reservation:
    expires_at_ms: int
    charged: list[tuple[str, str, int]]  # (key, kind, cost)


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
        self, tag: str, request_id: str, rules: list[LimitRule], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        self._tick(now_ms)
        self._release_expired(tag, now_ms, MAX_RELEASES_PER_ADMIT)
        used: list[int] = []
        denied: int | None = None
        for index, rule in enumerate(rules):
            if rule.kind == "counter":
                counter = self._counter(rule.key, now_ms)
                current = 0 if counter is None else counter.value
                if denied is None and rule.cost > 0 and current + rule.cost > rule.limit:
                    denied = index
            else:
                current = len(self._live_slots(rule.key, now_ms))
                if denied is None and current + 1 > rule.limit:
                    denied = index
            used.append(current)
        if denied is not None:
            return AdmitResult(False, denied, tuple(used))

        charged: list[tuple[str, str, int]] = []
        for index, rule in enumerate(rules):
            if rule.kind == "counter":
                if rule.cost <= 0:
                    continue
                counter = self._counter(rule.key, now_ms)
                if counter is None:
                    counter = self._counters[rule.key] = _Counter(0, now_ms + max(rule.ttl_ms, 1))
                counter.value += rule.cost
                used[index] = counter.value
                charged.append((rule.key, "counter", rule.cost))
            else:
                slots = self._slots.setdefault(rule.key, {})
                slots[request_id] = expires_at_ms
                used[index] = len(slots)
                charged.append((rule.key, "concurrency", 0))
        reservations = self._tags.setdefault(tag, _TagReservations())
        reservations.by_id[request_id] = _Reservation(expires_at_ms, charged)
        heapq.heappush(reservations.expiry, (expires_at_ms, request_id))
        return AdmitResult(True, None, tuple(used))

    async def settle(self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int]) -> None:
        if len(actual) != len(rules):
            raise ValueError(f"settle got {len(actual)} costs for {len(rules)} rules")
        now_ms = int(time.time() * 1000)
        self._tick(now_ms)
        reserved: dict[str, int] = {}
        reservations = self._tags.get(tag)
        reservation = reservations.by_id.pop(request_id, None) if reservations is not None else None
        if reservation is not None:
            for key, kind, cost in reservation.charged:
                if kind == "counter":
                    reserved[key] = reserved.get(key, 0) + cost
        for rule, cost in zip(rules, actual, strict=True):
            if rule.kind == "counter":
                # pop: a key named by two rules has its reservation taken back once.
                self._add(rule.key, cost - reserved.pop(rule.key, 0), rule.ttl_ms, now_ms)
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

    def _add(self, key: str, delta: int, ttl_ms: int, now_ms: int) -> None:
        """Move a counter by delta: never below zero, and never create it by subtracting."""
        if delta == 0:
            return
        counter = self._counter(key, now_ms)
        if counter is None:
            if delta > 0:
                self._counters[key] = _Counter(delta, now_ms + max(ttl_ms, 1))
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
            for key, kind, cost in reservation.charged:
                if kind == "counter":
                    self._add(key, -cost, 0, now_ms)
                else:
                    self._leave(key, request_id)
        reservations.compact()
