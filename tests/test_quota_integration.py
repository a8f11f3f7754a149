"""Tenants and quotas end to end: real Envoy, four `extproc serve` replicas, real Redis, the openai SDK."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis

from extproc.policy import TokenizerSpec
from extproc.tokenizer import counter_for
from extproc_dev.stack import LocalStack, free_port, running
from tests.redis_server import RedisServer

pytestmark = pytest.mark.envoy

POLICY = Path(__file__).parent / "policies" / "quota.yaml"
TOKEN_DELAY_MS = 100  # each generated token takes this long at the fake vLLM


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[LocalStack]:
    setup = LocalStack(
        POLICY,
        listen_port=free_port(),
        token_delay_ms=TOKEN_DELAY_MS,
        redis_url=redis_server.url,
        replicas=4,
        envoy_concurrency=2,
    )
    with running(setup) as started:
        yield started


@pytest.fixture
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def sdk(stack: LocalStack, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=retries)


def counter_total(db: redis.Redis, pattern: str) -> int:
    return sum(int(db.get(key) or 0) for key in db.scan_iter(pattern))


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def avoid_minute_boundary(needed_s: float) -> None:
    """Per-minute windows are aligned: a burst that straddles two would be judged twice."""
    into_minute = time.time() % 60
    if into_minute + needed_s > 58:
        time.sleep(60 - into_minute + 0.5)


def chat_body(content: str = "hi", max_tokens: int = 20, **extra: object) -> Any:  # the SDK types each field
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def _burst(stack: LocalStack, key: str, n: int) -> list[tuple[int, dict[str, object]]]:
    connector = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> tuple[int, dict[str, object]]:
            async with session.post(
                f"{stack.base_url}/chat/completions", json=chat_body(), headers={"authorization": f"Bearer {key}"}
            ) as response:
                return response.status, await response.json()

        return await asyncio.gather(*(one() for _ in range(n)))


def test_concurrent_burst_across_four_replicas_never_overshoots(stack: LocalStack, db: redis.Redis) -> None:
    limit = 3000
    reservation = counter_for(TokenizerSpec()).count("hi") + 3 + 3 + 20
    avoid_minute_boundary(10)
    results = asyncio.run(_burst(stack, "sk-burst", 200))
    admitted = [body for status, body in results if status == 200]
    refused = [body for status, body in results if status == 429]
    assert len(admitted) + len(refused) == 200
    # Every request holds its reservation for 2 s (20 tokens x 100 ms): all 200 were judged while
    # the admitted ones were still outstanding, so admission is exactly what the limit allows.
    assert len(admitted) * reservation <= limit
    assert len(admitted) == limit // reservation
    assert all(body["error"]["code"] == "rate_limit_exceeded" for body in refused)  # type: ignore[index]
    used = sum(body["usage"]["total_tokens"] for body in admitted)  # type: ignore[index]
    assert wait_for(lambda: counter_total(db, "xp:{burst}:tpm:*") == used)
    assert db.hlen("xp:{burst}:resv") == 0
    # Several replicas admitted concurrently against the one Redis (Envoy spreads streams over them).
    replicas = ("extproc", "extproc-2", "extproc-3", "extproc-4")
    busy = [name for name in replicas if '"endpoint":"chat","tenant"' in stack.process(name).tail(400)]
    assert len(busy) >= 2, busy


def test_stream_settles_to_the_final_chunk_usage(stack: LocalStack, db: redis.Redis) -> None:
    avoid_minute_boundary(5)
    stream = sdk(stack, "sk-stream").chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "count for me"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1
    assert wait_for(lambda: counter_total(db, "xp:{stream}:tpm:*") == usage[0].total_tokens)


def test_aborted_stream_releases_its_reservation(stack: LocalStack, db: redis.Redis) -> None:
    avoid_minute_boundary(5)
    body = b'{"model": "tiny", "max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "go on"}]}'
    with socket.create_connection(("127.0.0.1", stack.listen_port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-abort\r\n" + f"content-length: {len(body)}\r\n\r\n".encode() + body
        )
        received = b""
        while received.count(b"data:") < 3:
            received += sock.recv(4096)
        assert db.zcard("xp:{abort}:conc") == 1
    # The backend would have generated 200 tokens; the client left after a few.
    assert wait_for(lambda: db.zcard("xp:{abort}:conc") == 0 and db.hlen("xp:{abort}:resv") == 0)
    assert 0 < counter_total(db, "xp:{abort}:tpm:*") < 50


def test_rate_limit_error_has_openai_headers(stack: LocalStack) -> None:
    client = sdk(stack, "sk-rpm")
    ok = client.chat.completions.with_raw_response.create(**chat_body(max_tokens=1))
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 100000
    client.chat.completions.create(**chat_body(max_tokens=1))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**chat_body(max_tokens=1))
    error = caught.value
    assert error.code == "rate_limit_exceeded" and error.body["type"] == "requests"  # type: ignore[index]
    headers = error.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["retry-after-ms"].isdigit()
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_sdk_retry_waits_as_told(stack: LocalStack) -> None:
    import threading

    holder = threading.Thread(target=lambda: sdk(stack, "sk-conc").chat.completions.create(**chat_body(max_tokens=5)))
    holder.start()
    time.sleep(0.2)  # the first request now holds the only concurrency slot for ~0.5 s
    started = time.monotonic()
    raw = sdk(stack, "sk-conc", retries=2).chat.completions.with_raw_response.create(**chat_body(max_tokens=1))
    elapsed = time.monotonic() - started
    holder.join()
    assert raw.http_response.status_code == 200
    # The 429 said retry-after-ms ~1000: the SDK waited that long, not its own short backoff.
    assert raw.retries_taken == 1
    assert elapsed >= 0.9


def test_exhausted_budget_is_insufficient_quota_and_not_retried(stack: LocalStack) -> None:
    client = sdk(stack, "sk-budget", retries=3)
    client.chat.completions.create(**chat_body(max_tokens=30))
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**chat_body(max_tokens=30))
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert time.monotonic() - started < 0.5  # no retries


def test_one_tenant_exhausting_its_quota_does_not_affect_another(stack: LocalStack) -> None:
    with pytest.raises(openai.RateLimitError):
        sdk(stack, "sk-budget").chat.completions.create(**chat_body(max_tokens=30))
    ok = sdk(stack, "sk-neighbour").chat.completions.create(**chat_body(max_tokens=1))
    assert ok.choices


def test_missing_key_is_401_and_credentials_never_reach_the_backend(stack: LocalStack) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(stack, "sk-unknown").chat.completions.create(**chat_body(max_tokens=1))
    assert caught.value.code == "invalid_api_key"
    import json
    import urllib.request

    port = stack.upstream_port("small")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/requests") as response:
        seen = json.load(response)["requests"]
    assert seen and all("authorization" not in r["headers"] for r in seen)
    assert all(r["headers"].get("x-llm-tenant") for r in seen)


def test_redis_outage_fails_open_and_usage_arrives_afterwards(
    stack: LocalStack, redis_server: RedisServer, db: redis.Redis
) -> None:
    avoid_minute_boundary(15)
    client = sdk(stack, "sk-outage")
    before = client.chat.completions.create(**chat_body(max_tokens=2))
    assert before.usage is not None
    redis_server.stop()
    try:
        during = [client.chat.completions.create(**chat_body(max_tokens=2)) for _ in range(3)]
    finally:
        redis_server.restart()
    assert all(c.usage is not None for c in during)
    expected = before.usage.total_tokens + sum(c.usage.total_tokens for c in during if c.usage)
    fresh = redis.Redis.from_url(redis_server.url)
    try:
        assert wait_for(lambda: counter_total(fresh, "xp:{outage}:tpm:*") == expected, timeout=15)
    finally:
        fresh.close()


def test_redis_outage_fails_closed_when_the_policy_says_so(tmp_path: Path) -> None:
    closed = tmp_path / "closed.yaml"
    closed.write_text(POLICY.read_text().replace("on_store_failure: open", "on_store_failure: closed"))
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with running(LocalStack(closed, listen_port=free_port(), redis_url=dead_redis)) as closed_stack:
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(closed_stack, "sk-neighbour").chat.completions.create(**chat_body(max_tokens=1))
        assert caught.value.status_code == 503
        assert caught.value.code == "quota_store_unavailable"
