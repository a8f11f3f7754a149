"""Rollout signals read from a response's content: is it worse, not only is it up.

For JSON-mode requests: did the content parse as JSON. For tool calls: did each call's
arguments parse as JSON. For every choice: its `finish_reason`. Streams are assembled from their
deltas up to a size bound; past it the verdict is `truncated` rather than a guess.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_ASSEMBLED_BYTES = 256 * 1024  # per response: content plus tool arguments


def _parses(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


class ContentSignals:
    """Feed it the parsed response (`from_body`) or each parsed SSE chunk (`feed_chunk`), then `finish`."""

    __slots__ = ("_args", "_content", "_size", "_truncated", "finish_reasons", "json_mode", "tools")

    def __init__(self, json_mode: bool, tools: bool, max_bytes: int = MAX_ASSEMBLED_BYTES) -> None:
        self.json_mode = json_mode
        self.tools = tools
        self.finish_reasons: list[str] = []
        self._content: dict[int, list[str]] = {}  # choice index -> content fragments
        self._args: dict[tuple[int, int], list[str]] = {}  # (choice, tool call index) -> argument fragments
        self._size = max_bytes
        self._truncated = False

    def _take(self, text: str) -> bool:
        self._size -= len(text)
        if self._size < 0:
            self._truncated = True
            return False
        return True

    def from_body(self, obj: Any) -> None:
        """A whole chat or completions response."""
        self._choices(obj, "message")

    def feed_chunk(self, obj: Any) -> None:
        """One streamed chunk: its deltas are assembled per choice and per tool call."""
        self._choices(obj, "delta")

    def _choices(self, obj: Any, part: str) -> None:
        """Each choice's finish reason, and its `part` (message or delta), or a completion's text."""
        for choice in _choices(obj):
            self._finish(choice)
            message = choice.get(part)
            if isinstance(message, dict):
                self._message(choice, message)
            elif isinstance(choice.get("text"), str) and self.json_mode:
                self._add_content(choice, choice["text"])

    def _finish(self, choice: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reasons.append(reason)

    def _message(self, choice: dict[str, Any], message: dict[str, Any]) -> None:
        content = message.get("content")
        if self.json_mode and isinstance(content, str):
            self._add_content(choice, content)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            index = _index(choice)
            for position, call in enumerate(calls):
                if not isinstance(call, dict):
                    continue
                function = call.get("function")
                arguments = function.get("arguments") if isinstance(function, dict) else None
                key = (index, call.get("index", position) if isinstance(call.get("index"), int) else position)
                fragments = self._args.setdefault(key, [])
                if isinstance(arguments, str) and self._take(arguments):
                    fragments.append(arguments)

    def _add_content(self, choice: dict[str, Any], text: str) -> None:
        if self._take(text):
            self._content.setdefault(_index(choice), []).append(text)

    def finish(self) -> tuple[str | None, int, int]:
        """(JSON-mode verdict or None, tool calls whose arguments parse, tool calls whose do not)."""
        verdict: str | None = None
        # A choice with no content (a tool call, or only vLLM's opening `"content": ""`) is not judged.
        texts = [text for text in ("".join(p) for p in self._content.values()) if text.strip()]
        if self.json_mode and self._truncated:
            verdict = "truncated"
        elif self.json_mode and texts:
            verdict = "valid" if all(_parses(text) for text in texts) else "invalid"
        valid = invalid = 0
        if not self._truncated:
            for fragments in self._args.values():
                if _parses("".join(fragments) or "{}"):
                    valid += 1
                else:
                    invalid += 1
        return verdict, valid, invalid


def _choices(obj: Any) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        return []
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for c in choices if isinstance(c, dict)]


def _index(choice: dict[str, Any]) -> int:
    index = choice.get("index", 0)
    return index if isinstance(index, int) else 0
