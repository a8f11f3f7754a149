"""The access log: one JSON line per request, built from its `RequestRecord`.

Never prompt text and never credentials, unless the debug switch is on (it adds the request body,
truncated, and the server warns at start that it is on). Lines are written in batches: a line
waits at most `flush_interval_s` (or until `max_buffer_bytes` are waiting), so a busy worker
makes one write system call per batch instead of one per request. A worker killed with SIGKILL
loses at most that last fraction of a second of lines; SIGTERM flushes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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
        if not self._lines:
            return
        data = memoryview(b"\n".join(self._lines) + b"\n")
        self._lines.clear()
        self._size = 0
        # A closed or full pipe must never take the gateway down with it: lines are dropped instead.
        with contextlib.suppress(OSError):
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
