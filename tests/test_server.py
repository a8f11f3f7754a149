"""`extproc serve` as operators run it: health, workers, graceful shutdown; and `policy check`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.server import HEALTH_SERVICE_NAME
from extproc_dev.stack import LocalStack, free_port, running


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAME), timeout=2).status)


def _wait_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if _health(port) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError("server never became healthy")


def _serve(port: int, policy: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "extproc", "serve", "--listen", f"127.0.0.1:{port}", "--policy", str(policy)]
    return subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_workers_share_the_port_report_health_and_stop_on_sigterm(gateway_policy_path: Path) -> None:
    port = free_port()
    process = _serve(port, gateway_policy_path, "--workers", "2", "--grace-seconds", "2")
    try:
        _wait_serving(port, process)
        assert len(_children(process.pid)) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_serving_worker_has_frozen_its_start_up_heap(gateway_policy_path: Path) -> None:
    port = free_port()
    process = _serve(port, gateway_policy_path, "--log-level", "info", "--grace-seconds", "1")
    try:
        _wait_serving(port, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert process.stdout is not None
        output = process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
    frozen = re.search(r"(\d+) start-up objects frozen out of the garbage collector", output)
    assert frozen is not None, output
    assert int(frozen.group(1)) > 10_000  # modules, descriptors, grpc, the policy: not a handful


def test_sigterm_lets_an_in_flight_stream_finish(gateway_policy_path: Path) -> None:
    with running(LocalStack(gateway_policy_path, listen_port=free_port(), token_delay_ms=20)) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0)
        started = threading.Event()
        chunks: list[str] = []

        def consume() -> None:
            stream = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=40, stream=True
            )
            for chunk in stream:
                started.set()
                chunks.append(chunk.choices[0].delta.content or "")

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(10)
        extproc = stack.process("extproc")
        assert extproc.process is not None
        extproc.process.send_signal(signal.SIGTERM)
        reader.join(15)
        assert not reader.is_alive()
        assert len("".join(chunks).split()) == 40
        assert extproc.process.wait(10) == 0


def test_policy_check_names_the_offending_key(tmp_path: Path, gateway_policy_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "extproc", "policy", "check", str(gateway_policy_path)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "ok (3 models" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backends: {small: {}}\n"
        "models:\n"
        "  - {name: a, backend: small, max_model_len: -5}\n"
        "  - {name: b, backend: nowhere, max_model_len: 10, max_tokns: 3}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "policy", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "models[a].max_model_len" in result.stderr
    assert "models[b].max_tokns: Extra inputs are not permitted" in result.stderr


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            "backends: {small: {}}\nmodels: [{name: a, backend: nowhere, max_model_len: 10}]",
            "models[a].backend: 'nowhere' is not a key of `backends`",
        ),
        (
            "backends: {s: {}}\nmodels:\n- {name: a, backend: s, max_model_len: 9}\n"
            "- {name: a, backend: s, max_model_len: 9}",
            "name 'a' is already used",
        ),
        (
            "gateway: {backend_header: X-Bad}\nbackends: {s: {}}\nmodels: [{name: a, backend: s, max_model_len: 9}]",
            "gateway: backend_header must be a lower-case header name",
        ),
        ("- just a list", "the document must be a mapping"),
    ],
)
def test_policy_errors(tmp_path: Path, document: str, message: str) -> None:
    from extproc.policy import PolicyError, load_policy

    path = tmp_path / "p.yaml"
    path.write_text(document)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert message in str(caught.value)


def test_metrics_endpoint_counts_decisions(gateway_policy_path: Path) -> None:
    import urllib.request

    import orjson
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from extproc.processor import header_mutation

    port, metrics_port = free_port(), free_port()
    process = _serve(port, gateway_policy_path, "--metrics-port", str(metrics_port))
    try:
        _wait_serving(port, process)
        headers = header_mutation([(":path", "/v1/chat/completions"), (":method", "POST")]).set_headers
        body = orjson.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        messages = [
            pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[h.header for h in headers]))
            ),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            replies = list(pb_grpc.ExternalProcessorStub(channel).Process(iter(messages), timeout=5))
        assert replies[-1].immediate_response.status.code == 404
        counted = (
            'extproc_requests_total{backend="none",class="interactive",model="other",outcome="invalid",tenant="anonymous"}'
            " 1.0"
        )
        deadline = time.monotonic() + 5  # finished requests are recorded in batches, a few ms after they end
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                text = response.read().decode()
            if counted in text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert counted in text
        assert 'extproc_rejections_total{reason="model_not_found"} 1.0' in text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def test_forked_workers_both_take_streams_behind_envoy(gateway_policy_path: Path) -> None:
    """SO_REUSEPORT spreads connections, not streams: the local stack has Envoy open several."""
    import asyncio

    import aiohttp

    from extproc_dev.bench import cpu_seconds, process_tree

    stack = LocalStack(
        gateway_policy_path, listen_port=free_port(), workers=2, envoy_concurrency=2, log_level="warning"
    )
    with running(stack):
        managed = stack.process("extproc").process
        assert managed is not None
        root = managed.pid
        workers = [pid for pid in process_tree(root) if pid != root]
        assert len(workers) == 2
        before = cpu_seconds(workers)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

        async def burst() -> list[int]:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

                async def one() -> int:
                    async with session.post(f"{stack.base_url}/chat/completions", json=body) as response:
                        await response.read()
                        return response.status

                statuses: list[int] = []
                for _ in range(6):
                    statuses += await asyncio.gather(*(one() for _ in range(64)))
                return statuses

        statuses = asyncio.run(burst())
        after = cpu_seconds(workers)
    assert statuses == [200] * len(statuses)
    used = [after[pid] - before[pid] for pid in workers]
    # The kernel spreads connections by hash, not load: an uneven split is normal; an idle worker is the bug.
    assert min(used) > 0.05 * sum(used), used
