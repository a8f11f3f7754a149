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

import asyncio
import contextlib
import hashlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from mypy_extensions import mypyc_attr

from extproc.quota.memory import MAX_RELEASES_PER_ADMIT
from extproc.quota.resp import ReplyError, RespConnection, RespNoReply, RespUnavailable, bulk, pack
from extproc.quota.store import (
    AdmitResult,
    LimitRule,
    Settlement,
    SettlesInBatches,
    StoreOutcomeUnknown,
    StoreUnavailable,
)

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
-- expires_at: when a counter created here goes (a time already past creates nothing lasting).
local function add(key, delta, expires_at)
  if delta == 0 then return end
  local cur = redis.call('GET', key)
  if not cur then
    if delta > 0 then
      redis.call('SET', key, int(delta))
      redis.call('PEXPIREAT', key, int(expires_at))
    end
    return
  end
  cur = tonumber(cur)
  if cur + delta < 0 then delta = -cur end
  if delta ~= 0 then redis.call('INCRBY', key, int(delta)) end
end
"""

# KEYS: resv hash, resv expiry zset, then one key per rule.
# ARGV: rules (JSON [[kind 'c' counter | 'z' concurrency, limit, counter expires_at_ms], ...]), max_releases,
#       request_id, now_ms, expires_at_ms, record (JSON), record_ttl_ms, costs (comma-separated, one per rule).
# The first two are the same for every request of a caller within a window, so the client sends them prebuilt.
_ADMIT_LUA = (
    _LUA_COMMON
    + """
local resv, resv_exp = KEYS[1], KEYS[2]
local rules, max_releases = cjson.decode(ARGV[1]), tonumber(ARGV[2])
local rid, now, expires_at = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local costs = cjson.decode('[' .. ARGV[8] .. ']')
local n = #KEYS - 2

local expired = redis.call('ZRANGEBYSCORE', resv_exp, '-inf', ARGV[4], 'LIMIT', 0, max_releases)
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
  local key, rule, cost = KEYS[i + 2], rules[i], costs[i]
  if rule[1] == 'c' then
    used[i] = tonumber(redis.call('GET', key) or '0')
    if denied < 0 and cost > 0 and used[i] + cost > rule[2] then denied = i - 1 end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[4])
    used[i] = redis.call('ZCARD', key)
    if denied < 0 and used[i] + 1 > rule[2] then denied = i - 1 end
  end
end
if denied >= 0 then return {0, denied, unpack(used)} end

for i = 1, n do
  local key, rule, cost = KEYS[i + 2], rules[i], costs[i]
  if rule[1] == 'c' then
    if cost > 0 then
      used[i] = redis.call('INCRBY', key, int(cost))
      if redis.call('PTTL', key) == -1 then redis.call('PEXPIREAT', key, int(rule[3])) end
    end
  else
    redis.call('ZADD', key, ARGV[5], rid)
    used[i] = redis.call('ZCARD', key)
    keep(key, math.max(expires_at - now, 0) + SLACK_MS)
  end
end
redis.call('HSET', resv, rid, ARGV[6])
redis.call('ZADD', resv_exp, ARGV[5], rid)
keep(resv, tonumber(ARGV[7]))
keep(resv_exp, tonumber(ARGV[7]))
return {1, -1, unpack(used)}
"""
).replace("SLACK_MS", str(_SLACK_MS))

# KEYS: resv hash, resv expiry zset, then one key per rule.
# ARGV: rules (JSON, as for admission), request_id, actual costs (comma-separated, one per rule),
#       only_if_reserved ('1': a replay that may have landed before; without a reservation, charge nothing).
_SETTLE_LUA = (
    _LUA_COMMON
    + """
local rules, rid = cjson.decode(ARGV[1]), ARGV[2]
local actual = cjson.decode('[' .. ARGV[3] .. ']')
local charge = ARGV[4] ~= '1'
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
  local key, rule = KEYS[i + 2], rules[i]
  if rule[1] == 'c' then
    -- Zeroed once used: a key named by two rules has its reservation taken back once.
    local r = reserved[key] or 0
    reserved[key] = 0
    if rec or charge then add(key, actual[i] - r, rule[3]) end
  else
    redis.call('ZREM', key, rid)
  end
end
if rec then return 1 end
return 0
"""
)

# Error replies that mean "the store cannot take this now" rather than "this call is wrong": the policy decides.
_UNAVAILABLE_REPLIES = (
    "BUSY",  # a long script elsewhere blocks the server: as good as down for our deadline
    "LOADING",  # restarting, still reading its dataset
    "READONLY",  # connected to a demoted primary during failover
    "MASTERDOWN",
    "OOM",  # maxmemory reached with noeviction
    "CLUSTERDOWN",
    "TRYAGAIN",
    "NOREPLICAS",
)
_PIPELINE_MAX = 128  # calls per pipeline; a bigger burst goes out as several pipelines at once
_Call = bytes  # one packed EVALSHA command
_PREFIX_CACHE_MAX = 4096


@dataclass(slots=True)
class _Admission:
    call: _Call
    reply: asyncio.Future[Any]
    tag: str  # the rest: to give the reservation back if its caller left before the reply came
    request_id: str
    rules: list[LimitRule]


@dataclass(frozen=True, slots=True)
class _Prefixes:
    rules: list[LimitRule]
    admit: bytes  # array header, EVALSHA, sha, KEYS, rules JSON, max releases
    settle: bytes  # array header, EVALSHA, sha, KEYS, rules JSON
    last_counter_expiry_ms: int


def _bulks(*args: bytes) -> bytes:
    """RESP bulk strings; the array header comes with the command's cached prefix."""
    return b"".join([bulk(arg) for arg in args])


def _as_unavailable(reply: Any) -> Any:
    if isinstance(reply, ReplyError) and str(reply).startswith(_UNAVAILABLE_REPLIES):
        return StoreUnavailable(f"Redis answered: {reply}")
    return reply


def _script_missing(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


def _sha1(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


def _kind(rule: LimitRule) -> str:
    return "c" if rule.kind == "counter" else "z"


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it to watch its pipelines
class RedisStore(SettlesInBatches):
    def __init__(self, url: str, *, timeout_s: float = 0.25) -> None:
        # timeout_s bounds connecting and every reply: a store slower than that is unavailable to us.
        # No retries here: admission is not idempotent, and the caller has its own fallback.
        self._redis = RespConnection(url, timeout_s=timeout_s)
        self._admit_sha = _sha1(_ADMIT_LUA)
        self._settle_sha = _sha1(_SETTLE_LUA)
        self._admissions: list[_Admission] = []  # waiting for this turn's pipeline
        self._in_flight: set[asyncio.Task[None]] = set()
        self._prefix_cache: dict[tuple[str, int], _Prefixes] = {}

    async def admit(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> AdmitResult:
        """Admissions made in the same event-loop turn share one pipeline: one round trip for all."""
        if not rules:
            return AdmitResult(True, None, ())
        call = self._admit_call(tag, request_id, rules, costs, now_ms, expires_at_ms)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._admissions:
            loop.call_soon(self._send_admissions)
        self._admissions.append(_Admission(call, reply, tag, request_id, rules))
        allowed, denied, *used = (int(v) for v in await reply)
        return AdmitResult(bool(allowed), None if denied < 0 else denied, tuple(used))

    def _admit_call(
        self, tag: str, request_id: str, rules: list[LimitRule], costs: list[int], now_ms: int, expires_at_ms: int
    ) -> bytes:
        record = orjson.dumps(
            [[r.key, "c", cost] for r, cost in zip(rules, costs, strict=True) if r.kind == "counter" and cost > 0]
            + [[r.key, "z", 0] for r in rules if r.kind == "concurrency"]
        )
        prefix = self._prefixes(tag, rules)
        last_counter_expiry = prefix.last_counter_expiry_ms
        record_ttl_ms = max(max(expires_at_ms, last_counter_expiry) - now_ms + _SLACK_MS, _SLACK_MS)
        return prefix.admit + _bulks(
            request_id.encode(),
            b"%d" % now_ms,
            b"%d" % expires_at_ms,
            record,
            b"%d" % record_ttl_ms,
            b",".join(b"%d" % cost for cost in costs),
        )

    def _send_admissions(self) -> None:
        # Callers that left already (their stream ended) are not sent: nothing to undo later.
        pending = [admission for admission in self._admissions if not admission.reply.done()]
        self._admissions = []
        for start in range(0, len(pending), _PIPELINE_MAX):
            self._spawn(self._run_admissions(pending[start : start + _PIPELINE_MAX]))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _run_admissions(self, batch: list[_Admission]) -> None:
        try:
            replies = await self._execute(_ADMIT_LUA, [admission.call for admission in batch])
        except BaseException as exc:  # StoreUnavailable, or cancelled at shutdown: every caller must hear of it
            failure = exc if isinstance(exc, Exception) else StoreUnavailable("the store client was shut down")
            for admission in batch:
                if not admission.reply.done():
                    admission.reply.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        abandoned: list[Settlement] = []
        for admission, result in zip(batch, replies, strict=True):
            if admission.reply.done():
                # The caller left while Redis decided: nobody will settle this, so give it back now
                # rather than hold the tokens and slots until the reservation expires.
                if not isinstance(result, BaseException) and int(result[0]):
                    abandoned.append(Settlement.release(admission.tag, admission.request_id, admission.rules))
            elif isinstance(result, BaseException):
                admission.reply.set_exception(result)
            else:
                admission.reply.set_result(result)
        if abandoned:
            self._spawn(self._release(abandoned))

    async def _release(self, settlements: list[Settlement]) -> None:
        # Best effort: if this fails too, the reservations expire on their own.
        with contextlib.suppress(StoreUnavailable):
            await self.settle_many(settlements)

    async def settle_many(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        """Every settlement of the batch in one pipeline: one round trip, not one per request."""
        outcomes: list[BaseException | None] = [None] * len(settlements)
        calls: list[bytes] = []
        sent: list[int] = []
        for index, item in enumerate(settlements):
            if not item.rules:
                continue
            try:
                calls.append(self._settle_call(item))
            except ValueError as exc:
                outcomes[index] = exc
                continue
            sent.append(index)
        if calls:
            replies = await self._execute(_SETTLE_LUA, calls)
            for index, reply in zip(sent, replies, strict=True):
                if isinstance(reply, BaseException):
                    outcomes[index] = reply
        return outcomes

    async def _execute(self, source: str, calls: list[bytes]) -> list[Any]:
        """EVALSHA each call in one pipeline; per call, its reply or the error it met.

        Raises StoreUnavailable when Redis could not be reached or stopped answering. Error replies
        that mean "not now" (BUSY, LOADING, READONLY, ...) count as unavailable per call. Calls that
        found the script missing (restart, SCRIPT FLUSH) ran nothing: the script is loaded and they
        are sent again; other calls of the batch may have been applied already, so from there a
        failure is reported per call, never raised.
        """
        replies = await self._pipeline(calls)
        lost = [i for i, reply in enumerate(replies) if _script_missing(reply)]
        if lost:
            again: list[Any]
            load_script = pack(b"SCRIPT", b"LOAD", source.encode())
            try:
                load, *again = await self._pipeline([load_script, *(calls[i] for i in lost)])
            except StoreUnavailable as exc:
                again = [exc] * len(lost)
            else:
                if isinstance(load, ReplyError):  # then the resent calls met NOSCRIPT again: nothing ran
                    again = [StoreUnavailable(f"Redis refused to load the script: {load}")] * len(lost)
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return [_as_unavailable(reply) for reply in replies]

    async def _pipeline(self, commands: list[bytes]) -> list[Any]:
        try:
            return await self._redis.execute(commands)
        # A name per handler: mypyc gives an `as` name one type per function.
        except RespNoReply as lost:
            raise StoreOutcomeUnknown(str(lost)) from None
        except RespUnavailable as unavailable:
            raise StoreUnavailable(str(unavailable)) from None

    def _settle_call(self, item: Settlement) -> bytes:
        if len(item.actual) != len(item.rules):
            raise ValueError(f"settle got {len(item.actual)} costs for {len(item.rules)} rules")
        return self._prefixes(item.tag, item.rules).settle + _bulks(
            item.request_id.encode(),
            b",".join(b"%d" % cost for cost in item.actual),
            b"1" if item.only_if_reserved else b"0",
        )

    def _prefixes(self, tag: str, rules: list[LimitRule]) -> _Prefixes:
        """The packed start of this caller's commands: script, keys and rules, the same all window long."""
        cached = self._prefix_cache.get((tag, id(rules)))
        if cached is not None and cached.rules is rules:  # holding the list keeps its id from being reused
            return cached
        keys = [key.encode() for key in self._keys(tag, rules)]
        rules_json = orjson.dumps([[_kind(r), r.limit, r.expires_at_ms if r.kind == "counter" else 0] for r in rules])
        head = [str(len(keys)).encode(), *keys, rules_json]
        admit = b"*%d\r\n" % (3 + len(keys) + 1 + 1 + 6) + _bulks(
            b"EVALSHA", self._admit_sha, *head, b"%d" % MAX_RELEASES_PER_ADMIT
        )
        settle = b"*%d\r\n" % (3 + len(keys) + 1 + 3) + _bulks(b"EVALSHA", self._settle_sha, *head)
        counters = [r.expires_at_ms for r in rules if r.kind == "counter"]
        prefixes = _Prefixes(rules, admit, settle, max(counters, default=0))
        if len(self._prefix_cache) >= _PREFIX_CACHE_MAX:
            self._prefix_cache.clear()
        self._prefix_cache[(tag, id(rules))] = prefixes
        return prefixes

    async def ping(self) -> bool:
        return await self._redis.ping()

    async def close(self) -> None:
        await self._redis.close()
        for task in list(self._in_flight):
            task.cancel()

    @staticmethod
    def _keys(tag: str, rules: list[LimitRule]) -> list[str]:
        hash_tag = f"{{{tag}}}"
        for rule in rules:
            # Released later by keys read from the record: they must share the slot (see module doc).
            if hash_tag not in rule.key:
                raise ValueError(f"quota key without the hash tag {hash_tag}")
        prefix = rules[0].key.partition(hash_tag)[0]
        return [f"{prefix}{hash_tag}:resv", f"{prefix}{hash_tag}:resv:exp", *(r.key for r in rules)]
