"""A pipelining Redis connection for the admission hot path.

Every admission is a Redis round trip, so the client's own cost per call is paid on
every request. redis-py's asyncio client spends most of it around the call (a pool
checkout under a condition, a task per send for its timeout, a timeout context per
reply); this connection writes commands as they come and matches replies in order,
the way Redis pipelining is meant to work, with hiredis (the C parser redis-py uses
too) reading the replies. One connection carries every caller: Redis executes
commands one at a time anyway.

Commands arrive already packed (RESP arrays of bulk strings); see `pack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis


class ReplyError(Exception):
    """An error reply from Redis (NOSCRIPT, BUSY, ERR ...): the command ran into it, the connection is fine."""


class RespUnavailable(Exception):
    """Redis could not be reached, or stopped answering: the connection is closed."""


class RespNoReply(RespUnavailable):
    """The commands were written but their replies never came: Redis may have run them."""


def bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def pack(*args: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(arg) for arg in args)


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """redis://[[user]:password@]host[:port][/db] or rediss:// for TLS."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("the Redis URL must look like redis://[[user]:password@]host[:port][/db] (or rediss://)")
        path = parts.path.strip("/")
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.waiting.popleft()
                if not future.done():  # its caller gave up; the reply still had to be read
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.fail(RespUnavailable(f"protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RespUnavailable(f"connection lost: {exc}" if exc else "connection closed by Redis"))

    def fail(self, error: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RespConnection:
    """One lazily (re)connected, pipelined connection; every failure surfaces as RespUnavailable."""

    def __init__(self, url: str, *, timeout_s: float = 0.25) -> None:
        self.address = RedisAddress.from_url(url)
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        # The connect attempt in progress: callers arriving meanwhile share its outcome, so a
        # black-holed Redis costs each of them one timeout, not one per caller queued before it.
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Send commands in one write; their replies in order, error replies as ReplyError instances."""
        return await self._send(await self._connected(), commands)

    async def _send(self, protocol: _Protocol, commands: list[bytes]) -> list[Any]:
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        protocol.waiting.extend(futures)
        protocol.transport.write(b"".join(commands))
        # One timer for the batch: if the last reply is late, the connection is out of step for everyone.
        timer = loop.call_later(self.timeout_s, protocol.fail, RespUnavailable(f"no reply within {self.timeout_s:g}s"))
        try:
            # hiredis returns error replies as ReplyError objects: only a failed connection raises here.
            return [await future for future in futures]
        except BaseException as exc:
            # The connection failed (or we were cancelled): the replies still owed to this batch will
            # never be read, so settle their futures here rather than leave errors nobody retrieves.
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()
            if isinstance(exc, RespUnavailable):
                raise RespNoReply(str(exc)) from None
            raise
        finally:
            timer.cancel()

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._protocol is not None:
            self._protocol.fail(RespUnavailable("client closed"))
            self._protocol = None

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._closed:
            raise RespUnavailable("client closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            # Shielded: a caller that gives up must not cancel the attempt the others are waiting on.
            return await asyncio.shield(self._connecting)
        except asyncio.CancelledError:
            if self._closed:
                raise RespUnavailable("client closed") from None
            raise

    async def _connect(self) -> _Protocol:
        address, loop = self.address, asyncio.get_running_loop()
        context = ssl.create_default_context() if address.tls else None
        try:
            async with asyncio.timeout(self.timeout_s):
                _, protocol = await loop.create_connection(_Protocol, address.host, address.port, ssl=context)
        except (OSError, TimeoutError) as exc:
            raise RespUnavailable(f"cannot connect to {address.host}:{address.port}: {exc or 'timed out'}") from None
        setup: list[bytes] = []
        if address.password is not None:
            user = [address.username.encode()] if address.username else []
            setup.append(pack(b"AUTH", *user, address.password.encode()))
        if address.db:
            setup.append(pack(b"SELECT", b"%d" % address.db))
        # Published only once set up: a command sent before AUTH would be refused with NOAUTH.
        try:
            replies = await self._send(protocol, setup) if setup else []
        except RespNoReply as unanswered:  # the callers' own commands were never sent: plainly unavailable
            raise RespUnavailable(f"no answer to the connection setup: {unanswered}") from None
        for reply in replies:
            if isinstance(reply, ReplyError):
                protocol.fail(RespUnavailable("connection setup failed"))
                # The reply names the failing step (e.g. WRONGPASS); it never echoes the password.
                raise RespUnavailable(f"Redis refused the connection setup: {reply}")
        if self._closed:
            protocol.fail(RespUnavailable("client closed"))
            raise RespUnavailable("client closed")
        self._protocol = protocol
        return protocol

    async def ping(self) -> bool:
        with contextlib.suppress(RespUnavailable):
            return (await self.execute([pack(b"PING")]))[0] == b"PONG"
        return False
