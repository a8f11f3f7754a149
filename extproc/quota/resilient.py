"""What the gateway does while the shared store is unreachable, and how the usage gets there afterwards.

Fail-closed: admissions raise `StoreUnavailable` (the gateway answers 503).
Fail-open: admissions are decided by a per-process fallback (each replica enforces the limits on its
own, so the fleet may overshoot by up to the number of replicas), and every settlement meant for the
primary is queued in memory and written when it answers again. A replayed settlement finds no
reservation in the primary and adds the real cost in full; one whose reservation the primary still
holds applies the difference. Both leave the counter where it would have been without the outage.
A settlement that was sent but got no answer may have landed: it is replayed `only_if_reserved`, so
it never charges twice (if its reservation expired meanwhile, the real cost is lost instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Literal

from extproc.quota.memory import MemoryStore
from extproc.quota.store import (
    AdmitResult,
    LimitRule,
    QuotaStore,
    Settlement,
    SettlesInBatches,
    StoreOutcomeUnknown,
    StoreUnavailable,
)
from extproc.recorder import NULL_RECORDER, Recorder

log = logging.getLogger("extproc.quota")

_WARN_EVERY_S = 10.0
# Local admissions are forgotten this long after they expire: a request never settled must not leak.
# Forgetting is harmless: its settlement then goes to the primary, which applies the real cost.
_FORGET_AFTER_MS = 60_000

_FLUSH_BATCH = 256  # queued settlements written per round trip when the primary is back
_MAX_FLUSH_ERRORS = 3  # a batch that breaks the primary's client this often in a row is dropped, not retried forever


def _retryable(outcome: BaseException | None) -> bool:
    return isinstance(outcome, StoreUnavailable)


def _for_replay(item: Settlement, failure: BaseException | None) -> Settlement:
    """What to queue after a failed write: if it may have landed, a replay that cannot charge twice."""
    if isinstance(failure, StoreOutcomeUnknown) and not item.only_if_reserved:
        return item.as_replay()
    return item


class ResilientStore(SettlesInBatches):
    def __init__(
        self,
        primary: QuotaStore,
        *,
        on_failure: Literal["open", "closed"],
        fallback: QuotaStore | None = None,
        max_pending: int = 100_000,
        retry_interval_s: float = 1.0,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        self.primary = primary
        self.recorder = recorder
        self.fallback: QuotaStore = fallback if fallback is not None else MemoryStore()
        self.on_failure = on_failure
        self.max_pending = max_pending
        self.retry_interval_s = retry_interval_s
        self._queue: deque[Settlement] = deque()
        self._local: dict[str, int] = {}  # request_id admitted by the fallback -> its expires_at_ms
        self._next_forget_ms = 0
        self._drain_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_warning = -_WARN_EVERY_S
        self._flush_errors = 0
        # After a failure the primary is skipped for a retry interval: a black-holed Redis would
        # otherwise cost every admission a full connect timeout.
        self._primary_down_until = 0.0
        self._degraded = False
        self._fail_open_since_warning = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _primary_failed(self, operation: str) -> None:
        self._primary_down_until = time.monotonic() + self.retry_interval_s
        self.recorder.store_error(operation)
        if not self._degraded:
            self._degraded = True
            self.recorder.store_degraded(True)
            self._ensure_task()  # probes the primary even when nothing is queued (an idle, fail-closed replica)

    def _primary_answered(self) -> None:
        if self._degraded:
            self._degraded = False
            self.recorder.store_degraded(False)

    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        failure: StoreUnavailable
        if time.monotonic() < self._primary_down_until:
            failure = StoreUnavailable("unavailable moments ago; retrying shortly")
        else:
            try:
                result = await self.primary.admit(tag, request_id, rules, costs, now_ms, expires_at_ms)
            except StoreUnavailable as exc:
                self._primary_failed("admit")
                failure = exc
            else:
                if self._degraded:
                    self._primary_answered()
                return result
        if self.on_failure == "closed":
            if isinstance(failure, StoreOutcomeUnknown):
                # The admission may have landed, and this request is refused: give it back once the
                # primary answers (a fail-open admission instead settles through the queue as usual).
                self._enqueue(Settlement.release(tag, request_id, rules, only_if_reserved=True))
            raise failure
        result = await self.fallback.admit(tag, request_id, rules, costs, now_ms, expires_at_ms)
        self._fail_open_since_warning += 1
        self.recorder.fail_open_admission()
        if result.allowed:
            self._forget_expired(now_ms)
            self._local[request_id] = expires_at_ms
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            # The exception text names host and error, never a key.
            log.warning(
                "quota store unavailable (%s); admitting on per-process limits (%d since the last warning)",
                failure,
                self._fail_open_since_warning,
            )
            self._fail_open_since_warning = 0
        return result

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        outcomes: list[BaseException | None] = [None] * len(settlements)
        for_primary: list[int] = []
        for index, item in enumerate(settlements):
            if self._local.pop(item.request_id, None) is not None:
                # Admitted locally during an outage: the fallback gives the slot back now, the
                # primary gets the real cost when it answers again.
                self._enqueue(item)
                try:
                    await self.fallback.settle(item.tag, item.request_id, item.rules, item.actual)
                except Exception as item_failure:  # one bad item must not cost the rest of the batch
                    outcomes[index] = item_failure
            else:
                for_primary.append(index)
        if not for_primary:
            return outcomes
        batch = [settlements[i] for i in for_primary]
        if time.monotonic() < self._primary_down_until:
            for item in batch:
                self._enqueue(item)
            return outcomes
        try:
            results = await self.primary.settle_many(batch)
        except StoreUnavailable as exc:
            self._primary_failed("settle")
            for item in batch:
                self._enqueue(_for_replay(item, exc))
            return outcomes
        failed = False
        for index, result in zip(for_primary, results, strict=True):
            if _retryable(result):
                failed = True
                self._enqueue(_for_replay(settlements[index], result))
            else:
                outcomes[index] = result
        if failed:
            self._primary_failed("settle")  # one failed call, however many items it carried
        else:
            self._primary_answered()
        return outcomes

    async def start(self) -> None:
        """Start retrying queued settlements now rather than on the next one queued."""
        self._ensure_task()

    async def flush(self) -> int:
        """Write queued settlements now, in order, until the queue is empty or the primary fails."""
        async with self._drain_lock:
            written = 0
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _FLUSH_BATCH))]
                try:
                    results = await self.primary.settle_many(batch)
                except StoreUnavailable as exc:
                    self._primary_failed("settle")
                    self._requeue([_for_replay(item, exc) for item in batch])
                    break
                except asyncio.CancelledError:
                    # Cancelled mid-write: it may or may not have landed; keep it rather than lose it.
                    self._requeue([item.as_replay() for item in batch])
                    raise
                except Exception:
                    self._flush_errors += 1
                    if self._flush_errors < _MAX_FLUSH_ERRORS:
                        log.exception("writing queued quota settlements failed; keeping them for the next retry")
                        self._requeue(batch)
                    else:  # a bug, not an outage: retrying it forever would block everything behind it
                        self._flush_errors = 0
                        self._dropped(len(batch))
                        log.exception("writing queued quota settlements kept failing; dropped %d", len(batch))
                    break
                self._flush_errors = 0
                self._primary_answered()
                unwritten = [
                    _for_replay(item, result) for item, result in zip(batch, results, strict=True) if _retryable(result)
                ]
                for result in results:
                    if result is None:
                        written += 1
                    elif not _retryable(result):
                        # A settlement the primary rejects for good must not block all the others behind it.
                        self._dropped(1)
                        log.error("quota store rejected a queued settlement; dropped it: %s", result)
                if unwritten:
                    self._requeue(unwritten)
                    break
            self.recorder.settlements_pending(len(self._queue))
            return written

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue:
            # Last chance before the process exits; stops at the first failure, so it cannot hang.
            await self.flush()
            if self._queue:
                log.warning("quota store unavailable at shutdown: %d settlements lost", len(self._queue))
        await self.primary.close()
        await self.fallback.close()

    def _dropped(self, count: int) -> None:
        self.recorder.settlements_dropped(count)

    def _enqueue(self, settlement: Settlement) -> None:
        self._queue.append(settlement)
        self._trim()
        self.recorder.settlements_pending(len(self._queue))
        self._ensure_task()

    def _requeue(self, batch: list[Settlement]) -> None:
        # Back to the front, in order: still the oldest, so the first dropped if the queue overflowed meanwhile.
        self._queue.extendleft(reversed(batch))
        self._trim()
        self.recorder.settlements_pending(len(self._queue))

    def _trim(self) -> None:
        while len(self._queue) > self.max_pending:
            self._queue.popleft()
            self._dropped(1)

    def _ensure_task(self) -> None:
        if (self._queue or self._degraded) and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        while self._queue or self._degraded:
            await asyncio.sleep(self.retry_interval_s)
            try:
                if self._queue:
                    await self.flush()
                else:
                    await self._probe()
            except Exception:  # never let the loop die with work still queued
                log.exception("retrying queued quota settlements failed")

    async def _probe(self) -> None:
        """Nothing queued, yet degraded: ask the primary whether it is back, so the gauge says so."""
        ping = getattr(self.primary, "ping", None)
        if ping is None:
            self._primary_answered()  # no way to ask: the next admission will tell
            return
        try:
            await ping()
        except Exception:
            self.recorder.store_error("ping")
            return
        self._primary_down_until = 0.0
        self._primary_answered()

    def _forget_expired(self, now_ms: int) -> None:
        if now_ms < self._next_forget_ms:
            return
        self._next_forget_ms = now_ms + _FORGET_AFTER_MS
        cutoff = now_ms - _FORGET_AFTER_MS
        self._local = {rid: expires for rid, expires in self._local.items() if expires > cutoff}
