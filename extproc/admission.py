"""Admission to a capped backend: take a free slot at once, or wait a short bounded time in a queue.

One `AdmissionQueue` per worker process, on its event loop, over an `InFlightCounter` (shared by
the workers of a replica, so a backend's cap holds for the replica as a whole).

Order among waiters for one backend: strict priority (0 first), then round robin across
tenants within a priority (a tenant with ten waiters does not make another wait ten turns),
then FIFO within a tenant. The queue is bounded per backend by `max_queue`: when it is full, an
arrival of higher priority than the lowest waiting priority evicts the newest waiter of that
priority, and any other arrival is refused. So interactive traffic is never refused for a queue
full of batch waiters.

Slots come free two ways. One released in this process is handed to the head waiter then and
there, still counted (it changes hands; the total stays the same). One released by another worker
is only visible in the shared counters, so while anyone waits for a backend a timer polls
`try_acquire` for it every `poll_interval_s` (one timer per backend, none when nobody waits).

A waiter is a future, resolved exactly once by whoever removes it from the queue: the dispatcher
(with a `Slot`), its timeout or an eviction (with `Shed`). A cancelled waiter (the client went
away) leaves the queue when its coroutine resumes; until then the dispatcher skips its cancelled
future. If it was handed a slot just before being cancelled, the coroutine sees CancelledError
with the slot in its future, and passes the slot on (`release`): a slot is never leaked.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from extproc.inflight import InFlightCounter
from extproc.recorder import NULL_RECORDER, Recorder
from extproc.routing import CLASS_OF_PRIORITY

__all__ = ["AdmissionQueue", "Shed", "Slot"]

ShedReason = Literal["queue_full", "queue_timeout"]


class Shed(Exception):
    """The request cannot be admitted: the queue is full ("queue_full") or its wait ran out ("queue_timeout")."""

    def __init__(self, reason: ShedReason, waited_s: float = 0.0) -> None:
        super().__init__(f"{reason} after {waited_s * 1000:.1f} ms")
        self.reason: ShedReason = reason
        self.waited_s = waited_s


@dataclass(frozen=True, slots=True)
class Slot:
    """A slot held: what to release."""

    backend: str


class _Waiter:
    __slots__ = ("backend", "cap", "future", "priority", "queued", "seq", "since", "tenant")

    def __init__(
        self,
        backend: _Backend,
        cap: int,
        priority: int,
        tenant: str,
        seq: int,
        since: float,
        future: asyncio.Future[Slot],
    ) -> None:
        self.backend = backend
        self.cap = cap
        self.priority = priority
        self.tenant = tenant
        self.seq = seq
        self.since = since
        self.future = future
        self.queued = True


class _Backend:
    """The waiters for one backend; exists only while there are some."""

    __slots__ = ("count", "levels", "loop", "name", "poll")

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        # priority -> tenant -> that tenant's waiters, FIFO. A tenant's place in its dict is its
        # turn in the round robin: served, it moves to the end.
        self.levels: dict[int, dict[str, deque[_Waiter]]] = {}
        self.count = 0
        self.poll: asyncio.TimerHandle | None = None


class AdmissionQueue:
    """Per-backend admission for one worker process. Use it from its event loop's thread only."""

    def __init__(
        self,
        counter: InFlightCounter,
        poll_interval_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        self._counter = counter
        self._recorder = recorder
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._backends: dict[str, _Backend] = {}
        self._slots: dict[str, Slot] = {}  # one immutable Slot per backend, reused
        self._seq = 0

    @property
    def counter(self) -> InFlightCounter:
        return self._counter

    async def acquire(
        self, backend: str, cap: int | None, priority: int, tenant: str, max_wait_s: float, max_queue: int
    ) -> Slot:
        """A slot for `backend` (at most `cap` in flight, None for no cap), or raise `Shed`.

        Waits at most `max_wait_s` (timed by the event loop's clock; the `clock` given to the
        queue stamps `Shed.waited_s`), in a queue of at most `max_queue` waiters for `backend`.
        """
        slot = self._slots.get(backend)
        if slot is None:
            slot = self._slots[backend] = Slot(backend)
        if cap is None:
            self._counter.add(backend)  # counted (the in-flight gauge), never refused
            return slot
        state = self._backends.get(backend)
        # Fast path: nobody of equal or higher priority waits, and a slot is free.
        if state is None or min(state.levels) > priority:
            if self._counter.try_acquire(backend, cap):
                return slot
            tried = True
        else:
            tried = False
        return await self._wait(backend, cap, priority, tenant, max_wait_s, max_queue, tried)

    def release(self, slot: Slot) -> None:
        """Give back a slot: to the head waiter in this process if there is one, else to the counter."""
        backend = slot.backend
        state = self._backends.get(backend)
        if state is not None:
            head = self._head(state)
            if head is not None:
                # The slot changes hands and the total stays the same: fine unless the cap went down meanwhile.
                if self._counter.total(backend) <= head.cap:
                    self._unlink(head, served=True)
                    head.future.set_result(slot)
                else:
                    self._counter.release(backend)
                    self._dispatch(state)  # the counter decides, under its lock
                return
        self._counter.release(backend)

    def waiting(self, backend: str) -> dict[int, int]:
        """Waiters for `backend` per priority (a waiter cancelled this very loop turn may still count)."""
        state = self._backends.get(backend)
        if state is None:
            return {}
        return {p: sum(map(len, tenants.values())) for p, tenants in sorted(state.levels.items())}

    async def _wait(
        self, backend: str, cap: int, priority: int, tenant: str, max_wait_s: float, max_queue: int, tried: bool
    ) -> Slot:
        if max_queue <= 0:
            raise Shed("queue_full")
        if max_wait_s <= 0:
            raise Shed("queue_timeout")
        state = self._backends.get(backend)
        if state is not None:
            while state.count >= max_queue:  # `while`: max_queue may have shrunk with a policy reload
                lowest = max(state.levels)
                if priority >= lowest:
                    raise Shed("queue_full")
                self._evict_newest(state, lowest)
            state = self._backends.get(backend)  # evictions may have emptied (and retired) it
        loop = asyncio.get_running_loop()
        if state is None:
            state = self._backends[backend] = _Backend(backend, loop)
        future: asyncio.Future[Slot] = loop.create_future()
        self._seq += 1
        waiter = _Waiter(state, cap, priority, tenant, self._seq, self._clock(), future)
        tenants = state.levels.get(priority)
        if tenants is None:
            tenants = state.levels[priority] = {}
        fifo = tenants.get(tenant)
        if fifo is None:
            fifo = tenants[tenant] = deque()
        fifo.append(waiter)
        state.count += 1
        self._report(state, priority)
        if state.poll is None:
            state.poll = loop.call_later(self._poll_interval_s, self._on_poll, state)
        timer = loop.call_later(max_wait_s, self._expire, waiter)
        try:
            if not tried:
                # Queued behind others without trying: a slot may be free (another worker released one).
                self._dispatch(state)
            return await future
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()

    def _report(self, state: _Backend, priority: int) -> None:
        tenants = state.levels.get(priority)
        length = sum(map(len, tenants.values())) if tenants else 0
        self._recorder.queue_length(state.name, CLASS_OF_PRIORITY.get(priority, str(priority)), length)

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting coroutine is leaving with an exception (cancelled, most likely)."""
        future = waiter.future
        if waiter.queued:
            self._unlink(waiter)
            future.cancel()
        elif future.done() and not future.cancelled() and future.exception() is None:
            # Handed a slot, then cancelled before it could resume: pass the slot on.
            self.release(future.result())

    def _head(self, state: _Backend) -> _Waiter | None:
        """The next waiter to serve, dropping cancelled ones on the way."""
        while state.count:
            tenants = state.levels[min(state.levels)]
            waiter = tenants[next(iter(tenants))][0]
            if not waiter.future.done():
                return waiter
            self._unlink(waiter)  # cancelled: its coroutine has not resumed to leave yet
        return None

    def _dispatch(self, state: _Backend) -> None:
        """Admit head waiters while the counter has room."""
        counter, name = self._counter, state.name
        while True:
            head = self._head(state)
            if head is None or not counter.try_acquire(name, head.cap):
                return
            self._unlink(head, served=True)
            head.future.set_result(self._slots[name])

    def _on_poll(self, state: _Backend) -> None:
        state.poll = None
        if self._backends.get(state.name) is not state:
            return
        try:
            self._dispatch(state)
        finally:
            if state.count and state.poll is None:
                state.poll = state.loop.call_later(self._poll_interval_s, self._on_poll, state)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        self._unlink(waiter)
        if not waiter.future.done():
            waiter.future.set_exception(Shed("queue_timeout", self._clock() - waiter.since))

    def _evict_newest(self, state: _Backend, priority: int) -> None:
        newest = max((fifo[-1] for fifo in state.levels[priority].values()), key=lambda w: w.seq)
        self._unlink(newest)
        if not newest.future.done():
            newest.future.set_exception(Shed("queue_full", self._clock() - newest.since))

    def _unlink(self, waiter: _Waiter, served: bool = False) -> None:
        """Take a waiter out of the queue; `served`: it is its tenant's head, and the tenant's turn is over."""
        state = waiter.backend
        tenants = state.levels[waiter.priority]
        fifo = tenants[waiter.tenant]
        if served:
            fifo.popleft()
            del tenants[waiter.tenant]
            if fifo:
                tenants[waiter.tenant] = fifo  # to the end of the round robin
        else:
            fifo.remove(waiter)
            if not fifo:
                del tenants[waiter.tenant]
        if not tenants:
            del state.levels[waiter.priority]
        waiter.queued = False
        state.count -= 1
        self._report(state, waiter.priority)
        if not state.count:
            if state.poll is not None:
                state.poll.cancel()
                state.poll = None
            if self._backends.get(state.name) is state:
                del self._backends[state.name]
