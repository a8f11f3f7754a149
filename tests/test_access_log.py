"""The access log: one JSON line per request with the documented fields, never the key or the prompt."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.access_log import FIELDS, AccessLog
from extproc.core import Gateway
from extproc.policy import load_policy
from tests.recording import CountingRecorder, record_with, run_exchanges

POLICY = Path(__file__).parent / "policies" / "quota.yaml"
PROMPT = "the secret prompt text"


def header_map(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def exchange(
    key: str, body: dict[str, object], response: bytes | None, extra: dict[str, str] | None = None
) -> list[pb.ProcessingRequest]:
    raw = orjson.dumps(body)
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        "content-length": str(len(raw)),
        "authorization": f"Bearer {key}",
        "x-request-id": "req-42",
        **(extra or {}),
    }
    messages = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(headers))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True)),
    ]
    if response is not None:
        status = {":status": "200", "content-type": "application/json", "x-model-version": "v7"}
        messages += [
            pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(status))),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=response, end_of_stream=True)),
        ]
    return messages


def drive(messages: list[pb.ProcessingRequest], tmp_path: Path, include_prompts: bool = False) -> list[dict[str, Any]]:
    path = tmp_path / "access.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    access_log = AccessLog(fd, include_prompts=include_prompts)
    recorder = CountingRecorder()
    run_exchanges(Gateway.from_policy(load_policy(POLICY)), [messages], recorder, access_log)
    access_log.close()
    os.close(fd)
    lines = path.read_bytes().splitlines()
    assert len(recorder.records) == len(lines) == 1  # one line, one record, per request
    return [orjson.loads(line) for line in lines]


def test_an_admitted_request_logs_one_json_line_with_its_cost(tmp_path: Path) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    response = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 7}
    (line,) = drive(exchange("sk-stream", body, response, {"x-llm-class": "batch"}), tmp_path)
    assert list(line) == list(FIELDS)
    assert line["request_id"] == "req-42"
    assert (line["tenant"], line["model"], line["served_model"], line["backend"]) == (
        "stream",
        "tiny",
        "org/tiny",
        "small",
    )
    assert (line["status"], line["outcome"], line["code"]) == (200, "ok", None)
    assert (line["prompt_tokens"], line["completion_tokens"], line["usage"]) == (11, 5, "reported")
    assert (line["max_tokens"], line["completion_cap"], line["messages"]) == (7, 7, 1)
    assert (line["version"], line["rule"], line["class"], line["requested_class"]) == (
        "v7",
        "default",
        "batch",
        "batch",
    )
    assert line["stream"] is False and line["fallback"] is False and line["json_mode"] is False
    assert line["finish_reasons"] == ["stop"]
    assert line["duration_ms"] >= 0 and line["queue_ms"] >= 0 and line["ttft_ms"] is None
    text = orjson.dumps(line).decode()
    assert "sk-stream" not in text and PROMPT not in text and "prompt" not in line


def test_a_refused_request_logs_why(tmp_path: Path) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 999_999}
    (line,) = drive(exchange("sk-stream", body, None), tmp_path)
    assert (line["status"], line["code"], line["outcome"]) == (400, "context_length_exceeded", "invalid")
    assert (line["tenant"], line["model"], line["backend"]) == ("stream", "tiny", "small")
    assert line["max_tokens"] == 999_999 and line["counted_prompt_tokens"] > 0 and line["prompt_tokens"] == 0
    assert "sk-stream" not in orjson.dumps(line).decode() and PROMPT not in orjson.dumps(line).decode()


def test_an_unknown_key_is_logged_as_unauthorized_without_the_key(tmp_path: Path) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}]}
    (line,) = drive(exchange("sk-not-a-real-key", body, None), tmp_path)
    assert (line["status"], line["code"], line["outcome"], line["tenant"]) == (
        401,
        "invalid_api_key",
        "unauthorized",
        None,
    )
    assert "sk-not-a-real-key" not in orjson.dumps(line).decode()


def test_the_debug_switch_adds_the_prompt(tmp_path: Path) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 7}
    (line,) = drive(exchange("sk-stream", body, None), tmp_path, include_prompts=True)
    assert PROMPT in line["prompt"]


def test_writes_are_cut_at_line_ends_into_pipe_sized_pieces() -> None:
    from extproc.access_log import line_chunks

    lines = [orjson.dumps({"n": n, "pad": "x" * (n * 37 % 900)}) for n in range(200)]
    data = b"\n".join(lines) + b"\n"
    pieces = line_chunks(data, 4096)
    assert b"".join(pieces) == data
    assert all(len(p) <= 4096 and p.endswith(b"\n") for p in pieces)
    long_line = b"y" * 10_000 + b"\n"
    assert line_chunks(b"a\n" + long_line + b"b\n", 4096) == [b"a\n", long_line, b"b\n"]


def test_a_stuck_reader_never_blocks_the_writer_of_lines(tmp_path: Path) -> None:
    """A pipe nobody reads: write() returns at once; lines beyond the pending bound are dropped and counted."""

    read_end, write_end = os.pipe()
    access_log = AccessLog(write_end, max_buffer_bytes=1, max_pending_bytes=256 * 1024)  # a batch per line
    record = record_with(notes=["z" * 2000])
    started = time.monotonic()
    for _ in range(2000):
        access_log.write(record)
    assert time.monotonic() - started < 5
    assert access_log.dropped_lines > 0
    # The shared description stays blocking: the log wrote through a description of its own.
    assert not fcntl.fcntl(write_end, fcntl.F_GETFL) & os.O_NONBLOCK
    os.close(read_end)  # the next write fails with EPIPE: those lines are lost, quietly
    access_log.close(timeout_s=1)
    os.close(write_end)


def test_close_gives_a_stuck_reader_a_bounded_time() -> None:
    from extproc.recorder import RequestRecord

    read_end, write_end = os.pipe()
    access_log = AccessLog(write_end, max_buffer_bytes=1)
    for _ in range(100):
        access_log.write(record_with(notes=["z" * 2000]))
    started = time.monotonic()
    access_log.close(timeout_s=0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert access_log.dropped_lines > 0
    access_log.write(RequestRecord(0.0, 0.0))  # after the drain: counted, never raised
    os.close(read_end)
    os.close(write_end)


def _lines_through(read_end: int, write_end: int, count: int) -> list[dict[str, Any]]:
    """`count` records logged from a running loop while a slow reader drains the other end."""
    import asyncio
    import threading

    received = bytearray()

    def read_slowly() -> None:
        while chunk := os.read(read_end, 4096):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=read_slowly)
    reader.start()

    async def log_lines() -> None:
        access_log = AccessLog(write_end, flush_interval_s=0.01, max_buffer_bytes=64 * 1024)
        for n in range(count):
            access_log.write(record_with(f"r{n}", notes=["y" * (n % 700)]))
            if n % 50 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        access_log.close()
        assert access_log.dropped_lines == 0

    asyncio.run(log_lines())
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    return [orjson.loads(line) for line in bytes(received).splitlines()]


def test_a_full_pipe_holds_lines_until_it_drains_whole_and_in_order() -> None:
    read_end, write_end = os.pipe()
    lines = _lines_through(read_end, write_end, 3000)
    assert [line["request_id"] for line in lines] == [f"r{n}" for n in range(3000)]


def test_a_terminal_whose_reader_stopped_never_blocks_the_loop() -> None:
    """`docker run -t`: stdout is a terminal, and a terminal's reader can stop (Ctrl-S, a paused pager)."""

    controller, terminal = os.openpty()
    access_log = AccessLog(terminal, max_buffer_bytes=1, max_pending_bytes=64 * 1024)
    started = time.monotonic()
    for _ in range(500):  # nobody reads the controller side: the terminal's buffer fills
        access_log.write(record_with(notes=["t" * 1000]))
    assert time.monotonic() - started < 5
    assert access_log.dropped_lines > 0
    assert not fcntl.fcntl(terminal, fcntl.F_GETFL) & os.O_NONBLOCK
    access_log.close(timeout_s=0.2)
    os.close(terminal)
    os.close(controller)


def test_dev_null_takes_every_line(tmp_path: Path) -> None:
    from extproc.recorder import RequestRecord

    fd = os.open(os.devnull, os.O_WRONLY)
    access_log = AccessLog(fd, max_buffer_bytes=1)
    for _ in range(1000):
        access_log.write(RequestRecord(0.0, 0.0))
    access_log.close()
    assert access_log.dropped_lines == 0
    os.close(fd)


def test_a_log_file_opened_by_path_is_closed_with_the_log(tmp_path: Path) -> None:
    from extproc.recorder import RequestRecord

    before = len(os.listdir("/proc/self/fd"))
    access_log = AccessLog.open(str(tmp_path / "access.jsonl"))
    assert access_log is not None
    access_log.write(RequestRecord(0.0, 0.0, request_id="one"))
    access_log.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert orjson.loads((tmp_path / "access.jsonl").read_bytes())["request_id"] == "one"


def test_a_socket_output_is_written_by_a_thread() -> None:
    import socket

    ours, theirs = socket.socketpair()
    probe = AccessLog(ours.fileno())
    assert probe._writer is not None  # which path it took: the thread
    probe.close()
    lines = _lines_through(theirs.detach(), ours.detach(), 500)
    assert [line["request_id"] for line in lines] == [f"r{n}" for n in range(500)]


def test_finished_requests_are_recorded_in_batches_soon_after() -> None:
    """`extproc serve` records finished requests together, a few milliseconds after they end."""
    import asyncio

    from extproc.processor import RecordBatch
    from extproc.recorder import RequestRecord

    recorder = CountingRecorder()

    async def scenario() -> None:
        batch = RecordBatch(recorder, None, delay_s=0.01, max_pending=3)
        batch.add(RequestRecord(0.0, 0.0, request_id="a"))
        assert recorder.records == []  # waits for the batch
        await asyncio.sleep(0.05)
        assert [r.request_id for r in recorder.records] == ["a"]
        for name in "bcd":  # the third waiting record fills the batch: recorded at once
            batch.add(RequestRecord(0.0, 0.0, request_id=name))
        assert [r.request_id for r in recorder.records] == ["a", "b", "c", "d"]
        batch.add(RequestRecord(0.0, 0.0, request_id="e"))
        batch.flush()  # the server's drain, before the access log closes
        assert recorder.records[-1].request_id == "e"

    asyncio.run(scenario())
    outside = RecordBatch(recorder, None)
    outside.add(RequestRecord(0.0, 0.0, request_id="no loop"))  # no loop to wait on: at once
    assert recorder.records[-1].request_id == "no loop"
