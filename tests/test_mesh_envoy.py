"""The mesh's routing checked through a real Envoy 1.40, since Istio cannot run here.

Envoy is configured as istiod would configure the ingress gateway from the rendered dev overlay:
the GATEWAY EnvoyFilter's patches applied to its listener (ext_proc before the router, the local
reply mapper, the listener buffer), the VirtualService `llm` translated into routes by
`extproc_dev.istio_routes`, and one static cluster per Istio cluster name it uses, each backed by
a fake vLLM (one per host and subset, answering with the subset's `version` label). Behind the
filter runs a real `extproc serve` with the overlay's policy ConfigMap, a real Redis and the
fakes' /metrics as load sources.

What this proves and what it cannot: the translation (`istio_routes`) and the patching here are our
model of what istiod generates, checked field by field against Envoy's own protos and run on the
real Envoy; it is not Istio. It shows that the manifests' routes, splits, mirror and filter behave
as intended in Envoy, not which fields a given Istio version supports or how it names things.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
import yaml
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from google.protobuf import json_format
from prometheus_client.parser import text_string_to_metric_families

from extproc import filter_contract, names
from extproc.policy import Policy
from extproc_dev.istio_routes import ClusterRef, clusters_used, virtual_host
from extproc_dev.mesh_assets import (
    EXTPROC_CLUSTER,
    INGRESS_PORT,
    INGRESS_SELECTOR,
    LLM_PORT,
    NAMESPACE,
    PUBLIC_HOST,
    PUBLIC_PORT,
)
from extproc_dev.stack import ManagedProcess, envoy_binary, free_port
from tests.mesh_tools import by_kind, named, policy_of, policy_text, rendered
from tests.redis_server import RedisServer

pytestmark = pytest.mark.envoy

OVERLAY = "dev"
# Other services the same ingress listener serves (Istio gives each host its own virtual host): one
# answering, one whose backend is down. The gateway must not see their traffic nor restyle their errors.
OTHER_HOST = "other.example.com"
DEAD_HOST = "dead.example.com"
CHAT_MODEL = "llama-3.1-8b"
EMBEDDING_MODEL = "bge-m3"
CONCURRENCY = 16
CANARY_REQUESTS = 1000
MIRROR_REQUESTS = 300
# How far an observed count may stray from a binomial's mean: 4.5 sd fails a correct split about
# once in 150,000 runs, while a missing or inverted split is off by far more.
TOLERANCE_SD = 4.5
SHADOW_SUFFIX = "-shadow"


@dataclass
class Fake:
    ref: ClusterRef
    name: str  # its x-served-by
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Mesh:
    policy: Policy
    bootstrap_path: Path
    envoy_port: int
    admin_port: int
    extproc_port: int
    metrics_port: int
    fakes: dict[str, Fake]  # by Istio cluster name
    extproc: ManagedProcess
    redis: RedisServer
    hcm: dict[str, Any]  # the listener's HTTP connection manager, as given to Envoy
    other_port: int  # another service behind the same listener (OTHER_HOST)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    def fake(self, host_name: str, subset: str = "") -> Fake:
        """The fake behind `host_name` (a Service name such as `vllm-default-8b`) and subset."""
        host = f"{host_name}.{NAMESPACE}.svc.cluster.local"
        return next(f for f in self.fakes.values() if f.ref.host == host and f.ref.subset == subset)

    def served_by(self, name: str) -> Fake:
        return next(f for f in self.fakes.values() if f.name == name)

    def backend_host(self, backend: str) -> str:
        return f"vllm-{self.policy.subset(backend)}.{NAMESPACE}.svc.cluster.local"


# --- Istio, as far as the gateway's listener goes -----------------------------------------------


def proto_merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Protobuf merge, as an EnvoyFilter MERGE does: messages merge, lists append, scalars replace."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            proto_merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key] = [*target[key], *value]
        else:
            target[key] = value


def gateway_envoy_filter(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [
        doc
        for doc in by_kind(docs, "EnvoyFilter")
        if {p["match"]["context"] for p in doc["spec"]["configPatches"]} == {"GATEWAY"}
    ]
    assert len(found) == 1, f"expected one GATEWAY EnvoyFilter, found {len(found)}"
    return found[0]


def apply_envoy_filter(envoy_filter: dict[str, Any], listener: dict[str, Any], hcm: dict[str, Any]) -> None:
    """Apply the patches istiod would apply to the ingress gateway's HTTP listener on INGRESS_PORT."""
    for patch in envoy_filter["spec"]["configPatches"]:
        match, operation, value = patch["match"], patch["patch"]["operation"], patch["patch"]["value"]
        if "listener" in match:
            assert match["listener"]["portNumber"] == INGRESS_PORT, match
        applies_to = patch["applyTo"]
        if applies_to == "HTTP_FILTER" and operation == "INSERT_BEFORE":
            chain_filter = match["listener"]["filterChain"]["filter"]
            assert chain_filter["name"] == filter_contract.HCM_FILTER
            names_now = [f["name"] for f in hcm["http_filters"]]
            hcm["http_filters"].insert(names_now.index(chain_filter["subFilter"]["name"]), value)
        elif applies_to == "NETWORK_FILTER" and operation == "MERGE":
            assert value["name"] == match["listener"]["filterChain"]["filter"]["name"] == filter_contract.HCM_FILTER
            assert value["typed_config"]["@type"] == hcm["@type"]
            proto_merge(hcm, value["typed_config"])
        elif applies_to == "LISTENER" and operation == "MERGE":
            proto_merge(listener, value)
        elif applies_to == "VIRTUAL_HOST" and operation == "MERGE":
            wanted = match["routeConfiguration"]["vhost"]["name"]
            (vhost,) = [v for v in hcm["route_config"]["virtual_hosts"] if v["name"] == wanted]
            proto_merge(vhost, value)
        else:
            pytest.fail(f"this test does not know how Istio applies {applies_to} {operation}: extend it")


def static_cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def service_port(docs: list[dict[str, Any]], hosts: set[str]) -> int:
    """The port of the Services that destinations without `port` go to (the translator's default)."""
    ports = set()
    for host in hosts:
        service = named(docs, "Service", host.split(".")[0])
        (port,) = service["spec"]["ports"]
        ports.add(port["port"])
    if not ports:
        return LLM_PORT  # every destination names its port: the default is never used
    assert len(ports) == 1, f"destination Services on several ports: {ports}"
    return ports.pop()


def check_bound_to_ingress(docs: list[dict[str, Any]], virtual_service: dict[str, Any]) -> None:
    """Istio gives the VirtualService to the ingress only through a Gateway that selects it and serves the host."""
    servers = [
        server
        for gateway in by_kind(docs, "Gateway")
        if f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}" in virtual_service["spec"]["gateways"]
        and gateway["spec"]["selector"] == INGRESS_SELECTOR
        for server in gateway["spec"]["servers"]
    ]
    assert any(PUBLIC_HOST in server["hosts"] for server in servers), servers


def bootstrap(
    docs: list[dict[str, Any]],
    listen_port: int,
    admin_port: int,
    upstream_port: Callable[[ClusterRef], int],
    extproc_port: int,
    other_port: int,
    dead_port: int,
) -> tuple[dict[str, Any], list[ClusterRef]]:
    llm = named(docs, "VirtualService", "llm")
    rules = by_kind(docs, "DestinationRule")
    check_bound_to_ingress(docs, llm)
    destinations = [d["destination"] for http in llm["spec"]["http"] for d in http["route"]]
    destinations += [http["mirror"] for http in llm["spec"]["http"] if "mirror" in http]
    port = service_port(docs, {d["host"] for d in destinations if "port" not in d})
    refs = clusters_used(llm, rules, port)
    router = {
        "name": filter_contract.ROUTER_FILTER,
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    # Istio names a gateway's virtual hosts HOST:PORT (the Gateway server's port), one per host.
    llm_vhost = virtual_host(llm, rules, port) | {
        "name": f"{PUBLIC_HOST}:{PUBLIC_PORT}",
        "domains": [PUBLIC_HOST, f"{PUBLIC_HOST}:*"],
    }
    others = [
        {
            "name": f"{host}:{PUBLIC_PORT}",
            "domains": [host, f"{host}:*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": f"outbound|80||{host}", "timeout": "0s"}}],
        }
        for host in (OTHER_HOST, DEAD_HOST)
    ]
    hcm: dict[str, Any] = {
        "@type": filter_contract.HCM_TYPE,
        "stat_prefix": f"outbound_0.0.0.0_{INGRESS_PORT}",
        "codec_type": "AUTO",
        "route_config": {"name": f"http.{INGRESS_PORT}", "virtual_hosts": [llm_vhost, *others]},
        "http_filters": [router],
    }
    listener: dict[str, Any] = {
        "name": f"0.0.0.0_{INGRESS_PORT}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
    }
    apply_envoy_filter(gateway_envoy_filter(docs), listener, hcm)
    listener["filter_chains"] = [{"filters": [{"name": filter_contract.HCM_FILTER, "typed_config": hcm}]}]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == filter_contract.FILTER_NAME)
    grpc_cluster = ext_proc["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    clusters = [static_cluster(ref.name, upstream_port(ref)) for ref in refs]
    clusters.append(static_cluster(grpc_cluster, extproc_port, http2=True))
    clusters.append(static_cluster(f"outbound|80||{OTHER_HOST}", other_port))
    clusters.append(static_cluster(f"outbound|80||{DEAD_HOST}", dead_port))
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
    return config, refs


# --- processes ------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], bool], what: str, process: ManagedProcess | None = None, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while waiting for {what}:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}" + (f":\n{process.tail()}" if process else ""))
        time.sleep(0.05)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(200 <= response.status < 300)
    except Exception:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def fake_name(ref: ClusterRef) -> str:
    service = ref.host.split(".")[0]
    return f"{service}-{ref.subset}" if ref.subset else service


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    docs = rendered(OVERLAY)
    policy = policy_of(docs)
    work = Path(tempfile.mkdtemp(prefix="extproc-mesh-envoy-"))
    policy_path = work / "policy.yaml"
    policy_path.write_text(policy_text(docs))
    processes: list[ManagedProcess] = []

    def start(name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, work / f"{name}.log")
        process.start()
        processes.append(process)
        return process

    redis_server = RedisServer().start()
    try:
        envoy_port, admin_port, extproc_port, metrics_port, other_port = (free_port() for _ in range(5))
        ports: dict[str, int] = {}
        config, refs = bootstrap(
            docs,
            envoy_port,
            admin_port,
            lambda ref: ports.setdefault(ref.name, free_port()),
            extproc_port,
            other_port,
            dead_port=free_port(),  # nothing listens there
        )
        other_argv = [sys.executable, "-m", "extproc", "fake-vllm", "--port", str(other_port), "--name", "other"]
        other = start("fake-other", other_argv)
        fakes: dict[str, Fake] = {}
        for ref in refs:
            name, port = fake_name(ref), ports[ref.name]
            argv = [sys.executable, "-m", "extproc", "fake-vllm", "--port", str(port), "--name", name]
            if "version" in ref.labels:
                argv += ["--state", json.dumps({"version": ref.labels["version"]})]
            fakes[ref.name] = Fake(ref, name, port, start(f"fake-{name}", argv))
        load_urls = []
        for backend in policy.backends:
            host = f"vllm-{policy.subset(backend)}.{NAMESPACE}.svc.cluster.local"
            load_urls += [f"--load-url={backend}={f.url}/metrics" for f in fakes.values() if f.ref.host == host]
        extproc = start(
            "extproc",
            [
                sys.executable, "-m", "extproc", "serve",
                "--listen", f"127.0.0.1:{extproc_port}",
                "--policy", str(policy_path),
                "--workers", "1",
                "--redis-url", redis_server.url,
                "--metrics-port", str(metrics_port),
                "--grace-seconds", "1",
                "--log-level", "warning",
                *load_urls,
            ],
        )  # fmt: skip
        bootstrap_path = work / "envoy.yaml"
        bootstrap_path.write_text(yaml.safe_dump(config, sort_keys=False))
        for fake in fakes.values():
            wait_until(lambda f=fake: http_ok(f"{f.url}/health"), f"{fake.name} /health", fake.process)  # type: ignore[misc]
        wait_until(lambda: http_ok(f"http://127.0.0.1:{other_port}/health"), "the other service", other)
        wait_until(lambda: port_open(extproc_port), "extproc serve", extproc)
        envoy = start(
            "envoy",
            [envoy_binary(), "-c", str(bootstrap_path), "--disable-hot-restart", "--concurrency", "1", "-l", "warn"],
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"), "envoy /ready", envoy)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        yield Mesh(
            policy,
            bootstrap_path,
            envoy_port,
            admin_port,
            extproc_port,
            metrics_port,
            fakes,
            extproc,
            redis_server,
            hcm,
            other_port,
        )
    finally:
        for process in reversed(processes):  # Envoy first, the fakes last
            process.stop()
        redis_server.close()
        shutil.rmtree(work, ignore_errors=True)


# --- clients ----------------------------------------------------------------------------------------


def sdk(mesh: Mesh, key: str = "sk-demo", **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{mesh.origin}/v1", api_key=key, max_retries=0, default_headers={"host": PUBLIC_HOST, **headers}
    )


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


JSON_MODE = {"response_format": {"type": "json_object"}}


async def burst(
    mesh: Mesh, n: int, body: dict[str, Any], key: str = "sk-demo"
) -> list[tuple[int, str, dict[str, Any]]]:
    """n chat requests, CONCURRENCY at a time: (status, x-served-by, body) each."""
    limit = asyncio.Semaphore(CONCURRENCY)
    headers = {"host": PUBLIC_HOST, "authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> tuple[int, str, dict[str, Any]]:
            async with limit, session.post(f"{mesh.origin}/v1/chat/completions", json=body, headers=headers) as resp:
                return resp.status, resp.headers.get(names.SERVED_BY, ""), await resp.json()

        return await asyncio.gather(*(one() for _ in range(n)))


def fresh_request_window(mesh: Mesh, db: redis.Redis, tenant: str = "demo") -> None:
    """Forget the tenant's requests-per-minute count, so a burst measuring routing is not refused.

    These tests measure Envoy's splits and the gateway's accounting, not the rate limit: demo's
    requests_per_minute in the policy is below the traffic they need within one minute.
    """
    keys = list(db.scan_iter(f"{mesh.policy.quotas.key_prefix}:{{{tenant}}}:rpm:*"))
    if keys:
        db.delete(*keys)


def counters(db: redis.Redis, pattern: str) -> dict[str, int]:
    return {key.decode(): int(db.get(key) or 0) for key in db.scan_iter(pattern)}


def grown(before: dict[str, int], after: dict[str, int]) -> int:
    # A window key that expired in between counted nothing new: only keys still there can have grown.
    return sum(value - before.get(key, 0) for key, value in after.items())


def metric_sum(mesh: Mesh, sample_name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def envoy_stat(mesh: Mesh, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.admin_port}/stats?filter=^{name}$&format=json") as response:
        stats = json.loads(response.read())["stats"]
    return sum(int(s.get("value", 0)) for s in stats if s.get("name") == name)


def clear_histories(mesh: Mesh) -> None:
    for fake in mesh.fakes.values():
        urllib.request.urlopen(urllib.request.Request(f"{fake.url}/debug/requests", method="DELETE"), timeout=5).close()


def history(fake: Fake) -> list[dict[str, Any]]:
    return list(get_json(f"{fake.url}/debug/requests")["requests"])


def binomial_bounds(n: int, p: float) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - TOLERANCE_SD * sd, n * p + TOLERANCE_SD * sd


@pytest.fixture
def db(mesh: Mesh) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(mesh.redis.url)
    yield client
    client.close()


# --- the filter as Envoy takes it ------------------------------------------------------------------


def as_ext_proc(typed_config: dict[str, Any]) -> ext_proc_pb2.ExternalProcessor:
    fields = {k: v for k, v in typed_config.items() if k != "@type"}
    return json_format.ParseDict(fields, ext_proc_pb2.ExternalProcessor())


def test_envoy_accepts_the_gateway_envoy_filter(mesh: Mesh) -> None:
    check = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(mesh.bootstrap_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    dump = get_json(f"http://127.0.0.1:{mesh.admin_port}/config_dump?resource=static_listeners")
    (listener,) = [c["listener"] for c in dump["configs"]]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f["typed_config"] for f in chain["filters"]]
    assert [f["name"] for f in hcm["http_filters"]] == [filter_contract.FILTER_NAME, filter_contract.ROUTER_FILTER]
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == EXTPROC_CLUSTER
    # Envoy runs the EnvoyFilter's filter as written (the dump leaves out default values).
    applied = next(f for f in mesh.hcm["http_filters"] if f["name"] == filter_contract.FILTER_NAME)
    assert as_ext_proc(ext_proc) == as_ext_proc(applied["typed_config"])
    assert as_ext_proc(ext_proc).failure_mode_allow is filter_contract.FAILURE_MODE_ALLOW
    assert len(hcm["local_reply_config"]["mappers"]) == len(filter_contract.local_reply_config(1)["mappers"])
    assert listener["per_connection_buffer_limit_bytes"] == filter_contract.listener_buffer_limit(
        mesh.policy.gateway.max_body_bytes
    )


# --- header routing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    backend: str
    key: str = "sk-demo"
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    embeddings: bool = False


ROUTING_CASES = [
    Case("plain chat", "default-8b"),
    Case("internal-tools tier", "fast-8b", key="sk-tools"),
    Case("json mode", "strict-json-model", body=JSON_MODE),
    Case("quality high", "large-reasoning-model", headers={"x-llm-quality": "high"}),
    Case("batch class", "batch-pool", headers={names.TRAFFIC_CLASS: "batch"}),
    Case("embeddings", "embeddings", embeddings=True),
    # The gateway's choice wins over a routing header the client sends itself.
    Case("client's routing header", "default-8b", headers={"x-llm-backend": "large-reasoning-model"}),
]


def test_routing_cases_cover_every_backend(mesh: Mesh) -> None:
    assert {case.backend for case in ROUTING_CASES} == set(mesh.policy.backends)


@pytest.mark.parametrize("case", ROUTING_CASES, ids=[c.name for c in ROUTING_CASES])
def test_header_routing_reaches_the_backend(mesh: Mesh, db: redis.Redis, case: Case) -> None:
    fresh_request_window(mesh, db)
    clear_histories(mesh)
    client = sdk(mesh, case.key, **case.headers)
    if case.embeddings:
        raw: Any = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="hello")
    else:
        raw = client.chat.completions.with_raw_response.create(**chat_body(**case.body))
    raw.parse()  # a well-formed OpenAI answer
    served_by = mesh.served_by(raw.headers[names.SERVED_BY])
    assert served_by.ref.host == mesh.backend_host(case.backend)
    (seen,) = history(served_by)
    assert seen["headers"][mesh.policy.gateway.backend_header] == mesh.policy.subset(case.backend)
    assert names.AUTHORIZATION not in seen["headers"]


# --- canary -------------------------------------------------------------------------------------------


def backend_route(mesh: Mesh, backend: str) -> dict[str, Any]:
    """The Envoy route that matches the backend's routing header."""
    header = mesh.policy.gateway.backend_header
    matcher = {"name": header, "string_match": {"exact": mesh.policy.subset(backend)}}
    (route,) = [
        r for r in mesh.hcm["route_config"]["virtual_hosts"][0]["routes"] if matcher in r["match"].get("headers", [])
    ]
    return route


def weights(mesh: Mesh, backend: str) -> dict[str, int]:
    """subset -> weight, for a backend whose route splits traffic."""
    clusters = backend_route(mesh, backend)["route"].get("weighted_clusters", {}).get("clusters", [])
    return {mesh.fakes[c["name"]].ref.subset: c["weight"] for c in clusters}


def test_canary_split(mesh: Mesh, db: redis.Redis) -> None:
    split = weights(mesh, "default-8b")
    assert split == {"stable": 90, "canary": 10}, split
    p = split["canary"] / sum(split.values())
    stable, canary = mesh.fake("vllm-default-8b", "stable"), mesh.fake("vllm-default-8b", "canary")
    requests_per_minute = mesh.policy.tenants["demo"].limits.requests_per_minute or CANARY_REQUESTS
    batch = max(1, min(CANARY_REQUESTS, requests_per_minute - CONCURRENCY))
    results: list[tuple[int, str, dict[str, Any]]] = []
    while len(results) < CANARY_REQUESTS:
        fresh_request_window(mesh, db)
        results += asyncio.run(burst(mesh, min(batch, CANARY_REQUESTS - len(results)), chat_body()))
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: CANARY_REQUESTS}, statuses
    served = Counter(name for _, name, _ in results)
    low, high = binomial_bounds(CANARY_REQUESTS, p)
    print(
        f"\ncanary split over {CANARY_REQUESTS} requests: stable {served[stable.name]}, canary {served[canary.name]}"
        f" (expected {CANARY_REQUESTS * p:.0f}, tolerance {low:.1f}-{high:.1f})"
    )
    assert set(served) == {stable.name, canary.name}
    assert low <= served[canary.name] <= high


# --- mirror and accounting ------------------------------------------------------------------------------


@dataclass
class MirrorRun:
    results: list[tuple[int, str, dict[str, Any]]]
    shadowed: list[dict[str, Any]]  # what the candidate received
    envoy_mirrored: int  # what Envoy sent to the candidate's cluster
    percent: float
    requests_counted: float
    prompt_tokens_counted: float
    completion_tokens_counted: float
    rpm_grown: int
    tpm_grown: int
    tpd_grown: int


@pytest.fixture(scope="module")
def mirror_run(mesh: Mesh) -> MirrorRun:
    db = redis.Redis.from_url(mesh.redis.url)
    try:
        return _mirror_run(mesh, db)
    finally:
        db.close()


def _mirror_run(mesh: Mesh, db: redis.Redis) -> MirrorRun:
    (policy,) = backend_route(mesh, "strict-json-model")["route"]["request_mirror_policies"]
    fraction = policy["runtime_fraction"]["default_value"]
    assert fraction["denominator"] == "MILLION"
    percent = fraction["numerator"] / 10_000
    candidate = mesh.fakes[policy["cluster"]]
    prefix = f"{mesh.policy.quotas.key_prefix}:{{demo}}"
    fresh_request_window(mesh, db)
    clear_histories(mesh)
    stat = f"cluster.{candidate.ref.name}.upstream_rq_total"
    mirrored_before = envoy_stat(mesh, stat)
    before = {
        "requests": metric_sum(mesh, "extproc_requests_total"),
        "prompt": metric_sum(mesh, "extproc_tokens_total", tenant="demo", type="prompt"),
        "completion": metric_sum(mesh, "extproc_tokens_total", tenant="demo", type="completion"),
    }
    redis_before = {window: counters(db, f"{prefix}:{window}:*") for window in ("rpm", "tpm", "tpd")}
    results = asyncio.run(burst(mesh, MIRROR_REQUESTS, chat_body(**JSON_MODE)))
    used = sum(body["usage"]["total_tokens"] for status, _, body in results if status == 200)
    # Settlement follows the response; the mirrored copies finish on their own time.
    mirrored = envoy_stat(mesh, stat) - mirrored_before
    wait_until(lambda: len(history(candidate)) >= mirrored, "the mirrored copies to arrive")
    wait_until(lambda: grown(redis_before["tpd"], counters(db, f"{prefix}:tpd:*")) >= used, "the usage to be settled")
    wait_until(
        lambda: metric_sum(mesh, "extproc_requests_total") - before["requests"] >= MIRROR_REQUESTS,
        "the requests to be counted",
    )
    return MirrorRun(
        results=results,
        shadowed=history(candidate),
        envoy_mirrored=mirrored,
        percent=percent,
        requests_counted=metric_sum(mesh, "extproc_requests_total") - before["requests"],
        prompt_tokens_counted=metric_sum(mesh, "extproc_tokens_total", tenant="demo", type="prompt") - before["prompt"],
        completion_tokens_counted=metric_sum(mesh, "extproc_tokens_total", tenant="demo", type="completion")
        - before["completion"],
        rpm_grown=grown(redis_before["rpm"], counters(db, f"{prefix}:rpm:*")),
        tpm_grown=grown(redis_before["tpm"], counters(db, f"{prefix}:tpm:*")),
        tpd_grown=grown(redis_before["tpd"], counters(db, f"{prefix}:tpd:*")),
    )


def test_mirror_sends_copies_to_the_candidate_and_answers_from_stable(mesh: Mesh, mirror_run: MirrorRun) -> None:
    assert mirror_run.percent == 10
    stable = mesh.fake("vllm-strict-json-model", "stable")
    candidate = mesh.fake("vllm-strict-json-model", "candidate")
    assert Counter(status for status, _, _ in mirror_run.results) == {200: MIRROR_REQUESTS}
    # The client always gets the stable's answer.
    assert {name for _, name, _ in mirror_run.results} == {stable.name}
    copies = mirror_run.shadowed
    low, high = binomial_bounds(MIRROR_REQUESTS, mirror_run.percent / 100)
    print(
        f"\nmirror: {len(copies)} of {MIRROR_REQUESTS} requests copied to {candidate.name}"
        f" (expected {MIRROR_REQUESTS * mirror_run.percent / 100:.0f}, tolerance {low:.1f}-{high:.1f})"
    )
    assert len(copies) == mirror_run.envoy_mirrored
    assert low <= len(copies) <= high
    for copy in copies:
        # Envoy marks a shadow by its host; the copy is the request as the gateway passed it on.
        assert copy["headers"]["host"].split(":")[0] == PUBLIC_HOST + SHADOW_SUFFIX
        assert copy["headers"][mesh.policy.gateway.backend_header] == mesh.policy.subset("strict-json-model")
        assert names.AUTHORIZATION not in copy["headers"]
        assert copy["body"]["model"] == mesh.policy.backends["strict-json-model"].served_name


def test_mirrored_requests_are_charged_and_counted_once(mirror_run: MirrorRun) -> None:
    usages = [body["usage"] for _, _, body in mirror_run.results]
    total = sum(u["total_tokens"] for u in usages)
    assert mirror_run.requests_counted == MIRROR_REQUESTS
    assert mirror_run.prompt_tokens_counted == sum(u["prompt_tokens"] for u in usages)
    assert mirror_run.completion_tokens_counted == sum(u["completion_tokens"] for u in usages)
    assert mirror_run.rpm_grown == MIRROR_REQUESTS
    assert mirror_run.tpm_grown == total
    assert mirror_run.tpd_grown == total


# --- the gateway down -----------------------------------------------------------------------------------


def post_chat(mesh: Mesh, host: str = PUBLIC_HOST, key: str | None = "sk-demo") -> tuple[int, dict[str, str], bytes]:
    """One chat request without any client retry: (status, headers, body)."""
    headers = {"host": host, "content-type": names.JSON_CONTENT_TYPE}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{mesh.origin}/v1/chat/completions", data=json.dumps(chat_body()).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def test_gateway_down_is_a_json_503_and_recovery_is_immediate(mesh: Mesh, db: redis.Redis) -> None:
    fresh_request_window(mesh, db)
    mesh.extproc.stop()
    try:
        clear_histories(mesh)
        for _ in range(3):
            status, headers, body = post_chat(mesh)
            assert status == filter_contract.GATEWAY_UNAVAILABLE_STATUS, (status, body)
            assert headers["content-type"].startswith(names.JSON_CONTENT_TYPE)
            assert json.loads(body)["error"]["code"] == "gateway_unavailable"
            assert headers[names.RETRY_AFTER] == str(filter_contract.GATEWAY_RETRY_AFTER_S)
        # Failing closed: nothing reached a model.
        assert all(not history(fake) for fake in mesh.fakes.values())
    finally:
        mesh.extproc.start()
        wait_until(lambda: port_open(mesh.extproc_port), "extproc serve to restart", mesh.extproc)
    assert [post_chat(mesh)[0] for _ in range(5)] == [200] * 5


def put_fake_state(fake: Fake, state: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{fake.url}/fake/state",
        data=json.dumps(state).encode(),
        method="PUT",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=5).close()


def test_an_upstream_reset_mid_stream_is_reported_back_as_an_upstream_error(mesh: Mesh, db: redis.Redis) -> None:
    """The EnvoyFilter's access log patch reaches the gateway: the cut stream's outcome is upstream_error."""
    fresh_request_window(mesh, db)
    reports = metric_sum(mesh, "extproc_cut_streams_total", report="upstream_error")
    errors = metric_sum(mesh, "extproc_requests_total", outcome="upstream_error")
    unreported = metric_sum(mesh, "extproc_cut_streams_total", report="none")
    for fake in mesh.fakes.values():
        # Paced, so the response's head is through the gateway and on to the client before the reset.
        put_fake_state(fake, {"reset_after_chunks": 3, "token_delay_ms": 50})
    try:
        stream = sdk(mesh).chat.completions.create(stream=True, **chat_body(max_tokens=20))
        with pytest.raises((openai.APIError, OSError)):
            for _chunk in stream:
                pass
    finally:
        for fake in mesh.fakes.values():
            put_fake_state(fake, {"reset_after_chunks": None, "token_delay_ms": None})
    wait_until(lambda: metric_sum(mesh, "extproc_cut_streams_total", report="upstream_error") == reports + 1, "report")
    assert metric_sum(mesh, "extproc_requests_total", outcome="upstream_error") == errors + 1
    assert metric_sum(mesh, "extproc_cut_streams_total", report="none") == unreported


# --- a listener shared with other services ----------------------------------------------------------


def test_other_hosts_on_the_listener_bypass_the_gateway(mesh: Mesh) -> None:
    """The filter is on only for the LLM's virtual host: another service's calls are not the gateway's."""
    other = f"http://127.0.0.1:{mesh.other_port}"
    urllib.request.urlopen(urllib.request.Request(f"{other}/debug/requests", method="DELETE"), timeout=5).close()
    decided = metric_sum(mesh, "extproc_requests_total")
    # No key at all: through the gateway this would be a 401.
    status, _, body = post_chat(mesh, host=OTHER_HOST, key=None)
    assert status == 200, body
    (seen,) = get_json(f"{other}/debug/requests")["requests"]
    assert mesh.policy.gateway.backend_header not in seen["headers"]
    assert seen["body"]["model"] == CHAT_MODEL  # not rewritten to a served name
    assert metric_sum(mesh, "extproc_requests_total") == decided


def test_other_hosts_keep_envoys_own_errors(mesh: Mesh) -> None:
    """The OpenAI-shaped local replies are the LLM host's: another service's 503 stays Envoy's own."""
    status, headers, body = post_chat(mesh, host=DEAD_HOST, key=None)
    assert status == 503
    assert not headers.get("content-type", "").startswith(names.JSON_CONTENT_TYPE), body
    assert b"backend_unavailable" not in body
