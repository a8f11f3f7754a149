"""Load: four gateway processes (two replicas of two workers) sharing one Redis take 200 concurrent
requests from one tenant whose only limit is tokens per minute; exactly what the limit allows is
admitted, never more, and every other request gets an OpenAI-shaped 429.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml

from extproc.policy import load_policy
from extproc.tokenizer import counter_for
from extproc_dev.stack import LocalStack, free_port, running
from tests.redis_server import RedisServer
from tests.test_quota_integration import avoid_minute_boundary

BURST_KEY = "sk-load-burst"
BURST_REQUESTS = 200
BURST_ADMITS = 50  # the limit is sized so that exactly this many reservations fit
BURST_MAX_TOKENS = 30
# Each admitted request holds its reservation for max_tokens x this (12 s) before it settles to a
# smaller real usage: every one of the 200 is judged while the admitted ones still hold theirs, even
# on a loaded machine (the burst itself takes 3-5 s here).
BURST_TOKEN_DELAY_MS = 400
BURST_CONTENT = "hi"


def _burst_policy() -> dict[str, Any]:
    return {
        "version": 1,
        "backends": {"small": {}},
        "models": [{"name": "tiny", "backend": "small", "served_name": "org/tiny", "max_model_len": 4096}],
        "quotas": {"on_store_failure": "closed", "reservation_ttl_seconds": 60},
        "tenants": {
            "load": {
                "keys": [{"name": "burst", "sha256": hashlib.sha256(BURST_KEY.encode()).hexdigest()}],
                "limits": {"tokens_per_minute": 1},  # set once the reservation is known
            }
        },
    }


def _reservation(policy_path: Path) -> int:
    """What one request reserves, as the README says: its prompt as the gateway counts it (message
    contents plus the per-message and per-reply framing) + its max_tokens."""
    policy = load_policy(policy_path)
    gateway = policy.gateway
    prompt = counter_for(policy.models[0].tokenizer).count(BURST_CONTENT)
    return prompt + gateway.tokens_per_message + gateway.tokens_per_reply + BURST_MAX_TOKENS


@dataclass
class BurstReply:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


async def _burst(stack: LocalStack) -> list[BurstReply]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": BURST_CONTENT}], "max_tokens": BURST_MAX_TOKENS}
    connector = aiohttp.TCPConnector(limit=BURST_REQUESTS)
    timeout = aiohttp.ClientTimeout(total=120)
    start = asyncio.Event()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> BurstReply:
            await start.wait()  # all 200 leave together
            async with session.post(
                f"{stack.base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {BURST_KEY}"}
            ) as response:
                return BurstReply(
                    response.status, {k.lower(): v for k, v in response.headers.items()}, await response.json()
                )

        tasks = [asyncio.create_task(one()) for _ in range(BURST_REQUESTS)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


class CounterWatch:
    """Polls the tenant's per-minute token counter in Redis while the burst runs; keeps the peak."""

    def __init__(self, url: str, pattern: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pattern = pattern
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def value(self) -> int:
        return sum(int(self.client.get(key) or 0) for key in self.client.scan_iter(self.pattern))

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if stop() is never called
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.peak = max(self.peak, self.value())
            self.samples += 1
            self._stop.wait(0.01)

    def __enter__(self) -> CounterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def burst_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, RedisServer, int, int]]:
    path = tmp_path_factory.mktemp("burst") / "policy.yaml"
    policy = _burst_policy()
    path.write_text(yaml.safe_dump(policy))
    reservation = _reservation(path)
    # Room for BURST_ADMITS reservations and half of another: the next one cannot fit.
    limit = BURST_ADMITS * reservation + reservation // 2
    policy["tenants"]["load"]["limits"]["tokens_per_minute"] = limit
    path.write_text(yaml.safe_dump(policy))
    with RedisServer() as server:
        stack = LocalStack(
            path,
            listen_port=free_port(),
            replicas=2,
            workers=2,
            redis_url=server.url,
            token_delay_ms=BURST_TOKEN_DELAY_MS,
            log_level="warning",
        )
        with running(stack, timeout=60):
            yield stack, server, reservation, limit


def _access_log(stack: LocalStack, name: str) -> list[dict[str, Any]]:
    assert stack.work_dir is not None
    text = (stack.work_dir / f"{name}.log").read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.envoy
def test_200_concurrent_requests_across_two_replicas_of_two_workers_admit_exactly_what_the_limit_allows(
    burst_stack: tuple[LocalStack, RedisServer, int, int],
) -> None:
    stack, server, reservation, limit = burst_stack
    pattern = "xp:{load}:tpm:*"
    avoid_minute_boundary(20)  # the burst and its holds take ~15 s; every admission must fall in one window
    watch = CounterWatch(server.url, pattern)
    try:
        started = time.monotonic()
        with watch:
            replies = asyncio.run(_burst(stack))
        elapsed = time.monotonic() - started
        admitted = [r for r in replies if r.status == 200]
        refused = [r for r in replies if r.status != 200]
        print(
            f"\nburst: {len(admitted)} admitted, {len(refused)} refused; reservation {reservation}, "
            f"limit {limit}; Redis counter peak {watch.peak} over {watch.samples} samples; {elapsed:.1f} s"
        )

        # Admission is exactly what the limit allows: no request was admitted past it, and none
        # was refused while a whole reservation still fitted.
        assert len(admitted) == limit // reservation == BURST_ADMITS
        assert len(admitted) * reservation <= limit
        # Each admission saw the counter every earlier one left: the remaining tokens the 200s
        # report are limit - k x reservation for k = 1..50, each exactly once (one atomic Lua call
        # per admission, whichever of the four processes made it).
        remaining = sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in admitted)
        assert remaining == sorted(limit - k * reservation for k in range(1, BURST_ADMITS + 1))
        assert {r.headers["x-ratelimit-limit-tokens"] for r in admitted} == {str(limit)}
        # Redis's counter never held more than the limit, and at its peak held exactly the 50
        # reservations (sampled while all of them were outstanding).
        assert watch.peak <= limit
        assert watch.peak == BURST_ADMITS * reservation

        # Every other request: an OpenAI-shaped 429 on tokens, with the headers clients act on.
        for reply in refused:
            assert reply.status == 429, reply
            error = reply.body["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens", error
            assert error["param"] is None
            used = int(re.search(r"Used (\d+)", error["message"]).group(1))  # type: ignore[union-attr]
            requested = int(re.search(r"Requested (\d+)", error["message"]).group(1))  # type: ignore[union-attr]
            assert requested == reservation and used + requested > limit, error
            assert 1 <= int(reply.headers["retry-after"]) <= 60
            assert reply.headers["retry-after-ms"].isdigit()
            assert reply.headers["x-ratelimit-limit-tokens"] == str(limit)
            assert 0 <= int(reply.headers["x-ratelimit-remaining-tokens"]) < reservation
            assert reply.headers["x-ratelimit-reset-tokens"].endswith("s")

        # The access logs of both replicas: each admitted request reserved prompt (as counted) +
        # completion cap = the reservation.
        deadline = time.monotonic() + 30
        while True:  # the access log is written in batches, a little after each request ends
            logs = {name: _access_log(stack, name) for name in ("extproc", "extproc-2")}
            lines = [line for entries in logs.values() for line in entries]
            if len(lines) >= BURST_REQUESTS or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ok = [line for line in lines if line["status"] == 200]
        assert len(ok) == BURST_ADMITS and len(lines) == BURST_REQUESTS
        assert {line["counted_prompt_tokens"] + line["completion_cap"] for line in ok} == {reservation}
        # Both replicas judged part of the burst against the one counter (which of them admitted is
        # up to timing: one may see only refusals, caused by the other's admissions).
        assert all(entries for entries in logs.values()), {name: len(entries) for name, entries in logs.items()}

        # Settled: the counter falls from the reservations to the real usage, to the token.
        used = sum(r.body["usage"]["total_tokens"] for r in admitted)
        deadline = time.monotonic() + 30
        while watch.value() != used and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.value() == used
        assert watch.client.hlen("xp:{load}:resv") == 0
    finally:
        watch.close()
