"""Envoy's reports of how cut streams ended: the board that holds outcomes for them, shared
through a real redis-server, and the access log service that takes them over real gRPC.

The whole path through real Envoy (an upstream reset mid-SSE recorded as `upstream_error`, a
client's hang-up as `cancelled`) is in test_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from extproc import filter_contract
from extproc.codes import OUTCOMES, Outcome
from extproc.filter_contract import STREAM_END_FLAGS, STREAM_END_LOG_NAME
from extproc.stream_ends import MAX_SHARING, AccessLogReceiver, StreamEnds, outcome_of_flags
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class Outcomes:
    """What `hold` recorded, and when."""

    def __init__(self) -> None:
        self.got: dict[str, Outcome | None] = {}
        self.at: dict[str, float] = {}

    def recorder(self, request_id: str):  # type: ignore[no-untyped-def]
        def record(outcome: Outcome | None) -> None:
            assert request_id not in self.got, "recorded twice"
            self.got[request_id] = outcome
            self.at[request_id] = asyncio.get_running_loop().time()

        return record


def flags(**set_: bool) -> accesslog_pb2.ResponseFlags:
    return accesslog_pb2.ResponseFlags(**set_)


# -- the flags ------------------------------------------------------------------------------------


def test_every_flag_names_a_response_flags_field_and_an_outcome() -> None:
    fields = set(accesslog_pb2.ResponseFlags.DESCRIPTOR.fields_by_name)
    for short, field, outcome in STREAM_END_FLAGS:
        assert field in fields, (short, field)
        assert outcome in OUTCOMES
        assert outcome_of_flags(flags(**{field: True})) == outcome
    assert outcome_of_flags(flags()) is None
    assert outcome_of_flags(flags(no_healthy_upstream=True)) is None  # answered by Envoy: not a cut stream


def test_an_upstream_reset_outranks_the_downstream_reset_it_causes() -> None:
    both = flags(upstream_remote_reset=True, downstream_connection_termination=True)
    assert outcome_of_flags(both) == "upstream_error"
    assert outcome_of_flags(flags(stream_idle_timeout=True, downstream_remote_reset=True)) == "timeout"


def test_the_access_log_entry_reports_only_routed_requests_with_those_flags() -> None:
    entry = filter_contract.stream_end_log("extproc", "x-llm-backend")
    response_flags, header = entry["filter"]["and_filter"]["filters"]
    assert response_flags["response_flag_filter"]["flags"] == [short for short, _, _ in STREAM_END_FLAGS]
    assert header["header_filter"]["header"] == {"name": "x-llm-backend", "present_match": True}
    common = entry["typed_config"]["common_config"]
    assert common["log_name"] == STREAM_END_LOG_NAME
    assert common["buffer_size_bytes"] == 0  # sent as it happens: an outcome waits for it


# -- the board, in one process ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_report_that_arrives_while_the_outcome_waits_wakes_it_at_once() -> None:
    ends, outcomes = StreamEnds(wait_s=5), Outcomes()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert ends.hold("r1", outcomes.recorder("r1"))
    assert ends.waiting == 1
    await asyncio.sleep(0.01)
    ends.report("r1", "upstream_error")
    await ends.drain()
    assert outcomes.got == {"r1": "upstream_error"}
    assert outcomes.at["r1"] - started < 1  # woken by the report, not by the 5 s deadline
    assert ends.waiting == 0


@pytest.mark.asyncio
async def test_a_report_that_arrives_first_is_kept_for_the_stream() -> None:
    ends, outcomes = StreamEnds(wait_s=5), Outcomes()
    ends.report("r1", "timeout")
    assert ends.hold("r1", outcomes.recorder("r1"))
    assert outcomes.got == {"r1": "timeout"}  # at once, no task
    # Used once: the same id again (a client reusing its x-request-id) waits for a report of its own.
    assert ends.hold("r1", Outcomes().recorder("r1"))
    assert ends.waiting == 1
    await ends.drain()


@pytest.mark.asyncio
async def test_no_report_in_time_leaves_the_outcome_to_the_caller() -> None:
    ends, outcomes = StreamEnds(wait_s=0.05), Outcomes()
    assert ends.hold("r1", outcomes.recorder("r1"))
    await ends.drain()
    assert outcomes.got == {"r1": None}
    ends.report("r1", "upstream_error")  # too late: kept, and expires, harming nothing
    assert ends.waiting == 0


@pytest.mark.asyncio
async def test_bounds_reports_kept_and_outcomes_waiting() -> None:
    ends = StreamEnds(wait_s=5, max_reports=3, max_waiting=2)
    for i in range(5):
        ends.report(f"r{i}", "cancelled")
    outcomes = Outcomes()
    for i in (2, 3, 4):  # the newest three are kept ...
        assert ends.hold(f"r{i}", outcomes.recorder(f"r{i}"))
    assert outcomes.got == {"r2": "cancelled", "r3": "cancelled", "r4": "cancelled"}
    for i in (0, 1):  # ... the oldest were dropped: these wait for a report
        assert ends.hold(f"r{i}", outcomes.recorder(f"r{i}"))
    assert ends.waiting == 2
    # Two wait already: a third cannot, and its caller records at once. No request id: nothing to wait for.
    assert not ends.hold("r9", outcomes.recorder("r9"))
    assert not ends.hold(None, outcomes.recorder("none"))
    ends.report("r0", "upstream_error")
    ends.report("r1", "upstream_error")
    await ends.drain()
    assert outcomes.got["r0"] == outcomes.got["r1"] == "upstream_error"


@pytest.mark.asyncio
async def test_reports_expire() -> None:
    clock = [0.0]
    ends, outcomes = StreamEnds(wait_s=0.01, ttl_s=10, clock=lambda: clock[0]), Outcomes()
    ends.report("late", "upstream_error")
    clock[0] = 11
    ends.report("fresh", "upstream_error")  # keeping it also drops the expired one
    assert ends.hold("fresh", outcomes.recorder("fresh"))
    assert outcomes.got == {"fresh": "upstream_error"}
    assert len(ends._reports) == 0


@pytest.mark.asyncio
async def test_ids_no_stream_can_have_are_not_kept() -> None:
    ends, outcomes = StreamEnds(wait_s=0.01), Outcomes()
    for request_id in ("x" * 129, "caf\u00e9", "a\nb"):
        ends.report(request_id, "upstream_error")
    assert len(ends._reports) == 0
    ends.report("x" * 128, "upstream_error")
    assert ends.hold("x" * 128, outcomes.recorder("longest"))
    assert outcomes.got == {"longest": "upstream_error"}


@pytest.mark.asyncio
async def test_a_second_stream_with_a_waiting_id_does_not_wait() -> None:
    ends = StreamEnds(wait_s=5)
    assert ends.hold("same", Outcomes().recorder("first"))
    assert not ends.hold("same", Outcomes().recorder("second"))  # recorded at once by its caller
    ends.report("same", "cancelled")
    await ends.drain()


@pytest.mark.asyncio
async def test_a_flood_of_reports_does_not_keep_outcomes_from_waiting() -> None:
    ends = StreamEnds(wait_s=5, max_waiting=2)
    for i in range(1000):
        ends.report(f"flood-{i}", "upstream_error")
    assert ends.hold("real", Outcomes().recorder("real"))
    ends.report("real", "upstream_error")
    await ends.drain()


# -- across workers and replicas: Redis -------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_report_to_another_worker_reaches_the_waiting_one_through_redis(redis_server: RedisServer) -> None:
    receiving, holding = StreamEnds(redis_server.url, wait_s=3), StreamEnds(redis_server.url, wait_s=3)
    outcomes = Outcomes()
    try:
        assert holding.hold("shared-1", outcomes.recorder("waits"))
        receiving.report("shared-1", "upstream_error")
        # And one reported before the other worker's stream was over.
        receiving.report("shared-2", "timeout")
        await receiving.drain()  # written
        assert holding.hold("shared-2", outcomes.recorder("later"))
        await holding.drain()
    finally:
        await receiving.drain()
        await holding.drain()
    assert outcomes.got == {"waits": "upstream_error", "later": "timeout"}


@pytest.mark.asyncio
async def test_reports_go_to_redis_in_one_pipeline_a_turn_and_a_bounded_queue(redis_server: RedisServer) -> None:
    ends = StreamEnds(redis_server.url, wait_s=1)
    for i in range(MAX_SHARING + 500):
        ends.report(f"many-{i}", "cancelled")
    assert ends.unshared == 500  # kept here only: the queue for Redis is full
    await ends.drain()
    other, outcomes = StreamEnds(redis_server.url, wait_s=1), Outcomes()
    for request_id in ("many-0", f"many-{MAX_SHARING - 1}", f"many-{MAX_SHARING}"):
        assert other.hold(request_id, outcomes.recorder(request_id))
    await other.drain()
    assert outcomes.got == {"many-0": "cancelled", f"many-{MAX_SHARING - 1}": "cancelled", f"many-{MAX_SHARING}": None}
    # Taken once (GETDEL): a stream that reuses an id finds no stale report.
    again = StreamEnds(redis_server.url, wait_s=0.3)
    assert again.hold("many-0", outcomes.recorder("again"))
    await again.drain()
    assert outcomes.got["again"] is None


@pytest.mark.asyncio
async def test_redis_unreachable_costs_only_the_report() -> None:
    ends, outcomes = StreamEnds("redis://127.0.0.1:1/0", wait_s=0.6), Outcomes()
    ends.report("elsewhere", "upstream_error")  # kept here; sharing it fails quietly
    assert ends.hold("other", outcomes.recorder("other"))
    await ends.drain()
    assert outcomes.got == {"other": None}


# -- the access log service, over gRPC ------------------------------------------------------------


def _entry(request_id: str, **set_: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    return accesslog_pb2.HTTPAccessLogEntry(
        common_properties=accesslog_pb2.AccessLogCommon(response_flags=flags(**set_)),
        request=accesslog_pb2.HTTPRequestProperties(request_id=request_id),
    )


def _message(entries: list[accesslog_pb2.HTTPAccessLogEntry], log_name: str | None) -> als_pb2.StreamAccessLogsMessage:
    message = als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=entries)
    )
    if log_name is not None:
        message.identifier.log_name = log_name
    return message


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[AccessLogReceiver, als_pb2_grpc.AccessLogServiceStub]]:
    ends = StreamEnds(wait_s=5)
    servicer = AccessLogReceiver(ends)
    server = grpc.aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield servicer, als_pb2_grpc.AccessLogServiceStub(channel)
    await server.stop(0)
    await ends.drain()


@pytest.mark.asyncio
async def test_the_service_files_reports_of_its_own_log_only(
    receiver: tuple[AccessLogReceiver, als_pb2_grpc.AccessLogServiceStub],
) -> None:
    servicer, stub = receiver

    async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        # Envoy names the log in a stream's first message only.
        yield _message(
            [_entry("a", upstream_remote_reset=True), _entry("b", downstream_remote_reset=True)], STREAM_END_LOG_NAME
        )
        yield _message([_entry("c", upstream_protocol_error=True), _entry("", upstream_remote_reset=True)], None)
        yield _message([_entry("d", no_healthy_upstream=True)], None)  # not a stream end: ignored

    async def others() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield _message([_entry("e", upstream_remote_reset=True)], "someone-elses-log")
        yield _message([_entry("f", upstream_remote_reset=True)], None)

    await stub.StreamAccessLogs(messages())
    await stub.StreamAccessLogs(others())
    got = Outcomes()
    for request_id in "abcdef":
        servicer.ends.hold(request_id, got.recorder(request_id))
    assert {k: v for k, v in got.got.items()} == {"a": "upstream_error", "b": "cancelled", "c": "upstream_error"}
    for task in list(servicer.ends._tasks):
        task.cancel()


@pytest.mark.asyncio
async def test_closing_the_service_ends_envoys_open_streams(
    receiver: tuple[AccessLogReceiver, als_pb2_grpc.AccessLogServiceStub],
) -> None:
    servicer, stub = receiver
    forever = asyncio.Event()

    async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        yield _message([_entry("a", upstream_remote_reset=True)], STREAM_END_LOG_NAME)
        await forever.wait()  # Envoy never ends its side

    call = stub.StreamAccessLogs(messages())
    await asyncio.sleep(0.2)
    assert not call.done()
    servicer.close()
    response = await asyncio.wait_for(call, 5)
    assert response == als_pb2.StreamAccessLogsResponse()
    forever.set()
