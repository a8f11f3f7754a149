"""Admission and settlement against the shared store, as the adapter needs them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from extproc import metrics
from extproc.errors import GatewayError
from extproc.identity import Identity
from extproc.policy import Policy
from extproc.quota.plan import QuotaPlan, plan_quota, rate_limit_headers, refusal
from extproc.quota.store import QuotaStore, StoreUnavailable

log = logging.getLogger("extproc.quota")


@dataclass(slots=True)
class Reservation:
    plan: QuotaPlan
    headers: list[tuple[str, str]]  # x-ratelimit-* for the successful response


def store_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "The quota service is unavailable; please retry shortly.",
        type="server_error",
        code="quota_store_unavailable",
    )


class QuotaService:
    def __init__(self, policy: Policy, store: QuotaStore) -> None:
        self.store = store
        self.ttl_ms = policy.quotas.reservation_ttl_seconds * 1000
        self.prefix = policy.quotas.key_prefix
        self._settling: set[asyncio.Task[None]] = set()

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
            raise store_unavailable() from None
        if not result.allowed:
            raise refusal(plan, result)
        return Reservation(plan, rate_limit_headers(plan, result))

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int) -> None:
        """Settle in the background: the stream is over and must not wait for Redis."""
        if not reservation.plan.rules:
            return
        task = asyncio.get_running_loop().create_task(self._settle(reservation.plan, prompt_tokens, completion_tokens))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, plan: QuotaPlan, prompt_tokens: int, completion_tokens: int) -> None:
        try:
            await self.store.settle(
                plan.tag, plan.request_id, plan.store_rules, plan.actual_costs(prompt_tokens, completion_tokens)
            )
        except Exception:
            # The reservation expires on its own; losing a settlement must not kill the worker.
            log.exception("settlement failed for tenant %s", plan.tag)

    async def drain(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self.store.close()
