"""Quota state in Redis, shared by every gateway replica: one Lua script per admission, one per settlement.

Keys of one call share the tenant's hash tag, so the store works unchanged on Redis Cluster.
Next to the rules' own keys, each tag has two store keys (same prefix as the rules' keys):

    <prefix>{tag}:resv      hash: request_id -> JSON [[key, "c"|"z", cost], ...] charged at admission
    <prefix>{tag}:resv:exp  sorted set: request_id scored by expires_at_ms, to find crashed reservations

Releasing an expired reservation touches the keys its record names, which the caller of that later
admission cannot list in KEYS. They all carry the same hash tag (checked at admission), so they live
in the slot of the keys that are declared: Redis Cluster executes this, which is all that matters here.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from extproc.quota.memory import MAX_RELEASES_PER_ADMIT
from extproc.quota.store import AdmitResult, LimitRule, StoreUnavailable

# Reservation bookkeeping outlives what it describes by this much, so a late settlement still finds it.
_SLACK_MS = 60_000

# Numbers leave Lua through string.format('%d'): tostring() would print 1e+14 style past 14 digits.
_LUA_COMMON = """
local function int(n) return string.format('%d', n) end

-- Raise a key's TTL to at least ms; never shorten it (the key may also hold longer-lived state).
local function keep(key, ms)
  local pttl = redis.call('PTTL', key)
  if pttl == -1 or (pttl >= 0 and pttl < ms) then redis.call('PEXPIRE', key, int(ms)) end
end

-- Move a counter by delta, never below zero, never creating it by subtracting.
local function add(key, delta, ttl)
  if delta == 0 then return end
  local cur = redis.call('GET', key)
  if not cur then
    if delta > 0 then redis.call('SET', key, int(delta), 'PX', int(math.max(ttl, 1))) end
    return
  end
  cur = tonumber(cur)
  if cur + delta < 0 then delta = -cur end
  if delta ~= 0 then redis.call('INCRBY', key, int(delta)) end
end
"""

# KEYS: resv hash, resv expiry zset, then one key per rule.
# ARGV: request_id, now_ms, expires_at_ms, max_releases, record (JSON), record_ttl_ms,
#       then per rule: kind ('c' counter | 'z' concurrency), limit, cost, ttl_ms.
_ADMIT_LUA = (
    _LUA_COMMON
    + """
local resv, resv_exp = KEYS[1], KEYS[2]
local rid, now, expires_at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS - 2

local expired = redis.call('ZRANGEBYSCORE', resv_exp, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
for _, old in ipairs(expired) do
  local rec = redis.call('HGET', resv, old)
  if rec then
    for _, item in ipairs(cjson.decode(rec)) do
      if item[2] == 'c' then add(item[1], -item[3], 0) else redis.call('ZREM', item[1], old) end
    end
    redis.call('HDEL', resv, old)
  end
end
if #expired > 0 then redis.call('ZREM', resv_exp, unpack(expired)) end

-- Decide before writing anything: an error or a denial must leave no partial charge behind.
local used, denied = {}, -1
for i = 1, n do
  local key, a = KEYS[i + 2], 6 + (i - 1) * 4
  local limit = tonumber(ARGV[a + 2])
  if ARGV[a + 1] == 'c' then
    local cost = tonumber(ARGV[a + 3])
    used[i] = tonumber(redis.call('GET', key) or '0')
    if denied < 0 and cost > 0 and used[i] + cost > limit then denied = i - 1 end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
    used[i] = redis.call('ZCARD', key)
    if denied < 0 and used[i] + 1 > limit then denied = i - 1 end
  end
end
if denied >= 0 then return {0, denied, unpack(used)} end

for i = 1, n do
  local key, a = KEYS[i + 2], 6 + (i - 1) * 4
  if ARGV[a + 1] == 'c' then
    if tonumber(ARGV[a + 3]) > 0 then
      used[i] = redis.call('INCRBY', key, ARGV[a + 3])
      if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ARGV[a + 4]) end
    end
  else
    redis.call('ZADD', key, ARGV[3], rid)
    used[i] = redis.call('ZCARD', key)
    keep(key, math.max(expires_at - now, 0) + SLACK_MS)
  end
end
redis.call('HSET', resv, rid, ARGV[5])
redis.call('ZADD', resv_exp, ARGV[3], rid)
keep(resv, tonumber(ARGV[6]))
keep(resv_exp, tonumber(ARGV[6]))
return {1, -1, unpack(used)}
"""
).replace("SLACK_MS", str(_SLACK_MS))

# KEYS: resv hash, resv expiry zset, then one key per rule.
# ARGV: request_id, then per rule: kind ('c' | 'z'), actual cost, ttl_ms.
_SETTLE_LUA = (
    _LUA_COMMON
    + """
local rid = ARGV[1]
local reserved = {}
local rec = redis.call('HGET', KEYS[1], rid)
if rec then
  for _, item in ipairs(cjson.decode(rec)) do
    if item[2] == 'c' then reserved[item[1]] = (reserved[item[1]] or 0) + item[3] end
  end
  redis.call('HDEL', KEYS[1], rid)
  redis.call('ZREM', KEYS[2], rid)
end
for i = 1, #KEYS - 2 do
  local key, a = KEYS[i + 2], 1 + (i - 1) * 3
  if ARGV[a + 1] == 'c' then
    -- Zeroed once used: a key named by two rules has its reservation taken back once.
    local r = reserved[key] or 0
    reserved[key] = 0
    add(key, tonumber(ARGV[a + 2]) - r, tonumber(ARGV[a + 3]))
  else
    redis.call('ZREM', key, rid)
  end
end
if rec then return 1 end
return 0
"""
)

# Failures that mean "the store cannot take this now" rather than "this call is wrong": the policy decides.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes refused/reset, auth, LOADING, pool exhaustion
    RedisTimeoutError,
    OSError,
    ReadOnlyError,  # connected to a demoted primary during failover
    OutOfMemoryError,  # maxmemory reached with noeviction
    ClusterDownError,
    TryAgainError,
)


def _kind(rule: LimitRule) -> str:
    return "c" if rule.kind == "counter" else "z"


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float = 0.25, max_connections: int = 64) -> None:
        # A blocking pool: a burst beyond max_connections waits for a connection instead of failing at once
        # (the default pool raises "Too many connections", which would look like an outage). timeout_s bounds
        # each wait, for a connection as for a reply: a store slower than that is unavailable to us.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=False,
            # No client-side retries: admission is not idempotent, and the caller has its own fallback.
            retry=Retry(NoBackoff(), 0),
        )
        self._redis: redis.asyncio.Redis = redis.asyncio.Redis.from_pool(pool)
        self._admit_script = self._redis.register_script(_ADMIT_LUA)
        self._settle_script = self._redis.register_script(_SETTLE_LUA)

    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        if not rules:
            return AdmitResult(True, None, ())
        record = orjson.dumps(
            [[r.key, "c", r.cost] for r in rules if r.kind == "counter" and r.cost > 0]
            + [[r.key, "z", 0] for r in rules if r.kind == "concurrency"]
        )
        longest_counter = max((r.ttl_ms for r in rules if r.kind == "counter"), default=0)
        record_ttl_ms = max(expires_at_ms - now_ms, longest_counter, 0) + _SLACK_MS
        args: list[str | int | bytes] = [
            request_id,
            now_ms,
            expires_at_ms,
            MAX_RELEASES_PER_ADMIT,
            record,
            record_ttl_ms,
        ]
        for rule in rules:
            args += [_kind(rule), rule.limit, rule.cost, rule.ttl_ms]
        reply = await self._call(self._admit_script, self._keys(tag, rules), args)
        allowed, denied, *used = (int(v) for v in reply)
        return AdmitResult(bool(allowed), None if denied < 0 else denied, tuple(used))

    async def settle(self, tag: str, request_id: str, rules: list[LimitRule], actual: list[int]) -> None:
        if len(actual) != len(rules):
            raise ValueError(f"settle got {len(actual)} costs for {len(rules)} rules")
        if not rules:
            return
        args: list[str | int | bytes] = [request_id]
        for rule, cost in zip(rules, actual, strict=True):
            args += [_kind(rule), cost, rule.ttl_ms]
        await self._call(self._settle_script, self._keys(tag, rules), args)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()

    @staticmethod
    def _keys(tag: str, rules: list[LimitRule]) -> list[str]:
        hash_tag = f"{{{tag}}}"
        for rule in rules:
            # Released later by keys read from the record: they must share the slot (see module doc).
            if hash_tag not in rule.key:
                raise ValueError(f"quota key without the hash tag {hash_tag}")
        prefix = rules[0].key.partition(hash_tag)[0]
        return [f"{prefix}{hash_tag}:resv", f"{prefix}{hash_tag}:resv:exp", *(r.key for r in rules)]

    @staticmethod
    async def _call(script: AsyncScript, keys: list[str], args: list[str | int | bytes]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except ResponseError as exc:
            # A long script elsewhere blocks the server: as good as down for our deadline.
            if str(exc).startswith("BUSY"):
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise
