"""Routing through real Envoy: the playbook's rules, fallback and shedding driven by the fakes'
/metrics, the admission queue, and stale figures. Clients are the real openai SDK."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from extproc.policy import example_policy_path
from extproc_dev.stack import LocalStack, free_port, running

pytestmark = pytest.mark.envoy

HELLO = [{"role": "user", "content": "Hello!"}]


def set_fake_state(stack: LocalStack, backend: str, state: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{stack.upstream_port(stack.policy.subset(backend))}/fake/state"
    request = urllib.request.Request(url, data=json.dumps(state).encode(), method="PUT")
    request.add_header("content-type", "application/json")
    urllib.request.urlopen(request, timeout=5).close()


def client(stack: LocalStack, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, default_headers=headers or None)


def served_by(stack: LocalStack, key: str, headers: dict[str, str] | None = None, **kwargs: Any) -> str:
    raw = client(stack, key, **(headers or {})).chat.completions.with_raw_response.create(
        model=kwargs.pop("model", "llama3"), messages=kwargs.pop("messages", HELLO), max_tokens=4, **kwargs
    )
    return raw.headers["x-served-by"]


def eventually(check: Any, timeout: float = 5.0) -> Any:
    """Scrapes run every 500 ms in the example policy: retry until the gateway has seen the change."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, openai.APIStatusError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def playbook() -> Iterator[LocalStack]:
    with running(LocalStack(example_policy_path(), listen_port=free_port(), token_delay_ms=1)) as stack:
        yield stack


def test_the_playbook_rules_pick_the_backend(playbook: LocalStack) -> None:
    assert served_by(playbook, "sk-demo") == "default-8b"
    assert served_by(playbook, "sk-tools") == "fast-8b"
    assert served_by(playbook, "sk-demo", response_format={"type": "json_object"}) == "strict-json-model"
    assert served_by(playbook, "sk-demo", {"x-llm-quality": "high"}) == "large-reasoning-model"
    assert served_by(playbook, "sk-demo", {"x-llm-class": "batch"}) == "batch-pool"
    # sk-tiny's class is experimental: asking for batch is a different class it may not choose.
    assert served_by(playbook, "sk-tiny", {"x-llm-class": "batch"}) == "default-8b"
    with pytest.raises(openai.BadRequestError) as refused:
        served_by(playbook, "sk-demo", messages=[{"role": "user", "content": "word " * 6100}])
    assert refused.value.code == "prompt_too_long"


def test_the_body_names_the_model_the_backend_serves(playbook: LocalStack) -> None:
    url = f"http://127.0.0.1:{playbook.upstream_port('fast-8b')}/debug/requests"
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE")).close()
    assert served_by(playbook, "sk-tools") == "fast-8b"
    with urllib.request.urlopen(url) as response:
        (seen,) = json.load(response)["requests"]
    assert seen["body"]["model"] == "meta-llama/Llama-3.1-8B-Instruct-FP8"
    assert seen["headers"]["x-llm-class"] == "interactive"


def test_a_saturated_backend_falls_back_then_sheds_by_class(playbook: LocalStack) -> None:
    try:
        # Queue 6 per pod: level 1.2, saturated; fast-8b takes what it can hold.
        set_fake_state(playbook, "default-8b", {"num_requests_waiting": 6})
        eventually(lambda: _assert_served(playbook, "sk-demo", "fast-8b"))
        # A prompt fast-8b's 4,096-token window cannot hold stays on the saturated primary (interactive
        # is shed only at level 2.0) ...
        long_prompt = [{"role": "user", "content": "word " * 4500}]
        assert served_by(playbook, "sk-demo", messages=long_prompt) == "default-8b"
        # ... while experimental traffic with nowhere to go is shed with a retry hint.
        set_fake_state(playbook, "fast-8b", {"kv_cache_usage_perc": 0.95})
        eventually(lambda: _assert_shed(playbook, "sk-tiny", 429, "shed"))
        # At level 2.4 interactive traffic is shed too: a 503 the SDK would retry after retry-after.
        set_fake_state(playbook, "default-8b", {"num_requests_waiting": 12})
        eventually(lambda: _assert_shed(playbook, "sk-demo", 503, "backend_overloaded"))
    finally:
        set_fake_state(playbook, "default-8b", {"num_requests_waiting": None})
        set_fake_state(playbook, "fast-8b", {"kv_cache_usage_perc": None})
    eventually(lambda: _assert_served(playbook, "sk-demo", "default-8b"))


def test_interactive_keeps_flowing_while_batch_is_shed(playbook: LocalStack) -> None:
    try:
        set_fake_state(playbook, "batch-pool", {"num_requests_waiting": 8})
        eventually(lambda: _assert_shed(playbook, "sk-demo", 429, "shed", {"x-llm-class": "batch"}))

        async def burst() -> tuple[list[int], list[int]]:
            async_client = openai.AsyncOpenAI(base_url=playbook.base_url, api_key="sk-demo", max_retries=0)

            async def one(headers: dict[str, str]) -> int:
                try:
                    await async_client.chat.completions.create(
                        model="llama3", messages=HELLO, max_tokens=8, extra_headers=headers
                    )
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code

            interactive = [one({}) for _ in range(20)]
            batch = [one({"x-llm-class": "batch"}) for _ in range(20)]
            results = await asyncio.gather(*interactive, *batch)
            await async_client.close()
            return list(results[:20]), list(results[20:])

        interactive, batch = asyncio.run(burst())
        assert interactive == [200] * 20
        assert batch == [429] * 20
    finally:
        set_fake_state(playbook, "batch-pool", {"num_requests_waiting": None})


def _assert_served(stack: LocalStack, key: str, backend: str) -> None:
    assert served_by(stack, key) == backend


def _assert_shed(stack: LocalStack, key: str, status: int, code: str, headers: dict[str, str] | None = None) -> None:
    try:
        served_by(stack, key, headers)
    except openai.APIStatusError as exc:
        assert exc.status_code == status, exc
        assert exc.code == code
        assert int(exc.response.headers["retry-after"]) >= 1
        assert int(exc.response.headers["retry-after-ms"]) >= 1000
        return
    raise AssertionError("not shed")


# --- the admission queue, with a cap of one --------------------------------------------------

QUEUE_POLICY = {
    "version": 1,
    "backends": {"pool": {"max_in_flight": 1}},
    "models": [{"name": "m", "backend": "pool", "max_model_len": 4096}],
    "queue": {"max_wait_ms": 4000, "max_length": 8},
    "tenants": {
        "alice": {
            "allowed_classes": ["batch"],
            "keys": [{"name": "a", "sha256": "e0d35bac1b6b6e4a3c5bd8ed3a7e4e6d3b1da5d2b0ac0b0d0b1cc4ef3b7d1f83"}],
        },
    },
}


def _queue_stack(tmp_path: Path, policy: dict[str, Any]) -> LocalStack:
    import hashlib

    policy = json.loads(json.dumps(policy))
    for tenant in policy.get("tenants", {}).values():
        for key in tenant["keys"]:
            key["sha256"] = hashlib.sha256(f"sk-{key['name']}".encode()).hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return LocalStack(path, listen_port=free_port())


def test_a_full_backend_queues_by_priority(tmp_path: Path) -> None:
    with running(_queue_stack(tmp_path, QUEUE_POLICY)) as stack:
        set_fake_state(stack, "pool", {"delay_ms": 600})
        finished: list[str] = []

        async def scenario() -> None:
            async_client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="sk-a", max_retries=0)

            async def one(name: str, headers: dict[str, str]) -> None:
                await async_client.chat.completions.create(
                    model="m", messages=HELLO, max_tokens=2, extra_headers=headers
                )
                finished.append(name)

            first = asyncio.create_task(one("first", {}))
            await asyncio.sleep(0.2)  # it holds the only slot
            batch = asyncio.create_task(one("batch", {"x-llm-class": "batch"}))
            await asyncio.sleep(0.1)
            interactive = asyncio.create_task(one("interactive", {}))
            await asyncio.gather(first, batch, interactive)
            await async_client.close()

        started = time.monotonic()
        asyncio.run(scenario())
        # One at a time (the cap), the interactive request ahead of the batch one that queued first.
        assert finished == ["first", "interactive", "batch"]
        assert time.monotonic() - started >= 3 * 0.6


def test_a_queue_that_cannot_drain_in_time_sheds(tmp_path: Path) -> None:
    policy = {**QUEUE_POLICY, "queue": {"max_wait_ms": 300, "max_length": 1}}
    with running(_queue_stack(tmp_path, policy)) as stack:
        set_fake_state(stack, "pool", {"delay_ms": 1500})

        async def scenario() -> list[int | str]:
            async_client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="sk-a", max_retries=0)

            async def one() -> int | str:
                try:
                    await async_client.chat.completions.create(model="m", messages=HELLO, max_tokens=2)
                    return 200
                except openai.APIStatusError as exc:
                    return f"{exc.status_code} {exc.code}"

            holder = asyncio.create_task(one())
            await asyncio.sleep(0.3)
            rest = await asyncio.gather(*(one() for _ in range(3)))
            results = [await holder, *rest]
            await async_client.close()
            return results

        results = asyncio.run(scenario())
        assert results[0] == 200
        # One waits and times out, the others find the queue full: all three are told to come back.
        assert sorted(results[1:]) == ["503 backend_overloaded"] * 3


# --- stale or missing figures ----------------------------------------------------------------


@pytest.mark.parametrize(("unknown", "expected"), [("available", 200), ("saturated", 429)])
def test_unknown_figures_mean_what_the_policy_says(tmp_path: Path, unknown: str, expected: int) -> None:
    dead = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens: the figures never arrive
    policy = {
        "version": 1,
        "backends": {"pool": {"load": {"metrics_urls": [dead]}}},
        "models": [{"name": "m", "backend": "pool", "max_model_len": 4096}],
        "load": {"unknown": unknown},
        "tenants": {"bob": {"traffic_class": "experimental", "keys": [{"name": "b", "sha256": "0" * 64}]}},
    }
    with running(_queue_stack(tmp_path, policy)) as stack:
        try:
            client(stack, "sk-b").chat.completions.create(model="m", messages=HELLO, max_tokens=2)
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        assert status == expected
