"""A bounded soak on loopback: real Envoy, one `extproc serve` of two workers, real Redis, the fake vLLM.

Mixed traffic (chat and completions, streams with and without usage, bad JSON, unknown models and
keys, a tenant over its tokens per minute, a backend answering 503 part of the time, clients that
leave mid-stream) runs for `EXTPROC_SOAK_SECONDS` (default 150) while the policy file is rewritten
every 15 s and Redis is stopped and restarted in the middle. It shows:

- the gateway's memory (RSS of the supervisor, its workers and its metrics process, from /proc) and
  open file descriptors are flat: the median of a window after warm-up against the last window;
- no worker died, and every policy rewrite was reloaded by every worker;
- `extproc_requests_total` by tenant and outcome equals what the clients saw, status class by status
  class, and `extproc_tokens_total` equals the usage the clients saw;
- zero lost settlements: once traffic stops and the queue has drained, each tenant's token counter in
  Redis equals, to the token, the usage the clients saw, the usage settled during the outage included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc_dev.stack import LocalStack, free_port, running
from tests.redis_server import RedisServer

pytestmark = pytest.mark.envoy

SOAK_SECONDS = float(os.environ.get("EXTPROC_SOAK_SECONDS", "150"))
CLIENTS = 4  # concurrent client loops: enough to keep both workers busy, not the whole machine
WORKERS = 2
RELOAD_EVERY_S = 15.0
FLAKY_PERIOD_S, FLAKY_ON_S = 10.0, 3.0  # the flaky backend answers 503 for 3 s of every 10
OUTAGE_AT, OUTAGE_S = 0.55, 6.0  # Redis goes away at 55% of the run, for 6 s
SAMPLE_EVERY_S = 1.0
# Windows compared for flatness, as fractions of the run: after warm-up, and the end.
WARM_WINDOW, LAST_WINDOW = (0.25, 0.40), (0.85, 1.0)
# Generous: allocator noise and lazily built caches are not leaks; a leak per request over a few
# thousand requests is far more than this.
RSS_SLACK = 0.10  # relative
RSS_SLACK_BYTES = 12 * 2**20
FD_SLACK = 12

KEYS = {"soak": "sk-soak-main", "tiny": "sk-soak-tiny", "abort": "sk-soak-abort"}
UNKNOWN_KEY = "sk-soak-nobody"
MESSAGES = [{"role": "user", "content": "a soak test prompt of several words"}]
DAY = 10**9  # a daily budget nobody reaches: it gives every tenant a token counter that spans the run


def _policy(generation: int) -> dict[str, Any]:
    """The soak policy; `generation` changes only a limit of a tenant nobody uses (a harmless reload)."""

    def keys(tenant: str) -> list[dict[str, str]]:
        return [{"name": f"{tenant}-key", "sha256": hashlib.sha256(KEYS[tenant].encode()).hexdigest()}]

    return {
        "version": 1,
        "gateway": {"default_max_tokens": 16},
        "backends": {"main": {}, "flaky": {}},
        "models": [
            {"name": "m", "backend": "main", "served_name": "org/m", "max_model_len": 4096},
            {"name": "f", "backend": "flaky", "served_name": "org/f", "max_model_len": 4096},
        ],
        "quotas": {"on_store_failure": "open", "reservation_ttl_seconds": 600},
        "tenants": {
            "soak": {"keys": keys("soak"), "limits": {"tokens_per_minute": 10**8, "tokens_per_day": DAY}},
            # One or two requests of ~110 tokens a minute fit; the rest get 429.
            "tiny": {"keys": keys("tiny"), "limits": {"tokens_per_minute": 300, "tokens_per_day": DAY}},
            "abort": {"keys": keys("abort"), "limits": {"tokens_per_day": DAY}},
            "spare": {"keys": [], "limits": {"requests_per_minute": 1000 + generation}},
        },
    }


def _write_policy(path: Path, generation: int) -> None:
    # Written aside and renamed in, as Kubernetes swaps a ConfigMap: a worker never reads half a file.
    fresh = path.with_suffix(".new")
    fresh.write_text(yaml.safe_dump(_policy(generation)))
    os.replace(fresh, path)


# -- what the clients saw ------------------------------------------------------------------------


@dataclass
class Tally:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tenant, outcome)
    classes: Counter[str] = field(default_factory=Counter)  # status class as the client saw it
    tokens: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tenant, "prompt"/"completion")
    prompt_tokens: set[int] = field(default_factory=set)  # of MESSAGES, from every usage seen
    rejections: Counter[str] = field(default_factory=Counter)  # the gateway's own refusals, by code
    unexpected: list[str] = field(default_factory=list)
    sent: int = 0

    def saw(self, tenant: str, outcome: str, status_class: str, code: str | None = None) -> None:
        self.requests[(tenant, outcome)] += 1
        self.classes[status_class] += 1
        if code is not None:
            self.rejections[code] += 1

    def usage(self, tenant: str, prompt: int, completion: int) -> None:
        self.tokens[(tenant, "prompt")] += prompt
        self.tokens[(tenant, "completion")] += completion

    def odd(self, what: str) -> None:
        if len(self.unexpected) < 50:
            self.unexpected.append(what)


@dataclass
class Client:
    session: aiohttp.ClientSession
    base_url: str
    tally: Tally
    chat_prompt_tokens: int  # what the upstream reports for MESSAGES: constant, learned first

    async def post(self, path: str, key: str, body: Any) -> aiohttp.ClientResponse:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.tally.sent += 1
        return await self.session.post(f"{self.base_url}{path}", data=data, headers=headers)

    async def chat(self, tenant: str = "soak", model: str = "m", max_tokens: int = 8) -> None:
        body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens}
        async with await self.post("/chat/completions", KEYS[tenant], body) as response:
            payload = await response.json(content_type=None)
            if response.status == 200:
                usage = payload["usage"]
                self.tally.prompt_tokens.add(usage["prompt_tokens"])
                self.tally.usage(tenant, usage["prompt_tokens"], usage["completion_tokens"])
                self.tally.saw(tenant, "ok", "2xx")
            elif response.status == 429 and tenant == "tiny" and payload["error"]["code"] == "rate_limit_exceeded":
                self.tally.saw(tenant, "rate_limited", "4xx", "rate_limit_exceeded")
            elif response.status == 503 and model == "f" and isinstance(payload["error"]["code"], int):
                # The fake vLLM's own error body (its code is the status): the upstream failed.
                self.tally.saw(tenant, "upstream_error", "5xx")
            else:
                self.tally.odd(f"chat {tenant} {model}: {response.status} {payload}")

    async def completion(self) -> None:
        body = {"model": "m", "prompt": "complete this soak sentence", "max_tokens": 6}
        async with await self.post("/completions", KEYS["soak"], body) as response:
            payload = await response.json(content_type=None)
            if response.status == 200:
                self.tally.usage("soak", payload["usage"]["prompt_tokens"], payload["usage"]["completion_tokens"])
                self.tally.saw("soak", "ok", "2xx")
            else:
                self.tally.odd(f"completion: {response.status} {payload}")

    async def stream(self, include_usage: bool) -> None:
        body: dict[str, Any] = {"model": "m", "messages": MESSAGES, "max_tokens": 10, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        async with await self.post("/chat/completions", KEYS["soak"], body) as response:
            if response.status != 200:
                self.tally.odd(f"stream: {response.status} {await response.text()}")
                return
            usage: dict[str, int] | None = None
            content_deltas, done = 0, False
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice.get("delta", {}).get("content"):
                        content_deltas += 1
        if not done or (usage is not None) != include_usage:
            self.tally.odd(f"stream include_usage={include_usage}: done={done} usage={usage}")
            return
        if usage is not None:
            self.tally.prompt_tokens.add(usage["prompt_tokens"])
            self.tally.usage("soak", usage["prompt_tokens"], usage["completion_tokens"])
        else:
            # No usage chunk for a client that did not ask (the gateway asked and removed it): what
            # the client saw is its prompt, whose count every other answer reports, and one token
            # per content delta (vLLM's pacing).
            self.tally.usage("soak", self.chat_prompt_tokens, content_deltas)
        self.tally.saw("soak", "ok", "2xx")

    async def abort(self) -> None:
        """A client that leaves after the first chunk of a long stream."""
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 400, "stream": True}
        response = await self.post("/chat/completions", KEYS["abort"], body)
        try:
            if response.status != 200:
                self.tally.odd(f"abort: {response.status} {await response.text()}")
                return
            await response.content.readany()
            self.tally.saw("abort", "cancelled", "2xx, left early")
        finally:
            response.close()  # drops the connection mid-stream

    async def bad_json(self) -> None:
        async with await self.post("/chat/completions", KEYS["soak"], b"{not json") as response:
            payload = await response.json(content_type=None)
            if response.status == 400 and payload["error"]["code"] == "invalid_json":
                self.tally.saw("soak", "invalid", "4xx", "invalid_json")
            else:
                self.tally.odd(f"bad json: {response.status} {payload}")

    async def unknown_model(self) -> None:
        body = {"model": "no-such-model", "messages": MESSAGES}
        async with await self.post("/chat/completions", KEYS["soak"], body) as response:
            payload = await response.json(content_type=None)
            if response.status == 404 and payload["error"]["code"] == "model_not_found":
                self.tally.saw("soak", "invalid", "4xx", "model_not_found")
            else:
                self.tally.odd(f"unknown model: {response.status} {payload}")

    async def unknown_key(self) -> None:
        body = {"model": "m", "messages": MESSAGES}
        async with await self.post("/chat/completions", UNKNOWN_KEY, body) as response:
            payload = await response.json(content_type=None)
            if response.status == 401 and payload["error"]["code"] == "invalid_api_key":
                self.tally.saw("anonymous", "unauthorized", "4xx", "invalid_api_key")
            else:
                self.tally.odd(f"unknown key: {response.status} {payload}")

    def schedule(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """One round of the mix: mostly successful traffic, some of every kind of failure."""
        return [
            ("chat", self.chat),
            ("stream with usage", lambda: self.stream(include_usage=True)),
            ("chat", self.chat),
            ("stream without usage", lambda: self.stream(include_usage=False)),
            ("completion", self.completion),
            ("flaky chat", lambda: self.chat(model="f")),
            ("bad json", self.bad_json),
            ("stream with usage", lambda: self.stream(include_usage=True)),
            ("tiny tenant chat", lambda: self.chat(tenant="tiny", max_tokens=100)),
            ("unknown model", self.unknown_model),
            ("chat", self.chat),
            ("abort", self.abort),
            ("unknown key", self.unknown_key),
            ("flaky chat", lambda: self.chat(model="f")),
        ]


# -- what the gateway says -----------------------------------------------------------------------


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == w for k, w in match.items()))


def by(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, *labels: str) -> Counter[tuple[str, ...]]:
    out: Counter[tuple[str, ...]] = Counter()
    for found, value in samples.get(name, []):
        if value:
            out[tuple(found[label] for label in labels)] += int(value)
    return out


def process_tree(pid: int) -> list[int]:
    """The supervisor and every process below it (workers, the metrics process)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            todo += [int(p) for p in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
    return sorted(tree)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sample:
    at: float  # seconds since the traffic started
    rss: dict[int, int]
    fds: dict[int, int]


class Sampler:
    """Reads RSS and open fds of every gateway process once a second, in a thread."""

    def __init__(self, root_pid: int, started: float, limit_s: float) -> None:
        self.root_pid = root_pid
        self.started = started
        self.limit_s = limit_s
        self.samples: list[Sample] = []
        self.pids: set[tuple[int, ...]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() - self.started < self.limit_s:
            pids = process_tree(self.root_pid)
            self.pids.add(tuple(pids))
            rss, fds = {}, {}
            for pid in pids:
                try:
                    rss[pid] = rss_bytes(pid)
                    fds[pid] = len(os.listdir(f"/proc/{pid}/fd"))
                except OSError:
                    continue
            self.samples.append(Sample(time.monotonic() - self.started, rss, fds))
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def window(self, lo: float, hi: float, duration: float) -> list[Sample]:
        return [s for s in self.samples if lo * duration <= s.at <= hi * duration]


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Events:
    reloads: int = 0
    flaky_toggles: int = 0
    outage: tuple[float, float] | None = None  # (stopped at, back at), seconds into the run
    log: list[str] = field(default_factory=list)


async def _fake_state(session: aiohttp.ClientSession, port: int, state: dict[str, Any]) -> None:
    async with session.put(f"http://127.0.0.1:{port}/fake/state", json=state) as response:
        assert response.status == 200, await response.text()


async def _control(
    session: aiohttp.ClientSession,
    stack: LocalStack,
    redis_server: RedisServer,
    policy_path: Path,
    started: float,
    events: Events,
) -> None:
    """Reloads, the flaky backend's 503 episodes and the Redis outage, on a timetable."""
    flaky_port = stack.upstream_port("flaky")
    flaky_on = False
    next_reload = RELOAD_EVERY_S
    outage_start = OUTAGE_AT * SOAK_SECONDS
    while (now := time.monotonic() - started) < SOAK_SECONDS:
        want_flaky = now % FLAKY_PERIOD_S >= FLAKY_PERIOD_S - FLAKY_ON_S
        if want_flaky != flaky_on:
            await _fake_state(session, flaky_port, {"status": 503 if want_flaky else None})
            flaky_on = want_flaky
            events.flaky_toggles += 1
        if now >= next_reload:
            events.reloads += 1
            _write_policy(policy_path, events.reloads)
            events.log.append(f"{now:6.1f}s reload #{events.reloads}")
            next_reload += RELOAD_EVERY_S
        if events.outage is None and now >= outage_start:
            await asyncio.to_thread(redis_server.stop)
            events.log.append(f"{now:6.1f}s redis stopped")
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(redis_server.start)
            back = time.monotonic() - started
            events.outage = (now, back)
            events.log.append(f"{back:6.1f}s redis back")
        await asyncio.sleep(0.2)
    if flaky_on:
        await _fake_state(session, flaky_port, {"status": None})


async def _client_loop(client: Client, offset: int, started: float) -> None:
    schedule = client.schedule()
    index = offset
    # Bounded in time and in count (a runaway fast path cannot loop forever).
    for _ in range(1_000_000):
        if time.monotonic() - started >= SOAK_SECONDS:
            return
        name, send = schedule[index % len(schedule)]
        try:
            await send()
        except Exception as exc:  # reported with the rest at the end; the soak goes on
            client.tally.odd(f"{name}: {exc!r}")
        index += 1


async def _soak(
    stack: LocalStack, redis_server: RedisServer, policy_path: Path, tally: Tally, events: Events
) -> tuple[float, Sampler]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS * 2), timeout=timeout) as session:
        # The prompt count of MESSAGES, for streams that carry no usage: from the first answer.
        first = Client(session, stack.base_url, tally, 0)
        await first.chat()
        assert tally.prompt_tokens, tally.unexpected
        prompt = next(iter(tally.prompt_tokens))
        clients = [Client(session, stack.base_url, tally, prompt) for _ in range(CLIENTS)]
        started = time.monotonic()
        supervisor = stack.process("extproc").process
        assert supervisor is not None
        with Sampler(supervisor.pid, started, SOAK_SECONDS + 30) as sampler:
            await asyncio.gather(
                _control(session, stack, redis_server, policy_path, started, events),
                *(_client_loop(client, i * 3, started) for i, client in enumerate(clients)),
            )
        return time.monotonic() - started, sampler


def _day_counter(db: redis.Redis, tenant: str) -> int:
    return sum(int(db.get(key) or 0) for key in db.scan_iter(f"xp:{{{tenant}}}:tpd:*"))


def _avoid_day_boundary(needed_s: float) -> None:
    """The daily counters are what span the run: one that straddles UTC midnight is two counters,
    and the first expires a minute after midnight."""
    into_day = time.time() % 86_400
    if into_day + needed_s > 86_400 - 5:
        time.sleep(86_400 - into_day + 1)


def _print_series(sampler: Sampler) -> None:
    print(f"\n{'t (s)':>7} {'RSS total (MiB)':>16} {'fds total':>10}   per process RSS MiB / fds")
    step = max(1, len(sampler.samples) // 40)
    for sample in sampler.samples[::step] + sampler.samples[-1:]:
        per = "  ".join(f"{pid}:{sample.rss[pid] / 2**20:.1f}/{sample.fds.get(pid, 0)}" for pid in sorted(sample.rss))
        print(f"{sample.at:7.1f} {sum(sample.rss.values()) / 2**20:16.1f} {sum(sample.fds.values()):10d}   {per}")


@pytest.fixture
def soak_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, RedisServer, Path]]:
    policy_path = tmp_path / "policy.yaml"
    _write_policy(policy_path, 0)
    with RedisServer() as server:
        stack = LocalStack(
            policy_path,
            listen_port=free_port(),
            workers=WORKERS,
            redis_url=server.url,
            metrics_port=free_port(),
            token_delay_ms=5,  # a 400-token stream lasts 2 s: the aborting client leaves well before its end
            log_level="warning",
        )
        with running(stack, timeout=60):
            yield stack, server, policy_path


def test_soak_memory_and_fds_stay_flat_counters_match_and_no_settlement_is_lost(
    soak_stack: tuple[LocalStack, RedisServer, Path],
) -> None:
    stack, redis_server, policy_path = soak_stack
    assert stack.metrics_url is not None
    _avoid_day_boundary(SOAK_SECONDS + 120)
    tally, events = Tally(), Events()
    elapsed, sampler = asyncio.run(_soak(stack, redis_server, policy_path, tally, events))

    print(f"\nsoak: {elapsed:.0f} s, {tally.sent} requests sent, {CLIENTS} clients; events: {events.log}")
    print(f"client tally by class: {dict(tally.classes)}")
    print(f"client tally by tenant and outcome: {dict(tally.requests)}")
    _print_series(sampler)
    assert not tally.unexpected, tally.unexpected
    assert events.outage is not None and events.reloads >= 1

    # -- the gateway's counters, once every request has ended and the settlement queue has drained.
    deadline = time.monotonic() + 60
    while True:
        metrics = scrape(stack.metrics_url)
        done = total(metrics, "extproc_requests_total") == tally.sent
        drained = total(metrics, "extproc_quota_pending_settlements") == 0
        if (done and drained) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    requests = by(metrics, "extproc_requests_total", "tenant", "outcome")
    assert requests == tally.requests, (requests, tally.requests)
    # By status class, as the clients saw them.
    class_of = {
        "ok": "2xx",
        "cancelled": "2xx, left early",
        "invalid": "4xx",
        "unauthorized": "4xx",
        "rate_limited": "4xx",
        "upstream_error": "5xx",
    }
    classes: Counter[str] = Counter()
    for (_tenant, outcome), count in requests.items():
        classes[class_of.get(outcome, f"unexpected outcome {outcome}")] += count
    assert classes == tally.classes
    assert by(metrics, "extproc_rejections_total", "reason") == Counter({(k,): v for k, v in tally.rejections.items()})
    assert len(tally.prompt_tokens) == 1, tally.prompt_tokens  # the streams without usage were counted right
    # Tokens: the usage the clients saw, for every tenant whose clients saw it.
    tokens = by(metrics, "extproc_tokens_total", "tenant", "type")
    for tenant in ("soak", "tiny"):
        for kind in ("prompt", "completion"):
            assert tokens[(tenant, kind)] == tally.tokens[(tenant, kind)], (tenant, kind, tokens, tally.tokens)
    # Each policy rewrite was reloaded by each worker, none refused.
    assert total(metrics, "extproc_policy_reloads_total", result="ok") == events.reloads * WORKERS
    assert total(metrics, "extproc_policy_reloads_total", result="refused") == 0
    # The outage happened under traffic, and nothing was given up.
    fail_open = total(metrics, "extproc_quota_fail_open_admissions_total")
    assert fail_open > 0
    assert total(metrics, "extproc_quota_dropped_settlements_total") == 0
    assert total(metrics, "extproc_quota_pending_settlements") == 0
    assert total(metrics, "extproc_quota_store_degraded") == 0

    # -- zero lost settlements: Redis holds, to the token, the usage the clients saw.
    db = redis.Redis.from_url(redis_server.url)
    try:
        expected = {
            "soak": tally.tokens[("soak", "prompt")] + tally.tokens[("soak", "completion")],
            "tiny": tally.tokens[("tiny", "prompt")] + tally.tokens[("tiny", "completion")],
            # The aborted streams' usage is what the gateway saw of them: its own tokens counter.
            "abort": tokens[("abort", "prompt")] + tokens[("abort", "completion")],
        }
        deadline = time.monotonic() + 30
        while (found := {t: _day_counter(db, t) for t in expected}) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"Redis day counters {found}, expected {expected}; fail-open admissions {fail_open:.0f}")
        assert found == expected
        assert all(db.hlen(f"xp:{{{tenant}}}:resv") == 0 for tenant in expected)  # nothing left reserved
    finally:
        db.close()

    # -- flat memory and file descriptors, no worker replaced.
    assert len(sampler.pids) == 1, f"the gateway's processes changed during the soak: {sampler.pids}"
    warm = sampler.window(*WARM_WINDOW, SOAK_SECONDS)
    last = sampler.window(*LAST_WINDOW, SOAK_SECONDS)
    assert len(warm) >= 3 and len(last) >= 3, (len(warm), len(last))
    warm_rss = statistics.median(sum(s.rss.values()) for s in warm)
    last_rss = statistics.median(sum(s.rss.values()) for s in last)
    warm_fds = max(sum(s.fds.values()) for s in warm)
    last_fds = max(sum(s.fds.values()) for s in last)
    # The trend after warm-up, per process, for the record (a fitted slope is too noisy to assert on).
    after = [s for s in sampler.samples if s.at >= WARM_WINDOW[0] * SOAK_SECONDS]
    rate = tally.sent / elapsed
    for pid in sorted(after[0].rss):
        xs = [s.at for s in after if pid in s.rss]
        ys = [s.rss[pid] / 2**20 for s in after if pid in s.rss]
        slope = statistics.linear_regression(xs, ys).slope if len(xs) > 1 else 0.0
        print(
            f"pid {pid}: RSS {ys[0]:.1f} -> {ys[-1]:.1f} MiB, trend {slope * 10_000 / rate:+.2f} MiB per 10k requests"
        )
    print(
        f"RSS median {warm_rss / 2**20:.1f} MiB after warm-up -> {last_rss / 2**20:.1f} MiB at the end "
        f"({(last_rss - warm_rss) / 2**20:+.1f} MiB); fds max {warm_fds} -> {last_fds}"
    )
    assert last_rss <= warm_rss * (1 + RSS_SLACK) + RSS_SLACK_BYTES
    assert last_fds <= warm_fds + FD_SLACK
