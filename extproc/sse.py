"""Incremental server-sent-events reading for OpenAI-style streams.

Reads usage from the final chunk and, when the gateway injected
``stream_options.include_usage`` for a client that did not ask, removes that
usage-only event. Holds at most one incomplete event, so memory stays flat on
streams of any length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from extproc.signals import ContentSignals

_EVENT_END = re.compile(rb"\r?\n\r?\n")
# The stream's last event (vLLM and OpenAI end every stream with it).
_DONE_EVENT = re.compile(rb"data: ?\[DONE\][ \t]*\r?\n\r?\n?")
# Only events that carry a usage object are parsed; every other chunk is a byte scan.
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
# With rollout signals on, also the chunks that end a choice, and (JSON mode, tools) those that carry
# content or tool calls: one pattern per combination, so an event costs a single scan.
_SIGNAL_PATTERNS = {
    (content, tools): re.compile(
        rb'"usage"\s*:\s*\{|"finish_reason"\s*:\s*"'
        + (rb'|"content"' if content else b"")
        + (rb'|"tool_calls"' if tools else b"")
    )
    for content in (False, True)
    for tools in (False, True)
}


@dataclass(slots=True, init=False)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_from_object(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if completion is None:  # embeddings: absent or null
        completion = 0
    if not _is_count(prompt) or not _is_count(completion):
        return None  # not a usage we can settle with: the reservation's estimate stands instead
    return Usage(prompt, completion)


_MAX_COUNT = 1 << 53  # settled through Redis's Lua, which counts in doubles: exact below this


def _is_count(value: object) -> TypeGuard[int]:
    """A token count: an int (`true` is not one), neither negative nor too large to settle exactly."""
    return type(value) is int and 0 <= value < _MAX_COUNT


def usage_from_json_body(body: bytes, signals: ContentSignals | None = None) -> Usage | None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if signals is not None:
        signals.from_body(obj)
    return usage_from_object(obj)


def _event_data(event: bytes) -> bytes:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


class SseUsageReader:
    """Feed it response chunks in order; it says what to send on to the client."""

    def __init__(
        self, hide_usage_event: bool, max_pending_bytes: int = 1 << 20, signals: ContentSignals | None = None
    ) -> None:
        self.hide_usage_event = hide_usage_event
        self.signals = signals
        self._wanted = None if signals is None else _SIGNAL_PATTERNS[(signals.json_mode, signals.tools)].search
        self.max_pending_bytes = max_pending_bytes
        self.usage: Usage | None = None
        self.events = 0
        self.finished = False  # the `[DONE]` event went by: the client has the whole stream
        self._pending = b""
        self._gave_up = False

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> bytes | None:
        """Return replacement bytes for this chunk, or None to pass it unchanged."""
        if self._gave_up:
            return None
        data = self._pending + chunk if self._pending else chunk
        last_end = 0
        kept: list[bytes] = []
        dropped = False
        for match in _EVENT_END.finditer(data):
            event = data[last_end : match.end()]
            last_end = match.end()
            self.events += 1
            if b"[DONE]" in event and _DONE_EVENT.fullmatch(event):
                self.finished = True
            if self._wanted is not None:
                if self._wanted(event) is not None:
                    obj = self._parse(event)
                    assert self.signals is not None
                    self.signals.feed_chunk(obj)
                    if self._take_usage(obj) and self.hide_usage_event:
                        dropped = True
                        continue
            elif _HAS_USAGE.search(event) and self._take_usage(self._parse(event)) and self.hide_usage_event:
                dropped = True
                continue
            kept.append(event)
        had_pending = bool(self._pending)
        self._pending = data[last_end:]
        if end_of_stream and self._pending:
            kept.append(self._pending)
            self._pending = b""
        if len(self._pending) > self.max_pending_bytes:
            # Not SSE as we know it: stop interpreting, release what we hold.
            self._gave_up = True
            kept.append(self._pending)
            self._pending = b""
            return b"".join(kept)
        if not self.hide_usage_event:
            return None
        if not dropped and not had_pending and not self._pending:
            return None
        return b"".join(kept)

    @staticmethod
    def _parse(event: bytes) -> Any:
        try:
            return orjson.loads(_event_data(event))
        except orjson.JSONDecodeError:
            return None  # `[DONE]`, or not JSON at all

    def _take_usage(self, obj: Any) -> bool:
        """Record usage; True when the event is the usage-only chunk (no choices)."""
        usage = usage_from_object(obj)
        if usage is None:
            return False
        self.usage = usage
        return isinstance(obj, dict) and not obj.get("choices")
