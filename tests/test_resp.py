"""The pipelined Redis connection under the quota store, against a private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from extproc.quota.resp import RedisAddress, ReplyError, RespConnection, RespNoReply, RespUnavailable, pack
from tests.redis_server import RedisServer, command

T = TypeVar("T")
LOOPS = ["asyncio", "uvloop"]  # the server runs on uvloop; its transports are not asyncio's classes


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def run(loop_kind: str, make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return uvloop.run(main()) if loop_kind == "uvloop" else asyncio.run(main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_replies_come_back_in_order_with_errors_in_place(redis_server: RedisServer, loop_kind: str) -> None:
    async def scenario() -> list[Any]:
        connection = RespConnection(redis_server.url)
        try:
            commands = [pack(b"SET", b"resp:order", b"0")]
            commands += [pack(b"INCR", b"resp:order") for _ in range(300)]
            commands.append(pack(b"HGET", b"resp:order", b"field"))  # WRONGTYPE: the pipeline goes on
            commands.append(pack(b"GET", b"resp:order"))
            return await connection.execute(commands)
        finally:
            await connection.close()

    replies = run(loop_kind, scenario)
    assert replies[0] == b"OK"
    assert replies[1:301] == list(range(1, 301))
    assert isinstance(replies[301], ReplyError) and str(replies[301]).startswith("WRONGTYPE")
    assert replies[302] == b"300"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_concurrent_callers_share_one_connection(redis_server: RedisServer, loop_kind: str) -> None:
    async def scenario() -> tuple[list[list[Any]], int]:
        connection = RespConnection(redis_server.url)
        try:
            await connection.execute([pack(b"DEL", b"resp:shared")])
            before = int(_info_field(redis_server, "total_connections_received"))
            results = await asyncio.gather(*(connection.execute([pack(b"INCR", b"resp:shared")]) for _ in range(200)))
            return results, int(_info_field(redis_server, "total_connections_received")) - before
        finally:
            await connection.close()

    results, new_connections = run(loop_kind, scenario)
    assert sorted(reply for (reply,) in results) == list(range(1, 201))
    assert new_connections == 1  # only the INFO probe's own connection


def _info_field(server: RedisServer, field: str) -> str:
    assert server.port is not None
    info = command(server.port, "INFO", "stats").decode()
    return next(line.split(":", 1)[1] for line in info.splitlines() if line.startswith(f"{field}:"))


def test_url_selects_the_database(redis_server: RedisServer) -> None:
    async def scenario() -> list[Any]:
        url = redis_server.url.rsplit("/", 1)[0] + "/3"
        connection = RespConnection(url)
        try:
            await connection.execute([pack(b"SET", b"resp:db", b"three")])
            return await connection.execute([pack(b"CLIENT", b"INFO")])
        finally:
            await connection.close()

    (client_info,) = run("uvloop", scenario)
    assert b" db=3 " in client_info
    assert redis_server.port is not None
    assert command(redis_server.port, "GET", "resp:db").startswith(b"$-1")  # not in db 0


def test_credentials_from_the_url_authenticate_and_a_wrong_password_is_unavailable(redis_server: RedisServer) -> None:
    assert redis_server.port is not None
    command(redis_server.port, "ACL", "SETUSER", "gateway", "on", ">s3cret-pass", "~resp:*", "+@all")
    base = f"127.0.0.1:{redis_server.port}"

    async def whoami(url: str) -> list[Any]:
        connection = RespConnection(url)
        try:
            return await connection.execute([pack(b"ACL", b"WHOAMI")])
        finally:
            await connection.close()

    assert run("uvloop", lambda: whoami(f"redis://gateway:s3cret-pass@{base}/0")) == [b"gateway"]
    with pytest.raises(RespUnavailable) as refused:
        run("uvloop", lambda: whoami(f"redis://gateway:wrong-pass@{base}/0"))
    assert "WRONGPASS" in str(refused.value)
    assert "wrong-pass" not in str(refused.value)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_nothing_listening_is_unavailable(loop_kind: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before we connect: nothing listens there

    async def scenario() -> None:
        await RespConnection(f"redis://127.0.0.1:{port}/0").execute([pack(b"PING")])

    with pytest.raises(RespUnavailable, match="cannot connect"):
        run(loop_kind, scenario)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_silent_server_times_out_and_the_next_call_reconnects(loop_kind: str) -> None:
    async def scenario() -> tuple[str, list[Any], int]:
        accepted = 0
        answer = False

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            while data := await reader.read(4096):
                if answer:
                    writer.write(b"+PONG\r\n" * data.count(b"PING"))

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = RespConnection(f"redis://127.0.0.1:{port}", timeout_s=0.1)
        try:
            try:
                await connection.execute([pack(b"PING")])
                message = "answered"
            except RespUnavailable as exc:
                message = str(exc)
            answer = True
            replies = await connection.execute([pack(b"PING")])
            return message, replies, accepted
        finally:
            await connection.close()
            server.close()

    message, replies, accepted = run(loop_kind, scenario)
    assert message == "no reply within 0.1s"
    assert replies == [b"PONG"]
    assert accepted == 2  # the late connection was dropped: its replies would be out of step


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisAddress("localhost", 6379)),
        ("redis://10.0.0.5:6380/2", RedisAddress("10.0.0.5", 6380, db=2)),
        ("redis://:p%40ss@redis:6379/0", RedisAddress("redis", 6379, password="p@ss")),
        ("redis://gw:pw@redis", RedisAddress("redis", 6379, username="gw", password="pw")),
        ("rediss://redis.example:6380", RedisAddress("redis.example", 6380, tls=True)),
    ],
)
def test_redis_urls(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == expected


@pytest.mark.parametrize("url", ["http://redis:6379", "redis://", "unix:///var/run/redis.sock", "redis:6379"])
def test_unsupported_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.from_url(url)


async def _silent_server(connections: list[int]) -> tuple[asyncio.Server, int]:
    """Accepts connections and reads everything, answers nothing; counts connections in `connections`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_callers_queued_behind_a_failing_connect_share_its_failure(loop_kind: str) -> None:
    # Connecting includes AUTH, which the silent server never answers: the attempt times out.
    async def scenario() -> tuple[list[BaseException | list[Any]], int]:
        connections: list[int] = []
        server, port = await _silent_server(connections)
        connection = RespConnection(f"redis://:pw@127.0.0.1:{port}", timeout_s=0.1)
        try:
            calls = (connection.execute([pack(b"PING")]) for _ in range(8))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            return outcomes, len(connections)
        finally:
            await connection.close()
            server.close()

    outcomes, connections = run(loop_kind, scenario)
    # Plainly unavailable, not RespNoReply: their own commands never left.
    assert all(type(outcome) is RespUnavailable for outcome in outcomes), outcomes
    assert connections == 1  # one attempt for all eight, not one after another


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_pipeline_lost_to_a_timeout_leaves_no_unretrieved_errors(loop_kind: str) -> None:
    async def attempt(port: int) -> str:
        connection = RespConnection(f"redis://127.0.0.1:{port}", timeout_s=0.05)
        try:
            await connection.execute([pack(b"PING") for _ in range(5)])
            return "answered"
        except RespUnavailable as exc:
            return type(exc).__name__
        finally:
            await connection.close()

    async def scenario() -> tuple[str, list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        server, port = await _silent_server([])
        failure = await attempt(port)
        server.close()
        await asyncio.sleep(0.05)  # the aborted transport lets go of its protocol
        gc.collect()  # "exception was never retrieved" is reported when a failed future is collected
        await asyncio.sleep(0)
        return failure, reported

    failure, reported = run(loop_kind, scenario)
    assert failure == RespNoReply.__name__  # sent, then silence: Redis may have run them
    assert reported == []


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_callers_arriving_during_the_connection_setup_wait_for_it(loop_kind: str) -> None:
    # A server that takes a while to refuse AUTH, and refuses anything sent before AUTH as Redis does.
    async def scenario() -> list[BaseException | list[Any]]:
        auth_seen = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read(4096)
            auth_seen.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    data += await reader.read(4096)
            writer.write(b"-WRONGPASS invalid username-password pair\r\n")
            writer.write(b"-NOAUTH Authentication required.\r\n" * data.count(b"PING"))
            await writer.drain()
            await reader.read(4096)

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        connection = RespConnection(f"redis://:pw@127.0.0.1:{port}", timeout_s=1.0)
        try:
            first = asyncio.ensure_future(connection.execute([pack(b"PING")]))
            await auth_seen.wait()  # the connection is up, its AUTH unanswered: now the others come
            later = [connection.execute([pack(b"PING")]) for _ in range(4)]
            return await asyncio.gather(first, *later, return_exceptions=True)
        finally:
            await connection.close()
            server.close()

    outcomes = run(loop_kind, scenario)
    # Not a NOAUTH reply handed to a caller as if its command had run: every caller is told why.
    assert all(isinstance(o, RespUnavailable) and "WRONGPASS" in str(o) for o in outcomes), outcomes


def test_a_closed_connection_stays_closed(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[list[Any], BaseException | None, int]:
        connection = RespConnection(redis_server.url)
        first = await connection.execute([pack(b"PING")])
        await connection.close()
        before = int(_info_field(redis_server, "total_connections_received"))
        error: BaseException | None = None
        try:
            await connection.execute([pack(b"PING")])
        except RespUnavailable as exc:
            error = exc
        return first, error, int(_info_field(redis_server, "total_connections_received")) - before

    first, error, new_connections = run("uvloop", scenario)
    assert first == [b"PONG"]
    assert error is not None and "closed" in str(error)
    assert new_connections == 1  # the INFO probe's own


def test_the_password_stays_out_of_the_address_repr() -> None:
    address = RedisAddress.from_url("redis://gw:hunter2-secret@redis:6379/0")
    assert "hunter2-secret" not in repr(address)
