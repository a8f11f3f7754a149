"""Admission and settlement against the shared store, as the adapter needs them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from extproc import errors
from extproc.identity import Identity
from extproc.quota.plan import QuotaPlan, QuotaPlanner, rate_limit_headers, refusal
from extproc.quota.store import AdmitResult, QuotaStore, Settlement, StoreUnavailable

log = logging.getLogger("extproc.quota")
_BATCH = 256  # settlements written per store call
_FLUSH_DELAY_S = 0.005


@dataclass(slots=True, init=False)
class Reservation:
    plan: QuotaPlan
    result: AdmitResult

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, plan: QuotaPlan, result: AdmitResult) -> None:
        self.plan = plan
        self.result = result

    def rate_limit_headers(self) -> list[tuple[str, str]]:
        """x-ratelimit-* for the successful response; built only when a response comes."""
        return rate_limit_headers(self.plan, self.result)


class QuotaService:
    def __init__(self, store: QuotaStore) -> None:
        self.store = store
        self._queue: deque[Settlement] = deque()
        self._worker: asyncio.Task[None] | None = None  # the flush in progress, if any
        self._flush_scheduled = False

    async def admit(
        self,
        identity: Identity,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        planner: QuotaPlanner,
    ) -> Reservation | None:
        """Reserve prompt + completion cap, or raise the 429/503 the client should see; None: no limits.

        `planner` is the one compiled with the policy in force for this request: a reload brings new
        limits with a new planner, while the store and its queued settlements live on.
        """
        now_ms = int(time.time() * 1000)
        plan = planner.plan(identity, model, prompt_tokens, completion_tokens, now_ms)
        if plan is None:
            return None
        try:
            result = await self.store.admit(
                plan.tag, plan.request_id, plan.store_rules, plan.costs, now_ms, plan.expires_at_ms
            )
        except StoreUnavailable:
            raise errors.quota_store_unavailable() from None
        if not result.allowed:
            raise refusal(plan, result)
        return Reservation(plan, result)

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int) -> None:
        """Queue a settlement; a flush a few milliseconds later writes everything queued by then.

        Under load that is one store call (one Redis round trip) per flush instead of one per
        request, and the few milliseconds of delay cannot matter to a counter read by the next
        admission.
        """
        plan = reservation.plan
        self._queue.append(
            Settlement(plan.tag, plan.request_id, plan.store_rules, plan.actual_costs(prompt_tokens, completion_tokens))
        )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(_FLUSH_DELAY_S, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """Write every queued settlement now (shutdown, tests)."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
            try:
                outcomes = await self.store.settle_many(batch)
            except Exception:
                # The reservations expire on their own; losing settlements must not kill the worker.
                log.exception("settling %d requests failed", len(batch))
                continue
            for item, outcome in zip(batch, outcomes, strict=True):
                if outcome is not None:
                    log.error("settlement failed for tenant %s: %s", item.tag, outcome)

    async def close(self) -> None:
        # Let a flush in progress finish (cancelling it mid-write would lose settlements).
        if self._worker is not None:
            await self._worker
        await self.drain()
        await self.store.close()
