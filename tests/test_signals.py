"""Rollout signals from response content: JSON validity, tool-call arguments, finish reasons; streams assembled."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.signals import ContentSignals
from extproc.sse import SseUsageReader, usage_from_json_body


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    obj = {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream(events: list[bytes], signals: ContentSignals) -> SseUsageReader:
    reader = SseUsageReader(hide_usage_event=False, signals=signals)
    blob = b"".join(events) + b"data: [DONE]\n\n"
    # Split anywhere: events cross chunk boundaries.
    for i in range(0, len(blob), 7):
        reader.feed(blob[i : i + 7])
    return reader


def test_json_mode_body_valid_and_invalid() -> None:
    for content, verdict in (('{"a": 1}', "valid"), ('{"a": 1', "invalid")):
        signals = ContentSignals(json_mode=True, tools=False)
        body = {"choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}]}
        usage_from_json_body(orjson.dumps(body), signals)
        assert signals.finish() == (verdict, 0, 0)
        assert signals.finish_reasons == ["stop"]


def test_json_mode_stream_is_assembled_across_chunks() -> None:
    signals = ContentSignals(json_mode=True, tools=False)
    events = [chunk({"role": "assistant", "content": ""}), chunk({"content": '{"te'}), chunk({"content": 'xt": "hi"}'})]
    stream([*events, chunk({}, "length")], signals)
    assert signals.finish() == ("valid", 0, 0)
    assert signals.finish_reasons == ["length"]


def test_an_oversized_stream_is_truncated_not_judged() -> None:
    signals = ContentSignals(json_mode=True, tools=False, max_bytes=10)
    stream([chunk({"content": '{"text": "' + "x" * 50}), chunk({"content": '"}'}, "stop")], signals)
    assert signals.finish()[0] == "truncated"


def test_streamed_tool_call_arguments() -> None:
    for tail, expect in (("}", (None, 1, 0)), ("", (None, 0, 1))):
        signals = ContentSignals(json_mode=False, tools=True)
        first = {
            "tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]
        }
        events = [
            chunk(first),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"' + tail}}]}, "tool_calls"),
        ]
        stream(events, signals)
        assert signals.finish() == expect
        assert signals.finish_reasons == ["tool_calls"]


def test_plain_streams_parse_only_the_chunks_that_end_a_choice() -> None:
    signals = ContentSignals(json_mode=False, tools=False)
    events = [chunk({"content": "hello "}) for _ in range(50)] + [chunk({"content": "."}, "stop", index=0)]
    reader = stream(events, signals)
    assert reader.events == 52  # 51 chunks and [DONE]
    assert signals.finish() == (None, 0, 0) and signals.finish_reasons == ["stop"]


def test_a_json_mode_stream_that_calls_a_tool_is_not_judged_on_its_empty_content() -> None:
    signals = ContentSignals(json_mode=True, tools=True)
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    stream([chunk({"role": "assistant", "content": ""}), chunk({"tool_calls": [call]}, "tool_calls")], signals)
    assert signals.finish() == (None, 1, 0)
