"""Admission and settlement against the shared store, as the adapter needs them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

from extproc import errors, metrics
from extproc.identity import Identity
from extproc.policy import Policy
from extproc.quota.plan import QuotaPlan, plan_quota, rate_limit_headers, refusal
from extproc.quota.store import QuotaStore, StoreUnavailable

log = logging.getLogger("extproc.quota")
_BATCH = 256  # settlements written concurrently per flush turn
_FLUSH_DELAY_S = 0.005


@dataclass(slots=True)
class Reservation:
    plan: QuotaPlan
    headers: list[tuple[str, str]]  # x-ratelimit-* for the successful response


class QuotaService:
    def __init__(self, policy: Policy, store: QuotaStore) -> None:
        self.store = store
        self.ttl_ms = policy.quotas.reservation_ttl_seconds * 1000
        self.prefix = policy.quotas.key_prefix
        self._queue: deque[tuple[QuotaPlan, int, int]] = deque()
        self._worker: asyncio.Task[None] | None = None  # the flush in progress, if any
        self._flush_scheduled = False

    async def admit(self, identity: Identity, model: str, prompt_tokens: int, completion_tokens: int) -> Reservation:
        """Reserve prompt + completion cap, or raise the 429/503 the client should see."""
        now_ms = int(time.time() * 1000)
        plan = plan_quota(
            identity, model, uuid.uuid4().hex, prompt_tokens, completion_tokens, now_ms, self.ttl_ms, self.prefix
        )
        if not plan.rules:
            return Reservation(plan, [])
        try:
            result = await self.store.admit(plan.tag, plan.request_id, plan.store_rules, now_ms, plan.expires_at_ms)
        except StoreUnavailable:
            metrics.QUOTA_UNAVAILABLE.inc()
            raise errors.quota_store_unavailable() from None
        if not result.allowed:
            raise refusal(plan, result)
        return Reservation(plan, rate_limit_headers(plan, result))

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int) -> None:
        """Queue a settlement; a flush a few milliseconds later writes everything queued by then.

        Under load that is one task per flush instead of one per request, and the few
        milliseconds of delay cannot matter to a counter read by the next admission.
        """
        if not reservation.plan.rules:
            return
        self._queue.append((reservation.plan, prompt_tokens, completion_tokens))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(_FLUSH_DELAY_S, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self.drain())

    async def _settle(self, plan: QuotaPlan, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            await self.store.settle(
                plan.tag, plan.request_id, plan.store_rules, plan.actual_costs(prompt_tokens, completion_tokens)
            )
        except Exception:
            # The reservation expires on its own; losing a settlement must not kill the worker.
            log.exception("settlement failed for tenant %s", plan.tag)

    async def drain(self) -> None:
        """Write every queued settlement now (shutdown, tests)."""
        while self._queue:
            if len(self._queue) == 1:  # the common case at low load: no task per settlement
                await self._settle(*self._queue.popleft())
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
            await asyncio.gather(*(self._settle(*item) for item in batch))

    async def close(self) -> None:
        # Let a flush in progress finish (cancelling it mid-write would lose settlements).
        if self._worker is not None:
            await self._worker
        await self.drain()
        await self.store.close()
