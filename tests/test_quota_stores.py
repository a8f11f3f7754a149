"""The quota stores: the same behaviour from MemoryStore and RedisStore (a real, private redis-server),
and ResilientStore across an outage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import pytest
import pytest_asyncio
import redis.asyncio

from extproc.quota.memory import MemoryStore
from extproc.quota.redis_store import RedisStore
from extproc.quota.resilient import ResilientStore
from extproc.quota.store import AdmitResult, LimitRule, QuotaStore, Settlement, SettlesInBatches, StoreUnavailable
from tests.recording import CountingRecorder
from tests.redis_server import RedisServer

MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@dataclass(frozen=True)
class Charge:
    """A rule and what one request charges it: the tests' shorthand for the store's parallel rules and costs."""

    rule: LimitRule
    cost: int


def rules_of(charges: list[Charge]) -> list[LimitRule]:
    return [c.rule for c in charges]


@dataclass
class Harness:
    store: QuotaStore
    tag: str
    db: redis.asyncio.Redis | None  # raw access to what RedisStore wrote; None for MemoryStore

    def key(self, name: str) -> str:
        return f"xp:{{{self.tag}}}:{name}"

    def counter(
        self, name: str, limit: int, cost: int, ttl_ms: int = MINUTE_MS, *, now_ms: int | None = None
    ) -> Charge:
        """A counter whose key may expire ttl_ms after now_ms (the wall clock unless given)."""
        now = now_ms if now_ms is not None else now_ms_()
        return Charge(LimitRule(self.key(name), "counter", limit, now + ttl_ms), cost)

    def slots(self, limit: int, name: str = "conc") -> Charge:
        return Charge(LimitRule(self.key(name), "concurrency", limit, 0), 1)

    async def admit(self, request_id: str, charges: list[Charge], now_ms: int, expires_at_ms: int) -> AdmitResult:
        costs = [c.cost for c in charges]
        return await self.store.admit(self.tag, request_id, rules_of(charges), costs, now_ms, expires_at_ms)

    async def settle(self, request_id: str, charges: list[Charge], actual: list[int]) -> None:
        await self.store.settle(self.tag, request_id, rules_of(charges), actual)

    def settlement(self, request_id: str, charges: list[Charge], actual: list[int]) -> Settlement:
        return Settlement(self.tag, request_id, rules_of(charges), actual)

    async def usage(self, charges: list[Charge], now_ms: int | None = None) -> tuple[int, ...]:
        """Current usage per rule, read through the store itself: an admission that must be denied."""
        now = now_ms if now_ms is not None else now_ms_()
        probe = [Charge(replace(c.rule, limit=0), 1) for c in charges]
        result = await self.admit(f"probe-{uuid.uuid4().hex}", probe, now, now + 1)
        assert not result.allowed
        return result.used

    async def exists(self, name: str) -> bool | None:
        """Whether RedisStore holds the key (None for MemoryStore, which cannot be asked)."""
        return None if self.db is None else bool(await self.db.exists(self.key(name)))


def now_ms_() -> int:
    return int(time.time() * 1000)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def unique_tag() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture(params=["memory", "redis"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        store: QuotaStore = MemoryStore()
        harness = Harness(store, unique_tag(), None)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        # Generous: these tests are about semantics, and a loaded CI machine can stall a read for 250 ms.
        store = RedisStore(server.url, timeout_s=2.0)
        harness = Harness(store, unique_tag(), redis.asyncio.Redis.from_url(server.url))
    yield harness
    await store.close()
    if harness.db is not None:
        await harness.db.aclose()


# --- the same behaviour from both stores -------------------------------------------------------


@pytest.mark.asyncio
async def test_admit_charges_every_rule_or_none(h: Harness) -> None:
    now = now_ms_()
    tpm, rpm, conc = h.counter("tpm", 100, 30), h.counter("rpm", 50, 60), h.slots(5)
    assert await h.admit("r1", [tpm, rpm, conc], now, now + MINUTE_MS) == AdmitResult(False, 1, (0, 0, 0))
    assert await h.usage([tpm, rpm, conc]) == (0, 0, 0)
    assert await h.exists("tpm") is not True  # a denial creates nothing

    rpm = replace(rpm, cost=40)
    assert await h.admit("r2", [tpm, rpm, conc], now, now + MINUTE_MS) == AdmitResult(True, None, (30, 40, 1))
    assert await h.usage([tpm, rpm, conc]) == (30, 40, 1)


@pytest.mark.asyncio
async def test_denial_reports_the_first_denying_rule_and_current_usage(h: Harness) -> None:
    now = now_ms_()
    tpm, rpm, conc = h.counter("tpm", 100, 90), h.counter("rpm", 50, 10), h.slots(1)
    assert (await h.admit("r1", [tpm, rpm, conc], now, now + MINUTE_MS)).used == (90, 10, 1)

    second = [replace(tpm, cost=5), replace(rpm, cost=41), conc]  # rpm and conc are both full
    assert await h.admit("r2", second, now, now + MINUTE_MS) == AdmitResult(False, 1, (90, 10, 1))
    third = [replace(tpm, cost=11), replace(rpm, cost=1), conc]
    assert await h.admit("r3", third, now, now + MINUTE_MS) == AdmitResult(False, 0, (90, 10, 1))
    assert await h.usage([tpm, rpm, conc]) == (90, 10, 1)


@pytest.mark.asyncio
async def test_zero_cost_never_denies_and_charges_nothing(h: Harness) -> None:
    now = now_ms_()
    full = h.counter("tpm", 10, 10)
    assert (await h.admit("r1", [full], now, now + MINUTE_MS)).allowed
    assert await h.admit("r2", [replace(full, cost=0)], now, now + MINUTE_MS) == AdmitResult(True, None, (10,))
    fresh = h.counter("fresh", 10, 0)
    assert (await h.admit("r3", [fresh], now, now + MINUTE_MS)).allowed
    assert await h.exists("fresh") is not True


@pytest.mark.asyncio
async def test_settle_applies_the_difference(h: Harness) -> None:
    now = now_ms_()
    rules = [h.counter("tpm", 1000, 100), h.counter("rpm", 10, 1), h.slots(2)]
    await h.admit("short", rules, now, now + MINUTE_MS)
    await h.admit("long", rules, now, now + MINUTE_MS)
    assert await h.usage(rules) == (200, 2, 2)

    await h.settle("short", rules, [37, 1, 1])
    assert await h.usage(rules) == (137, 2, 1)
    await h.settle("long", rules, [150, 1, 1])  # more than reserved: the real cost still counts
    assert await h.usage(rules) == (187, 2, 0)


@pytest.mark.asyncio
async def test_settle_without_a_reservation_applies_the_actual_cost(h: Harness) -> None:
    rules = [h.counter("tpm", 1000, 100), h.counter("zero", 10, 1), h.slots(2)]
    await h.settle("never-admitted", rules, [25, 0, 1])
    assert await h.usage(rules) == (25, 0, 0)
    assert await h.exists("zero") is not True  # nothing to add: no key
    if h.db is not None:
        assert 0 < await h.db.pttl(h.key("tpm")) <= MINUTE_MS


@pytest.mark.asyncio
async def test_expired_reservation_is_released_on_the_next_admit(h: Harness) -> None:
    now = now_ms_()
    tpm, conc = h.counter("tpm", 1000, 100), h.slots(1)
    assert (await h.admit("crashed", [tpm, conc], now, now + 10)).allowed
    assert await h.admit("blocked", [replace(tpm, cost=5), conc], now + 5, now + MINUTE_MS) == (
        AdmitResult(False, 1, (100, 1))
    )

    later = now + 20
    assert await h.admit("next", [replace(tpm, cost=5), conc], later, later + MINUTE_MS) == (
        AdmitResult(True, None, (5, 1))
    )
    # Its gateway comes back after all: no reservation left, so the real cost is added in full.
    await h.settle("crashed", [tpm, conc], [40, 1])
    assert await h.usage([tpm, conc], later) == (45, 1)
    await h.settle("next", [replace(tpm, cost=5), conc], [5, 1])
    assert await h.usage([tpm, conc], later) == (45, 0)


@pytest.mark.asyncio
async def test_releases_per_admission_are_bounded(h: Harness) -> None:
    now = now_ms_()
    rpm = h.counter("rpm", 1000, 1)
    for i in range(150):
        assert (await h.admit(f"r{i}", [rpm], now, now + 1)).allowed
    later = now + 10
    assert (await h.admit("a", [rpm], later, later + MINUTE_MS)).used == (150 - 100 + 1,)
    assert (await h.admit("b", [rpm], later, later + MINUTE_MS)).used == (51 - 50 + 1,)


@pytest.mark.asyncio
async def test_counters_never_go_negative_nor_reappear(h: Harness) -> None:
    t0 = now_ms_()
    short = h.counter("tpm", 1000, 100, ttl_ms=100, now_ms=t0)
    gone = h.counter("gone", 1000, 100, ttl_ms=100, now_ms=t0)
    assert (await h.admit("old", [short], t0, t0 + MINUTE_MS)).allowed
    assert (await h.admit("gone", [gone], t0, t0 + 120)).allowed
    await asyncio.sleep(0.15)  # both counters' windows end; their keys go

    t1 = now_ms_()
    fresh = h.counter("tpm", 1000, 5, now_ms=t1)
    assert await h.admit("new", [fresh], t1, t1 + MINUTE_MS) == AdmitResult(True, None, (5,))
    # "old" reserved 100 on the key before it expired: settling at 0 must stop at zero, not go to -95.
    await h.settle("old", [short], [0])
    assert await h.usage([fresh], t1) == (0,)
    # "gone" expired too: releasing it must not bring its key back as a negative count.
    assert await h.exists("gone") is not True
    assert await h.usage([gone], t1) == (0,)
    assert await h.exists("gone") is not True


@pytest.mark.asyncio
async def test_concurrency_admits_up_to_the_limit_and_settle_frees_a_slot(h: Harness) -> None:
    now = now_ms_()
    conc = h.slots(3)
    for i in range(3):
        assert await h.admit(f"r{i}", [conc], now, now + MINUTE_MS) == AdmitResult(True, None, (i + 1,))
    assert await h.admit("r3", [conc], now, now + MINUTE_MS) == AdmitResult(False, 0, (3,))
    await h.settle("r1", [conc], [1])
    assert await h.admit("r4", [conc], now, now + MINUTE_MS) == AdmitResult(True, None, (3,))


@pytest.mark.asyncio
async def test_concurrent_admissions_never_overshoot(h: Harness) -> None:
    now = now_ms_()

    async def burst(charges: list[Charge], n: int = 200) -> list[AdmitResult]:
        return list(await asyncio.gather(*(h.admit(uuid.uuid4().hex, charges, now, now + MINUTE_MS) for _ in range(n))))

    rpm = h.counter("rpm", 50, 1)
    assert sum(r.allowed for r in await burst([rpm])) == 50
    assert await h.usage([rpm]) == (50,)

    tpm = h.counter("tpm", 1000, 7)
    admitted = sum(r.allowed for r in await burst([tpm]))
    assert admitted * 7 <= 1000 and admitted == 1000 // 7

    # Each admitted request saw a distinct count: the check and the charge are one step.
    conc, rpm2 = h.slots(20), h.counter("rpm2", 100, 1)
    results = await burst([rpm2, conc])
    assert sorted(r.used[1] for r in results if r.allowed) == list(range(1, 21))
    assert await h.usage([rpm2, conc]) == (20, 20)  # denials charged nothing


@pytest.mark.asyncio
async def test_counts_beyond_fourteen_digits_stay_exact(h: Harness) -> None:
    # Lua prints numbers with 14 significant digits unless told otherwise.
    now, big = now_ms_(), 10**14
    tpmo = h.counter("tpmo", 10**15, big + 1)
    assert (await h.admit("r1", [tpmo], now, now + MINUTE_MS)).used == (big + 1,)
    await h.settle("r1", [tpmo], [big + 12_345])
    assert await h.usage([tpmo]) == (big + 12_345,)

    assert (await h.admit("crashed", [replace(tpmo, cost=big + 1)], now, now + 1)).allowed
    assert await h.usage([tpmo], now + 10) == (big + 12_345,)  # released: exactly what it had charged

    replayed = h.counter("replayed", 10**15, 1)
    await h.settle("never-admitted", [replayed], [big + 3])
    assert await h.usage([replayed]) == (big + 3,)


@pytest.mark.asyncio
async def test_settle_needs_one_cost_per_rule(h: Harness) -> None:
    with pytest.raises(ValueError):
        await h.settle("r1", [h.counter("tpm", 10, 1)], [1, 2])


@pytest.mark.asyncio
async def test_two_rules_on_one_key_both_charge_it(h: Harness) -> None:
    now = now_ms_()
    tpm = h.counter("shared", 100, 3)
    assert (await h.admit("r1", [tpm, tpm], now, now + MINUTE_MS)).used == (3, 6)
    assert await h.usage([tpm]) == (6,)
    await h.settle("r1", [tpm, tpm], [2, 2])  # the reservation is taken back once, each rule's cost added
    assert await h.usage([tpm]) == (4,)


@pytest.mark.asyncio
async def test_a_replay_only_if_reserved_never_charges_twice(h: Harness) -> None:
    now = now_ms_()
    rules = [h.counter("tpm", 1000, 100), h.slots(2)]
    await h.admit("r1", rules, now, now + MINUTE_MS)
    first = h.settlement("r1", rules, [30, 1])
    assert await h.store.settle_many([first]) == [None]
    assert await h.usage(rules) == (30, 0)
    # Its answer was lost, so it is replayed: the reservation is gone, nothing changes.
    assert await h.store.settle_many([first.as_replay()]) == [None]
    assert await h.usage(rules) == (30, 0)

    # Replayed while the reservation is still there (the first attempt never arrived): applied.
    await h.admit("r2", rules, now, now + MINUTE_MS)
    assert await h.store.settle_many([h.settlement("r2", rules, [40, 1]).as_replay()]) == [None]
    assert await h.usage(rules) == (70, 0)


@pytest.mark.asyncio
async def test_settle_many_settles_a_batch_like_single_settles(h: Harness) -> None:
    now = now_ms_()
    rules = [h.counter("tpm", 1000, 100), h.counter("rpm", 10, 1), h.slots(3)]
    for request_id in ("a", "b", "c"):
        assert (await h.admit(request_id, rules, now, now + MINUTE_MS)).allowed
    assert await h.usage(rules) == (300, 3, 3)

    batch = [
        h.settlement("a", rules, [10, 1, 1]),  # less than reserved
        h.settlement("b", rules, [250, 1, 1]),  # more than reserved
        h.settlement("c", rules, [0, 1, 1]),
        h.settlement("never-admitted", rules, [40, 1, 1]),  # no reservation: the real cost in full
    ]
    assert await h.store.settle_many(batch) == [None, None, None, None]
    assert await h.usage(rules) == (10 + 250 + 0 + 40, 4, 0)

    # A malformed item fails alone: the items around it are still applied.
    for request_id in ("d", "x", "e"):
        assert (await h.admit(request_id, rules, now, now + MINUTE_MS)).allowed
    assert await h.usage(rules) == (600, 7, 3)
    outcomes = await h.store.settle_many(
        [h.settlement("d", rules, [5, 1, 1]), h.settlement("x", rules, [1, 2]), h.settlement("e", rules, [7, 1, 1])]
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ValueError)
    assert await h.usage(rules) == (300 + 5 + 100 + 7, 7, 1)  # "x" keeps its reservation and its slot


# --- RedisStore only --------------------------------------------------------------------------


@pytest_asyncio.fixture
async def redis_db(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    db = redis.asyncio.Redis.from_url(redis_server.url)
    yield db
    await db.aclose()


@pytest.mark.asyncio
async def test_redis_keys_share_the_hash_tag_and_all_expire(
    redis_server: RedisServer, redis_db: redis.asyncio.Redis
) -> None:
    store, tag, now = RedisStore(redis_server.url), unique_tag(), now_ms_()
    rules = [
        LimitRule(f"xp:{{{tag}}}:tpm:1", "counter", 100, now + MINUTE_MS),
        LimitRule(f"xp:{{{tag}}}:conc", "concurrency", 5, 0),
    ]
    try:
        assert (await store.admit(tag, "r1", rules, [10, 1], now, now + 10 * MINUTE_MS)).allowed
        keys = sorted(text(k) for k in await redis_db.keys(f"*{tag}*"))
        assert keys == sorted(
            [f"xp:{{{tag}}}:tpm:1", f"xp:{{{tag}}}:conc", f"xp:{{{tag}}}:resv", f"xp:{{{tag}}}:resv:exp"]
        )
        for key in keys:
            assert await redis_db.pttl(key) > 0, key
        assert 0 < await redis_db.pttl(f"xp:{{{tag}}}:tpm:1") <= MINUTE_MS  # expires at now + MINUTE_MS
        assert await redis_db.pttl(f"xp:{{{tag}}}:conc") >= 10 * MINUTE_MS - 1000

        await store.settle(tag, "r1", rules, [7, 1])
        assert sorted(text(k) for k in await redis_db.keys(f"*{tag}*")) == [f"xp:{{{tag}}}:tpm:1"]

        with pytest.raises(ValueError, match="hash tag"):
            other = LimitRule("xp:other:tpm", "counter", 1, now + 1000)
            await store.admit(tag, "r2", [other], [1], now, now + 1000)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_redis_script_is_reloaded_after_script_flush(
    redis_server: RedisServer, redis_db: redis.asyncio.Redis
) -> None:
    store, tag, now = RedisStore(redis_server.url), unique_tag(), now_ms_()
    rule = LimitRule(f"xp:{{{tag}}}:rpm", "counter", 10, now + MINUTE_MS)
    try:
        assert (await store.admit(tag, "r1", [rule], [1], now, now + 1000)).allowed
        await redis_db.script_flush()  # as after a failover to a replica that never saw the script
        assert (await store.admit(tag, "r2", [rule], [1], now, now + 1000)).used == (2,)
        await redis_db.script_flush()
        await store.settle(tag, "r2", [rule], [1])
        assert await store.ping()
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_redis_settle_many_after_script_flush_applies_every_item(
    redis_server: RedisServer, redis_db: redis.asyncio.Redis
) -> None:
    store, tag, now = RedisStore(redis_server.url), unique_tag(), now_ms_()
    rule = LimitRule(f"xp:{{{tag}}}:tpm", "counter", 1000, now + MINUTE_MS)
    try:
        for i in range(3):
            assert (await store.admit(tag, f"r{i}", [rule], [100], now, now + MINUTE_MS)).allowed
        await redis_db.script_flush()  # the pipeline's EVALSHAs all fail: the store must reload and apply them
        outcomes = await store.settle_many([Settlement(tag, f"r{i}", [rule], [i + 1]) for i in range(3)])
        assert outcomes == [None, None, None]
        assert int(await redis_db.get(rule.key) or 0) == 1 + 2 + 3
        assert await redis_db.hlen(f"xp:{{{tag}}}:resv") == 0

        # Loaded again: the next batch goes through the pipeline as usual.
        assert (await store.admit(tag, "r3", [rule], [100], now, now + MINUTE_MS)).allowed
        assert await store.settle_many([Settlement(tag, "r3", [rule], [4])]) == [None]
        assert int(await redis_db.get(rule.key) or 0) == 10
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_redis_burst_beyond_the_pool_waits_for_a_connection(redis_server: RedisServer) -> None:
    store, tag, now = RedisStore(redis_server.url, timeout_s=2.0), unique_tag(), now_ms_()
    rule = LimitRule(f"xp:{{{tag}}}:rpm", "counter", 10_000, now + MINUTE_MS)
    try:
        # 1,000 admissions in one turn: eight pipelines at once, more than the pool's four connections.
        results = await asyncio.gather(*(store.admit(tag, f"r{i}", [rule], [1], now, now + 1000) for i in range(1000)))
        assert all(r.allowed for r in results)
        assert sorted(r.used[0] for r in results) == list(range(1, 1001))
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_redis_admissions_of_one_turn_share_a_round_trip(redis_server: RedisServer) -> None:
    pipelines: list[int] = []

    class Counting(RedisStore):  # a subclass: the compiled form's methods cannot be replaced on an instance
        async def _pipeline(self, commands: list[bytes]) -> list[Any]:
            pipelines.append(len(commands))
            return await super()._pipeline(commands)

    store, tag, now = Counting(redis_server.url, timeout_s=2.0), unique_tag(), now_ms_()
    rule = LimitRule(f"xp:{{{tag}}}:rpm", "counter", 20, now + MINUTE_MS)
    try:
        results = await asyncio.gather(*(store.admit(tag, f"r{i}", [rule], [1], now, now + 1000) for i in range(30)))
        assert [r.allowed for r in results].count(True) == 20  # still one atomic decision per request
        assert pipelines == [30]
        one = await store.admit(tag, "alone", [replace(rule, limit=100)], [1], now, now + 1000)
        assert one.used == (21,) and pipelines == [30, 1]
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_unreachable_redis_is_store_unavailable_quickly() -> None:
    from extproc_dev.stack import free_port

    store, now = RedisStore(f"redis://127.0.0.1:{free_port()}/0"), now_ms_()
    rule = LimitRule("xp:{t}:rpm", "counter", 10, now + MINUTE_MS)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await store.admit("t", "r1", [rule], [1], now, now + 1000)
        with pytest.raises(StoreUnavailable):
            await store.settle("t", "r1", [rule], [1])
        with pytest.raises(StoreUnavailable):
            await store.settle_many([Settlement("t", f"r{i}", [rule], [1]) for i in range(3)])
        assert not await store.ping()
    finally:
        await store.close()
    assert time.monotonic() - started < 1.0


@pytest.mark.asyncio
async def test_redis_admission_whose_caller_left_is_given_back(
    redis_server: RedisServer, redis_db: redis.asyncio.Redis
) -> None:
    sent: list[bytes] = []
    gate = asyncio.Event()

    class Held(RedisStore):  # a subclass: the compiled form's methods cannot be replaced on an instance
        async def _pipeline(self, commands: list[bytes]) -> list[Any]:
            sent.append(b"".join(commands))
            if b"$4\r\nlate\r\n" in sent[-1] and b"EVALSHA" in sent[-1]:  # Redis decides once we let it through
                await gate.wait()
            return await super()._pipeline(commands)

    store, tag, now = Held(redis_server.url, timeout_s=2.0), unique_tag(), now_ms_()
    tpm = LimitRule(f"xp:{{{tag}}}:tpm", "counter", 1000, now + MINUTE_MS)
    slots = LimitRule(f"xp:{{{tag}}}:conc", "concurrency", 5, 0)
    try:
        # Left before its turn's pipeline went out: never sent at all.
        early = asyncio.ensure_future(store.admit(tag, "early", [tpm, slots], [100, 1], now, now + MINUTE_MS))
        await asyncio.sleep(0)
        early.cancel()
        assert (await store.admit(tag, "probe", [tpm], [0], now, now + MINUTE_MS)).used == (0,)
        assert not any(b"early" in commands for commands in sent)

        # Left while Redis decided: allowed there, so given back right after.
        late = asyncio.ensure_future(store.admit(tag, "late", [tpm, slots], [100, 1], now, now + MINUTE_MS))
        while not any(b"late" in commands for commands in sent):
            await asyncio.sleep(0)
        late.cancel()
        gate.set()
        while store._in_flight:
            await asyncio.sleep(0.01)
        assert int(await redis_db.get(tpm.key) or 0) == 0
        assert await redis_db.zcard(slots.key) == 0
        assert not await redis_db.hexists(f"xp:{{{tag}}}:resv", "late")
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_redis_refusing_to_load_the_script_is_unavailable_not_a_crash(
    redis_server: RedisServer, redis_db: redis.asyncio.Redis
) -> None:
    assert redis_server.port is not None
    # A user that may run scripts but not load them, as some managed Redis offerings set it up.
    await redis_db.execute_command("ACL", "SETUSER", "noload", "on", ">pw", "~*", "+@all", "-script|load")
    url = f"redis://noload:pw@127.0.0.1:{redis_server.port}/0"
    store, tag, now = RedisStore(url, timeout_s=2.0), unique_tag(), now_ms_()
    rule = LimitRule(f"xp:{{{tag}}}:rpm", "counter", 10, now + MINUTE_MS)
    try:
        await redis_db.script_flush()
        with pytest.raises(StoreUnavailable, match="load the script"):
            await store.admit(tag, "r1", [rule], [1], now, now + 1000)
        (outcome,) = await store.settle_many([Settlement(tag, "r1", [rule], [1])])
        assert isinstance(outcome, StoreUnavailable)
    finally:
        await store.close()
        await redis_db.execute_command("ACL", "DELUSER", "noload")


# --- MemoryStore only -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_memory_store_forgets_what_has_expired() -> None:
    store, now = MemoryStore(purge_every=100), now_ms_()
    for i in range(1000):
        rules = [
            LimitRule(f"xp:{{t{i}}}:rpm", "counter", 10, now + 1000),
            LimitRule(f"xp:{{t{i}}}:c", "concurrency", 5, 0),
        ]
        await store.admit(f"t{i}", f"r{i}", rules, [1, 1], now, now + 500)
    assert store.size == 3000
    later = now + 10_000
    for i in range(100):
        other = LimitRule("xp:{other}:rpm", "counter", 10**6, later + MINUTE_MS)
        await store.admit("other", f"o{i}", [other], [1], later, later + 1)
    assert store.size <= 1 + 100  # one live counter, and at most the reservations of the last purge interval

    # Settled reservations leave their heap entries behind; the heap must not grow with traffic.
    rule = LimitRule("xp:{busy}:rpm", "counter", 10**6, later + MINUTE_MS)
    for i in range(5000):
        await store.admit("busy", f"b{i}", [rule], [1], later, later + 10 * MINUTE_MS)
        await store.settle("busy", f"b{i}", [rule], [1])
    assert len(store._tags["busy"].expiry) < 200


# --- ResilientStore ---------------------------------------------------------------------------


class FlakyStore(SettlesInBatches):
    """A MemoryStore that can be taken down, recording the settlements it accepted."""

    def __init__(self, settle_delays_s: dict[str, float] | None = None) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.settled: list[str] = []
        self.batches: list[int] = []  # items per settle_many call that reached the store
        self.settle_delays_s = settle_delays_s or {}
        self.unavailable_once: set[str] = set()  # request ids answered "unavailable" in their slot, once

    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        if self.down:
            raise StoreUnavailable("down")
        return await self.inner.admit(tag, request_id, rules, costs, now_ms, expires_at_ms)

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        # One exchange: slow as its slowest items together, and all or nothing when the store is down.
        delay = sum(self.settle_delays_s.get(item.request_id, 0.0) for item in settlements)
        if delay:
            await asyncio.sleep(delay)
        if self.down:
            raise StoreUnavailable("down")
        self.batches.append(len(settlements))
        refused = [item.request_id in self.unavailable_once for item in settlements]
        self.unavailable_once -= {item.request_id for item in settlements}
        written = await self.inner.settle_many([item for item, no in zip(settlements, refused, strict=True) if not no])
        outcomes: list[BaseException | None] = [
            StoreUnavailable("lost mid-batch") if no else written.pop(0) for no in refused
        ]
        self.settled += [
            item.request_id for item, outcome in zip(settlements, outcomes, strict=True) if outcome is None
        ]
        return outcomes

    async def close(self) -> None:
        pass


def rpm(limit: int = 2) -> LimitRule:
    """The ResilientStore tests' requests-per-minute rule, its key expiring a minute from now."""
    return LimitRule("xp:{t}:rpm", "counter", limit, now_ms_() + MINUTE_MS)


async def admit_and_settle(store: QuotaStore, request_id: str, rules: list[LimitRule] | None = None) -> bool:
    rules = rules if rules is not None else [rpm()]
    now = now_ms_()
    allowed = (await store.admit("t", request_id, rules, [1] * len(rules), now, now + MINUTE_MS)).allowed
    if allowed:
        await store.settle("t", request_id, rules, [1] * len(rules))
    return allowed


@pytest.fixture
def outage_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.mark.asyncio
async def test_redis_outage_fails_closed(outage_server: RedisServer) -> None:
    store = ResilientStore(RedisStore(outage_server.url), on_failure="closed", recorder=CountingRecorder())
    outage_server.stop()
    now = now_ms_()
    with pytest.raises(StoreUnavailable):
        await store.admit("t", "r1", [rpm()], [1], now, now + 1000)
    assert store.recorder.fail_open == 0
    await store.close()


@pytest.mark.asyncio
async def test_redis_outage_fails_open_and_usage_reaches_redis_afterwards(outage_server: RedisServer) -> None:
    store = ResilientStore(
        RedisStore(outage_server.url, timeout_s=2.0),
        on_failure="open",
        retry_interval_s=60,
        recorder=CountingRecorder(),
    )
    now = now_ms_()
    tpm = LimitRule("xp:{t}:tpm", "counter", 1000, now + MINUTE_MS)
    conc = LimitRule("xp:{t}:conc", "concurrency", 5, 0)
    costs = [100, 1]
    try:
        assert (await store.admit("t", "before", [tpm, conc], costs, now, now + MINUTE_MS)).allowed
        outage_server.stop()  # saved: "before" keeps its reservation across the restart

        assert await store.admit("t", "during", [tpm, conc], costs, now, now + MINUTE_MS) == AdmitResult(
            True, None, (100, 1)
        )
        assert store.recorder.fail_open == 1
        await store.settle("t", "during", [tpm, conc], [30, 1])  # replayed later in full
        await store.settle("t", "before", [tpm, conc], [20, 1])  # its reservation is in Redis: the difference
        assert store.pending == 2

        outage_server.restart()
        assert await store.flush() == 2
        assert store.pending == 0
    finally:
        await store.close()
    db = redis.asyncio.Redis.from_url(outage_server.url)
    try:
        assert int(await db.get("xp:{t}:tpm") or 0) == 50
        assert await db.zcard("xp:{t}:conc") == 0
        assert await db.hlen("xp:{t}:resv") == 0
    finally:
        await db.aclose()


@pytest.mark.asyncio
async def test_fallback_enforces_limits_while_the_primary_is_down() -> None:
    primary = FlakyStore()
    primary.down = True
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    now = now_ms_()
    results = [await store.admit("t", f"r{i}", [rpm()], [1], now, now + MINUTE_MS) for i in range(3)]
    assert [r.allowed for r in results] == [True, True, False]
    assert store.recorder.fail_open == 3

    # Settled locally too, so a slot taken during the outage is given back during the outage.
    one_at_a_time = [LimitRule("xp:{t}:conc", "concurrency", 1, 0)]
    assert await admit_and_settle(store, "c1", one_at_a_time)
    assert await admit_and_settle(store, "c2", one_at_a_time)
    await store.close()


@pytest.mark.asyncio
async def test_queued_settlements_drain_in_the_background_once_the_primary_is_back() -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", retry_interval_s=0.02, recorder=CountingRecorder())
    primary.down = True
    assert await admit_and_settle(store, "r1")
    assert store.pending == 1
    await asyncio.sleep(0.05)  # retried and failed meanwhile
    assert store.pending == 1
    primary.down = False
    for _ in range(100):
        if store.pending == 0:
            break
        await asyncio.sleep(0.01)
    assert primary.settled == ["r1"]
    now = now_ms_()
    assert (await primary.inner.admit("t", "probe", [rpm(limit=0)], [1], now, now + 1)).used == (1,)
    await store.close()


@pytest.mark.asyncio
async def test_a_full_queue_drops_the_oldest() -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", max_pending=3, retry_interval_s=60, recorder=CountingRecorder())
    primary.down = True
    for i in range(5):
        await admit_and_settle(store, f"r{i}", [rpm(limit=100)])
    assert (store.pending, store.recorder.dropped) == (3, 2)
    primary.down = False
    assert await store.flush() == 3
    assert primary.settled == ["r2", "r3", "r4"]
    await store.close()


@pytest.mark.asyncio
async def test_settlement_failing_at_the_primary_is_queued_and_close_writes_it() -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    now = now_ms_()
    assert (await store.admit("t", "r1", [rpm()], [1], now, now + MINUTE_MS)).allowed
    primary.down = True
    await store.settle("t", "r1", [rpm()], [1])
    assert store.pending == 1 and store.recorder.fail_open == 0
    primary.down = False
    await store.close()
    assert primary.settled == ["r1"]


@pytest.mark.asyncio
async def test_drains_run_one_at_a_time_in_order() -> None:
    primary = FlakyStore(settle_delays_s={"r0": 0.02})  # a slow first write must not be overtaken
    store = ResilientStore(primary, on_failure="open", retry_interval_s=0.001, recorder=CountingRecorder())
    primary.down = True
    for i in range(5):
        await admit_and_settle(store, f"r{i}", [rpm(limit=100)])
    primary.down = False
    await asyncio.gather(store.flush(), store.flush(), asyncio.sleep(0.01))
    await store.flush()
    assert primary.settled == [f"r{i}" for i in range(5)]
    await store.close()


@pytest.mark.asyncio
async def test_flush_writes_a_long_queue_in_batches_in_order() -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    primary.down = True
    for i in range(300):  # more than one batch
        assert await admit_and_settle(store, f"r{i}", [rpm(limit=1000)])
    assert store.pending == 300
    primary.down = False
    assert await store.flush() == 300
    assert store.pending == 0
    assert primary.settled == [f"r{i}" for i in range(300)]
    assert 1 < len(primary.batches) < 300 and sum(primary.batches) == 300  # batched, not one write per item
    now = now_ms_()
    assert (await primary.inner.admit("t", "probe", [rpm(limit=0)], [1], now, now + 1)).used == (300,)
    await store.close()


@pytest.mark.asyncio
async def test_fail_open_warns_at_most_every_ten_seconds_without_keys(caplog: pytest.LogCaptureFixture) -> None:
    primary = FlakyStore()
    primary.down = True
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    with caplog.at_level(logging.WARNING, logger="extproc.quota"):
        for i in range(3):
            await admit_and_settle(store, f"r{i}", [rpm(limit=100)])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "xp:" not in warnings[0].getMessage()
    primary.down = False
    await store.close()


@pytest.mark.asyncio
async def test_a_settlement_lost_mid_batch_is_kept_and_written_later() -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    primary.down = True
    for i in range(3):
        assert await admit_and_settle(store, f"r{i}", [rpm(10)])
    primary.down = False
    primary.unavailable_once = {"r1"}  # e.g. the connection broke after the others were applied
    assert await store.flush() == 2
    assert store.pending == 1 and store.recorder.dropped == 0
    assert await store.flush() == 1
    assert primary.settled == ["r0", "r2", "r1"]
    await store.close()


class ReplyDroppingProxy:
    """Forwards commands to Redis and, while `drop` is set, throws the replies away.

    Redis runs every command it gets; the client hears nothing and times out: the case where a
    call may have landed without its caller knowing.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.drop = False
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    if not (replies and self.drop):
                        writer.write(data)
            writer.close()

        await asyncio.gather(
            pump(client_reader, redis_writer, replies=False), pump(redis_reader, client_writer, replies=True)
        )


@pytest_asyncio.fixture
async def lossy(redis_server: RedisServer) -> AsyncIterator[tuple[ReplyDroppingProxy, str]]:
    assert redis_server.port is not None
    proxy = ReplyDroppingProxy(redis_server.port)
    url = await proxy.start()
    yield proxy, url
    await proxy.close()


def resilient_behind(url: str, on_failure: Literal["open", "closed"]) -> tuple[ResilientStore, str, LimitRule]:
    """A ResilientStore quick to give up on Redis, a fresh tag and its tokens-per-minute rule."""
    store = ResilientStore(
        RedisStore(url, timeout_s=0.2), on_failure=on_failure, retry_interval_s=60, recorder=CountingRecorder()
    )
    tag = unique_tag()
    return store, tag, LimitRule(f"xp:{{{tag}}}:tpm", "counter", 1000, now_ms_() + MINUTE_MS)


async def replay_once_answered(proxy: ReplyDroppingProxy, store: ResilientStore) -> int:
    proxy.drop = False
    store._primary_down_until = 0.0  # as if the retry interval were over
    return await store.flush()


@pytest.mark.asyncio
async def test_a_settlement_applied_without_an_answer_is_not_charged_again_by_its_replay(
    lossy: tuple[ReplyDroppingProxy, str], redis_db: redis.asyncio.Redis
) -> None:
    proxy, url = lossy
    store, tag, tpm = resilient_behind(url, "open")
    now = now_ms_()
    try:
        assert (await store.admit(tag, "r1", [tpm], [100], now, now + MINUTE_MS)).allowed
        await store.settle(tag, "warm-up", [tpm], [0])  # the settle script is loaded: Redis can run it unseen
        proxy.drop = True
        await store.settle(tag, "r1", [tpm], [30])
        assert store.pending == 1  # no answer: kept for a replay
        assert int(await redis_db.get(tpm.key) or 0) == 30  # ... yet Redis applied it
        assert await replay_once_answered(proxy, store) == 1
        assert int(await redis_db.get(tpm.key) or 0) == 30
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_fail_closed_gives_back_an_admission_that_landed_without_an_answer(
    lossy: tuple[ReplyDroppingProxy, str], redis_db: redis.asyncio.Redis
) -> None:
    proxy, url = lossy
    store, tag, tpm = resilient_behind(url, "closed")
    now = now_ms_()
    slots = LimitRule(f"xp:{{{tag}}}:conc", "concurrency", 1, 0)
    try:
        await store.admit(tag, "warm-up", [tpm], [0], now, now + 1)  # the admit script is loaded
        proxy.drop = True
        with pytest.raises(StoreUnavailable):  # the client is answered 503
            await store.admit(tag, "r1", [tpm, slots], [100, 1], now, now + MINUTE_MS)
        assert int(await redis_db.get(tpm.key) or 0) == 100  # ... but Redis admitted it
        assert await replay_once_answered(proxy, store) == 1
        assert int(await redis_db.get(tpm.key) or 0) == 0
        assert await redis_db.zcard(slots.key) == 0
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_fallback_failing_one_settlement_does_not_fail_the_batch() -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    primary.down = True
    now = now_ms_()
    rule = rpm(10)
    for i in range(3):
        assert (await store.admit("t", f"r{i}", [rule], [1], now, now + MINUTE_MS)).allowed
    batch = [
        Settlement("t", "r0", [rule], [1]),
        Settlement("t", "r1", [rule], [1, 2]),
        Settlement("t", "r2", [rule], [1]),
    ]
    outcomes = await store.settle_many(batch)
    assert outcomes[0] is None and isinstance(outcomes[1], ValueError) and outcomes[2] is None
    await store.close()


@pytest.mark.asyncio
async def test_a_batch_that_keeps_breaking_the_client_is_dropped_not_retried_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    primary = FlakyStore()
    store = ResilientStore(primary, on_failure="open", retry_interval_s=60, recorder=CountingRecorder())
    primary.down = True
    assert await admit_and_settle(store, "r0", [rpm(10)])
    primary.down = False

    async def broken(settlements: Sequence[Settlement]) -> list[BaseException | None]:
        raise RuntimeError("a bug in the client")

    primary.settle_many = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="extproc.quota"):
        for _ in range(3):
            assert await store.flush() == 0
    assert store.pending == 0 and store.recorder.dropped == 1
    await store.close()
