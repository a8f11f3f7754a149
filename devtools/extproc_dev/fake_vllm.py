"""A protocol-faithful fake of vLLM's OpenAI-compatible HTTP server.

It exists so the gateway can be tested (and benchmarked) against something that
speaks vLLM's wire format -- error bodies, SSE framing, `/metrics` names -- without
a GPU or the `vllm` package. Output is deterministic: a request asking for N
tokens always gets the same N short words, so tests can control stream length
through `max_tokens`.

Run standalone with `python -m extproc_dev.fake_vllm --port 8001 --name a`.

`PUT /fake/state` changes what the fake reports and how it fails at runtime (queue
and KV-cache figures on `/metrics`, error statuses, delays, connection resets), so
load balancing and fault handling can be tested without a real overloaded engine;
`GET /fake/state` shows the current knobs. See `_KNOBS`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import signal
import socket
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from extproc import names

__all__ = ["build_app", "main", "serve"]

log = logging.getLogger(__name__)

# vLLM's own fallback when it cannot read a context length from the model config is
# far larger, but 8192 is a realistic value that still lets tests trip the limit cheaply.
ANY_MODEL_MAX_LEN = 8192
# The name advertised by /v1/models and used as the metrics label when any model is
# accepted: per-requested-name series would let clients grow /metrics without bound.
ANY_MODEL_NAME = "fake-model"
# Running requests that count as a "full" KV cache; only the gauge's shape matters.
KV_CACHE_SLOTS = 64
DEBUG_HISTORY = 100
# Big prompts are a normal test input (context-length errors); aiohttp's 1 MiB default
# would turn them into 413s that real vLLM never sends.
CLIENT_MAX_SIZE = 64 * 1024 * 1024
# When streaming without a delay, hand the loop back now and then so one long stream
# cannot starve concurrent requests when the fake is used as a benchmark upstream.
YIELD_EVERY_TOKENS = 32

_WORDS = ("hello", "world", "fake", "vllm", "token", "stream", "test", "data")
_TOKENS = tuple(w + " " for w in _WORDS)

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_PROM = "text/plain; version=0.0.4; charset=utf-8"
_DONE = b"data: [DONE]\n\n"
# The control plane's own paths: never recorded in the debug history, so setting a
# knob does not show up as traffic the gateway forwarded.
_CONTROL_PREFIX = "/fake/"
# How the fake's requests finish, as vLLM's `finished_reason` label spells them: it
# never sees a stop token, so generation always runs to the token limit ("length"),
# while pooling (embedding) requests finish as "stop" in vLLM.
_FINISH_REASONS = ("stop", "length")


class _ApiError(Exception):
    """A request vLLM would refuse; carries what the client should see."""

    def __init__(self, status: int, message: str, err_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type

    def response(self) -> web.Response:
        return _error_response(self.status, self.message, self.err_type)


def _error_response(status: int, message: str, err_type: str) -> web.Response:
    # The newer vLLM shape: `code` is the integer HTTP status, not an OpenAI string code.
    body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


def _bad_request(message: str) -> _ApiError:
    return _ApiError(400, message, "BadRequestError")


def _injected_error(status: int) -> _ApiError:
    # vLLM names error types after the failure ("NotFoundError", "InternalServerError"),
    # so derive a name in that style from the status phrase.
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Bad Request" if status < 500 else "Internal Server Error"
    err_type = "".join(ch for ch in phrase.title() if ch.isalnum())
    if not err_type.endswith("Error"):
        err_type += "Error"
    return _ApiError(status, f"Injected failure: status {status} was set through /fake/state.", err_type)


class _ModelStats:
    __slots__ = ("finished", "generation_tokens", "prompt_tokens", "running")

    def __init__(self) -> None:
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # Successfully finished engine requests by vLLM's `finished_reason`.
        self.finished = dict.fromkeys(_FINISH_REASONS, 0)


@functools.lru_cache(maxsize=256)
def _completion_text(n_tokens: int) -> str:
    return "".join(_TOKENS[i % len(_TOKENS)] for i in range(n_tokens))


def _output_tokens(n_tokens: int, json_mode: bool, broken: bool) -> list[str]:
    """The generated tokens: words, or in JSON mode a JSON object (made invalid by `broken`)."""
    words = [_TOKENS[i % len(_TOKENS)] for i in range(n_tokens)]
    if not json_mode:
        return words
    if n_tokens == 1:
        return ["{" if broken else "{}"]
    return ['{"text": "', *words[: n_tokens - 2], '"' if broken else '"}']


def _tool_arguments(n_tokens: int, broken: bool) -> list[str]:
    """A tool call's arguments as `n_tokens` fragments (some may be empty), one per event."""
    text = '{"query": "hello"' + ("" if broken else "}")
    step = max(1, -(-len(text) // n_tokens))
    return [text[i * step : (i + 1) * step] for i in range(n_tokens)]


def _tool_name(body: dict[str, Any]) -> str | None:
    """The function a chat request lets the model call, when it offers tools and does not forbid them."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    first = tools[0]
    function = first.get("function") if isinstance(first, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "tool"


def _json_requested(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def _count_words(text: str) -> int:
    return len(text.split())


def _is_int(value: object) -> bool:
    # bool is an int subclass; JSON `true` must not pass as a token id or a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _chat_prompt_tokens(messages: object) -> int:
    if not isinstance(messages, list) or not messages:
        raise _bad_request("`messages` must be a non-empty list of messages.")
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            raise _bad_request("Each message must be an object.")
        # Roughly what a chat template adds around each turn.
        total += 4
        content = message.get("content")
        if isinstance(content, str):
            total += _count_words(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += _count_words(part["text"])
        elif content is not None:
            raise _bad_request("Message `content` must be a string or a list of content parts.")
    return total


def _completion_prompt_tokens(prompt: object) -> list[int]:
    """Token count per prompt; the completions API accepts a batch of prompts."""
    if isinstance(prompt, str):
        return [_count_words(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [len(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [_count_words(p) for p in prompt]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [len(p) for p in prompt]
    raise _bad_request(
        "`prompt` must be a string, an array of strings, an array of tokens, or an array of token arrays."
    )


def _embedding_inputs(inp: object) -> list[tuple[bytes, int]]:
    """(hash key, token count) per input, so identical inputs embed identically."""
    if isinstance(inp, str):
        return [(inp.encode(), _count_words(inp))]
    if isinstance(inp, list) and inp:
        if all(_is_int(t) for t in inp):
            return [(orjson.dumps(inp), len(inp))]
        if all(isinstance(s, str) for s in inp):
            return [(s.encode(), _count_words(s)) for s in inp]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in inp):
            return [(orjson.dumps(p), len(p)) for p in inp]
    raise _bad_request(
        "`input` must be a string, an array of strings, an array of tokens, or an array of token arrays."
    )


def _embedding(key: bytes) -> list[float]:
    raw = struct.unpack("<8I", hashlib.blake2b(key, digest_size=32).digest())
    vec = [r / 0xFFFFFFFF * 2.0 - 1.0 for r in raw]
    # vLLM normalises embedding outputs by default; clients may rely on unit length.
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


def _positive_int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value) or value < 1:
        raise _bad_request(f"{key} must be at least 1, got {value}.")
    return int(value)


def _max_output_tokens(body: dict[str, Any], default: int) -> int:
    # max_completion_tokens is the newer OpenAI name and wins, as in vLLM.
    if body.get("max_completion_tokens") is not None:
        return _positive_int(body, "max_completion_tokens", default)
    return _positive_int(body, "max_tokens", default)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(model: str, **extra: str) -> str:
    # model_name first, as in vLLM, whose label names are declared in that order.
    pairs = [("model_name", model), *extra.items()]
    return ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)


def _metric_block(lines: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
    """`samples` are (rendered label set, value) pairs; see `_labels`."""
    # Text format 0.0.4 (what prometheus_client emits): counters keep `_total` in HELP/TYPE.
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{{{labels}}} {float(value)!r}")


# -- runtime state (PUT/GET /fake/state) ------------------------------------------------


def _number_in(lo: float, hi: float = math.inf) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        # bool is an int subclass; `true` is not a count.
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and lo <= value <= hi
        )

    return check


def _int_in(lo: int, hi: float = math.inf) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi

    return check


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_version(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 40 and value.isprintable()


# Every knob, with what it accepts. None (JSON null) is always accepted and means
# "unset": the fake then behaves as it would without the control plane.
_KNOBS: dict[str, tuple[str, Callable[[object], bool]]] = {
    # /metrics overrides, so a scraper or load balancer can be shown a busy engine.
    "num_requests_waiting": ("a number >= 0", _number_in(0)),
    "num_requests_running": ("a number >= 0", _number_in(0)),
    "kv_cache_usage_perc": ("a number between 0 and 1", _number_in(0, 1)),
    # Older vLLM releases call the KV figure vllm:gpu_cache_usage_perc.
    "legacy_kv_metric": ("a boolean", _is_bool),
    # Faults.
    "reset_after_chunks": ("an integer >= 0", _int_in(0)),
    "status": ("an integer between 400 and 599", _int_in(400, 599)),
    "delay_ms": ("a number >= 0", _number_in(0)),
    # Pacing: overrides --token-delay-ms (a stream that must still be running when a fault hits it).
    "token_delay_ms": ("a number >= 0", _number_in(0)),
    # Rollout signals: the version header this engine sends (a pod label in the mesh), and
    # regressions a canary may carry: JSON-mode content that does not parse, tool-call
    # arguments that do not parse.
    "version": ("a string of 1 to 40 printable characters", _is_version),
    "broken_json": ("a boolean", _is_bool),
    "broken_tool_args": ("a boolean", _is_bool),
}


def _checked_state_update(update: object) -> dict[str, Any]:
    """Validate a whole update before any of it applies, so a bad PUT changes nothing."""
    if not isinstance(update, dict):
        raise _bad_request("Request body must be a JSON object.")
    unknown = sorted(k for k in update if k not in _KNOBS)
    if unknown:
        raise _bad_request(f"Unknown state keys: {', '.join(unknown)}. Known keys: {', '.join(_KNOBS)}.")
    for key, value in update.items():
        expected, check = _KNOBS[key]
        if value is not None and not check(value):
            raise _bad_request(f"`{key}` must be {expected} or null, got {orjson.dumps(value).decode()}.")
    return update


def _reset_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # A zero linger makes the close send an RST instead of a FIN, so the client
        # sees a reset rather than an early (if unterminated) end of the body.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(frozen=True, slots=True)
class _Output:
    """What a generation request gets back, beyond its length."""

    json_mode: bool
    broken_json: bool
    tool: str | None  # the function called (chat requests offering tools)
    broken_tool_args: bool


class _FakeVllm:
    def __init__(
        self,
        name: str,
        models: dict[str, int] | None,
        token_delay_s: float,
        default_max_tokens: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.models: dict[str, int] = dict(models) if models else {}
        self.token_delay_s = token_delay_s
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.stats: dict[str, _ModelStats] = {
            m: _ModelStats() for m in (self.models or {ANY_MODEL_NAME: ANY_MODEL_MAX_LEN})
        }
        self.history: deque[dict[str, Any]] = deque(maxlen=DEBUG_HISTORY)
        self.default_model = next(iter(self.models), ANY_MODEL_NAME)
        self.state: dict[str, Any] = dict.fromkeys(_KNOBS)
        if state:
            self.state.update(_checked_state_update(state))

    @property
    def token_delay(self) -> float:
        """Seconds per generated token: the state's `token_delay_ms` when set, else the command line's."""
        override = self.state["token_delay_ms"]
        return self.token_delay_s if override is None else float(override) / 1000.0

    # -- plumbing ---------------------------------------------------------------------

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        # A signal rather than per-handler headers so aiohttp's own error responses
        # (413, 500, ...) are attributed to this upstream too.
        response.headers[names.SERVED_BY] = self.name
        if self.state["version"] is not None:
            response.headers[names.MODEL_VERSION] = self.state["version"]

    async def _read(self, request: web.Request) -> Any:
        """Read, record and decode the body; raises a vLLM-style 400 on bad JSON."""
        raw = await request.read()
        body: Any = None
        error: _ApiError | None = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                error = _bad_request(f"Invalid JSON body: {exc}")
        self.history.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
                "raw_body_length": len(raw),
            }
        )
        if error is not None:
            raise error
        return body

    async def _read_object(self, request: web.Request) -> dict[str, Any]:
        body = await self._read(request)
        if not isinstance(body, dict):
            raise _bad_request("Request body must be a JSON object.")
        return body

    async def _admit(self, request: web.Request) -> dict[str, Any]:
        """Read an inference request's body, then apply the injected delay and status.

        The body is read (and recorded) first so the history shows what arrived even
        when the answer is an injected failure, and the injected status wins over
        the request's own validation errors, as a failing engine would.
        """
        error: _ApiError | None = None
        body: dict[str, Any] = {}
        try:
            body = await self._read_object(request)
        except _ApiError as exc:
            error = exc
        delay_ms = self.state["delay_ms"]
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000.0)
        status = self.state["status"]
        if status is not None:
            raise _injected_error(status)
        if error is not None:
            raise error
        return body

    def _resolve_model(self, body: dict[str, Any]) -> tuple[str, int, _ModelStats]:
        """(model name to echo, max_model_len, stats bucket)."""
        model = body.get("model")
        if model is None:
            # vLLM serves its (first) model when the client names none.
            model = self.default_model
        if not isinstance(model, str):
            raise _bad_request("`model` must be a string.")
        if not self.models:
            return model, ANY_MODEL_MAX_LEN, self.stats[ANY_MODEL_NAME]
        max_len = self.models.get(model)
        if max_len is None:
            raise _ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
        return model, max_len, self.stats[model]

    # -- simple endpoints -------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def list_models(self, request: web.Request) -> web.Response:
        await self._read(request)
        served = self.models or {ANY_MODEL_NAME: ANY_MODEL_MAX_LEN}
        data = [
            {
                "id": m,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
                "max_model_len": max_len,
            }
            for m, max_len in served.items()
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        stats = self.stats.items()
        state = self.state
        first = self.default_model

        def pod_wide(knob: str, model: str, live: float) -> float:
            # A knob set through /fake/state is the whole pod's figure, as a real vLLM
            # pod (one series, labelled with its first served model name) reports it.
            # It goes on the first model's series and the others read 0, so a scraper
            # that sums or takes the max over series sees exactly the knob.
            value = state[knob]
            if value is None:
                return live
            return float(value) if model == first else 0.0

        lines: list[str] = []
        _metric_block(
            lines,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            ((_labels(m), pod_wide("num_requests_running", m, s.running)) for m, s in stats),
        )
        _metric_block(
            lines,
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            # The fake never queues: every request is "scheduled" immediately.
            ((_labels(m), pod_wide("num_requests_waiting", m, 0)) for m in self.stats),
        )
        if state["legacy_kv_metric"]:
            kv_name, kv_help = "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage."
        else:
            kv_name, kv_help = "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        _metric_block(
            lines,
            kv_name,
            "gauge",
            kv_help,
            ((_labels(m), pod_wide("kv_cache_usage_perc", m, min(1.0, s.running / KV_CACHE_SLOTS))) for m, s in stats),
        )
        _metric_block(
            lines,
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            ((_labels(m), s.prompt_tokens) for m, s in stats),
        )
        _metric_block(
            lines,
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            ((_labels(m), s.generation_tokens) for m, s in stats),
        )
        _metric_block(
            lines,
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            # Every reason's series exists from the start, as vLLM creates them up front.
            ((_labels(m, finished_reason=reason), count) for m, s in stats for reason, count in s.finished.items()),
        )
        lines.append("")
        return web.Response(body="\n".join(lines).encode(), headers={"Content-Type": _PROM})

    async def debug_requests(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"requests": list(self.history)}), content_type=_JSON)

    async def debug_clear(self, request: web.Request) -> web.Response:
        self.history.clear()
        return web.Response(status=204)

    async def get_state(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.state), content_type=_JSON)

    async def put_state(self, request: web.Request) -> web.Response:
        # Read directly rather than through _read: control traffic is not recorded.
        raw = await request.read()
        try:
            update = _checked_state_update(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            return _bad_request(f"Invalid JSON body: {exc}").response()
        except _ApiError as exc:
            return exc.response()
        self.state.update(update)
        return await self.get_state(request)

    async def _record_stray(self, request: web.Request) -> None:
        # Recorded so tests can see a gateway forwarding somewhere it should not;
        # mistakes against the control plane are not forwarded traffic.
        if not request.path.startswith(_CONTROL_PREFIX):
            with contextlib.suppress(_ApiError):
                await self._read(request)

    async def not_found(self, request: web.Request) -> web.Response:
        await self._record_stray(request)
        return _error_response(404, f"Not Found: {request.path}", "NotFoundError")

    async def method_not_allowed(self, request: web.Request) -> web.Response:
        await self._record_stray(request)
        return _error_response(405, f"Method {request.method} not allowed", "MethodNotAllowedError")

    # -- inference endpoints ----------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await self._admit(request)
            model, max_len, stats = self._resolve_model(body)
            if chat:
                prompts = [_chat_prompt_tokens(body.get("messages"))]
            else:
                if "prompt" not in body:
                    raise _bad_request("`prompt` is required.")
                prompts = _completion_prompt_tokens(body["prompt"])
            n_out = _max_output_tokens(body, self.default_max_tokens)
            n = _positive_int(body, "n", 1)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise _bad_request("`stream` must be a boolean.")
            stream_options = body.get("stream_options")
            if stream_options is not None and not stream:
                raise _bad_request("Stream options can only be defined when `stream=True`.")
            include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
            where = "messages" if chat else "prompt"
            for p in prompts:
                if p + n_out > max_len:
                    raise _bad_request(
                        f"This model's maximum context length is {max_len} tokens. However, you requested "
                        f"{p + n_out} tokens ({p} in the {where}, {n_out} in the completion). "
                        f"Please reduce the length of the {where} or completion."
                    )
        except _ApiError as exc:
            return exc.response()

        prompt_tokens = sum(prompts)
        n_choices = len(prompts) * n
        output = _Output(
            json_mode=_json_requested(body),
            broken_json=bool(self.state["broken_json"]),
            tool=_tool_name(body) if chat else None,
            broken_tool_args=bool(self.state["broken_tool_args"]),
        )
        # vLLM schedules each prompt of a batch as its own engine request.
        stats.running += len(prompts)
        stats.prompt_tokens += prompt_tokens
        try:
            if stream:
                return await self._stream(
                    request, stats, chat, model, len(prompts), n_choices, n_out, prompt_tokens, include_usage, output
                )
            if self.token_delay > 0:
                # Keep non-streamed latency consistent with streamed latency.
                await asyncio.sleep(self.token_delay * n_out)
            stats.generation_tokens += n_out * n_choices
            stats.finished["length"] += len(prompts)
            return web.Response(
                body=orjson.dumps(_full_response(chat, model, n_choices, n_out, prompt_tokens, output)),
                content_type=_JSON,
            )
        finally:
            stats.running -= len(prompts)

    async def _stream(
        self,
        request: web.Request,
        stats: _ModelStats,
        chat: bool,
        model: str,
        n_prompts: int,
        n_choices: int,
        n_out: int,
        prompt_tokens: int,
        include_usage: bool,
        output: _Output,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        if chat:
            req_id, obj = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk"
        else:
            req_id, obj = f"cmpl-{uuid.uuid4().hex}", "text_completion"
        created = int(time.time())
        delay = self.token_delay
        generated = 0
        reset_after = self.state["reset_after_chunks"]
        sent = 0

        async def send(data: bytes) -> None:
            nonlocal sent
            if reset_after is not None and sent >= reset_after:
                # Before the event that would exceed the limit, so the client gets
                # exactly `reset_after` events; a stream with no more events than
                # that ends normally.
                _reset_connection(request)
                raise ConnectionResetError("reset injected through /fake/state")
            await response.write(data)
            sent += 1

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": req_id,
                "object": obj,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage is not None:
                chunk["usage"] = usage
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        try:
            if chat:
                # vLLM opens every chat choice with a role-only delta before any text.
                for i in range(n_choices):
                    await send(
                        event(
                            [
                                {
                                    "index": i,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    )
            tokens = _output_tokens(n_out, output.json_mode, output.broken_json)
            tool = output.tool if chat else None
            fragments = _tool_arguments(n_out, output.broken_tool_args) if tool is not None else []
            for t in range(n_out):
                if delay > 0:
                    await asyncio.sleep(delay)
                elif t and t % YIELD_EVERY_TOKENS == 0:
                    await asyncio.sleep(0)
                token = tokens[t]
                finish = ("tool_calls" if tool is not None else "length") if t == n_out - 1 else None
                for i in range(n_choices):
                    if tool is not None:
                        call: dict[str, Any] = {"index": 0, "function": {"arguments": fragments[t]}}
                        if t == 0:
                            call.update(id=f"call_{req_id[-24:]}", type="function")
                            call["function"]["name"] = tool
                        choice: dict[str, Any] = {
                            "index": i,
                            "delta": {"tool_calls": [call]},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    elif chat:
                        choice = {
                            "index": i,
                            "delta": {"content": token},
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    else:
                        choice = {"index": i, "text": token, "logprobs": None, "finish_reason": finish}
                    # One write per event so each goes out as its own HTTP chunk, as in vLLM.
                    await send(event([choice]))
                generated += n_choices
            if include_usage:
                await send(event([], _usage(prompt_tokens, n_out * n_choices)))
            await send(_DONE)
            stats.finished["length"] += n_prompts
        except ConnectionError:
            # Client went away mid-stream (ConnectionResetError / BrokenPipeError), or
            # an injected reset: normal for streaming, nothing to report. aiohttp
            # tolerates the already-broken response being returned.
            pass
        finally:
            stats.generation_tokens += generated
        return response

    # -- embeddings -------------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = await self._admit(request)
            model, max_len, stats = self._resolve_model(body)
            if "input" not in body:
                raise _bad_request("`input` is required.")
            inputs = _embedding_inputs(body["input"])
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise _bad_request(f"Unsupported encoding_format: {fmt!r}.")
            for _, p in inputs:
                if p > max_len:
                    raise _bad_request(
                        f"This model's maximum context length is {max_len} tokens. However, you requested "
                        f"{p} tokens in the input for embedding generation. Please reduce the length of "
                        "the input."
                    )
        except _ApiError as exc:
            return exc.response()

        data: list[dict[str, Any]] = []
        for i, (key, _) in enumerate(inputs):
            vec = _embedding(key)
            # The openai Python client asks for base64 by default, so this path is not exotic.
            emb: list[float] | str = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        prompt_tokens = sum(p for _, p in inputs)
        stats.prompt_tokens += prompt_tokens
        stats.finished["stop"] += len(inputs)
        payload = {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _full_response(
    chat: bool, model: str, n_choices: int, n_out: int, prompt_tokens: int, output: _Output
) -> dict[str, Any]:
    text = "".join(_output_tokens(n_out, output.json_mode, output.broken_json))
    choices: list[dict[str, Any]]
    if chat and output.tool is not None:
        arguments = "".join(_tool_arguments(n_out, output.broken_tool_args))
        choices = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{uuid.uuid4().hex[:24]}",
                            "type": "function",
                            "function": {"name": output.tool, "arguments": arguments},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
            for i in range(n_choices)
        ]
        req_id, obj = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
    elif chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
                "logprobs": None,
            }
            for i in range(n_choices)
        ]
        req_id, obj = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
    else:
        choices = [{"index": i, "text": text, "finish_reason": "length", "logprobs": None} for i in range(n_choices)]
        req_id, obj = f"cmpl-{uuid.uuid4().hex}", "text_completion"
    return {
        "id": req_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(prompt_tokens, n_out * n_choices),
    }


def build_app(
    name: str,
    models: dict[str, int] | None = None,
    token_delay_s: float = 0.0,
    default_max_tokens: int = 16,
    state: dict[str, Any] | None = None,
) -> web.Application:
    """Build the fake server.

    `models` maps served model name -> max_model_len. When it is None or empty any
    model name is accepted (with max_model_len 8192), because the gateway rewrites
    model names and tests should not have to mirror its routing table.

    `state` sets initial /fake/state knobs; invalid knobs raise ValueError.
    """
    try:
        fake = _FakeVllm(name, models, token_delay_s, default_max_tokens, state)
    except _ApiError as exc:
        raise ValueError(exc.message) from None
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app.on_response_prepare.append(fake.on_prepare)
    routes: Sequence[tuple[str, str, Any]] = (
        ("GET", "/health", fake.health),
        ("GET", "/v1/models", fake.list_models),
        ("GET", "/metrics", fake.metrics),
        ("POST", "/v1/chat/completions", fake.chat_completions),
        ("POST", "/v1/completions", fake.completions),
        ("POST", "/v1/embeddings", fake.embeddings),
        ("GET", "/debug/requests", fake.debug_requests),
        ("DELETE", "/debug/requests", fake.debug_clear),
        ("GET", "/fake/state", fake.get_state),
        ("PUT", "/fake/state", fake.put_state),
    )
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    # Without these, a wrong method on a known path would fall through to the
    # catch-all below and be reported as 404 instead of 405.
    for path in dict.fromkeys(path for _, path, _ in routes):
        app.router.add_route("*", path, fake.method_not_allowed)
    # A route rather than a middleware keeps the hot path free of an extra wrapper.
    app.router.add_route("*", "/{tail:.*}", fake.not_found)
    return app


async def serve(
    host: str,
    port: int,
    name: str,
    models: dict[str, int] | None = None,
    token_delay_s: float = 0.0,
    state: dict[str, Any] | None = None,
) -> None:
    """Serve until cancelled."""
    app = build_app(name, models, token_delay_s, state=state)
    # A short shutdown timeout: a stopping fake should not hold tests hostage to
    # in-flight streams.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        # Logged (not printed) so embedding callers stay quiet; the address shows the
        # real port when 0 was asked for.
        for addr in runner.addresses:
            log.info("fake-vllm %s listening on http://%s:%s", name, addr[0], addr[1])
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _model_arg(value: str) -> tuple[str, int]:
    model, sep, max_len = value.rpartition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"expected NAME=MAXLEN, got {value!r}")
    try:
        n = int(max_len)
    except ValueError:
        raise argparse.ArgumentTypeError(f"MAXLEN must be an integer, got {max_len!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"MAXLEN must be positive, got {n}")
    return model, n


def _state_arg(value: str) -> dict[str, Any]:
    try:
        return _checked_state_update(orjson.loads(value))
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    except _ApiError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


DESCRIPTION = "Fake vLLM OpenAI-compatible server."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True, help="value of the x-served-by response header")
    p.add_argument(
        "--model",
        type=_model_arg,
        action="append",
        default=[],
        metavar="NAME=MAXLEN",
        help="served model and its max_model_len (repeatable); omit to accept any model",
    )
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="delay per generated token")
    p.add_argument(
        "--state",
        type=_state_arg,
        default=None,
        metavar="JSON",
        help="initial /fake/state knobs, e.g. '{\"num_requests_waiting\": 5}'",
    )


async def _run_until_signal(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not available off the main thread or on Windows; the caller then stops us
        # by other means.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    server = asyncio.create_task(
        serve(args.host, args.port, args.name, dict(args.model) or None, args.token_delay_ms / 1000.0, args.state)
    )
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            # Re-raises startup failures such as "address already in use".
            await server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-vllm", description=DESCRIPTION)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run_until_signal(args))
    except KeyboardInterrupt:
        # A second Ctrl-C before our handler is installed; still a requested stop.
        return 0
    except OSError as exc:
        print(f"fake-vllm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
