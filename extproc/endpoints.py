"""One small translator per OpenAI endpoint: validate the body, count its prompt.

Translators work on the parsed JSON object and raise `GatewayError` for a
client's mistake; they never touch I/O or policy beyond what they are handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from extproc import names
from extproc.errors import invalid_request
from extproc.policy import Endpoint
from extproc.tokenizer import TokenCounter


@dataclass(slots=True, init=False)
class PromptCost:
    total: int  # every prompt token the request sends
    longest: int  # the largest single sequence: what must fit the context window

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(self, total: int, longest: int) -> None:
        self.total = total
        self.longest = longest


@dataclass(frozen=True, slots=True)
class ChatFraming:
    tokens_per_message: int
    tokens_per_reply: int
    tokens_per_image: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_MAX_WRITTEN_DEPTH = 254  # orjson writes at most this many levels of nesting


def dump_client_json(value: Any) -> bytes:
    """A client's JSON written back (the rewritten body, `tools` for counting), or its 400.

    orjson reads 1,024 levels of nesting but writes only 254, so a body that parsed can still fail
    to be written: the client's mistake, not an internal error. Only that error is turned into a 400;
    measuring every body's depth first would cost every request.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "Recursion limit" not in str(exc):
            raise  # anything else is our bug: the adapter logs it and answers 500
        raise invalid_request(
            f"The JSON body is nested too deeply: at most {_MAX_WRITTEN_DEPTH} levels are accepted."
        ) from None


def _shown(value: Any) -> str:
    """A client's value quoted in an error message: short, and never an error of its own."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
        return "a deeply nested value"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


_SHOWN_CHARS = 80


def _optional_positive_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise invalid_request(f"`{field}` must be a positive integer, got {_shown(value)}.", field)
    return int(value)


def _check_type(body: dict[str, Any], field: str, kind: type, described: str) -> None:
    value = body.get(field)
    if value is None:
        return
    # bool is an int in Python, never in JSON's eyes.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise invalid_request(f"`{field}` must be {described}.", field)


def _count_sequences(value: Any, counter: TokenCounter, field: str) -> PromptCost:
    """Count `prompt`/`input`: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        n = counter.count(value)
        return PromptCost(n, n)
    if isinstance(value, list) and value:
        if all(_is_int(x) for x in value):
            return PromptCost(len(value), len(value))
        if all(isinstance(x, str) for x in value):
            counts = [counter.count(x) for x in value]
            return PromptCost(sum(counts), max(counts))
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in value):
            lengths = [len(x) for x in value]
            return PromptCost(sum(lengths), max(lengths))
    raise invalid_request(
        f"`{field}` must be a non-empty string, array of strings, array of token ids, or array of token-id arrays.",
        field,
    )


class Translator:
    endpoint: ClassVar[Endpoint]
    prompt_field: ClassVar[str]  # the field that carries the prompt: what an error about its length names
    generates: ClassVar[bool] = True  # produces completion tokens (has max_tokens, stream)
    # Fields a backend always needs; a model's parameter allow-list never strips them.
    essential: ClassVar[frozenset[str]] = frozenset({"model", "stream", "stream_options", "max_tokens"})

    def validate(self, body: dict[str, Any]) -> None:
        _check_type(body, "stream", bool, "a boolean")
        _check_type(body, "stream_options", dict, "an object")
        _check_type(body, "n", int, "an integer")
        n = body.get("n")
        if n is not None and n < 1:
            raise invalid_request("`n` must be at least 1.", "n")
        _optional_positive_int(body, "max_tokens")

    def prompt_cost(self, body: dict[str, Any], counter: TokenCounter, framing: ChatFraming) -> PromptCost:
        raise NotImplementedError

    def requested_completion(self, body: dict[str, Any]) -> int | None:
        return _optional_positive_int(body, "max_tokens")

    def completion_field(self, body: dict[str, Any]) -> str:
        """The field that set the completion cap, as the client wrote it."""
        return "max_tokens"

    def sequences(self, body: dict[str, Any]) -> int:
        """How many completions the backend generates: n per prompt."""
        n = body.get("n") or 1
        return int(n)


class ChatCompletions(Translator):
    endpoint = "chat"
    prompt_field = "messages"
    essential = Translator.essential | {"messages", "max_completion_tokens"}
    _roles = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

    def validate(self, body: dict[str, Any]) -> None:
        super().validate(body)
        _optional_positive_int(body, "max_completion_tokens")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid_request("`messages` must be a non-empty array.", "messages")
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise invalid_request(f"`{where}` must be an object.", where)
            role = message.get("role")
            # A list or an object as the role is unhashable: test the type before the set lookup.
            if not isinstance(role, str) or role not in self._roles:
                raise invalid_request(
                    f"`{where}.role` must be one of {', '.join(sorted(self._roles))}.", f"{where}.role"
                )
            content = message.get("content")
            if content is None:
                if role != "assistant":
                    raise invalid_request(f"`{where}.content` is required for role {role}.", f"{where}.content")
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                        raise invalid_request(
                            f"`{where}.content[{j}]` must be an object with a `type`.",
                            f"{where}.content[{j}]",
                        )
                    if part["type"] == "text" and not isinstance(part.get("text"), str):
                        raise invalid_request(
                            f"`{where}.content[{j}].text` must be a string.", f"{where}.content[{j}].text"
                        )
            elif not isinstance(content, str):
                raise invalid_request(f"`{where}.content` must be a string or an array of parts.", f"{where}.content")
        _check_type(body, "tools", list, "an array")

    def requested_completion(self, body: dict[str, Any]) -> int | None:
        # vLLM honours max_completion_tokens over the deprecated max_tokens.
        newer = _optional_positive_int(body, "max_completion_tokens")
        return newer if newer is not None else _optional_positive_int(body, "max_tokens")

    def completion_field(self, body: dict[str, Any]) -> str:
        return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"

    def prompt_cost(self, body: dict[str, Any], counter: TokenCounter, framing: ChatFraming) -> PromptCost:
        total = framing.tokens_per_reply
        for message in body["messages"]:
            total += framing.tokens_per_message
            content = message.get("content")
            if isinstance(content, str):
                total += counter.count(content)
            elif isinstance(content, list):
                for part in content:
                    if part["type"] == "text":
                        total += counter.count(part["text"])
                    elif part["type"] in ("image_url", "input_image"):
                        total += framing.tokens_per_image
            name = message.get("name")
            if isinstance(name, str):
                total += counter.count(name)
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, list):
                total += counter.count(dump_client_json(tool_calls).decode())
        tools = body.get("tools")
        if tools:
            total += counter.count(dump_client_json(tools).decode())
        return PromptCost(total, total)


class Completions(Translator):
    endpoint = "completions"
    prompt_field = "prompt"
    essential = Translator.essential | {"prompt"}

    def validate(self, body: dict[str, Any]) -> None:
        super().validate(body)
        if "prompt" not in body:
            raise invalid_request("`prompt` is required.", "prompt")

    def prompt_cost(self, body: dict[str, Any], counter: TokenCounter, framing: ChatFraming) -> PromptCost:
        return _count_sequences(body["prompt"], counter, "prompt")

    def sequences(self, body: dict[str, Any]) -> int:
        prompt = body["prompt"]
        prompts = len(prompt) if isinstance(prompt, list) and not all(_is_int(x) for x in prompt) else 1
        return prompts * super().sequences(body)


class Embeddings(Translator):
    endpoint = "embeddings"
    prompt_field = "input"
    generates = False
    essential = frozenset({"model", "input"})

    def validate(self, body: dict[str, Any]) -> None:
        if "input" not in body:
            raise invalid_request("`input` is required.", "input")

    def prompt_cost(self, body: dict[str, Any], counter: TokenCounter, framing: ChatFraming) -> PromptCost:
        return _count_sequences(body["input"], counter, "input")

    def requested_completion(self, body: dict[str, Any]) -> int | None:
        return None

    def sequences(self, body: dict[str, Any]) -> int:
        return 0


TRANSLATORS: dict[str, Translator] = {
    names.CHAT_COMPLETIONS: ChatCompletions(),
    names.COMPLETIONS: Completions(),
    names.EMBEDDINGS: Embeddings(),
}
# The same translators by endpoint name (what the access log records).
BY_ENDPOINT: dict[str, Translator] = {t.endpoint: t for t in TRANSLATORS.values()}
