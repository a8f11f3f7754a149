"""A corpus of hostile requests through real Envoy, the real gateway and the fake vLLMs.

Every case must get a clear 4xx OpenAI-shaped JSON error (`{"error": {"message", "type", "param",
"code"}}`) or pass through to a backend and come back as a normal answer; none may get a 5xx.
After the corpus the gateway is still alive, has logged no internal error, and its resident memory
has not grown between the last passes of the corpus (a leak would grow it every pass).

Policy: the example policy, with the `demo` tenant's request rate raised so that several passes of
the corpus are not cut short by its own 600 requests per minute (a 429 would hide what is tested).
More passes: EXTPROC_CORPUS_PASSES=10 .venv/bin/pytest tests/test_hostile_corpus.py
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc_dev.stack import LocalStack, free_port, running

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_POLICY = ROOT / "extproc" / "examples" / "policy.yaml"
PASSES = max(3, int(os.environ.get("EXTPROC_CORPUS_PASSES", "3")))
RSS_GROWTH_LIMIT_KB = 16 * 1024  # over the last pass; a pass sends ~22 MB of bodies
JSON = "application/json"
AUTH = {"authorization": "Bearer sk-demo", "content-type": JSON}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "llama3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


@dataclass
class Case:
    name: str
    body: bytes | None = None
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str | bytes] = field(default_factory=lambda: dict(AUTH))
    chunked: bool = False  # no content-length: transfer-encoding chunked
    status: int | None = None  # the status expected; None: any 4xx or a passed-through 200
    code: str | None = None  # the error code expected with a 4xx
    check: Callable[[dict[str, Any]], None] | None = None  # more about a 200's JSON


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"1" + b"]" * levels


def _wrong_types() -> Iterator[Case]:
    """Every field of each endpoint, with a value of every wrong JSON type."""
    values: list[Any] = [None, True, 0, -1, 1.5, "x", [], {}, [None], {"a": 1}]
    endpoints = {
        "/v1/chat/completions": (
            chat(),
            [
                "model",
                "messages",
                "max_tokens",
                "max_completion_tokens",
                "n",
                "stream",
                "stream_options",
                "stop",
                "tools",
                "response_format",
                "temperature",
                "logit_bias",
            ],
        ),
        "/v1/completions": (
            {"model": "llama3", "prompt": "Hi", "max_tokens": 4},
            ["model", "prompt", "max_tokens", "n", "stream", "stream_options", "stop", "echo"],
        ),
        "/v1/embeddings": ({"model": "bge-m3", "input": "Hi"}, ["model", "input", "encoding_format", "dimensions"]),
    }
    for path, (base, fields) in endpoints.items():
        for name in fields:
            for value in values:
                yield Case(f"{path} {name}={json.dumps(value)}", _json({**base, name: value}), path=path)
    message_fields = {"role": values, "content": values, "name": values, "tool_calls": values}
    for name, choices in message_fields.items():
        for value in choices:
            message = {"role": "user", "content": "Hi", name: value}
            yield Case(f"messages[0].{name}={json.dumps(value)}", _json(chat(messages=[message])))
    for value in values:
        yield Case(f"messages[0]={json.dumps(value)}", _json(chat(messages=[value])))
        yield Case(f"content part {json.dumps(value)}", _json(chat(messages=[{"role": "user", "content": [value]}])))


def _served(expected_model: str) -> Callable[[dict[str, Any]], None]:
    def check(answer: dict[str, Any]) -> None:
        assert answer["model"] == expected_model, answer

    return check


def corpus() -> list[Case]:
    cases = [
        # Not UTF-8, not JSON, nothing at all.
        Case(
            "invalid utf-8 in a string",
            b'{"model": "llama3", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            status=400,
            code="invalid_json",
        ),
        Case(
            "latin-1 body",
            '{"model": "llama3", "messages": [{"role": "user", "content": "é"}]}'.encode("latin-1"),
            status=400,
            code="invalid_json",
        ),
        Case("utf-16 body", _json(chat()).decode().encode("utf-16"), status=400, code="invalid_json"),
        Case("byte order mark", b"\xef\xbb\xbf" + _json(chat()), status=400, code="invalid_json"),
        Case(
            "lone surrogate escape",
            b'{"model": "llama3", "messages": [{"role": "user", "content": "\\ud800"}]}',
            status=400,
            code="invalid_json",
        ),
        Case("NUL bytes", b"\x00" * 64, status=400, code="invalid_json"),
        Case("empty body", b"", status=400),
        Case("whitespace-only body", b" \r\n\t  ", status=400, code="invalid_json"),
        Case("JSON null", b"null", status=400),
        Case("JSON array", b"[]", status=400),
        Case("JSON string", b'"hello"', status=400),
        Case("truncated JSON", _json(chat())[:-3], status=400, code="invalid_json"),
        Case("trailing garbage", _json(chat()) + b"}", status=400, code="invalid_json"),
        Case("two documents", _json(chat()) + _json(chat()), status=400, code="invalid_json"),
        Case(
            "NaN literal",
            b'{"model": "llama3", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
            status=400,
            code="invalid_json",
        ),
        # Nesting.
        Case("10,000 levels", _deep(10_000), status=400, code="invalid_json"),
        Case(
            "10,000 levels in a field",
            _json(chat())[:-1] + b', "x": ' + _deep(10_000) + b"}",
            status=400,
            code="invalid_json",
        ),
        Case(
            "300 levels in a field (parsed, not writable)",
            _json(chat())[:-1] + b', "x": ' + _deep(300) + b"}",
            status=400,
        ),
        Case("300 levels in tools", _json(chat())[:-1] + b', "tools": ' + _deep(300) + b"}", status=400),
        Case("100 levels in a field", _json(chat())[:-1] + b', "x": ' + _deep(100) + b"}", status=200),
        # Numbers.
        Case("max_tokens 1e400", _json(chat())[:-1] + b', "max_tokens": 1e400}', status=400, code="invalid_json"),
        Case("max_tokens 2**4096", _json(chat())[:-1] + b', "max_tokens": ' + str(2**4096).encode() + b"}", status=400),
        Case("max_tokens u64 max", _json(chat(max_tokens=2**64 - 1)), status=200),  # clamped to the cap
        Case("max_tokens 1e-400", _json(chat())[:-1] + b', "max_tokens": 1e-400}', status=400),
        Case("max_tokens -0", _json(chat())[:-1] + b', "max_tokens": -0}', status=400),
        Case("n u64 max", _json(chat(n=2**64 - 1)), status=429, code="rate_limit_exceeded"),
        Case("temperature 1e308", _json(chat(temperature=1e308)), status=200),
        Case(
            "prompt token ids out of range",
            _json({"model": "llama3", "prompt": [2**63, -1], "max_tokens": 2}),
            path="/v1/completions",
        ),
        # Duplicate keys: the last one counts, for us and for vLLM.
        Case(
            "duplicate model",
            b'{"model": "nope", "model": "llama3", "messages": [{"role": "user", "content": "Hi"}]}',
            status=200,
            check=_served("meta-llama/Llama-3.1-8B-Instruct"),
        ),
        Case(
            "duplicate model, last unknown",
            b'{"model": "llama3", "model": "nope", "messages": [{"role": "user", "content": "Hi"}]}',
            status=404,
            code="model_not_found",
        ),
        Case(
            "duplicate messages",
            b'{"model": "llama3", "messages": 5, "messages": [{"role": "user", "content": "x"}]}',
            status=200,
        ),
        # Multimodal content.
        Case(
            "image_url part",
            _json(
                chat(
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is this?"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                            ],
                        }
                    ]
                )
            ),
            status=200,
        ),
        Case(
            "input_audio part",
            _json(
                chat(
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}}
                            ],
                        }
                    ]
                )
            ),
            status=200,
        ),
        Case(
            "text part without text",
            _json(chat(messages=[{"role": "user", "content": [{"type": "text"}]}])),
            status=400,
        ),
        Case("part without type", _json(chat(messages=[{"role": "user", "content": [{"text": "Hi"}]}])), status=400),
        # Sizes and encodings.
        Case(
            "10 MB body",
            _json(chat(messages=[{"role": "user", "content": "a" * 10_000_000}])),
            status=413,
            code="request_too_large",
        ),
        Case(
            "10 MB chunked body",
            _json(chat(messages=[{"role": "user", "content": "a" * 10_000_000}])),
            chunked=True,
            status=413,
        ),
        Case(
            "just under the limit, a long prompt",
            _json(chat(messages=[{"role": "user", "content": "word " * 200_000}])),
            status=400,
            code="prompt_too_long",
        ),
        Case(
            "gzip body",
            gzip.compress(_json(chat())),
            headers={**AUTH, "content-encoding": "gzip"},
            status=400,
            code="invalid_json",
        ),
        Case(
            "chunked upload", _json(chat()), chunked=True, status=200, check=_served("meta-llama/Llama-3.1-8B-Instruct")
        ),
        Case(
            "chunked upload, rewritten (stop, default max_tokens)",
            _json(
                {
                    "model": "llama3",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "stop": "x",
                    "logit_bias": {"1": 1},
                }
            ),
            chunked=True,
            status=200,
        ),
        Case("content-length 0 with a body-less POST", b"", status=400),
        # Methods.
        Case("GET with a body", _json(chat()), method="GET", status=405, code="method_not_allowed"),
        Case("HEAD with a body", _json(chat()), method="HEAD", status=405),
        Case("PUT", _json(chat()), method="PUT", status=405, code="method_not_allowed"),
        Case("GET /v1/models with a body", _json(chat()), method="GET", path="/v1/models", status=200),
        # Headers: obs-text and non-UTF-8 values reach the gateway (control bytes do not: Envoy refuses them).
        Case(
            "API key with obs-text",
            _json(chat()),
            headers={**AUTH, "authorization": b"Bearer sk-d\xe9mo"},
            status=401,
            code="invalid_api_key",
        ),
        Case(
            "API key with invalid UTF-8",
            _json(chat()),
            headers={**AUTH, "authorization": b"Bearer sk-demo\xff"},
            status=401,
            code="invalid_api_key",
        ),
        Case(
            "x-api-key obs-text",
            _json(chat()),
            headers={"content-type": JSON, "x-api-key": b"\x80\xff\xfe"},
            status=401,
            code="invalid_api_key",
        ),
        Case("no API key", _json(chat()), headers={"content-type": JSON}, status=401, code="invalid_api_key"),
        Case(
            "obs-text class and quality",
            _json(chat()),
            headers={**AUTH, "x-llm-class": b"b\xe4tch", "x-llm-quality": b"h\xefgh", "x-request-id": b"\xff\xfe"},
            status=200,
        ),
        Case(
            "forged routing header in obs-text",
            _json(chat()),
            headers={**AUTH, "x-llm-backend": b"b\xe4tch-pool"},
            status=200,
            check=_served("meta-llama/Llama-3.1-8B-Instruct"),
        ),
        Case(
            "content-type obs-text",
            _json(chat()),
            headers={**AUTH, "content-type": b"application/j\xe9son"},
            status=415,
            code="unsupported_media_type",
        ),
        Case("content-type text/plain", _json(chat()), headers={**AUTH, "content-type": "text/plain"}, status=415),
        Case(
            "content-type +json", _json(chat()), headers={**AUTH, "content-type": "application/vnd.x+json"}, status=200
        ),
    ]
    return cases + list(_wrong_types())


# --- the client: raw HTTP/1.1, so that every byte is ours --------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: the connection was closed with no response
    headers: dict[str, str]
    body: bytes
    # The server closed before reading all of the body we sent (or were sending): its early answer
    # (a 413) can then be lost to the TCP reset the unread bytes provoke, before we read it, even
    # when every send had succeeded into the socket's buffer. HTTP/1.1 has no cure for that.
    cut_while_sending: bool = False


def send(port: int, case: Case) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    cut = False
    try:
        connection.putrequest(case.method, case.path, skip_accept_encoding=True)
        for key, value in case.headers.items():
            connection.putheader(key, value)
        body = case.body
        if case.chunked:
            connection.putheader("transfer-encoding", "chunked")
        elif body is not None:
            connection.putheader("content-length", str(len(body)))
        connection.endheaders()
        if body is not None:
            if case.chunked:
                for start in range(0, len(body), 65536):
                    piece = body[start : start + 65536]
                    try:
                        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                    except OSError:
                        cut = True
                        break  # Envoy answered (413) and closed while we were still sending
                else:
                    connection.send(b"0\r\n\r\n")
            else:
                # An early answer (413 on content-length) may close before the whole body left.
                try:
                    connection.send(body)
                except OSError:
                    cut = True
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return Answer(None, {}, b"", cut or case.body is not None)
    finally:
        connection.close()


def assert_answer(case: Case, answer: Answer) -> None:
    where = f"{case.name}: {answer.status} {answer.body[:300]!r}"
    if answer.status is None and answer.cut_while_sending and case.status == 413:
        return  # Envoy refused the oversized body and closed; the reset beat its 413 to us
    assert answer.status is not None, f"{case.name}: connection closed with no response"
    assert answer.status < 500, where
    if case.status is not None:
        assert answer.status == case.status, where
    if case.method == "HEAD":
        return  # no body by definition
    if answer.status >= 400:
        assert answer.headers.get("content-type", "").startswith(JSON), where
        payload = json.loads(answer.body)
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, where
        assert isinstance(payload["error"]["message"], str) and payload["error"]["message"], where
        if case.code is not None:
            assert payload["error"]["code"] == case.code, where
        return
    assert answer.status == 200, where
    if answer.headers.get("content-type", "").startswith("text/event-stream"):  # `stream: true` among the cases
        assert answer.body.endswith(b"data: [DONE]\n\n"), where
        return
    payload = json.loads(answer.body)
    assert "choices" in payload or "data" in payload, where
    if case.path != "/v1/models":
        assert "x-served-by" in answer.headers, where  # it went upstream
    if case.check is not None:
        case.check(payload)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    policy["tenants"]["demo"]["limits"]["requests_per_minute"] = 1_000_000
    policy["tenants"]["demo"]["limits"]["tokens_per_minute"] = 100_000_000
    policy["tenants"]["demo"]["limits"]["tokens_per_day"] = 1_000_000_000
    path = tmp_path_factory.mktemp("hostile") / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    with running(LocalStack(path, listen_port=free_port())) as started:
        yield started


def run_corpus(stack: LocalStack, cases: Iterable[Case]) -> None:
    for case in cases:
        assert_answer(case, send(stack.listen_port, case))


def test_control_bytes_in_a_header_never_reach_the_gateway(stack: LocalStack) -> None:
    """Envoy's HTTP/1 codec refuses 0x00-0x1f/0x7f in a value before any filter (see field facts)."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-\x01demo\r\n"
        b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    with socket.create_connection(("127.0.0.1", stack.listen_port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    # Either a bare close or Envoy's own 400: never an answer from upstream, never a 5xx.
    assert received == b"" or received.startswith(b"HTTP/1.1 400"), received[:200]
    assert stack.process("extproc").alive()


def test_hostile_corpus_gets_4xx_or_passes_and_memory_stays_flat(stack: LocalStack) -> None:
    cases = corpus()
    assert len(cases) > 200
    gateway = stack.process("extproc")
    assert gateway.process is not None
    pid = gateway.process.pid
    rss = [rss_kb(pid)]
    for _ in range(PASSES):
        run_corpus(stack, cases)
        rss.append(rss_kb(pid))
    assert gateway.alive()
    # Still serving: a plain request is answered by the backend.
    assert_answer(
        Case("after the corpus", _json(chat()), status=200), send(stack.listen_port, Case("ok", _json(chat())))
    )
    assert stack.work_dir is not None
    log = (stack.work_dir / "extproc.log").read_text(errors="replace")
    assert "Traceback" not in log and '"internal_error"' not in log
    # The first pass fills the bounded caches (header encodings, token counts); after it, the last pass
    # may not end above the highest earlier one by more than the allowance (allocator noise is ~5 MB).
    growth = rss[-1] - max(rss[1:-1])
    print(f"extproc RSS (kB) at start and after each of {PASSES} passes of {len(cases)} cases: {rss}")
    assert growth <= RSS_GROWTH_LIMIT_KB, f"RSS grew {growth} kB over the earlier passes' peak: {rss}"
