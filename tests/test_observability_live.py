"""A real Prometheus scrapes the local stack (2 workers, Redis quotas) after mixed traffic.

Every counter equals what was sent, summed over both workers, also after every worker was killed
and replaced; tokens equal the usage the clients saw; every dashboard query and alert expression
evaluates and names series that exist; the access log is JSON with the documented fields; neither
a key nor a prompt shows up in the metrics or the log.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import pytest

from extproc.access_log import FIELDS
from extproc.policy import example_policy_path, load_policy
from extproc_dev.stack import LocalStack, free_port, running
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = ROOT / "observability"
PROMPT = "a recognisable prompt: zanzibar-quokka-1729"
KEYS = ("sk-demo", "sk-tiny", "sk-tools", "sk-nobody-knows-this-key")

pytestmark = pytest.mark.envoy


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Prometheus:
    def __init__(self, targets: dict[str, tuple[str, dict[str, str]]]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="extproc-prom-"))
        self.port = free_port()
        jobs = []
        for job, (address, labels) in targets.items():
            jobs.append(
                {
                    "job_name": job,
                    "scrape_interval": "1s",
                    "static_configs": [{"targets": [address], "labels": labels}],
                }
            )
        (self.dir / "prometheus.yml").write_text(
            json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs})
        )
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "prometheus.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready") as r:
                if r.status == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "prometheus.log").read_text()[-2000:])
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def vector(self, query: str) -> dict[tuple[tuple[str, str], ...], float]:
        reply = self.api("query", query=query)
        assert reply["status"] == "success", (query, reply)
        out = {}
        for item in reply["data"]["result"]:
            labels = tuple(sorted((k, v) for k, v in item["metric"].items() if k not in ("instance", "job")))
            out[labels] = float(item["value"][1])
        return out

    def close(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def static_file_server(path: Path) -> Iterator[int]:
    """A fake kube-state-metrics: no Kubernetes runs here, so its exposition is served from a file."""
    body = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


class Traffic:
    """Sends a mixed batch and keeps the tally of what each request should be counted as."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.expected: Counter[tuple[str, str, str, str, str]] = Counter()
        self.rejections: Counter[str] = Counter()
        self.tokens: Counter[tuple[str, str, str, str]] = Counter()  # usage the clients saw
        self.json_mode = 0
        self.tool_calls = 0

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.stack.base_url, api_key=key, max_retries=0, timeout=20)

    def fake_state(self, backend: str, state: dict[str, Any]) -> None:
        port = self.stack.upstream_port(backend)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/fake/state", data=json.dumps(state).encode(), method="PUT"
        )
        with urllib.request.urlopen(request, timeout=5):
            pass

    def post(self, body: bytes, key: str, keep_open: bool = False) -> tuple[int, http.client.HTTPConnection | None]:
        connection = http.client.HTTPConnection("127.0.0.1", self.stack.listen_port, timeout=20)
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
        response = connection.getresponse()
        if keep_open:
            return response.status, connection
        response.read()
        connection.close()
        return response.status, None

    def ok(self, tenant: str, backend: str, cls: str, usage: Any, model: str = "llama-3.1-8b") -> None:
        self.expected[(tenant, model, backend, cls, "ok")] += 1
        self.tokens[(tenant, model, backend, "prompt")] += usage.prompt_tokens
        self.tokens[(tenant, model, backend, "completion")] += usage.completion_tokens

    def send_batch(self) -> None:
        messages = [{"role": "user", "content": PROMPT}]
        demo, tiny, tools = self.client("sk-demo"), self.client("sk-tiny"), self.client("sk-tools")
        for _ in range(3):
            r = demo.chat.completions.create(model="llama3", messages=messages, max_tokens=8)  # an alias
            self.ok("demo", "default-8b", "interactive", r.usage)
        for _ in range(2):
            stream = demo.chat.completions.create(
                model="llama-3.1-8b",
                messages=messages,
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
            self.ok("demo", "default-8b", "interactive", usage)
        r = demo.chat.completions.create(
            model="llama-3.1-8b", messages=messages, max_tokens=8, response_format={"type": "json_object"}
        )
        json.loads(r.choices[0].message.content or "")
        self.ok("demo", "strict-json-model", "interactive", r.usage)
        self.json_mode += 1
        tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
        r = demo.chat.completions.create(model="llama-3.1-8b", messages=messages, max_tokens=8, tools=[tool])
        assert r.choices[0].finish_reason == "tool_calls"
        self.ok("demo", "default-8b", "interactive", r.usage)
        self.tool_calls += 1
        r = demo.chat.completions.create(
            model="llama-3.1-8b", messages=messages, max_tokens=8, extra_headers={"x-llm-class": "batch"}
        )
        self.ok("demo", "batch-pool", "batch", r.usage)

        # 400: a body that is not JSON.
        status, _ = self.post(b"{not json", "sk-demo")
        assert status == 400
        self.expected[("demo", "none", "none", "interactive", "invalid")] += 1
        self.rejections["invalid_json"] += 1
        # 401: a key nobody knows.
        with pytest.raises(openai.AuthenticationError):
            self.client(KEYS[3]).chat.completions.create(model="llama-3.1-8b", messages=messages)
        self.expected[("anonymous", "none", "none", "interactive", "unauthorized")] += 1
        self.rejections["invalid_api_key"] += 1
        # 403: a model the tenant may not use.
        with pytest.raises(openai.PermissionDeniedError):
            tiny.chat.completions.create(model="qwen-2.5-72b", messages=messages, max_tokens=8)
        self.expected[("tiny", "qwen-2.5-72b", "none", "experimental", "forbidden")] += 1
        self.rejections["model_not_allowed"] += 1
        # 429: 1,000 tokens a minute; the first reservation of 600 fits, the second does not. The
        # windows are aligned minutes and the first request takes 3 s (600 tokens at 5 ms): both must
        # fall in one minute, or the second starts a new window and fits.
        left_s = 60 - time.time() % 60
        if left_s < 15:
            time.sleep(left_s + 0.5)
        r = tiny.chat.completions.create(model="llama-3.1-8b", messages=messages, max_tokens=600)
        self.ok("tiny", "default-8b", "experimental", r.usage)
        with pytest.raises(openai.RateLimitError):
            tiny.chat.completions.create(model="llama-3.1-8b", messages=messages, max_tokens=600)
        self.expected[("tiny", "llama-3.1-8b", "default-8b", "experimental", "rate_limited")] += 1
        self.rejections["rate_limit_exceeded"] += 1
        # An upstream error: the tools tenant's backend answers 503 for a moment.
        self.fake_state("fast-8b", {"status": 503})
        try:
            with pytest.raises(openai.InternalServerError):
                tools.chat.completions.create(model="llama-3.1-8b", messages=messages, max_tokens=8)
        finally:
            self.fake_state("fast-8b", {"status": None})
        self.expected[("tools", "llama-3.1-8b", "fast-8b", "interactive", "upstream_error")] += 1
        # A client that hangs up mid-stream.
        body = {"model": "llama-3.1-8b", "messages": messages, "max_tokens": 400, "stream": True}
        status, connection = self.post(json.dumps(body).encode(), "sk-tools", keep_open=True)
        assert status == 200 and connection is not None
        connection.sock.recv(512)  # a chunk or two, then gone  # type: ignore[union-attr]
        connection.close()
        self.expected[("tools", "llama-3.1-8b", "fast-8b", "interactive", "cancelled")] += 1


def _wait_for(prom: Prometheus, query: str, want: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    got: dict[Any, float] = {}
    while time.monotonic() < deadline:
        got = prom.vector(query)
        if sum(got.values()) == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{query}: {got} != {want}")


def _check_counts(prom: Prometheus, traffic: Traffic) -> None:
    _wait_for(prom, "sum(extproc_requests_total)", sum(traffic.expected.values()))
    labels = ("tenant", "model", "backend", "class", "outcome")
    requests = {
        tuple(dict(k)[label] for label in labels): v for k, v in prom.vector("extproc_requests_total").items() if v
    }
    assert requests == dict(traffic.expected)
    rejections = {dict(k)["reason"]: v for k, v in prom.vector("extproc_rejections_total").items() if v}
    assert rejections == dict(traffic.rejections)
    tokens = {
        tuple(dict(k)[label] for label in ("tenant", "model", "backend", "type")): v
        for k, v in prom.vector("extproc_tokens_total").items()
        if dict(k)["tenant"] in ("demo", "tiny")  # the aborted stream (tools) is charged what the gateway saw
    }
    assert tokens == {k: v for k, v in traffic.tokens.items() if k[0] in ("demo", "tiny")}
    json_mode = prom.vector('sum(extproc_json_mode_responses_total{result="valid"})')
    assert sum(json_mode.values()) == traffic.json_mode
    tool_calls = prom.vector('sum(extproc_tool_call_arguments_total{result="valid"})')
    assert sum(tool_calls.values()) == traffic.tool_calls


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian's `prometheus` package; scripts/setup.sh --system)")
    return binary


def test_prometheus_sees_exact_counts_across_workers_and_restarts(prometheus_binary: str) -> None:
    policy_path = example_policy_path()
    backends = list(load_policy(policy_path).backends)
    with RedisServer() as redis, static_file_server(OBSERVABILITY / "testdata" / "kube-state-metrics.prom") as ksm:
        stack = LocalStack(
            policy_path,
            listen_port=free_port(),
            workers=2,
            redis_url=redis.url,
            metrics_port=free_port(),
            token_delay_ms=5,
            upstream_versions=dict.fromkeys(backends, "v1"),
            log_level="warning",
        )
        with running(stack):
            targets: dict[str, tuple[str, dict[str, str]]] = {
                "extproc": (f"127.0.0.1:{stack.metrics_port}", {}),
                "kube-state-metrics": (f"127.0.0.1:{ksm}", {}),
            }
            for backend in backends:
                port = stack.upstream_port(stack.policy.subset(backend))
                targets[f"vllm-{backend}"] = (f"127.0.0.1:{port}", {"backend": backend})
            prom = Prometheus(targets)
            try:
                traffic = Traffic(stack)
                traffic.send_batch()
                _check_counts(prom, traffic)

                # Every worker (and the metrics process) killed at once: the supervisor replaces them,
                # and what they had counted is neither lost nor counted twice.
                managed = stack.process("extproc").process
                assert managed is not None
                children = [
                    int(p) for p in Path(f"/proc/{managed.pid}/task/{managed.pid}/children").read_text().split()
                ]
                assert len(children) == 3  # two workers and the metrics process
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while True:
                    with contextlib.suppress(openai.APIError):
                        r = traffic.client("sk-demo").chat.completions.create(
                            model="llama-3.1-8b", messages=[{"role": "user", "content": PROMPT}], max_tokens=4
                        )
                        traffic.ok("demo", "default-8b", "interactive", r.usage)
                        break
                    assert time.monotonic() < deadline, "the workers did not come back"
                    time.sleep(0.3)
                # The second batch repeats the first except the 429 pair (the tiny tenant's minute is spent).
                _second_batch(traffic)
                _check_counts(prom, traffic)

                _check_queries(prom)
                metrics_text = urllib.request.urlopen(stack.metrics_url or "", timeout=5).read().decode()
                for secret in (PROMPT, *KEYS):
                    assert secret not in metrics_text
            finally:
                prom.close()
            log_text = (stack.work_dir / "extproc.log").read_text() if stack.work_dir else ""
        lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
        assert len(lines) == sum(traffic.expected.values())
        for line in lines:
            assert list(line) == list(FIELDS)
        for secret in (PROMPT, *KEYS):
            assert secret not in log_text


def _second_batch(traffic: Traffic) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    demo = traffic.client("sk-demo")
    for _ in range(4):
        r = demo.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5)
        traffic.ok("demo", "default-8b", "interactive", r.usage)
    with pytest.raises(openai.AuthenticationError):
        traffic.client(KEYS[3]).chat.completions.create(model="llama-3.1-8b", messages=messages)
    traffic.expected[("anonymous", "none", "none", "interactive", "unauthorized")] += 1
    traffic.rejections["invalid_api_key"] += 1


def _check_queries(prom: Prometheus) -> None:
    expressions = _load("observability_expressions", OBSERVABILITY / "expressions.py")
    queries = expressions.dashboard_expressions(OBSERVABILITY / "grafana" / "extproc.json")
    queries += expressions.alert_expressions(OBSERVABILITY / "prometheus" / "alerts.yaml")
    assert queries
    names = set(prom.api("label/__name__/values")["data"])
    for query in queries:
        reply = prom.api("query", query=query)
        assert reply["status"] == "success", (query, reply)
        missing = {n for n in expressions.series_names(query) if n not in names}
        assert not missing, (query, missing)


def _metric_lines(url: str, name: str) -> list[str]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_the_served_version_comes_from_the_header_or_from_envoys_upstream_host_metadata() -> None:
    """One backend names its version in a header; another only through Istio-style endpoint metadata,
    which reaches the gateway as ext_proc response attributes on the real Envoy."""
    stack = LocalStack(
        example_policy_path(),
        listen_port=free_port(),
        metrics_port=free_port(),
        upstream_versions={"default-8b": "v1"},
        upstream_workload_versions={"strict-json-model": "v3"},
        log_level="warning",
    )
    with running(stack):
        client = openai.OpenAI(base_url=stack.base_url, api_key="sk-demo", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        chunks = list(
            client.chat.completions.create(model="llama-3.1-8b", messages=messages, max_tokens=3, stream=True)
        )
        assert chunks
        client.chat.completions.create(
            model="llama-3.1-8b", messages=messages, max_tokens=3, response_format={"type": "json_object"}
        )
        time.sleep(0.5)  # the access log is written in batches
        assert stack.metrics_url is not None
        responses = _metric_lines(stack.metrics_url, "extproc_upstream_responses_total")
        assert any('backend="default-8b"' in line and 'version="v1"' in line for line in responses), responses
        assert any('backend="strict-json-model"' in line and 'version="v3"' in line for line in responses), responses
        ttft = _metric_lines(stack.metrics_url, "extproc_time_to_first_token_seconds_count")
        assert any('backend="default-8b"' in line and line.endswith(" 1.0") for line in ttft), ttft
        assert stack.work_dir is not None
        lines = [json.loads(x) for x in (stack.work_dir / "extproc.log").read_text().splitlines() if x.startswith("{")]
    streamed = next(line for line in lines if line["stream"])
    assert streamed["ttft_ms"] is not None and 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert {line["version"] for line in lines} == {"v1", "v3"}


def test_the_prompt_debug_switch_warns_at_start() -> None:
    stack = LocalStack(
        example_policy_path(), listen_port=free_port(), serve_args=("--access-log-prompts",), log_level="warning"
    )
    with running(stack):
        client = openai.OpenAI(base_url=stack.base_url, api_key="sk-demo", max_retries=0)
        client.chat.completions.create(
            model="llama-3.1-8b", messages=[{"role": "user", "content": PROMPT}], max_tokens=2
        )
        time.sleep(0.5)
        log = stack.process("extproc").tail(200)
    assert "the access log includes request bodies (prompt text)" in log
    assert PROMPT in log
