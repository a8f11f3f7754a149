"""What the adapter records for each way a request can end: outcome, code, backend, once per request."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.admission import AdmissionQueue
from extproc.core import Gateway
from extproc.inflight import LocalInFlight
from extproc.load import BackendLoad
from extproc.policy import example_policy_path, load_policy
from extproc.processor import RequestStream
from extproc.quota.memory import MemoryStore
from extproc.quota.service import QuotaService
from extproc.recorder import RequestRecord
from extproc.stream_ends import StreamEnds
from tests.recording import CountingRecorder

GATEWAY = Gateway.from_policy(load_policy(example_policy_path()))
CHAT = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def headers(pairs: dict[str, str]) -> pb.ProcessingRequest:
    mapped = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=mapped))


def request(key: str = "sk-demo", method: str = "POST", content_type: str = "application/json", **extra: str) -> Any:
    return headers(
        {
            ":method": method,
            ":path": "/v1/chat/completions",
            "content-type": content_type,
            "authorization": f"Bearer {key}",
            **extra,
        }
    )


def body(payload: dict[str, Any] = CHAT) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=orjson.dumps(payload), end_of_stream=True))


def response(status: int, content_type: str = "application/json") -> pb.ProcessingRequest:
    mapped = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
            base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode()),
        ]
    )
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=mapped))


def chunk(data: bytes, end: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


def run(messages: list[pb.ProcessingRequest], **stream_args: Any) -> RequestRecord:
    recorder = CountingRecorder()

    async def go() -> None:
        stream = RequestStream(GATEWAY, recorder=recorder, **stream_args)
        for message in messages:
            await stream.handle(message)
        stream.finish()

    asyncio.run(go())
    (record,) = recorder.records
    return record


USAGE = orjson.dumps(
    {"choices": [{"index": 0, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
)


@pytest.mark.parametrize(
    ("messages", "status", "code", "outcome"),
    [
        ([request(method="GET")], 405, "method_not_allowed", "invalid"),
        ([request(content_type="text/plain")], 415, "unsupported_media_type", "invalid"),
        ([request(key="sk-wrong")], 401, "invalid_api_key", "unauthorized"),
        (
            [request(), body({"model": "nope", "messages": [{"role": "user", "content": "x"}]})],
            404,
            "model_not_found",
            "invalid",
        ),
        ([request(key="sk-tiny"), body({**CHAT, "model": "qwen-2.5-72b"})], 403, "model_not_allowed", "forbidden"),
        ([body()], 500, "internal_error", "internal_error"),  # out of order: our failure, still recorded
    ],
)
def test_refusals_are_recorded_with_their_registered_outcome(
    messages: list[pb.ProcessingRequest], status: int, code: str, outcome: str
) -> None:
    record = run(messages)
    assert (record.status, record.code, record.outcome, record.refused) == (status, code, outcome, True)


def test_ok_json_and_ok_stream() -> None:
    record = run([request(), body(), response(200), chunk(USAGE, True)])
    assert (record.outcome, record.backend, record.prompt_tokens, record.completion_tokens) == (
        "ok",
        "default-8b",
        3,
        2,
    )
    assert record.finish_reasons == ["stop"] and record.ttft_s is None
    sse = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    record = run(
        [
            request(),
            body({**CHAT, "stream": True}),
            response(200, "text/event-stream"),
            chunk(sse, False),
            chunk(b"", True),
        ]
    )
    assert record.outcome == "ok" and record.stream and record.ttft_s is not None and record.finish_reasons == ["stop"]


@pytest.mark.parametrize(
    ("status", "outcome"), [(503, "upstream_error"), (429, "upstream_error"), (504, "timeout"), (400, "invalid")]
)
def test_upstream_errors(status: int, outcome: str) -> None:
    record = run([request(), body(), response(status)])
    assert (record.outcome, record.status, record.refused, record.backend) == (outcome, status, False, "default-8b")


def test_a_stream_cut_short_and_a_response_never_sent_are_cancelled() -> None:
    sse = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    record = run([request(), body({**CHAT, "stream": True}), response(200, "text/event-stream"), chunk(sse, False)])
    assert record.outcome == "cancelled" and record.completion_tokens == 1
    assert run([request(), body()]).outcome == "cancelled"


def test_a_partly_buffered_json_body_is_ok() -> None:
    """BUFFERED_PARTIAL: a body over Envoy's buffer limit comes in part, and the rest never reaches us."""
    record = run([request(), body(), response(200), chunk(USAGE[:20], False)])
    assert record.outcome == "ok"


def test_shed_for_load_keeps_the_backend_it_was_shed_from() -> None:
    saturated = BackendLoad(waiting_per_pod=100.0, kv_cache=0.99, running=10.0, pods=1, drain_per_s=None)
    loads = dict.fromkeys(GATEWAY.policy.backends, saturated)
    record = run([request(key="sk-tiny"), body()], loads=lambda: loads)
    assert (record.outcome, record.code, record.backend, record.traffic_class) == (
        "shed",
        "shed",
        "default-8b",
        "experimental",
    )


def test_a_client_that_leaves_while_queued_is_cancelled_and_counted_once() -> None:
    recorder = CountingRecorder()
    counter = LocalInFlight()

    async def go() -> None:
        queue = AdmissionQueue(counter, recorder=recorder)
        for _ in range(4):  # batch-pool takes 4 at a time: these hold every slot
            assert counter.try_acquire("batch-pool", 4)
        stream = RequestStream(GATEWAY, queue=queue, recorder=recorder)
        await stream.handle(request(**{"x-llm-class": "batch"}))
        waiting = asyncio.ensure_future(stream.handle(body()))
        await asyncio.sleep(0.05)
        assert recorder.queue[("batch-pool", "batch")] == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        stream.finish()
        assert recorder.queue[("batch-pool", "batch")] == 0

    asyncio.run(go())
    (record,) = recorder.records
    assert (record.outcome, record.backend, record.traffic_class) == ("cancelled", "batch-pool", "batch")
    assert record.queue_s > 0.04


# -- streams cut mid-response: the outcome Envoy reports (extproc.stream_ends) ------------------------

CUT = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'


def cut_stream(
    ends: StreamEnds | None, recorder: CountingRecorder, request_id: str, quotas: QuotaService | None = None
) -> Any:
    """A streamed request cut after one event; what `finish` gave to settle."""
    stream = RequestStream(GATEWAY, quotas, recorder=recorder, stream_ends=ends)

    async def go() -> Any:
        for message in (
            request(**{"x-request-id": request_id}),
            body({**CHAT, "stream": True}),
            response(200, "text/event-stream"),
            chunk(CUT, False),
        ):
            await stream.handle(message)
        return stream.finish()

    return go()


@pytest.mark.parametrize(("reported", "outcome"), [("upstream_error", "upstream_error"), (None, "cancelled")])
def test_a_cut_stream_takes_the_outcome_envoy_reports(reported: str | None, outcome: str) -> None:
    recorder = CountingRecorder()

    async def go() -> None:
        ends = StreamEnds(wait_s=0.2)
        await cut_stream(ends, recorder, "cut-1")
        assert recorder.records == []  # held for the report
        if reported is not None:
            ends.report("cut-1", reported)  # type: ignore[arg-type]
        await ends.drain()

    asyncio.run(go())
    (record,) = recorder.records
    assert record.outcome == outcome
    assert recorder.cut_streams == [reported or "none"]


def test_a_stream_cut_before_any_response_or_refused_does_not_wait() -> None:
    recorder = CountingRecorder()

    async def go() -> None:
        ends = StreamEnds(wait_s=30)
        stream = RequestStream(GATEWAY, recorder=recorder, stream_ends=ends)
        await stream.handle(request(**{"x-request-id": "early"}))
        await stream.handle(body())
        stream.finish()  # the client left before the response began
        stream = RequestStream(GATEWAY, recorder=recorder, stream_ends=ends)
        await stream.handle(request(key="sk-wrong", **{"x-request-id": "refused"}))
        stream.finish()
        assert ends.waiting == 0

    asyncio.run(go())
    assert [r.outcome for r in recorder.records] == ["cancelled", "unauthorized"]
    assert recorder.cut_streams == []


def test_a_failing_recorder_does_not_cost_a_cut_streams_settlement() -> None:
    class Broken(CountingRecorder):
        def request_done(self, record: RequestRecord) -> None:
            raise RuntimeError("broken recorder")

    async def go() -> Any:
        ends = StreamEnds(wait_s=5)
        ends.report("cut-2", "upstream_error")  # known already: recorded inside finish()
        settlement = await cut_stream(ends, Broken(), "cut-2", QuotaService(MemoryStore()))
        await ends.drain()
        return settlement

    reservation, _prompt, completion = asyncio.run(go())
    assert reservation is not None and completion == 1  # one event seen before the cut


def test_a_stream_whose_done_event_went_by_is_complete_without_its_end_of_stream() -> None:
    """A client that has `[DONE]` may hang up before the stream's empty last chunk reaches the gateway
    (seen under load through Envoy): the request is ok, not a cut stream waiting for a report."""
    recorder = CountingRecorder()

    async def go() -> None:
        ends = StreamEnds(wait_s=30)
        stream = RequestStream(GATEWAY, recorder=recorder, stream_ends=ends)
        for message in (
            request(**{"x-request-id": "done-1"}),
            body({**CHAT, "stream": True}),
            response(200, "text/event-stream"),
            chunk(CUT, False),
            chunk(b"data: [DONE]\n\n", False),
        ):
            await stream.handle(message)
        stream.finish()
        assert ends.waiting == 0

    asyncio.run(go())
    (record,) = recorder.records
    assert record.outcome == "ok" and recorder.cut_streams == []
