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

import aiohttp
import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from extproc_dev.fake_vllm import build_app
from extproc_dev.stack import free_port

ROOT = Path(__file__).resolve().parent.parent

Client = TestClient[Any, Any]


def run_with_client(
    test: Callable[[Client], Awaitable[None]],
    *,
    name: str = "up-a",
    models: dict[str, int] | None = None,
    token_delay_s: float = 0.0,
    state: dict[str, Any] | None = None,
) -> None:
    async def runner() -> None:
        app = build_app(name, models=models, token_delay_s=token_delay_s, state=state)
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


def parse_metrics(text: str) -> dict[tuple[str, ...], float]:
    """Samples keyed by (name, model_name, any further label values in order)."""
    out: dict[tuple[str, ...], float] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\S+)\{(.*)\} (\S+)", line)
        if m:
            labels = re.findall(r'(\w+)="([^"]*)"', m.group(2))
            assert labels[0][0] == "model_name", line
            out[(m.group(1), *(v for _, v in labels))] = float(m.group(3))
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
        assert values[("vllm:request_success_total", "a", "length")] == 2
        assert values[("vllm:request_success_total", "a", "stop")] == 0
        assert values[("vllm:prompt_tokens_total", "b")] == 0
        assert values[("vllm:request_success_total", "b", "length")] == 0
        assert 'vllm:request_success_total{model_name="a",finished_reason="length"} 2.0' in text

        # Pooling requests finish as "stop" in vLLM.
        await post_json(c, "/v1/embeddings", {"model": "a", "input": ["x", "y"]})
        values = parse_metrics(await (await c.get("/metrics")).text())
        assert values[("vllm:request_success_total", "a", "stop")] == 2
        assert values[("vllm:request_success_total", "a", "length")] == 2

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
        assert values[("vllm:request_success_total", "fake-model", "length")] == 0
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


# -- runtime state: PUT/GET /fake/state ------------------------------------------------

DEFAULT_STATE = {
    "num_requests_waiting": None,
    "num_requests_running": None,
    "kv_cache_usage_perc": None,
    "legacy_kv_metric": None,
    "reset_after_chunks": None,
    "status": None,
    "delay_ms": None,
    "token_delay_ms": None,
    "version": None,
    "broken_json": None,
    "broken_tool_args": None,
}


async def get_state(client: Client) -> Any:
    resp = await client.get("/fake/state")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return await resp.json()


async def put_state(client: Client, update: Any) -> ClientResponse:
    return await client.put("/fake/state", data=orjson.dumps(update), headers={"content-type": "application/json"})


async def history(client: Client) -> list[Any]:
    return list((await (await client.get("/debug/requests")).json())["requests"])


def test_state_defaults_merge_and_clear() -> None:
    async def t(c: Client) -> None:
        assert await get_state(c) == DEFAULT_STATE

        r = await put_state(c, {"num_requests_waiting": 3, "delay_ms": 0})
        assert r.status == 200
        assert r.headers["x-served-by"] == "up-a"
        # The answer is the whole state after the merge.
        assert await r.json() == {**DEFAULT_STATE, "num_requests_waiting": 3, "delay_ms": 0}

        r = await put_state(c, {"kv_cache_usage_perc": 0.5, "legacy_kv_metric": True})
        assert r.status == 200
        merged = {**DEFAULT_STATE, "num_requests_waiting": 3, "delay_ms": 0, "kv_cache_usage_perc": 0.5}
        assert await get_state(c) == {**merged, "legacy_kv_metric": True}

        # null clears one knob and leaves the others alone; {} changes nothing.
        assert (await put_state(c, {"num_requests_waiting": None, "legacy_kv_metric": None})).status == 200
        assert (await put_state(c, {})).status == 200
        assert await get_state(c) == {**merged, "num_requests_waiting": None}

        # Control traffic is not what the gateway forwarded, so it is not recorded.
        await c.post("/fake/state", data=b"{}")  # wrong method
        await c.get("/fake/nothing")
        assert await history(c) == []

    run_with_client(t)


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps({"bogus": 1}),
        orjson.dumps({"num_requests_waiting": 1, "bogus": 2}),  # valid part is not applied either
        orjson.dumps({"num_requests_waiting": -1}),
        orjson.dumps({"num_requests_running": "2"}),
        orjson.dumps({"kv_cache_usage_perc": 1.5}),
        orjson.dumps({"legacy_kv_metric": 1}),
        orjson.dumps({"reset_after_chunks": True}),
        orjson.dumps({"reset_after_chunks": 2.5}),
        orjson.dumps({"status": 200}),
        orjson.dumps({"status": 600}),
        orjson.dumps({"status": 503.0}),
        orjson.dumps({"delay_ms": -5}),
        orjson.dumps({"num_requests_waiting": 0, "status": 700}),
        b"[1, 2]",
        b"null",
        b'"status"',
        b"{broken",
        b"",
    ],
)
def test_state_rejects_bad_updates_and_changes_nothing(raw: bytes) -> None:
    async def t(c: Client) -> None:
        baseline = {**DEFAULT_STATE, "num_requests_waiting": 2, "status": 503}
        assert (await put_state(c, {"num_requests_waiting": 2, "status": 503})).status == 200
        r = await c.put("/fake/state", data=raw, headers={"content-type": "application/json"})
        assert r.status == 400
        assert r.headers["x-served-by"] == "up-a"
        assert_vllm_error(await r.json(), 400, "BadRequestError")
        assert await get_state(c) == baseline

    run_with_client(t)


def test_state_overrides_metrics() -> None:
    async def t(c: Client) -> None:
        assert (
            await put_state(c, {"num_requests_waiting": 7, "num_requests_running": 3, "kv_cache_usage_perc": 0.25})
        ).status == 200
        text = await (await c.get("/metrics")).text()
        values = parse_metrics(text)
        # Pod-wide figures: on the first model's series, so sums and maxes over series match.
        assert values[("vllm:num_requests_waiting", "a")] == 7
        assert values[("vllm:num_requests_running", "a")] == 3
        assert values[("vllm:kv_cache_usage_perc", "a")] == 0.25
        assert values[("vllm:num_requests_waiting", "b")] == 0
        assert values[("vllm:num_requests_running", "b")] == 0
        assert values[("vllm:kv_cache_usage_perc", "b")] == 0
        assert 'vllm:num_requests_waiting{model_name="a"} 7.0' in text

        # One knob at a time: the others keep the live figures.
        await put_state(c, {"num_requests_running": None, "kv_cache_usage_perc": None})
        values = parse_metrics(await (await c.get("/metrics")).text())
        assert values[("vllm:num_requests_waiting", "a")] == 7
        assert values[("vllm:num_requests_running", "a")] == 0
        assert values[("vllm:kv_cache_usage_perc", "a")] == 0

        # Older vLLM releases name the KV figure differently; the value follows the name.
        await put_state(c, {"legacy_kv_metric": True, "kv_cache_usage_perc": 0.5})
        text = await (await c.get("/metrics")).text()
        assert "vllm:kv_cache_usage_perc" not in text
        assert "# TYPE vllm:gpu_cache_usage_perc gauge" in text
        assert "# HELP vllm:gpu_cache_usage_perc " in text
        assert parse_metrics(text)[("vllm:gpu_cache_usage_perc", "a")] == 0.5

        await put_state(c, dict(DEFAULT_STATE))
        text = await (await c.get("/metrics")).text()
        assert "vllm:gpu_cache_usage_perc" not in text
        values = parse_metrics(text)
        assert values[("vllm:num_requests_waiting", "a")] == 0
        assert values[("vllm:kv_cache_usage_perc", "a")] == 0

    run_with_client(t, models={"a": 1000, "b": 1000})


INFERENCE = [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True}),
    ("/v1/completions", {"model": "m", "prompt": "a b", "max_tokens": 2}),
    ("/v1/completions", {"model": "m", "prompt": "a b", "max_tokens": 2, "stream": True}),
    ("/v1/embeddings", {"model": "m", "input": "a b"}),
]


@pytest.mark.parametrize(
    ("status", "err_type"),
    [
        (503, "ServiceUnavailableError"),
        (429, "TooManyRequestsError"),
        (500, "InternalServerError"),
        (400, "BadRequestError"),
        (599, "InternalServerError"),  # no standard phrase
    ],
)
def test_state_status_fails_every_inference_request(status: int, err_type: str) -> None:
    async def t(c: Client) -> None:
        assert (await put_state(c, {"status": status})).status == 200
        # A request the fake would refuse anyway gets the injected status too.
        for path, body in [*INFERENCE, ("/v1/chat/completions", {"model": "m"})]:
            r = await post_json(c, path, body)
            assert r.status == status, path
            assert r.content_type == "application/json"
            assert r.headers["x-served-by"] == "up-a"
            msg = assert_vllm_error(await r.json(), status, err_type)
            assert str(status) in msg
        # Probes and metrics keep working, and the failed requests are still recorded.
        assert (await c.get("/health")).status == 200
        assert (await c.get("/v1/models")).status == 200
        assert len(await history(c)) == len(INFERENCE) + 2  # + /v1/models
        values = parse_metrics(await (await c.get("/metrics")).text())
        assert values[("vllm:request_success_total", "fake-model", "length")] == 0
        assert values[("vllm:request_success_total", "fake-model", "stop")] == 0
        assert values[("vllm:prompt_tokens_total", "fake-model")] == 0

        await put_state(c, {"status": None})
        for path, body in INFERENCE:
            r = await post_json(c, path, body)
            assert r.status == 200, path
            await r.read()

    run_with_client(t)


def test_state_delay_ms_delays_first_byte() -> None:
    delay = 0.3

    async def t(c: Client) -> None:
        await put_state(c, {"delay_ms": delay * 1000})
        for path, body in INFERENCE:
            start = time.monotonic()
            r = await post_json(c, path, body)  # returns once the status line is in
            assert time.monotonic() - start >= delay * 0.9, path
            assert r.status == 200
            await r.read()
        # Only inference is delayed, so a scraper does not time out on a "slow" fake.
        start = time.monotonic()
        assert (await c.get("/metrics")).status == 200
        assert (await c.get("/fake/state")).status == 200
        assert time.monotonic() - start < delay

        # Combined with a status: the error arrives late, as from a struggling engine.
        await put_state(c, {"status": 503})
        start = time.monotonic()
        r = await post_json(c, *INFERENCE[0])
        assert r.status == 503
        assert time.monotonic() - start >= delay * 0.9

    run_with_client(t)


@pytest.mark.parametrize("n", [0, 1, 4])
def test_state_reset_after_chunks_cuts_the_stream(n: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = {**CHAT, "max_tokens": 10, "stream": True}

    async def t(c: Client) -> None:
        await put_state(c, {"reset_after_chunks": n})

        # An HTTP client sees an error, never a clean end, after exactly n events.
        events: list[bytes] = []
        with pytest.raises(aiohttp.ClientError):
            r = await post_json(c, "/v1/chat/completions", body)
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line)
        assert len(events) == n
        assert b"data: [DONE]\n" not in events

        # On the wire it is a TCP reset, not a FIN.
        raw = orjson.dumps(body)
        reader, writer = await asyncio.open_connection(c.server.host, c.server.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(raw) + raw
        )
        received = b""
        with pytest.raises(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
        writer.close()
        assert received.count(b"data: ") == n

        # An aborted stream is not a success and leaves nothing running.
        values = parse_metrics(await (await c.get("/metrics")).text())
        assert values[("vllm:num_requests_running", "fake-model")] == 0
        assert values[("vllm:request_success_total", "fake-model", "length")] == 0

        # Non-streamed responses are not affected, and a stream that fits ends normally.
        r = await post_json(c, "/v1/chat/completions", {**CHAT, "max_tokens": 10})
        assert r.status == 200
        await put_state(c, {"reset_after_chunks": 100})
        assert (await read_sse(await post_json(c, "/v1/chat/completions", body)))[-1] == "[DONE]"
        await put_state(c, {"reset_after_chunks": None})
        assert (await read_sse(await post_json(c, "/v1/chat/completions", body)))[-1] == "[DONE]"

    run_with_client(t)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]


def test_initial_state_from_build_app() -> None:
    async def t(c: Client) -> None:
        assert await get_state(c) == {**DEFAULT_STATE, "num_requests_waiting": 2}
        assert parse_metrics(await (await c.get("/metrics")).text())[("vllm:num_requests_waiting", "fake-model")] == 2

    run_with_client(t, state={"num_requests_waiting": 2})
    with pytest.raises(ValueError, match="bogus"):
        build_app("x", state={"bogus": 1})


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
            "extproc_dev.fake_vllm",
            "--port",
            str(port),
            "--name",
            "x",
            "--model",
            "m=128",
            "--token-delay-ms",
            "1",
            "--state",
            '{"num_requests_waiting": 4}',
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
        status, _, body = _get(base + "/fake/state")
        assert status == 200 and orjson.loads(body)["num_requests_waiting"] == 4

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_main_rejects_bad_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    from extproc_dev.fake_vllm import main

    with pytest.raises(SystemExit) as exc:
        main(["--port", "1", "--name", "x", "--model", "nomaxlen"])
    assert exc.value.code == 2
    assert "NAME=MAXLEN" in capsys.readouterr().err


def test_main_rejects_bad_state(capsys: pytest.CaptureFixture[str]) -> None:
    from extproc_dev.fake_vllm import main

    for state in ('{"bogus": 1}', '{"status": 200}', "{not json", "[]"):
        with pytest.raises(SystemExit) as exc:
            main(["--port", "1", "--name", "x", "--state", state])
        assert exc.value.code == 2
        assert "--state" in capsys.readouterr().err
