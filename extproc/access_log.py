"""The access log: one JSON line per request, built from its `RequestRecord`.

Never prompt text and never credentials, unless the debug switch is on (it adds the request body,
truncated, and the server warns at start that it is on). Lines are gathered in batches: a line
waits at most `flush_interval_s` (or until `max_buffer_bytes` are waiting).

The event loop writes the batches itself, without ever blocking: through a non-blocking open
file description of its own (a pipe, the usual stdout of a container, is reopened through
/proc/self/fd, so the flag never touches the description the process shares with others), and
what a full pipe refuses waits for the pipe to drain. Writes are cut at line boundaries into
pieces of at most PIPE_BUF bytes, which the kernel keeps whole on a pipe, so the workers of a
replica sharing one stdout never interleave inside a line (a line longer than PIPE_BUF, possible
only with the debug switch's prompts, may). Beyond `max_pending_bytes` waiting
(a reader that stopped reading) batches are dropped and counted. Writing from the loop costs a
few system calls per batch; a writer thread cost more, in the hand-offs of the GIL each of its
writes forced on the loop (bench, 3 rounds: C/C-nolog went from 0.91x to 0.97x). Outputs that cannot be
written so (a socket) keep a writer thread. A worker killed with SIGKILL loses at most the last
fraction of a second of lines; SIGTERM flushes them (`close` waits for the output at most its timeout,
at shutdown, on the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import stat
import threading
import time
from collections import deque
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
_MAX_PENDING_BYTES = 64 * 1024 * 1024
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


def nonblocking_twin(fd: int) -> int | None:
    """A descriptor for the same output with an open file description of its own, non-blocking,
    for the loop to write; None where that cannot be had without changing a shared description.

    A pipe (a container's stdout) or a terminal (`docker run -t`, whose reader can stop) is reopened
    through /proc/self/fd. A regular file or another character device (/dev/null) is written as it
    is: writing it waits on no reader. (A file on a disk that stalls the page cache can still hold
    the loop; a log file on such a disk belongs behind a pipe.)
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
        try:
            return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None
    if stat.S_ISREG(mode) or stat.S_ISCHR(mode):
        return os.dup(fd)
    return None


class AccessLog:
    def __init__(
        self,
        fd: int = 1,
        *,
        include_prompts: bool = False,
        flush_interval_s: float = 0.2,
        max_buffer_bytes: int = 256 * 1024,
        max_pending_bytes: int = _MAX_PENDING_BYTES,
        owns_fd: bool = False,
    ) -> None:
        self.fd = fd
        self._owns_fd = owns_fd  # opened for this log (a file path): closed with it
        self.include_prompts = include_prompts
        self.flush_interval_s = flush_interval_s
        self.max_buffer_bytes = max_buffer_bytes
        self.max_pending_bytes = max_pending_bytes
        self._lines: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._closed = False
        self.dropped_lines = 0
        self._last_warning = -_WARN_EVERY_S
        # The loop's own writing: pieces refused by a full pipe wait here, in order.
        self._out = nonblocking_twin(fd)
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._waiting_on: asyncio.AbstractEventLoop | None = None  # the loop watching _out for room
        # Otherwise (a socket) a writer thread.
        self._batches: queue.Queue[bytes | None] | None = None  # None: stop
        self._writer: threading.Thread | None = None
        if self._out is None:
            self._batches = queue.Queue(maxsize=_MAX_QUEUED_BATCHES)
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
        return cls(fd, include_prompts=include_prompts, owns_fd=True)

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
        """Write what is gathered, as far as the output takes it now (never blocks)."""
        if not self._lines:
            return
        count = len(self._lines)
        data = b"\n".join(self._lines) + b"\n"
        self._lines.clear()
        self._size = 0
        if self._closed:
            self.dropped_lines += count  # a request that ended after the drain
            return
        if self._out is None:
            assert self._batches is not None
            try:
                self._batches.put_nowait(data)
            except queue.Full:
                self._dropped(count)
            return
        if self._pending_bytes + len(data) > self.max_pending_bytes:
            self._dropped(count)
            return
        self._pending.extend(line_chunks(data))
        self._pending_bytes += len(data)
        if self._waiting_on is not None and self._waiting_on.is_closed():
            self._waiting_on = None  # the loop that watched for room is gone: write from this one
        if self._waiting_on is None:
            self._write_pending()

    def _dropped(self, count: int, why: str = "output is too slow") -> None:
        self.dropped_lines += count
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("access log %s: %d lines dropped so far", why, self.dropped_lines)

    def _write_pending(self) -> None:
        """Write pending pieces until done or the output is full; then wait for room on the loop."""
        assert self._out is not None
        pending = self._pending
        try:
            while pending:
                piece = pending[0]
                written = os.write(self._out, piece)
                # A pipe takes a piece of PIPE_BUF or less whole or not at all; a file may take part.
                if written < len(piece):
                    pending[0] = piece[written:]
                else:
                    pending.popleft()
                self._pending_bytes -= written
        except BlockingIOError:
            self._watch()
            return
        except OSError as exc:
            # A closed pipe must never take the gateway down with it: those lines are lost.
            self._lose_pending(f"output failed ({exc.strerror or exc})")
        self._unwatch()

    def _lose_pending(self, why: str) -> None:
        """What waits for the output is given up (it failed, or closing ran out of time), and counted."""
        lost = sum(piece.count(b"\n") for piece in self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._dropped(lost, why)

    def _watch(self) -> None:
        if self._waiting_on is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a tool, a test): the next flush or close tries again
        assert self._out is not None
        loop.add_writer(self._out, self._write_pending)
        self._waiting_on = loop

    def _unwatch(self) -> None:
        if self._waiting_on is not None and self._out is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._waiting_on.remove_writer(self._out)
        self._waiting_on = None

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush, and wait (a bounded time) for the output to take what is pending."""
        self.flush()
        if self._closed:
            return
        self._closed = True
        if self._out is None:
            assert self._batches is not None and self._writer is not None
            with contextlib.suppress(queue.Full):
                self._batches.put(None, timeout=timeout_s)
            self._writer.join(timeout_s)
            if self._owns_fd and not self._writer.is_alive():
                os.close(self.fd)
            return
        self._unwatch()
        deadline = time.monotonic() + timeout_s
        poller = select.poll()
        poller.register(self._out, select.POLLOUT)
        while self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                self._lose_pending("output is too slow")
                break
            self._write_pending()
            self._unwatch()
        os.close(self._out)
        if self._owns_fd:
            os.close(self.fd)

    def _write_batches(self) -> None:
        assert self._batches is not None
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
