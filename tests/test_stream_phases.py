"""The per-stream state machine: each message is taken only in the phase that expects it."""

from __future__ import annotations

import asyncio

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.core import Gateway
from extproc.processor import Phase, RequestStream
from extproc.quota.plan import QuotaPlan, RuleSet
from extproc.quota.service import Reservation
from extproc.quota.store import AdmitResult


def _headers(path: str = "/v1/chat/completions", end_of_stream: bool = False) -> pb.ProcessingRequest:
    pairs = {":path": path, ":method": "POST", "content-type": "application/json"}
    headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers), end_of_stream=end_of_stream)
    )


def _body(payload: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=payload, end_of_stream=True))


def _response_headers() -> pb.ProcessingRequest:
    headers = [base_pb2.HeaderValue(key=":status", raw_value=b"200")]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers)))


def _parse(reply: bytes | pb.ProcessingResponse) -> pb.ProcessingResponse:
    if isinstance(reply, bytes):
        return pb.ProcessingResponse.FromString(reply)
    return reply


_CHAT = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})


def test_a_body_before_any_headers_is_refused_not_passed_upstream(gateway: Gateway) -> None:
    stream = RequestStream(gateway)
    reply = _parse(asyncio.run(stream.handle(_body(_CHAT))))
    assert reply.WhichOneof("response") == "immediate_response"
    assert reply.immediate_response.status.code == 500
    assert stream.phase is Phase.DONE


def test_repeated_request_headers_are_refused(gateway: Gateway) -> None:
    stream = RequestStream(gateway)
    first = _parse(asyncio.run(stream.handle(_headers())))
    assert first.WhichOneof("response") == "request_headers"
    again = _parse(asyncio.run(stream.handle(_headers())))
    assert again.WhichOneof("response") == "immediate_response"
    assert stream.phase is Phase.DONE


def test_response_headers_before_the_body_was_decided_do_not_crash(gateway: Gateway) -> None:
    stream = RequestStream(gateway)
    asyncio.run(stream.handle(_headers()))
    assert stream.phase is Phase.REQUEST_BODY
    reply = _parse(asyncio.run(stream.handle(_response_headers())))
    assert reply.WhichOneof("response") == "response_headers"
    assert stream.phase is Phase.REQUEST_BODY


def test_the_usual_sequence_walks_every_phase(gateway: Gateway) -> None:
    stream = RequestStream(gateway)
    asyncio.run(stream.handle(_headers()))
    reply = _parse(asyncio.run(stream.handle(_body(_CHAT))))
    assert reply.WhichOneof("response") == "request_body"
    assert stream.phase is Phase.UPSTREAM
    asyncio.run(stream.handle(_response_headers()))
    assert stream.phase is Phase.DONE  # no content type: nothing to read
    # A body message after the response was done gets a plain continue.
    body = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"{}", end_of_stream=True))
    assert _parse(asyncio.run(stream.handle(body))).WhichOneof("response") == "response_body"


def test_a_reservation_taken_before_an_internal_error_is_given_back(gateway: Gateway) -> None:
    stream = RequestStream(gateway)
    # A real Reservation: the compiled form checks the attribute's type.
    rule_set = RuleSet("t", (), [], (), (), ())
    reservation = Reservation(QuotaPlan(rule_set, "r1", [], 0, 0), AdmitResult(True, None, ()))
    stream.reservation = reservation
    assert stream.admission is None
    assert stream.finish() == (reservation, 0, 0)
    assert stream.finish() is None  # given back once


def test_phase_times_reach_the_recorder_with_the_request_and_a_long_stream_holds_a_bounded_few(
    gateway: Gateway,
) -> None:
    from extproc.recorder import MAX_PHASE_TIMES
    from tests.recording import CountingRecorder

    recorder = CountingRecorder()
    stream = RequestStream(gateway, recorder=recorder)
    asyncio.run(stream.handle(_headers()))
    asyncio.run(stream.handle(_body(_CHAT)))
    sse = [base_pb2.HeaderValue(key=":status", raw_value=b"200")]
    sse.append(base_pb2.HeaderValue(key="content-type", raw_value=b"text/event-stream"))
    head = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=sse)))
    asyncio.run(stream.handle(head))
    assert sum(recorder.phases.values()) == 0  # nothing reported on the messages' own path
    chunks = 3 * MAX_PHASE_TIMES
    event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    for n in range(chunks):
        last = n == chunks - 1
        message = pb.HttpBody(body=event + (b"data: [DONE]\n\n" if last else b""), end_of_stream=last)
        asyncio.run(stream.handle(pb.ProcessingRequest(response_body=message)))
    record = stream.record
    assert record is not None
    assert len(record.phase_times) == MAX_PHASE_TIMES  # the rest went to the recorder at once
    assert recorder.records == []
    stream.finish()
    assert [r is record for r in recorder.records] == [True]
    assert recorder.phases["request_headers"] == 1 and recorder.phases["request_body"] == 1
    assert recorder.phases["response_headers"] == 1 and recorder.phases["response_body"] == chunks
