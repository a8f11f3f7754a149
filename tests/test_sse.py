"""SSE reading: usage from the final chunk, hiding it, events split across chunks."""

from __future__ import annotations

import orjson
import pytest

from extproc.sse import SseUsageReader

CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_observing_reader_passes_everything_and_reads_usage() -> None:
    reader = SseUsageReader(hide_usage_event=False)
    assert reader.feed(CONTENT) is None
    assert reader.feed(USAGE + DONE, end_of_stream=True) is None
    assert reader.usage is not None and (reader.usage.prompt_tokens, reader.usage.completion_tokens) == (5, 2)


def test_hiding_reader_drops_only_the_usage_event() -> None:
    reader = SseUsageReader(hide_usage_event=True)
    assert reader.feed(CONTENT) is None  # untouched chunks go on unchanged
    assert reader.feed(USAGE) == b""
    assert reader.feed(DONE, end_of_stream=True) is None
    assert reader.usage is not None and reader.usage.total_tokens == 7


def test_events_split_across_chunks_are_reassembled() -> None:
    stream = CONTENT + USAGE + DONE
    reader = SseUsageReader(hide_usage_event=True)
    out = b""
    for i in range(0, len(stream), 7):
        chunk = stream[i : i + 7]
        replaced = reader.feed(chunk, end_of_stream=i + 7 >= len(stream))
        out += chunk if replaced is None else replaced
    assert out == CONTENT + DONE
    assert reader.usage is not None and reader.usage.completion_tokens == 2


def test_crlf_framing() -> None:
    reader = SseUsageReader(hide_usage_event=True)
    assert reader.feed(USAGE.replace(b"\n", b"\r\n") + DONE.replace(b"\n", b"\r\n"), True) == DONE.replace(
        b"\n", b"\r\n"
    )
    assert reader.usage is not None


def test_a_usage_chunk_that_still_has_choices_is_kept() -> None:
    # Some servers put usage on the last content chunk; that chunk carries text the client needs.
    event = (
        b"data: "
        + orjson.dumps(
            {"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        )
        + b"\n\n"
    )
    reader = SseUsageReader(hide_usage_event=True)
    assert reader.feed(event, True) is None
    assert reader.usage is not None


def test_memory_is_bounded_by_one_pending_event() -> None:
    reader = SseUsageReader(hide_usage_event=True, max_pending_bytes=1024)
    for _ in range(10_000):
        assert reader.feed(CONTENT) is None
    assert reader.events == 10_000
    # A stream that never frames an event is released rather than held.
    assert reader.feed(b"x" * 2048) == b"x" * 2048
    assert reader.feed(b"more") is None


@pytest.mark.parametrize(
    ("stream", "finished"),
    [
        (b'data: {"choices":[]}\n\n' + DONE, True),
        (b"data:[DONE]\r\n\r\n", True),
        (b'data: {"choices":[{"delta":{"content":"[DONE]"}}]}\n\n', False),  # the text, not the event
        (b'data: {"choices":[]}\n\n', False),
    ],
)
def test_the_done_event_marks_the_stream_finished(stream: bytes, finished: bool) -> None:
    for i in range(len(stream) + 1):  # however the stream is cut into two chunks
        reader = SseUsageReader(hide_usage_event=False)
        reader.feed(stream[:i])
        reader.feed(stream[i:])
        assert reader.finished is finished, i
