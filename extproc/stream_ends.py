"""How cut streams ended, as Envoy reports them: an upstream reset, a timeout, or the client.

Envoy cancels the ext_proc stream the same way whether the client hung up or the upstream reset
mid-response, so the stream alone cannot give the request its outcome. Envoy's access log can:
the connection manager sends the requests that ended with one of `STREAM_END_FLAGS` over gRPC
(`filter_contract.stream_end_log`) to the gateway's own port, where `AccessLogReceiver` files
them here by request id (`x-request-id`, which Envoy's access log and the ext_proc stream share).

A stream cut mid-response holds its outcome (the log line and the request counter, never its
settlement) until its report arrives, for at most `wait_s`; without one it stays `cancelled`.
The report may reach any worker of any replica (each Envoy thread keeps one access log stream
to one gateway process), so with Redis it is also written there, briefly, for the others; a
waiter looks there while it waits. Without Redis, reports reach only the worker they were sent
to: one process (`extproc dev`, a single worker) sees them all.

Bounded: reports are kept `ttl_s` and at most `max_reports` of them; at most `max_waiting`
outcomes wait (past that, a cut stream is recorded at once as `cancelled`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from extproc.codes import OUTCOMES, Outcome
from extproc.filter_contract import STREAM_END_FLAGS, STREAM_END_LOG_NAME
from extproc.quota.resp import RespConnection, RespUnavailable, pack

log = logging.getLogger(__name__)

REPORT_WAIT_S: Final = 1.0
# A report is of use only while its stream may still be waiting: a few seconds, not minutes.
REPORT_TTL_S: Final = 5.0
MAX_REPORTS: Final = 10_000
MAX_WAITING: Final = 10_000
MAX_SHARING: Final = 10_000  # reports queued for Redis; past that they are kept here only
MAX_REQUEST_ID: Final = 128  # as the request record keeps it
_REDIS_STEP_S: Final = 0.25  # how often a waiter looks in Redis
_KEY_PREFIX: Final = b"extproc:stream-end:"
_ENCODED: Final = {outcome.encode(): outcome for outcome in OUTCOMES}


def outcome_of_flags(flags: accesslog_pb2.ResponseFlags) -> Outcome | None:
    """The outcome a report's response flags give, by `STREAM_END_FLAGS`' precedence."""
    for _short, field, outcome in STREAM_END_FLAGS:
        if getattr(flags, field):
            return outcome
    return None


class StreamEnds:
    """Reports by request id, and the outcomes waiting for them."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        wait_s: float = REPORT_WAIT_S,
        ttl_s: float = REPORT_TTL_S,
        max_reports: int = MAX_REPORTS,
        max_waiting: int = MAX_WAITING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wait_s = wait_s
        self._ttl_s = ttl_s
        self._max_reports = max_reports
        self._max_waiting = max_waiting
        self._clock = clock
        self._reports: OrderedDict[str, tuple[float, Outcome]] = OrderedDict()  # request id -> (expiry, outcome)
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._redis = RespConnection(redis_url, timeout_s=0.25) if redis_url else None
        self._to_share: list[bytes] = []  # SETs for Redis, written in one pipeline per loop turn
        self.unshared = 0  # reports that could not be queued for Redis (the queue was full)

    # -- reports ----------------------------------------------------------------------------------

    def report(self, request_id: str, outcome: Outcome) -> None:
        """Envoy says how `request_id` ended: wake its waiter here, and tell the other workers."""
        if len(request_id) > MAX_REQUEST_ID or not request_id.isascii() or not request_id.isprintable():
            return  # not an id the ext_proc stream can have kept
        waiter = self._waiters.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)
            return  # its stream was here: nobody else waits for it
        self._keep(request_id, outcome)  # it may arrive before its stream is over
        if self._redis is not None:
            if len(self._to_share) >= MAX_SHARING:
                self.unshared += 1
                return
            key = _KEY_PREFIX + request_id.encode()
            self._to_share.append(pack(b"SET", key, outcome.encode(), b"PX", b"%d" % int(self._ttl_s * 1000)))
            if len(self._to_share) == 1:
                asyncio.get_running_loop().call_soon(self._share)

    def _share(self) -> None:
        commands, self._to_share = self._to_share, []
        if commands:
            self._spawn(self._write(commands))

    def _keep(self, request_id: str, outcome: Outcome) -> None:
        now = self._clock()
        reports = self._reports
        while reports:  # oldest first: drop the expired, and the oldest past the bound
            first_id, (expiry, _) = next(iter(reports.items()))
            if expiry > now and len(reports) < self._max_reports:
                break
            del reports[first_id]
        reports[request_id] = (now + self._ttl_s, outcome)
        reports.move_to_end(request_id)

    def _known(self, request_id: str) -> Outcome | None:
        kept = self._reports.pop(request_id, None)
        if kept is None or kept[0] <= self._clock():
            return None
        return kept[1]

    async def _write(self, commands: list[bytes]) -> None:
        assert self._redis is not None
        try:
            await self._redis.execute(commands)
        except RespUnavailable as exc:
            log.debug("could not share a stream-end report: %s", exc)

    async def _read(self, request_id: str) -> Outcome | None:
        if self._redis is None:
            return None
        try:
            # GETDEL: a report is used once, so an id a client sends again finds nothing stale.
            (reply,) = await self._redis.execute([pack(b"GETDEL", _KEY_PREFIX + request_id.encode())])
        except RespUnavailable:
            return None
        return _ENCODED.get(reply) if isinstance(reply, bytes) else None

    # -- waiting ----------------------------------------------------------------------------------

    def hold(self, request_id: str | None, record: Callable[[Outcome | None], None]) -> bool:
        """Call `record` with the reported outcome once known (None: no report came in time).

        False when it cannot wait (no request id, too many waiting, another stream with the same id
        waiting): the caller records at once.
        """
        if request_id is None:
            return False
        request_id = request_id[:MAX_REQUEST_ID]
        known = self._known(request_id)
        if known is not None:
            record(known)
            return True
        if len(self._waiters) >= self._max_waiting or request_id in self._waiters:
            return False
        waiter: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        self._spawn(self._await_report(request_id, waiter, record))
        return True

    async def _await_report(
        self, request_id: str, waiter: asyncio.Future[Outcome], record: Callable[[Outcome | None], None]
    ) -> None:
        outcome: Outcome | None = None
        deadline = self._clock() + self.wait_s
        step = _REDIS_STEP_S if self._redis is not None else self.wait_s
        try:
            while outcome is None:
                left = deadline - self._clock()
                if left <= 0:
                    break
                try:
                    outcome = await asyncio.wait_for(asyncio.shield(waiter), min(step, left))
                except TimeoutError:
                    outcome = await self._read(request_id)
            if outcome is None and waiter.done():  # reported while the last look in Redis was under way
                outcome = waiter.result()
        finally:
            if self._waiters.get(request_id) is waiter:
                del self._waiters[request_id]
            record(outcome)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def settled(self, timeout_s: float) -> None:
        """Until no outcome waits for a report, or `timeout_s` is over (a draining server)."""
        deadline = self._clock() + timeout_s
        while self._waiters and self._clock() < deadline:
            await asyncio.sleep(0.05)

    async def drain(self) -> None:
        """At shutdown: let every held outcome be recorded (each waits at most `wait_s`)."""
        self._share()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._redis is not None:
            await self._redis.close()


class AccessLogReceiver:
    """Envoy's access log service, for the stream-end log only (`filter_contract.stream_end_log`).
    Registered with `als_pb2_grpc.add_AccessLogServiceServicer_to_server` (no generated base
    class, which a compiled class cannot inherit from).

    Envoy keeps these streams open for good, so a stopping server would wait out its whole grace
    period for them: `close` ends them (Envoy opens a new one, to another replica, when it next
    has something to report).
    """

    def __init__(self, ends: StreamEnds) -> None:
        self.ends = ends
        self._closed = asyncio.Event()

    def close(self) -> None:
        self._closed.set()

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        reading = asyncio.ensure_future(self._read(request_iterator))
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((reading, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            closing.cancel()
        if reading.done() and not reading.cancelled() and reading.exception() is not None:
            log.error("reading Envoy's access log stream failed", exc_info=reading.exception())
        return als_pb2.StreamAccessLogsResponse()

    async def _read(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage]) -> None:
        log_name = ""
        async for message in request_iterator:
            if message.HasField("identifier"):  # the stream's first message names its log
                log_name = message.identifier.log_name
            if log_name != STREAM_END_LOG_NAME:
                continue  # some other access log pointed here: not ours to read
            for entry in message.http_logs.log_entry:
                request_id = entry.request.request_id
                outcome = outcome_of_flags(entry.common_properties.response_flags)
                if request_id and outcome is not None:
                    self.ends.report(request_id, outcome)
