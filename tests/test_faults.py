"""Faults the gateway must survive, with real processes: real Envoy, `extproc serve`, real Redis.

Two stacks, each with its own Redis and a policy written here:

- `main`: `on_store_failure: open`, two workers. Redis stopped and restarted under load, made slow
  (SIGSTOP/SIGCONT pulses) and black-holed (SIGSTOP); the upstream resetting mid-SSE, answering 5xx,
  slow before the first byte; clients hanging up mid-stream and while queued.
- `edge`: `on_store_failure: closed`, two workers, a short reservation TTL, reloads on SIGHUP only.
  Redis black-holed (503 `quota_store_unavailable`); the whole `extproc serve` SIGKILLed mid-stream
  and before a request; every worker SIGKILLed under load (and after a reload: the replacements
  serve the reloaded policy); SIGTERM while a worker is being replaced; SIGTERM under load. Each
  test leaves it serving.

Every test checks what the client saw, the replica's `/metrics`, and that nothing is lost: Redis
counters settle to the usage the clients saw, reservations and concurrency slots are given back.
A policy reload (a harmless limit change) runs during the Redis outage, the upstream reset and the
SIGTERM drain, and fails nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.filter_contract import message_timeout_ms
from extproc.policy import load_policy
from extproc.server import HEALTH_SERVICE_NAME
from extproc_dev.stack import LocalStack, free_port, running
from tests.redis_server import RedisServer, command

pytestmark = pytest.mark.envoy

TOKEN_DELAY_MS = 20  # each generated token takes this long at the fake vLLMs
BIG = 10_000_000  # a limit no test reaches: counted, never binding
CLIENT_TIMEOUT_S = 30.0  # a request that takes longer than this has hung


def _tenant(name: str, **limits: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"sk-{name}".encode()).hexdigest()
    return {"keys": [{"name": f"{name}-key", "sha256": digest}], "limits": {"tokens_per_minute": BIG, **limits}}


def _policy(on_store_failure: str, ttl_s: int, tenants: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "version": 1,
        "gateway": {"default_max_tokens": 16},
        "backends": {"small": {}, "flaky": {}, "queued": {"max_in_flight": 1}},
        "models": [
            {"name": "tiny", "backend": "small", "served_name": "org/tiny", "max_model_len": 4096},
            {"name": "flaky", "backend": "flaky", "max_model_len": 4096},
            {"name": "queued", "backend": "queued", "max_model_len": 4096},
        ],
        # Envoy's message timeout is max(2 s, max_wait_ms + 1 s) = 3 s.
        "queue": {"max_wait_ms": 2000, "max_length": 8},
        "quotas": {"on_store_failure": on_store_failure, "reservation_ttl_seconds": ttl_s},
        # `spare` is what the reloads change: nothing sends as it, so a reload is harmless by construction.
        "tenants": {name: _tenant(name, **limits) for name, limits in {**tenants, "spare": {}}.items()},
    }


MAIN_TENANTS: dict[str, dict[str, int]] = {
    "load": {"requests_per_minute": BIG},
    "pulse": {"requests_per_minute": BIG},
    "reset": {"max_concurrent_requests": 1},
    "upstream": {"requests_per_minute": BIG, "max_concurrent_requests": 5},
    "slow": {"max_concurrent_requests": 5},
    "holder": {"max_concurrent_requests": 5},
    "leaver": {"max_concurrent_requests": 5},
    "next": {"max_concurrent_requests": 5},
}
EDGE_TENANTS: dict[str, dict[str, int]] = {
    "strict": {"max_concurrent_requests": 1},
    "killed": {"max_concurrent_requests": 1},
    "fresh": {},
    "crash": {"max_concurrent_requests": 50},
    "drain": {"requests_per_minute": BIG, "max_concurrent_requests": 50},
}


# ----------------------------------------------------------------------------------------------
# Clients


@dataclass
class Result:
    status: int  # 0: no response at all
    headers: dict[str, str]
    body: bytes
    cut: bool  # the body ended before it was complete (a reset or a closed connection)
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The SSE data events, decoded ([DONE] left out)."""
        out = []
        for block in self.body.split(b"\n\n"):
            if block.startswith(b"data: ") and block != b"data: [DONE]":
                with contextlib.suppress(ValueError):
                    out.append(json.loads(block[6:]))
        return out

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.body

    @property
    def usage(self) -> dict[str, int] | None:
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            found = [e["usage"] for e in self.events if e.get("usage")]
            return found[-1] if found else None
        with contextlib.suppress(ValueError, TypeError, KeyError):
            usage: dict[str, int] = self.json()["usage"]
            return usage
        return None

    @property
    def total_tokens(self) -> int:
        assert self.usage is not None, self
        return self.usage["total_tokens"]

    def __repr__(self) -> str:
        return f"Result({self.status}, cut={self.cut}, error={self.error!r}, body={self.body[:300]!r})"


def chat(model: str = "tiny", max_tokens: int = 4, stream: bool = False, content: str = "hi") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def send(port: int, tenant: str, body: dict[str, Any], timeout: float = CLIENT_TIMEOUT_S) -> Result:
    """One request, read to the end or to wherever it was cut; never raises for a network failure."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body),
                headers={"authorization": f"Bearer sk-{tenant}", "content-type": "application/json"},
            )
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            return Result(0, {}, b"", True, repr(exc))
        headers = {k.lower(): v for k, v in response.getheaders()}
        received = b""
        try:
            while chunk := response.read1(65536):
                received += chunk
        except (OSError, http.client.HTTPException) as exc:
            return Result(response.status, headers, received, True, repr(exc))
        return Result(response.status, headers, received, False)
    finally:
        connection.close()


class RawStream:
    """A streaming request on a raw socket, so the test decides when the client hangs up."""

    def __init__(self, port: int, tenant: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)
        self.sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer sk-{tenant}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        self.received = b""

    def read_events(self, count: int) -> int:
        """Read until `count` SSE events arrived (or the server closed); the number received."""
        while self.received.count(b"data:") < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        return self.received.count(b"data:")

    def hang_up(self) -> None:
        self.sock.close()


def reader(port: int, tenant: str, body: dict[str, Any]) -> tuple[threading.Thread, list[Result]]:
    """`send` in a thread; its result lands in the list."""
    out: list[Result] = []
    thread = threading.Thread(target=lambda: out.append(send(port, tenant, body)), daemon=True)
    thread.start()
    return thread, out


class Load:
    """Clients sending back to back (streams and JSON alternating) until stopped; every result kept."""

    def __init__(self, port: int, tenant: str, clients: int = 3, max_tokens: int = 4, model: str = "tiny") -> None:
        self.port, self.tenant, self.max_tokens, self.model = port, tenant, max_tokens, model
        self.stop_event = threading.Event()
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        for n in range(1000):  # bounded: at most this many requests per client
            if self.stop_event.is_set():
                return
            result = send(self.port, self.tenant, chat(self.model, self.max_tokens, stream=(n + index) % 2 == 0))
            with self._lock:
                self.results.append(result)
            if result.status != 200:
                time.sleep(0.05)  # as a client honouring retry-after would pause, if briefly

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self.threads), "a load client hung"

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for_more(self, n: int, timeout: float = 20.0) -> None:
        """Block until `n` more requests finished: the fault saw real traffic, however slow the machine."""
        target = self.count() + n
        assert wait_for(lambda: self.count() >= target, timeout), f"the load made no progress ({self.count()})"


# ----------------------------------------------------------------------------------------------
# Observing


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def scrape(stack: LocalStack) -> list[tuple[str, dict[str, str], float]]:
    assert stack.metrics_url is not None
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def metric(stack: LocalStack, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels (0 when none)."""
    try:
        samples = scrape(stack)
    except OSError:
        return float("nan")  # the metrics process is being replaced
    return sum(v for n, lbl, v in samples if n == name and all(lbl.get(k) == want for k, want in labels.items()))


def access_log(stack: LocalStack, tenant: str) -> list[dict[str, Any]]:
    assert stack.work_dir is not None
    text = (stack.work_dir / "extproc.log").read_text(errors="replace")
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("tenant") == tenant]


def fake_state(stack: LocalStack, subset: str, state: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{stack.upstream_port(subset)}/fake/state", data=json.dumps(state).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=5):
        pass


def upstream_requests(stack: LocalStack, subset: str, tenant: str) -> int:
    """How many requests of this tenant the fake vLLM received."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.upstream_port(subset)}/debug/requests", timeout=5) as r:
        seen = json.load(r)["requests"]
    return sum(1 for request in seen if request["headers"].get("x-llm-tenant") == tenant)


def is_gateway_unavailable(result: Result) -> bool:
    """Envoy's fail-closed reply: a JSON 503 the OpenAI SDKs retry, never a bare 500."""
    if result.status != 503:
        return False
    error = result.json()["error"]
    return bool(error["code"] == "gateway_unavailable" and result.headers.get("retry-after") == "1")


# ----------------------------------------------------------------------------------------------
# The rigs


@dataclass
class Rig:
    stack: LocalStack
    redis_server: RedisServer
    db: redis.Redis
    policy_path: Path
    policy: dict[str, Any]
    workers: int
    sighup: bool  # reloads are asked for with SIGHUP (`--reload-interval 0`), not noticed by polling
    reloads: int = 0

    @property
    def port(self) -> int:
        return self.stack.listen_port

    @property
    def message_timeout_s(self) -> float:
        return message_timeout_ms(load_policy(self.policy_path)) / 1000

    # Redis, as the gateway sees it

    def counter(self, tenant: str, kind: str = "tpm") -> int:
        return sum(int(self.db.get(key) or 0) for key in self.db.scan_iter(f"xp:{{{tenant}}}:{kind}:*"))

    def outstanding(self, tenant: str) -> tuple[int, int]:
        """(reservations, concurrency slots) the tenant holds in Redis."""
        return int(self.db.hlen(f"xp:{{{tenant}}}:resv")), int(self.db.zcard(f"xp:{{{tenant}}}:conc"))

    def settled(self, tenant: str, tokens: int, requests: int | None = None, timeout: float = 20.0) -> bool:
        """Counters equal to what the clients saw, nothing reserved any more."""

        def check() -> bool:
            if self.counter(tenant) != tokens or self.outstanding(tenant) != (0, 0):
                return False
            return requests is None or self.counter(tenant, "rpm") == requests

        return wait_for(check, timeout, interval=0.2)

    def redis_pid(self) -> int:
        assert self.redis_server.port is not None
        info = command(self.redis_server.port, "INFO", "server").decode()
        return int(info.split("process_id:")[1].split("\r\n")[0])

    # The gateway's own view

    def store_recovered(self) -> bool:
        """The breaker closed again and nothing waits to be written, in every worker."""
        return metric(self.stack, "extproc_quota_store_degraded") == 0 and (
            metric(self.stack, "extproc_quota_pending_settlements") == 0
        )

    def reload(self) -> None:
        """Rewrite the policy with a harmless change (the unused tenant's limit), as a ConfigMap update would."""
        before = metric(self.stack, "extproc_policy_reloads_total", result="ok")
        self.reloads += 1
        self.policy["tenants"]["spare"]["limits"]["requests_per_minute"] = 1000 + self.reloads
        fresh = self.policy_path.with_suffix(".tmp")
        fresh.write_text(yaml.safe_dump(self.policy))
        os.replace(fresh, self.policy_path)
        if self.sighup:
            os.kill(self.serve_process(), signal.SIGHUP)  # the supervisor forwards it to every worker
        # Every worker reloads on its own.
        assert wait_for(
            lambda: metric(self.stack, "extproc_policy_reloads_total", result="ok") >= before + self.workers, 15
        ), "the policy was not reloaded"

    # The `extproc serve` process

    def serve_process(self) -> int:
        managed = self.stack.process("extproc").process
        assert managed is not None
        return managed.pid

    def children(self) -> list[int]:
        pid = self.serve_process()
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def worker_pids(self) -> list[int]:
        """The supervisor's children that hold a listening socket on the ext_proc port (not the metrics process)."""
        assert self.stack.extproc_port is not None
        inodes = _listening_inodes(self.stack.extproc_port)
        workers = []
        for pid in self.children():
            with contextlib.suppress(OSError):
                fds = os.listdir(f"/proc/{pid}/fd")
                links = {_readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
                if any(f"socket:[{inode}]" in links for inode in inodes):
                    workers.append(pid)
        return workers

    def healthy(self) -> bool:
        assert self.stack.extproc_port is not None
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.stack.extproc_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAME), timeout=1)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def serving(self) -> bool:
        """Every worker is listening, the gateway says SERVING, and /metrics answers."""
        if not self.stack.process("extproc").alive():
            return False
        assert self.stack.extproc_port is not None
        if len(_listening_inodes(self.stack.extproc_port)) < self.workers or not self.healthy():
            return False
        return not math.isnan(metric(self.stack, "extproc_policy_info"))

    def restart_gateway(self) -> None:
        """Start `extproc serve` again (same argv, same port) and wait until it serves."""
        managed = self.stack.process("extproc")
        if managed.alive():
            managed.stop()
        managed.start()
        assert wait_for(self.serving, 30, interval=0.05), managed.tail()

    def kill_gateway(self) -> None:
        """SIGKILL the whole `extproc serve` process group: supervisor, workers, metrics process."""
        managed = self.stack.process("extproc").process
        assert managed is not None
        group = [managed.pid, *self.children()]
        os.killpg(managed.pid, signal.SIGKILL)  # it runs in its own session, so its group is its pid
        managed.wait(10)
        # Every member gone (it held the metrics directory's lock, which a restart takes again).
        assert wait_for(lambda: not any(_running(pid) for pid in group), 10)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited already, only not been reaped


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on this TCP port (one per worker: SO_REUSEPORT)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    return inodes


@contextlib.contextmanager
def rig(
    tmp: Path, on_store_failure: str, ttl_s: int, tenants: dict[str, dict[str, int]], reload_interval_s: float
) -> Iterator[Rig]:
    policy = _policy(on_store_failure, ttl_s, tenants)
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    # Metric files here rather than in a temporary directory of the gateway's own, which a SIGKILL leaves behind.
    metrics_dir = tmp / "metrics"
    with RedisServer() as redis_server:
        stack = LocalStack(
            path,
            listen_port=free_port(),
            workers=2,
            redis_url=redis_server.url,
            metrics_port=free_port(),
            token_delay_ms=TOKEN_DELAY_MS,
            serve_args=(
                *("--reload-interval", str(reload_interval_s), "--grace-seconds", "20"),
                *("--metrics-dir", str(metrics_dir)),
            ),
            log_level="warning",
        )
        with running(stack), contextlib.closing(redis.Redis.from_url(redis_server.url)) as db:
            yield Rig(stack, redis_server, db, path, policy, workers=2, sighup=reload_interval_s == 0)


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with rig(tmp_path_factory.mktemp("main"), "open", 30, MAIN_TENANTS, reload_interval_s=0.2) as started:
        yield started


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    # A short TTL: reservations of a gateway that was SIGKILLed are given back within the test.
    # Reloads on SIGHUP only, so a worker that missed one cannot catch up by polling.
    with rig(tmp_path_factory.mktemp("edge"), "closed", 3, EDGE_TENANTS, reload_interval_s=0) as started:
        yield started


@contextlib.contextmanager
def stopped(rig: Rig) -> Iterator[None]:
    """Redis black-holed: SIGSTOP, so connections are accepted by the kernel and never answered."""
    pid = rig.redis_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# ----------------------------------------------------------------------------------------------
# 3. Redis stopped, slow, black-holed


def test_redis_stopped_and_restarted_under_load_fails_nothing_and_usage_arrives(main: Rig) -> None:
    fail_open_before = metric(main.stack, "extproc_quota_fail_open_admissions_total")
    with Load(main.port, "load") as load:
        load.wait_for_more(6)  # admitted by Redis
        main.redis_server.stop()  # SHUTDOWN SAVE: what it had counted survives, as a restarted Redis's would
        try:
            load.wait_for_more(6)  # admitted on per-process limits, usage queued
            main.reload()  # a ConfigMap update lands during the outage
            load.wait_for_more(3)
        finally:
            main.redis_server.restart()
        load.wait_for_more(6)  # Redis again
    results = load.results
    assert all(r.status == 200 and not r.cut for r in results), [r for r in results if r.status != 200 or r.cut]
    assert metric(main.stack, "extproc_quota_fail_open_admissions_total") > fail_open_before
    # What was settled during the outage was written when Redis came back: the counters hold exactly
    # the usage the clients saw, one request each, and no reservation is left behind.
    tokens = sum(r.total_tokens for r in results)
    assert main.settled("load", tokens, requests=len(results)), (main.counter("load"), tokens, main.outstanding("load"))
    assert wait_for(main.store_recovered)
    assert metric(main.stack, "extproc_quota_dropped_settlements_total") == 0


def test_redis_slow_and_black_holed_degrades_open_without_hanging_and_recovers(main: Rig) -> None:
    fail_open_before = metric(main.stack, "extproc_quota_fail_open_admissions_total")
    with Load(main.port, "pulse") as load:
        load.wait_for_more(3)
        # Slow: paused in short pulses, so some replies come late (after the client's 0.25 s) and some in time.
        pid = main.redis_pid()
        for _ in range(8):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.2)
        # Black-holed: connections are accepted by the kernel and never answered.
        with stopped(main):
            load.wait_for_more(6)
            assert metric(main.stack, "extproc_quota_store_degraded") == 1
        load.wait_for_more(3)
    results = load.results
    # Every request was answered, admitted on per-process limits while Redis did not answer: none was
    # cut off by Envoy's message timeout (504 gateway_timeout) nor refused.
    assert all(r.status == 200 and not r.cut for r in results), [r for r in results if r.status != 200 or r.cut]
    assert metric(main.stack, "extproc_quota_fail_open_admissions_total") > fail_open_before
    assert wait_for(main.store_recovered)
    # Admissions Redis ran after it woke up, for requests already admitted locally, were settled too.
    tokens = sum(r.total_tokens for r in results)
    assert main.settled("pulse", tokens, requests=len(results)), (
        main.counter("pulse"),
        tokens,
        main.outstanding("pulse"),
    )


def test_redis_black_holed_fails_closed_with_503_in_time_and_gives_back_late_admissions(edge: Rig) -> None:
    before = send(edge.port, "strict", chat())
    assert before.status == 200
    with stopped(edge):
        during = [send(edge.port, "strict", chat()) for _ in range(4)]
        assert metric(edge.stack, "extproc_quota_store_degraded") == 1
    for result in during:
        # Answered within Envoy's message timeout (else Envoy's 504 gateway_timeout) and as the policy says.
        assert result.status == 503, result
        error = result.json()["error"]
        assert (error["code"], error["type"]) == ("quota_store_unavailable", "server_error"), error
    assert wait_for(edge.store_recovered)
    # Redis ran the admissions it had buffered while stopped when it woke up; the gateway gave them back
    # (the tenant's only concurrency slot among them), so the next request is admitted, and nothing of
    # the refused requests is charged.
    assert edge.settled("strict", before.total_tokens)
    after = send(edge.port, "strict", chat())
    assert after.status == 200, after
    assert edge.settled("strict", before.total_tokens + after.total_tokens)
    outcomes = [line["outcome"] for line in access_log(edge.stack, "strict")]
    assert wait_for(lambda: len(access_log(edge.stack, "strict")) == 6), outcomes
    assert [line["code"] for line in access_log(edge.stack, "strict")].count("quota_store_unavailable") == 4


# ----------------------------------------------------------------------------------------------
# 1. The ext_proc server killed


def test_gateway_killed_mid_stream_and_before_a_request_then_restarted(edge: Rig) -> None:
    stream = RawStream(edge.port, "killed", chat(max_tokens=2000, stream=True))
    assert stream.read_events(3) >= 3
    assert edge.outstanding("killed") == (1, 1)
    try:
        _killed_then_restarted(edge, stream)
    finally:
        if not edge.stack.process("extproc").alive():
            edge.restart_gateway()  # the later tests share this gateway


def _killed_then_restarted(edge: Rig, stream: RawStream) -> None:
    try:
        edge.kill_gateway()
        # Mid-stream: the response had begun (200 and some events), so all Envoy can do is cut it.
        while chunk := stream.sock.recv(65536):
            stream.received += chunk
    finally:
        stream.hang_up()
    print(f"killed mid-stream, the client's last bytes: {stream.received[-120:]!r}")
    head, _, body = stream.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    # The body stops without chunked encoding's last chunk (b"0\r\n\r\n") and without [DONE].
    assert b"[DONE]" not in body and not body.endswith(b"0\r\n\r\n")
    assert 3 <= body.count(b"data:") < 2000

    # Before a request: Envoy cannot reach the gateway and fails closed with its JSON 503.
    down = [send(edge.port, "fresh", chat(stream=stream_)) for stream_ in (False, True)]
    assert all(is_gateway_unavailable(r) for r in down), down
    assert all(r.json()["error"]["type"] == "server_error" for r in down)

    edge.restart_gateway()
    first = send(edge.port, "fresh", chat())
    assert first.status == 200, first  # the first request after it is ready succeeds
    # The dead gateway's reservation is given back when its TTL (3 s) runs out: the tenant's only
    # slot frees, nothing of the cut stream is charged.
    for _ in range(100):  # bounded: 100 tries, 0.2 s apart
        again = send(edge.port, "killed", chat())
        if again.status == 200:
            break
        assert again.status == 429 and again.json()["error"]["code"] == "rate_limit_exceeded", again
        time.sleep(0.2)
    assert again.status == 200
    assert edge.settled("killed", again.total_tokens)
    assert edge.settled("fresh", first.total_tokens)


# ----------------------------------------------------------------------------------------------
# 2. Every worker killed together


def test_every_worker_killed_together_is_restarted_and_no_request_hangs(edge: Rig) -> None:
    workers = edge.worker_pids()
    assert len(workers) == 2
    supervisor = edge.serve_process()
    # Holds the only in-flight slot of the `queued` backend (max_in_flight: 1) when the workers die.
    # Long enough to outlast a slow machine's setup below: the kill, not its end, must cut it.
    holder = RawStream(edge.port, "crash", chat("queued", max_tokens=2000, stream=True))
    with Load(edge.port, "crash", clients=4, max_tokens=30) as load:
        load.wait_for_more(4)
        assert holder.read_events(2) >= 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        # The supervisor (not killed) replaces both; requests succeed again.
        assert wait_for(lambda: sorted(edge.worker_pids()) != sorted(workers) and len(edge.worker_pids()) == 2, 30)
        assert wait_for(lambda: send(edge.port, "fresh", chat()).status == 200, 30)
        load.wait_for_more(8)
    assert edge.serve_process() == supervisor and edge.stack.process("extproc").alive()
    holder.read_events(2000)  # returns when the connection closes
    holder.hang_up()
    assert b"[DONE]" not in holder.received  # cut mid-stream
    # The dead worker's in-flight slot was given back before its replacement started: the backend
    # takes a request at once instead of queueing it until it is shed.
    queued = send(edge.port, "fresh", chat("queued"))
    assert queued.status == 200, queued
    results = load.results
    # Nothing hung (Load's exit joined every client). Each request either completed, or was cut
    # mid-stream by the kill, or met Envoy's fail-closed 503 while no worker listened; never a 500.
    complete = [r for r in results if r.status == 200 and not r.cut and (r.done or r.usage is not None)]
    cut = [r for r in results if r.status == 200 and r.cut]
    refused = [r for r in results if r.status == 503 and is_gateway_unavailable(r)]
    assert len(complete) + len(cut) + len(refused) == len(results), [
        r for r in results if r not in complete + cut + refused
    ]
    assert cut or refused  # the kill did meet requests in flight
    print(f"workers killed: {len(complete)} complete, {len(cut)} cut mid-stream, {len(refused)} JSON 503")
    # The requests after the restart all completed.
    assert all(r in complete for r in results[-4:])
    # The killed workers' reservations expire (TTL 3 s) and are given back at the tenant's next
    # admission: nothing stays reserved, and nothing is charged that the clients did not receive.
    delivered = sum(r.total_tokens for r in complete)
    for _ in range(50):  # bounded
        extra = send(edge.port, "crash", chat())
        assert extra.status == 200, extra
        delivered += extra.total_tokens
        if wait_for(lambda: edge.outstanding("crash") == (0, 0), 0.5):
            break
        time.sleep(0.3)
    assert edge.outstanding("crash") == (0, 0)
    # A settlement still unwritten when its worker died (a 5 ms batch) is lost with it, so "at most".
    assert 0 < edge.counter("crash") <= delivered


def test_workers_replaced_after_a_reload_serve_the_reloaded_policy(edge: Rig) -> None:
    # A reload adds a tenant; every worker takes it (SIGHUP).
    edge.policy["tenants"]["late"] = _tenant("late")
    edge.reload()
    assert send(edge.port, "late", chat()).status == 200
    workers = edge.worker_pids()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not set(edge.worker_pids()) & set(workers) and edge.serving(), 30)
    # The replacements serve the policy in force, not the one the replica started with: a key revoked
    # by a reload must not come back when a worker dies, nor an added one go away.
    after = [send(edge.port, "late", chat()) for _ in range(4)]
    assert all(r.status == 200 for r in after), after


def test_sigterm_while_a_worker_is_being_replaced_still_stops_the_replica(edge: Rig) -> None:
    assert edge.stack.work_dir is not None
    log_path = edge.stack.work_dir / "extproc.log"
    managed = edge.stack.process("extproc").process
    assert managed is not None
    restarts_before = log_path.read_text().count("; restarting")
    try:
        os.kill(edge.worker_pids()[0], signal.SIGKILL)
        # The supervisor logs the death, pauses 0.5 s, then starts the replacement: SIGTERM in that pause.
        assert wait_for(lambda: log_path.read_text().count("; restarting") > restarts_before, 10, interval=0.01)
        managed.send_signal(signal.SIGTERM)
        try:
            code = managed.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the supervisor never exited: the worker it started after SIGTERM was never told to stop")
        assert code == 0
    finally:
        edge.restart_gateway()


# ----------------------------------------------------------------------------------------------
# 4. The upstream resetting mid-SSE


def test_upstream_reset_mid_stream_releases_the_reservation_and_the_slot(main: Rig) -> None:
    reports_before = metric(main.stack, "extproc_cut_streams_total", report="upstream_error")
    fake_state(main.stack, "flaky", {"reset_after_chunks": 3})
    try:
        main.reload()  # a ConfigMap update while the upstream is failing
        cut = []
        for _ in range(2):
            cut.append(send(main.port, "reset", chat("flaky", max_tokens=50, stream=True)))
            # The cut stream gave back its reservation and the tenant's only concurrency slot.
            assert wait_for(lambda: main.outstanding("reset") == (0, 0)), main.outstanding("reset")
    finally:
        fake_state(main.stack, "flaky", {"reset_after_chunks": None})
    for result in cut:
        # The client sees the stream begin (200, SSE) and then cut: the connection closes after the
        # events sent before the reset, without chunked encoding's last chunk or [DONE].
        assert result.status == 200 and result.cut and not result.done, result
        assert result.headers["content-type"].startswith("text/event-stream")
        assert len(result.events) <= 3  # the fake resets before its fourth event
    print(f"upstream reset mid-stream: {len(cut[0].events)} events, then {cut[0].error}")
    # So the tenant can send again.
    after = send(main.port, "reset", chat("flaky", max_tokens=5, stream=True))
    assert after.status == 200 and after.done, after
    # Settled to what the gateway saw of each cut stream (prompt + one token per event seen, an
    # estimate), the rest of the 50-token reservation released; the complete one to its usage.
    assert wait_for(lambda: len(access_log(main.stack, "reset")) == 3)
    lines = access_log(main.stack, "reset")
    cut_lines = [line for line in lines if line["outcome"] != "ok"]
    assert len(cut_lines) == 2
    for line in cut_lines:
        assert line["usage"] == "estimated" and line["completion_tokens"] <= 3, line
    charged = sum(line["prompt_tokens"] + line["completion_tokens"] for line in cut_lines)
    assert main.settled("reset", charged + after.total_tokens)
    # Envoy cancels the ext_proc stream as it would for a client that left; its access log report
    # (the response flag UR/UC/UPE, to the gateway's access log service) makes it an upstream error.
    assert {line["outcome"] for line in cut_lines} == {"upstream_error"}, cut_lines
    assert metric(main.stack, "extproc_requests_total", tenant="reset", outcome="upstream_error") == 2
    assert metric(main.stack, "extproc_requests_total", tenant="reset", outcome="cancelled") == 0
    assert metric(main.stack, "extproc_cut_streams_total", report="upstream_error") == reports_before + 2
    assert metric(main.stack, "extproc_requests_total", tenant="reset", outcome="ok") == 1


# ----------------------------------------------------------------------------------------------
# 5. The upstream answering 5xx, and slow


def test_upstream_5xx_is_passed_through_charged_nothing_and_counted_as_upstream_error(main: Rig) -> None:
    fake_state(main.stack, "flaky", {"status": 503})
    try:
        failed = [send(main.port, "upstream", chat("flaky", max_tokens=20, stream=s)) for s in (False, True)]
    finally:
        fake_state(main.stack, "flaky", {"status": None})
    for result in failed:
        # vLLM's own error, unchanged: its status and its (newer vLLM) error shape.
        assert result.status == 503 and not result.cut, result
        assert result.headers["content-type"].startswith("application/json")
        assert result.json() == {
            "error": {
                "message": "Injected failure: status 503 was set through /fake/state.",
                "type": "ServiceUnavailableError",
                "param": None,
                "code": 503,
            }
        }
    # The reservations are released whole: an upstream error generated nothing, so no tokens are
    # charged (the requests themselves count against requests per minute).
    assert main.settled("upstream", 0, requests=2)
    assert wait_for(lambda: len(access_log(main.stack, "upstream")) == 2)
    for line in access_log(main.stack, "upstream"):
        assert (line["status"], line["outcome"], line["backend"]) == (503, "upstream_error", "flaky"), line
        assert line["prompt_tokens"] == line["completion_tokens"] == 0
    assert metric(main.stack, "extproc_requests_total", tenant="upstream", outcome="upstream_error") == 2
    assert metric(main.stack, "extproc_upstream_responses_total", backend="flaky", status_class="5xx") == 2


def test_upstream_slow_before_the_first_byte_still_completes(main: Rig) -> None:
    # Longer than Envoy's ext_proc message timeout: that bounds the gateway's answers, not the upstream's.
    delay_ms = int(main.message_timeout_s * 1000) + 500
    fake_state(main.stack, "flaky", {"delay_ms": delay_ms})
    try:
        readers = [reader(main.port, "slow", chat("flaky", max_tokens=3, stream=s)) for s in (False, True)]
        for thread, _ in readers:
            thread.join(CLIENT_TIMEOUT_S)
        slow = [out[0] for _, out in readers]
    finally:
        fake_state(main.stack, "flaky", {"delay_ms": None})
    assert all(r.status == 200 and not r.cut and r.usage is not None for r in slow), slow
    assert main.settled("slow", sum(r.total_tokens for r in slow))
    assert wait_for(lambda: [line["outcome"] for line in access_log(main.stack, "slow")] == ["ok", "ok"])
    assert all(line["duration_ms"] >= delay_ms for line in access_log(main.stack, "slow"))


# ----------------------------------------------------------------------------------------------
# 6. Clients that hang up: mid-stream, and while queued


def test_clients_hanging_up_mid_stream_and_while_queued(main: Rig) -> None:
    unreported_before = metric(main.stack, "extproc_cut_streams_total", report="none")
    hang_ups_before = metric(main.stack, "extproc_cut_streams_total", report="cancelled")

    def queued() -> float:
        return metric(main.stack, "extproc_admission_queue_length", backend="queued")

    # The holder takes the backend's only in-flight slot (max_in_flight: 1) with a long stream.
    # Long (30 s at the fake's pace) so it is still streaming whatever the machine's load; the hang-up ends it.
    holder = RawStream(main.port, "holder", chat("queued", max_tokens=1500, stream=True))
    try:
        assert holder.read_events(3) >= 3
        # The leaver is admitted (its reservation taken in Redis), then waits in the queue for the slot...
        leaver = RawStream(main.port, "leaver", chat("queued", max_tokens=20))
        try:
            assert wait_for(lambda: queued() == 1 and main.outstanding("leaver") == (1, 1), 10)
        finally:
            leaver.hang_up()  # ...and hangs up while queued.
        # It leaves the queue at once, its reservation given back whole, and it never reached the backend.
        assert wait_for(lambda: queued() == 0)
        assert main.settled("leaver", 0)
        assert upstream_requests(main.stack, "queued", "leaver") == 0
        # The queue moves on: the next client waits for the slot, and gets it when the holder hangs up mid-stream.
        thread, next_result = reader(main.port, "next", chat("queued", max_tokens=3))
        assert wait_for(lambda: queued() == 1, 10)
        received = holder.read_events(6)
    finally:
        holder.hang_up()
    thread.join(CLIENT_TIMEOUT_S)
    assert next_result and next_result[0].status == 200, next_result
    assert main.settled("next", next_result[0].total_tokens)
    # The holder is charged for what the gateway saw before it left (prompt + one token per event,
    # an estimate), the rest of its 1,500-token reservation released.
    assert wait_for(lambda: len(access_log(main.stack, "holder")) == 1)
    (line,) = access_log(main.stack, "holder")
    assert (line["outcome"], line["usage"], line["stream"]) == ("cancelled", "estimated", True), line
    # Every event the client got passed the gateway first, which counts one token per event.
    assert received <= line["completion_tokens"] < 1500
    assert main.settled("holder", line["prompt_tokens"] + line["completion_tokens"])
    (left,) = access_log(main.stack, "leaver")
    assert (left["outcome"], left["completion_tokens"], left["prompt_tokens"]) == ("cancelled", 0, 0), left
    assert metric(main.stack, "extproc_requests_total", tenant="leaver", outcome="cancelled") == 1
    # Envoy reported the holder's hang-up (DC), so its outcome did not wait out the report's deadline.
    assert metric(main.stack, "extproc_cut_streams_total", report="cancelled") == hang_ups_before + 1
    assert metric(main.stack, "extproc_cut_streams_total", report="none") == unreported_before


# ----------------------------------------------------------------------------------------------
# 7. SIGTERM under load


def test_sigterm_under_load_lets_streams_in_progress_finish(edge: Rig) -> None:
    tokens = 600  # 12 s of streaming each (the fake's own clock): still running when the drain begins,
    # on a loaded machine too, and done well within the drain's --grace-seconds (20)
    threads = [reader(edge.port, "drain", chat(max_tokens=tokens, stream=True)) for _ in range(4)]
    assert wait_for(lambda: edge.outstanding("drain")[1] == 4, 10)  # all four admitted and streaming
    edge.reload()  # a ConfigMap update while they stream
    managed = edge.stack.process("extproc").process
    assert managed is not None
    try:
        assert edge.outstanding("drain")[1] == 4, "the streams ended before the drain: the test proves nothing"
        managed.send_signal(signal.SIGTERM)
        # New requests are refused once the drain has begun: Envoy's fail-closed JSON 503, never a 500.
        refused: list[Result] = []
        for _ in range(50):  # bounded; each try is quick
            late = send(edge.port, "fresh", chat())
            if late.status != 200:
                refused.append(late)
                break
            time.sleep(0.05)
        assert refused and is_gateway_unavailable(refused[0]), refused
        for thread, _ in threads:
            thread.join(CLIENT_TIMEOUT_S)
        # Every stream in progress finished: all its tokens, the usage chunk and [DONE].
        results = [out[0] for _, out in threads]
        for result in results:
            assert result.status == 200 and not result.cut and result.done, result
            assert result.usage is not None and result.usage["completion_tokens"] == tokens
        assert managed.wait(30) == 0
        # Settled before the workers exited.
        assert edge.settled("drain", sum(r.total_tokens for r in results), requests=4)
    finally:
        edge.restart_gateway()
    assert send(edge.port, "fresh", chat()).status == 200
