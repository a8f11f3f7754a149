"""The access log: one JSON line per request, built from its `RequestRecord`.

Never prompt text and never credentials, unless the debug switch is on (it adds the request body,
truncated, and the server warns at start that it is on). Lines are gathered in batches: a line
waits at most `flush_interval_s` (or until `max_buffer_bytes` are waiting). A writer thread does
the writing, so a slow log reader (a full stdout pipe) never stalls the event loop: batches queue
up to a bound and beyond it are dropped and counted, never blocking. Writes are cut at line
boundaries into pieces of at most PIPE_BUF bytes, which the kernel keeps whole on a pipe, so the
workers of a replica sharing one stdout never interleave inside a line. A worker killed with
SIGKILL loses at most the last fraction of a second of lines; SIGTERM flushes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import threading
import time
from typing import Any

import orjson

from extproc.recorder import RequestRecord

# Each field is documented in the README's "Access log" section; replay reads them back.
FIELDS = (
    "ts",
    "request_id",
    "endpoint",
    "tenant",
    "key",
    "tier",
    "model",
    "served_model",
    "backend",
    "routed_backend",
    "version",
    "class",
    "requested_class",
    "rule",
    "status",
    "code",
    "outcome",
    "counted_prompt_tokens",
    "prompt_tokens",
    "completion_tokens",
    "max_tokens",
    "completion_cap",
    "usage",
    "duration_ms",
    "ttft_ms",
    "queue_ms",
    "stream",
    "fallback",
    "json_mode",
    "tools",
    "quality",
    "messages",
    "json_result",
    "tool_calls_valid",
    "tool_calls_invalid",
    "finish_reasons",
    "notes",
)
DEBUG_PROMPT_BYTES = 4096
_ATOMIC_WRITE = select.PIPE_BUF  # a write this size or smaller reaches a pipe whole
_MAX_QUEUED_BATCHES = 256
_WARN_EVERY_S = 10.0

log = logging.getLogger("extproc.access_log")


def line_chunks(data: bytes, limit: int = _ATOMIC_WRITE) -> list[bytes]:
    """`data` (whole lines) cut at line ends into pieces of at most `limit` bytes; a longer line stays whole."""
    pieces: list[bytes] = []
    start = 0
    while len(data) - start > limit:
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:
            cut = data.find(b"\n", start + limit)
            if cut < 0:
                break
        pieces.append(data[start : cut + 1])
        start = cut + 1
    if start < len(data):
        pieces.append(data[start:])
    return pieces


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def line_fields(record: RequestRecord) -> dict[str, Any]:
    """The line's fields, in FIELDS order."""
    return {
        "ts": round(record.started_unix, 3),
        "request_id": record.request_id,
        "endpoint": record.endpoint,
        "tenant": record.tenant,
        "key": record.key,
        "tier": record.tier,
        "model": record.requested_model,
        "served_model": record.served_model,
        "backend": record.backend,
        "routed_backend": record.routed_backend,
        "version": record.version,
        "class": record.traffic_class,
        "requested_class": record.requested_class,
        "rule": record.rule,
        "status": record.status,
        "code": record.code,
        "outcome": record.outcome,
        "counted_prompt_tokens": record.counted_prompt_tokens,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "max_tokens": record.requested_completion,
        "completion_cap": record.completion_cap,
        "usage": record.usage,
        "duration_ms": _ms(record.duration_s),
        "ttft_ms": _ms(record.ttft_s),
        "queue_ms": _ms(record.queue_s),
        "stream": record.stream,
        "fallback": record.fallback,
        "json_mode": record.json_mode,
        "tools": record.tools,
        "quality": record.quality,
        "messages": record.messages,
        "json_result": record.json_result,
        "tool_calls_valid": record.tool_calls_valid,
        "tool_calls_invalid": record.tool_calls_invalid,
        "finish_reasons": record.finish_reasons,
        "notes": list(record.notes),
    }


class AccessLog:
    def __init__(
        self,
        fd: int = 1,
        *,
        include_prompts: bool = False,
        flush_interval_s: float = 0.2,
        max_buffer_bytes: int = 256 * 1024,
    ) -> None:
        self.fd = fd
        self.include_prompts = include_prompts
        self.flush_interval_s = flush_interval_s
        self.max_buffer_bytes = max_buffer_bytes
        self._lines: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self.dropped_lines = 0
        self._last_warning = -_WARN_EVERY_S
        self._batches: queue.Queue[bytes | None] = queue.Queue(maxsize=_MAX_QUEUED_BATCHES)  # None: stop
        self._writer = threading.Thread(target=self._write_batches, name="extproc-access-log", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, target: str, *, include_prompts: bool = False) -> AccessLog | None:
        """`stdout`, `stderr`, `off`, or a file path (appended to)."""
        if target == "off":
            return None
        if target in ("stdout", "-"):
            return cls(1, include_prompts=include_prompts)
        if target == "stderr":
            return cls(2, include_prompts=include_prompts)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return cls(fd, include_prompts=include_prompts)

    def write(self, record: RequestRecord) -> None:
        fields = line_fields(record)
        if self.include_prompts and record.prompt_text is not None:
            fields["prompt"] = record.prompt_text
        line = orjson.dumps(fields)
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= self.max_buffer_bytes:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_later(self.flush_interval_s, self._flush_later)

    def _flush_later(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Hand what is gathered to the writer thread (never blocks)."""
        if not self._lines:
            return
        count = len(self._lines)
        data = b"\n".join(self._lines) + b"\n"
        self._lines.clear()
        self._size = 0
        try:
            self._batches.put_nowait(data)
        except queue.Full:
            self.dropped_lines += count
            now = time.monotonic()
            if now - self._last_warning >= _WARN_EVERY_S:
                self._last_warning = now
                log.warning("access log output is too slow: %d lines dropped so far", self.dropped_lines)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush, and wait (a bounded time) for the writer to finish what is queued."""
        self.flush()
        with contextlib.suppress(queue.Full):
            self._batches.put(None, timeout=timeout_s)
        self._writer.join(timeout_s)

    def _write_batches(self) -> None:
        while True:
            data = self._batches.get()
            if data is None:
                return
            # A closed pipe must never take the gateway down with it: those lines are lost.
            with contextlib.suppress(OSError):
                for piece in line_chunks(data):
                    view = memoryview(piece)
                    while view:
                        written = os.write(self.fd, view)
                        view = view[written:]
