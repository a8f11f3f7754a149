"""Tests for the fake vLLM upstream.

Deliberately plain sync tests driving `asyncio.run`, so they do not depend on how
pytest-asyncio is configured for the rest of the suite.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from extproc.fake_vllm import build_app
from extproc.stack import free_port

ROOT = Path(__file__).resolve().parent.parent

Client = TestClient[Any, Any]


def run_with_client(
    test: Callable[[Client], Awaitable[None]],
    *,
    name: str = "up-a",
    models: dict[str, int] | None = None,
    token_delay_s: float = 0.0,
) -> None:
    async def runner() -> None:
        app = build_app(name, models=models, token_delay_s=token_delay_s)
        async with TestClient(TestServer(app)) as client:
            await test(client)

    asyncio.run(runner())


async def post_json(client: Client, path: str, body: Any) -> ClientResponse:
    return await client.post(path, data=orjson.dumps(body), headers={"content-type": "application/json"})


async def read_sse(resp: ClientResponse) -> list[Any]:
    """Events in order; `[DONE]` is returned as the string "[DONE]"."""
    events: list[Any] = []
    text = await resp.text()
    assert text.endswith("\n\n")
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append("[DONE]" if payload == "[DONE]" else orjson.loads(payload))
    return events


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'(\S+)\{model_name="([^"]*)"\} (\S+)', line)
        if m:
            out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


async def running(client: Client, model: str = "fake-model") -> float:
    resp = await client.get("/metrics")
    return parse_metrics(await resp.text())[("vllm:num_requests_running", model)]


def assert_vllm_error(body: Any, code: int, err_type: str) -> str:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == err_type
    assert err["code"] == code
    assert err["param"] is None
    assert isinstance(err["message"], str)
    return str(err["message"])


CHAT = {"model": "whatever", "messages": [{"role": "user", "content": "hello there world"}]}


def test_x_served_by_on_every_response() -> None:
    async def t(c: Client) -> None:
        responses = [
            await c.get("/health"),
            await c.get("/v1/models"),
            await c.get("/metrics"),
            await c.get("/no/such/path"),
            await c.get("/v1/chat/completions"),  # wrong method
            await c.post("/v1/chat/completions", data=b"{not json"),
            await post_json(c, "/v1/chat/completions", {**CHAT, "max_tokens": 0}),
            await post_json(c, "/v1/chat/completions", {**CHAT, "max_tokens": 2}),
            await post_json(c, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True}),
            await post_json(c, "/v1/embeddings", {"model": "e", "input": "x"}),
            await c.get("/debug/requests"),
        ]
        statuses = []
        for r in responses:
            await r.read()
            statuses.append(r.status)
            assert r.headers["x-served-by"] == "up-a", (r.status, r.url)
        assert statuses == [200, 200, 200, 404, 405, 400, 400, 200, 200, 200, 200]

    run_with_client(t)


def test_health_and_models() -> None:
    async def t(c: Client) -> None:
        r = await c.get("/health")
        assert r.status == 200
        assert await r.read() == b""
        r = await c.get("/v1/models")
        body = await r.json()
        assert body["object"] == "list"
        (model,) = body["data"]
        assert model["id"] == model["root"] == "fake-model"
        assert model["max_model_len"] == 8192
        assert model["owned_by"] == "vllm" and model["parent"] is None
        assert isinstance(model["created"], int)

    run_with_client(t)

    async def t2(c: Client) -> None:
        body = await (await c.get("/v1/models")).json()
        assert [(m["id"], m["max_model_len"]) for m in body["data"]] == [("a", 100), ("b", 200)]

    run_with_client(t2, models={"a": 100, "b": 200})


def test_unknown_path_is_vllm_style_404() -> None:
    async def t(c: Client) -> None:
        r = await c.post("/v2/nothing", data=b"{}")
        assert r.status == 404
        assert r.content_type == "application/json"
        assert_vllm_error(await r.json(), 404, "NotFoundError")

    run_with_client(t)


def test_chat_non_stream_usage_and_n() -> None:
    async def t(c: Client) -> None:
        body = {
            "model": "served-name",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
            ],
            "max_tokens": 5,
        }
        r = await post_json(c, "/v1/chat/completions", body)
        assert r.status == 200
        out = await r.json()
        assert out["object"] == "chat.completion"
        assert out["id"].startswith("chatcmpl-")
        assert out["model"] == "served-name"
        (choice,) = out["choices"]
        assert choice["index"] == 0
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"] is None
        assert choice["message"]["role"] == "assistant"
        assert len(choice["message"]["content"].split()) == 5
        # 4 per message + words: (4 + 2) + (4 + 3)
        assert out["usage"] == {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}

        # Deterministic output, and max_completion_tokens wins over max_tokens.
        again = await (await post_json(c, "/v1/chat/completions", {**body, "max_completion_tokens": 3, "n": 2})).json()
        assert [ch["index"] for ch in again["choices"]] == [0, 1]
        assert again["choices"][0]["message"]["content"].split() == choice["message"]["content"].split()[:3]
        assert again["usage"]["completion_tokens"] == 6

        # Without a limit the default (16) applies.
        dflt = await (await post_json(c, "/v1/chat/completions", CHAT)).json()
        assert dflt["usage"]["completion_tokens"] == 16

    run_with_client(t)


def test_completions_non_stream() -> None:
    async def t(c: Client) -> None:
        out = await (
            await post_json(c, "/v1/completions", {"model": "m", "prompt": [1, 2, 3, 4], "max_tokens": 2})
        ).json()
        assert out["object"] == "text_completion"
        assert out["id"].startswith("cmpl-")
        assert out["choices"] == [
            {"index": 0, "text": out["choices"][0]["text"], "finish_reason": "length", "logprobs": None}
        ]
        assert len(out["choices"][0]["text"].split()) == 2
        assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}

    run_with_client(t)


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream(include_usage: bool) -> None:
    async def t(c: Client) -> None:
        body: dict[str, Any] = {**CHAT, "max_tokens": 7, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        r = await post_json(c, "/v1/chat/completions", body)
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(r)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
        assert len({ch["id"] for ch in chunks}) == 1
        assert all(ch["model"] == "whatever" for ch in chunks)

        first = chunks[0]["choices"][0]
        assert first["delta"] == {"role": "assistant", "content": ""}
        assert first["finish_reason"] is None

        content = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")]
        assert len(content) == 7
        assert [ch["choices"][0]["finish_reason"] for ch in content] == [None] * 6 + ["length"]
        assert all(ch["choices"][0]["logprobs"] is None for ch in content)

        usage_chunks = [ch for ch in chunks if "usage" in ch]
        if include_usage:
            assert chunks[-1] is usage_chunks[0]
            assert chunks[-1]["choices"] == []
            assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
            assert len(chunks) == 1 + 7 + 1
        else:
            assert usage_chunks == []
            assert len(chunks) == 1 + 7

    run_with_client(t)


def test_completions_stream_with_usage() -> None:
    async def t(c: Client) -> None:
        body = {
            "model": "m",
            "prompt": "a b c",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = await read_sse(await post_json(c, "/v1/completions", body))
        assert events[-1] == "[DONE]"
        *tokens, usage = events[:-1]
        assert len(tokens) == 4
        assert all(ch["object"] == "text_completion" for ch in tokens)
        assert [ch["choices"][0]["finish_reason"] for ch in tokens] == [None, None, None, "length"]
        assert "".join(ch["choices"][0]["text"] for ch in tokens).split() == [
            "hello",
            "world",
            "fake",
            "vllm",
        ]
        assert usage["choices"] == []
        assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}

    run_with_client(t)


def test_stream_options_without_stream_is_rejected() -> None:
    async def t(c: Client) -> None:
        r = await post_json(c, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}})
        assert r.status == 400
        assert_vllm_error(await r.json(), 400, "BadRequestError")

    run_with_client(t)


def test_context_length_error() -> None:
    async def t(c: Client) -> None:
        prompt = " ".join(["word"] * 30)
        r = await post_json(c, "/v1/completions", {"model": "small", "prompt": prompt, "max_tokens": 16})
        assert r.status == 400
        assert r.content_type == "application/json"
        msg = assert_vllm_error(await r.json(), 400, "BadRequestError")
        assert msg.startswith("This model's maximum context length is 32 tokens. However, you requested 46 tokens")

        # Exactly at the limit is fine.
        ok = await post_json(c, "/v1/completions", {"model": "small", "prompt": prompt, "max_tokens": 2})
        assert ok.status == 200

        r = await post_json(
            c, "/v1/chat/completions", {"model": "small", "messages": [{"role": "user", "content": prompt}]}
        )
        assert r.status == 400
        assert "maximum context length is 32 tokens" in assert_vllm_error(await r.json(), 400, "BadRequestError")

    run_with_client(t, models={"small": 32})


def test_unknown_model_404() -> None:
    async def t(c: Client) -> None:
        for path, body in [
            ("/v1/chat/completions", {**CHAT, "model": "nope"}),
            ("/v1/completions", {"model": "nope", "prompt": "x"}),
            ("/v1/embeddings", {"model": "nope", "input": "x"}),
        ]:
            r = await post_json(c, path, body)
            assert r.status == 404
            assert r.headers["x-served-by"] == "up-a"
            msg = assert_vllm_error(await r.json(), 404, "NotFoundError")
            assert msg == "The model `nope` does not exist."
        # A configured model is served, and an absent model means the first one.
        r = await post_json(c, "/v1/chat/completions", {**CHAT, "model": "known"})
        assert r.status == 200
        r = await post_json(c, "/v1/chat/completions", {"messages": CHAT["messages"]})
        assert (await r.json())["model"] == "known"

    run_with_client(t, models={"known": 4096})


def test_bad_requests() -> None:
    async def t(c: Client) -> None:
        for path, raw in [
            ("/v1/chat/completions", b"{not json"),
            ("/v1/chat/completions", b""),
            ("/v1/chat/completions", b"[1, 2]"),
            ("/v1/chat/completions", orjson.dumps({"model": "m"})),
            ("/v1/chat/completions", orjson.dumps({**CHAT, "n": 0})),
            ("/v1/chat/completions", orjson.dumps({**CHAT, "max_tokens": "3"})),
            ("/v1/completions", orjson.dumps({"model": "m"})),
            ("/v1/completions", orjson.dumps({"model": "m", "prompt": [True]})),
            ("/v1/embeddings", orjson.dumps({"model": "m", "input": []})),
        ]:
            r = await c.post(path, data=raw)
            assert r.status == 400, (path, raw)
            assert_vllm_error(await r.json(), 400, "BadRequestError")

    run_with_client(t)


def test_embeddings() -> None:
    async def t(c: Client) -> None:
        r = await post_json(c, "/v1/embeddings", {"model": "emb", "input": ["a b", "c", "a b"]})
        assert r.status == 200
        out = await r.json()
        assert out["object"] == "list"
        assert out["model"] == "emb"
        assert [d["index"] for d in out["data"]] == [0, 1, 2]
        assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in out["data"])
        vecs = [d["embedding"] for d in out["data"]]
        assert vecs[0] == vecs[2] != vecs[1]
        assert sum(x * x for x in vecs[0]) == pytest.approx(1.0)
        assert out["usage"] == {"prompt_tokens": 5, "total_tokens": 5}

        # Token-id inputs, and the base64 encoding the openai client asks for by default.
        out = await (
            await post_json(
                c, "/v1/embeddings", {"model": "emb", "input": [[1, 2, 3], [4]], "encoding_format": "base64"}
            )
        ).json()
        assert out["usage"]["prompt_tokens"] == 4
        decoded = struct.unpack("<8f", base64.b64decode(out["data"][0]["embedding"]))
        floats = await (await post_json(c, "/v1/embeddings", {"model": "emb", "input": [1, 2, 3]})).json()
        assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)

    run_with_client(t)


def test_metrics_text() -> None:
    async def t(c: Client) -> None:
        ok = await post_json(c, "/v1/chat/completions", {**CHAT, "model": "a", "max_tokens": 3})
        assert ok.status == 200
        await post_json(c, "/v1/completions", {"model": "a", "prompt": "x y", "max_tokens": 2, "stream": True})
        r = await c.get("/metrics")
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = await r.text()
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            assert f"# TYPE {gauge} gauge" in text
            assert f"# HELP {gauge} " in text
        for counter in (
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:request_success_total",
        ):
            assert f"# TYPE {counter} counter" in text
        values = parse_metrics(text)
        assert values[("vllm:num_requests_running", "a")] == 0
        assert values[("vllm:prompt_tokens_total", "a")] == 7 + 2
        assert values[("vllm:generation_tokens_total", "a")] == 3 + 2
        assert values[("vllm:request_success_total", "a")] == 2
        assert values[("vllm:prompt_tokens_total", "b")] == 0

    run_with_client(t, models={"a": 1000, "b": 1000})


def test_running_gauge_tracks_streams_and_survives_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def t(c: Client) -> None:
        body = {**CHAT, "max_tokens": 1000, "stream": True}
        resp = await post_json(c, "/v1/chat/completions", body)
        await resp.content.readline()  # the role chunk
        assert await running(c) == 1
        text = parse_metrics(await (await c.get("/metrics")).text())
        assert text[("vllm:kv_cache_usage_perc", "fake-model")] == pytest.approx(1 / 64)
        await asyncio.sleep(0.1)  # let a few tokens out
        resp.close()  # drop the connection mid-stream
        deadline = time.monotonic() + 5
        while await running(c) != 0:
            assert time.monotonic() < deadline, "running gauge never went back to 0"
            await asyncio.sleep(0.02)
        values = parse_metrics(await (await c.get("/metrics")).text())
        # An aborted stream is not a success, but the tokens it produced were generated.
        assert values[("vllm:request_success_total", "fake-model")] == 0
        assert 0 < values[("vllm:generation_tokens_total", "fake-model")] < 1000

    run_with_client(t, token_delay_s=0.01)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]


def test_non_stream_counts_as_running_while_delayed() -> None:
    async def t(c: Client) -> None:
        task = asyncio.create_task(post_json(c, "/v1/chat/completions", {**CHAT, "max_tokens": 20}))
        await asyncio.sleep(0.1)
        assert await running(c) == 1
        resp = await task
        assert resp.status == 200
        assert await running(c) == 0

    run_with_client(t, token_delay_s=0.01)


def test_debug_requests_records_body_and_content_length() -> None:
    async def t(c: Client) -> None:
        raw = orjson.dumps({**CHAT, "max_tokens": 1})
        await c.post(
            "/v1/chat/completions?x=1",
            data=raw,
            headers={"Content-Type": "application/json", "X-Custom": "Yes"},
        )
        await c.post("/v1/completions", data=b"{broken")
        await c.get("/health")  # probes are not recorded
        rec = (await (await c.get("/debug/requests")).json())["requests"]
        assert len(rec) == 2
        first, second = rec
        assert first["method"] == "POST"
        assert first["path"] == "/v1/chat/completions?x=1"
        assert first["body"] == {**CHAT, "max_tokens": 1}
        assert first["raw_body_length"] == len(raw)
        assert first["headers"]["content-length"] == str(len(raw))
        assert first["headers"]["x-custom"] == "Yes"
        assert second["body"] is None
        assert second["raw_body_length"] == len(b"{broken")

        r = await c.delete("/debug/requests")
        assert r.status < 300
        assert (await (await c.get("/debug/requests")).json())["requests"] == []

    run_with_client(t)


def test_debug_history_is_bounded() -> None:
    async def t(c: Client) -> None:
        for i in range(105):
            await post_json(c, "/v1/embeddings", {"input": str(i)})
        rec = (await (await c.get("/debug/requests")).json())["requests"]
        assert len(rec) == 100
        assert rec[0]["body"]["input"] == "5"

    run_with_client(t)


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_subprocess_serves_and_exits_cleanly_on_sigterm() -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extproc.fake_vllm",
            "--port",
            str(port),
            "--name",
            "x",
            "--model",
            "m=128",
            "--token-delay-ms",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                status, headers, body = _get(base + "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "fake-vllm did not come up"
                time.sleep(0.05)
        assert status == 200 and body == b""
        assert headers["x-served-by"] == "x"
        status, headers, body = _get(base + "/v1/models")
        assert status == 200
        assert [(m["id"], m["max_model_len"]) for m in orjson.loads(body)["data"]] == [("m", 128)]
        status, headers, _ = _get(base + "/nope")
        assert status == 404 and headers["x-served-by"] == "x"

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_main_rejects_bad_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.fake_vllm import main

    with pytest.raises(SystemExit) as exc:
        main(["--port", "1", "--name", "x", "--model", "nomaxlen"])
    assert exc.value.code == 2
    assert "NAME=MAXLEN" in capsys.readouterr().err
