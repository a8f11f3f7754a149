"""Hot reload through real Envoy: a new policy takes effect without failing a request; a broken
one leaves the last good policy in force; SIGHUP reloads on demand."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from extproc.policy import load_policy
from extproc.reload import PolicyWatcher, restart_only_changes
from extproc_dev.stack import LocalStack, free_port, running

HELLO = [{"role": "user", "content": "Hello!"}]


def _policy(default_backend: str | None) -> dict[str, Any]:
    return {
        "version": 1,
        "backends": {"blue": {}, "green": {}},
        "models": [{"name": "m", "backend": "blue", "max_model_len": 4096}],
        "routing": {"default": default_backend},
    }


def _swap_in(path: Path, policy: dict[str, Any] | str) -> None:
    """Replace the file the way Kubernetes updates a mounted ConfigMap: a new file, then an atomic rename."""
    text = policy if isinstance(policy, str) else yaml.safe_dump(policy)
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    os.replace(fresh, path)


def _served_by(stack: LocalStack) -> str:
    client = openai.OpenAI(base_url=stack.base_url, api_key="none", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=HELLO, max_tokens=2)
    return raw.headers["x-served-by"]


def _wait_for(stack: LocalStack, backend: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _served_by(stack) != backend:
        assert time.monotonic() < deadline, f"still not routed to {backend}"
        time.sleep(0.1)


@pytest.mark.envoy
def test_reload_under_streaming_traffic_fails_nothing(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(_policy(None)))
    stack = LocalStack(path, listen_port=free_port(), token_delay_ms=5, serve_args=("--reload-interval", "0.2"))
    with running(stack):
        assert _served_by(stack) == "blue"
        stop = threading.Event()
        outcomes: list[str] = []

        async def stream_forever() -> None:
            client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="none", max_retries=0)

            async def one_client() -> None:
                while not stop.is_set():
                    try:
                        raw = await client.chat.completions.with_raw_response.create(
                            model="m", messages=HELLO, max_tokens=20, stream=True
                        )
                        chunks = [chunk async for chunk in raw.parse()]
                        assert chunks and chunks[-1].choices[0].finish_reason is not None
                        outcomes.append(raw.headers["x-served-by"])
                    except Exception as exc:  # every failure is a test failure: keep it
                        outcomes.append(f"failed: {exc!r}")

            await asyncio.gather(*(one_client() for _ in range(4)))
            await client.close()

        traffic = threading.Thread(target=lambda: asyncio.run(stream_forever()))
        traffic.start()
        try:
            time.sleep(0.5)
            _swap_in(path, _policy("green"))
            _wait_for(stack, "green")
            # A broken policy is refused: the log names the key, and green stays in force.
            broken = _policy("green")
            broken["models"][0]["max_model_len"] = -1
            _swap_in(path, broken)
            time.sleep(1.0)
            assert _served_by(stack) == "green"
            _swap_in(path, _policy(None))
            _wait_for(stack, "blue")
            time.sleep(0.3)
        finally:
            stop.set()
            traffic.join(30)
        log = stack.process("extproc").tail(200)
        assert "models[m].max_model_len" in log and "last good policy stays in force" in log
    failures = [o for o in outcomes if o.startswith("failed")]
    assert not failures, failures[:3]
    assert {"blue", "green"} <= set(outcomes) and len(outcomes) > 20


@pytest.mark.envoy
def test_sighup_reloads_when_polling_is_off(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(_policy(None)))
    stack = LocalStack(path, listen_port=free_port(), serve_args=("--reload-interval", "0"))
    with running(stack):
        assert _served_by(stack) == "blue"
        _swap_in(path, _policy("green"))
        time.sleep(0.5)
        assert _served_by(stack) == "blue"  # nothing watches the file: only SIGHUP reloads
        process = stack.process("extproc").process
        assert process is not None
        process.send_signal(signal.SIGHUP)
        _wait_for(stack, "green")


def test_keys_that_need_a_restart_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(_policy(None)))
    current = load_policy(path)
    bigger = _policy(None) | {"gateway": {"max_body_bytes": 1 << 24}}
    problems = restart_only_changes(current, load_policy(_write(tmp_path / "b.yaml", bigger)))
    assert problems and "gateway.max_body_bytes" in problems[0]
    smaller = _policy(None) | {"gateway": {"max_body_bytes": 1 << 10}}
    assert restart_only_changes(current, load_policy(_write(tmp_path / "s.yaml", smaller))) == []

    applied: list[str] = []
    results: list[bool] = []
    watcher = PolicyWatcher(
        str(path), current, lambda compiled: applied.append(compiled.digest), lambda r: results.append(r.ok), 0
    )

    async def scenario() -> None:
        _swap_in(path, bigger)
        assert (await watcher.check()) is not None
        _swap_in(path, _policy("green"))
        assert (await watcher.check()) is not None
        assert (await watcher.check()) is None  # unchanged: nothing to do

    asyncio.run(scenario())
    assert results == [False, True] and len(applied) == 1
    assert watcher.current.routing.default == "green"


def test_a_changed_key_file_reloads(tmp_path: Path) -> None:
    import hashlib

    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"tenant": "t", "name": "k1", "sha256": hashlib.sha256(b"sk-1").hexdigest()}]))
    policy = _policy(None) | {"auth": {"key_files": [str(keys)]}, "tenants": {"t": {}}}
    path = _write(tmp_path / "policy.yaml", policy)
    applied: list[Any] = []
    watcher = PolicyWatcher(str(path), load_policy(path), applied.append, interval_s=0)

    async def scenario() -> None:
        assert await watcher.check() is None
        keys.write_text(yaml.safe_dump([{"tenant": "t", "name": "k2", "sha256": hashlib.sha256(b"sk-2").hexdigest()}]))
        result = await watcher.check()
        assert result is not None and result.ok

    asyncio.run(scenario())
    (compiled,) = applied
    assert compiled.auth.identify({"authorization": "Bearer sk-2"}).key_name == "k2"


def _write(path: Path, policy: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(policy))
    return path


def test_restart_only_keys_include_the_routing_header_and_a_longer_queue_wait(tmp_path: Path) -> None:
    current = load_policy(_write(tmp_path / "a.yaml", _policy(None)))
    renamed = load_policy(_write(tmp_path / "b.yaml", _policy(None) | {"gateway": {"backend_header": "x-route"}}))
    assert any("gateway.backend_header" in p for p in restart_only_changes(current, renamed))
    longer = load_policy(_write(tmp_path / "c.yaml", _policy(None) | {"queue": {"max_wait_ms": 5000}}))
    assert any("queue.max_wait_ms" in p for p in restart_only_changes(current, longer))
    shorter = load_policy(_write(tmp_path / "d.yaml", _policy(None) | {"queue": {"max_wait_ms": 10}}))
    assert restart_only_changes(current, shorter) == []


def test_a_worker_born_after_a_change_still_sees_it(tmp_path: Path) -> None:
    from extproc.reload import fingerprint

    path = _write(tmp_path / "policy.yaml", _policy(None))
    seen_at_start = fingerprint([str(path)])  # what the supervisor saw when it read the policy
    started_with = load_policy(path)
    _swap_in(path, _policy("green"))  # changed before this (re)started worker began watching
    applied: list[Any] = []
    watcher = PolicyWatcher(str(path), started_with, applied.append, interval_s=0, seen=seen_at_start)
    result = asyncio.run(watcher.check())
    assert result is not None and result.ok and applied[0].policy.routing.default == "green"
