"""Backend load from vLLM's Prometheus `/metrics`, scraped on an interval, read as plain data.

`LoadScraper` polls every pod of every backend and keeps each pod's last figures;
`snapshot()` folds the fresh ones into one `BackendLoad` per backend for a pure routing
decision. Nothing here decides anything.

The HTTP client is a few lines of asyncio on purpose: the runtime carries no HTTP client
library, and a plain-http GET of one small document needs none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from extproc.recorder import NULL_RECORDER, Recorder

log = logging.getLogger("extproc.load")

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_LEGACY = "vllm:gpu_cache_usage_perc"  # vLLM's name before kv_cache_usage_perc
# The sample name, not the family name: the parser files a typed counter under
# `vllm:request_success` and an untyped one under `vllm:request_success_total`.
FINISHED = "vllm:request_success_total"

# A vLLM pod exports ~1000 lines (mostly histograms) and prometheus_client's pure-Python
# parser takes ~15 ms over all of them -- an event-loop stall per pod per round. Only the
# lines that can mention the metrics above go to the parser; it still does all the parsing.
_RELEVANT_LINE = re.compile(
    r"^.*(?:vllm:num_requests_|vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc|vllm:request_success).*$",
    re.MULTILINE,
)

MAX_BODY_BYTES = 4 * 1024 * 1024
_MAX_HEADER_LINES = 100


@dataclass(frozen=True, slots=True)
class PodFigures:
    """One pod's figures from one scrape, summed over the models it serves."""

    waiting: float
    running: float
    kv_cache: float | None  # 0..1; None when the pod exports neither kv metric
    finished_total: float | None  # vllm:request_success_total summed; None if absent


def parse_vllm_metrics(text: str) -> PodFigures:
    """Read one pod's figures from Prometheus text exposition. Raises ValueError."""
    sums: dict[str, float] = {}
    maxes: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families("\n".join(_RELEVANT_LINE.findall(text))):
            for sample in family.samples:
                name, value = sample.name, float(sample.value)
                # One NaN would poison every comparison the routing decision makes.
                if not math.isfinite(value):
                    continue
                if name in (WAITING, RUNNING, FINISHED):
                    sums[name] = sums.get(name, 0.0) + value
                elif name in (KV_CACHE, KV_CACHE_LEGACY):
                    # The fullest model's cache is the one that will preempt first.
                    maxes[name] = max(maxes.get(name, value), value)
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"unparsable metrics text: {exc}") from exc
    missing = [name for name in (WAITING, RUNNING) if name not in sums]
    if missing:
        raise ValueError(f"metrics text lacks {', '.join(missing)}")
    return PodFigures(
        waiting=sums[WAITING],
        running=sums[RUNNING],
        kv_cache=maxes.get(KV_CACHE, maxes.get(KV_CACHE_LEGACY)),
        finished_total=sums.get(FINISHED),
    )


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """What the routing decision reads about one backend. None means unknown."""

    waiting_per_pod: float | None
    kv_cache: float | None  # mean over the pods that reported it
    running: float | None  # total over pods
    pods: int  # pods whose figures are fresh
    # Requests finished per second across the backend: the mean rate of the pods that have
    # one, times `pods`, so that it covers the same pods as `waiting_per_pod`.
    drain_per_s: float | None
    UNKNOWN: ClassVar[BackendLoad]


BackendLoad.UNKNOWN = BackendLoad(waiting_per_pod=None, kv_cache=None, running=None, pods=0, drain_per_s=None)


@dataclass(frozen=True, slots=True)
class BackendTargets:
    """Where one backend's pods publish their metrics."""

    urls: tuple[str, ...] = ()  # static metrics URLs, e.g. http://10.0.0.5:8000/metrics
    # "host:port", re-resolved every round (a headless Service lists every pod); each
    # address is scraped at http://ADDR:PORT{path}.
    dns: str | None = None
    path: str = "/metrics"

    def __post_init__(self) -> None:
        # Fail at policy load rather than as a backend that stays UNKNOWN for ever.
        for url in self.urls:
            _parse_url(url)
        if self.dns is not None:
            _split_host_port(self.dns)
        if not self.path.startswith("/"):
            raise ValueError(f"metrics path must start with '/': {self.path!r}")


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str
    port: int
    target: str  # what goes on the request line: path and query

    @property
    def key(self) -> str:
        # One spelling for a static URL and a resolved address, so the two dedupe.
        return f"http://{_bracket(self.host)}:{self.port}{self.target}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _parse_url(url: str) -> _Endpoint:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"metrics URL must be http://HOST[:PORT]/PATH: {url!r}")
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    return _Endpoint(parts.hostname, parts.port or 80, target)


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics dns target must be HOST:PORT: {value!r}")
    return host, int(port)


class _HttpError(Exception):
    pass


async def _http_get(host: str, port: int, target: str, max_body: int = MAX_BODY_BYTES) -> bytes:
    """GET one document over plain HTTP/1.1 and return its body; the caller bounds the time."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {_bracket(host)}:{port}\r\n"
            "Accept: text/plain\r\nUser-Agent: extproc-load\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("latin-1"))
        await writer.drain()
        status = await reader.readline()
        version, _, rest = status.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise _HttpError(f"not an HTTP/1.x response: {status[:80]!r}")
        if rest.split(b" ", 1)[0].strip() != b"200":
            raise _HttpError(f"status {rest.strip()[:80]!r}")
        headers = await _read_headers(reader)
        if headers.get(b"content-encoding", b"identity").lower() != b"identity":
            raise _HttpError("compressed body was not asked for")
        encoding = headers.get(b"transfer-encoding")
        if encoding is not None:
            if encoding.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
                raise _HttpError(f"transfer-encoding {encoding[:80]!r}")
            return await _read_chunked(reader, max_body)
        length = headers.get(b"content-length")
        if length is not None:
            size = int(length)
            if not 0 <= size <= max_body:
                raise _HttpError(f"content-length {size}")
            return await reader.readexactly(size)
        return await _read_to_eof(reader, max_body)
    finally:
        writer.close()
        # The body is in hand (or the request failed): how the peer hangs up does not matter.
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_headers(reader: asyncio.StreamReader) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if not line:
            raise _HttpError("connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.partition(b":")
        if not sep:
            raise _HttpError(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    raise _HttpError("too many header lines")


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise _HttpError("connection closed inside a chunked body")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers may follow; the connection closes after them, nothing in them is wanted.
            return bytes(body)
        if size < 0 or len(body) + size > max_body:
            raise _HttpError(f"body larger than {max_body} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise _HttpError("chunk not followed by CRLF")


async def _read_to_eof(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > max_body:
            raise _HttpError(f"body larger than {max_body} bytes")
    return bytes(body)


@dataclass(slots=True)
class _Pod:
    endpoint: _Endpoint
    figures: PodFigures | None = None
    at: float = 0.0  # clock reading when `figures` arrived
    drain_per_s: float | None = None
    failing: bool = False

    def record(self, figures: PodFigures, now: float, stale_after_s: float) -> None:
        prev, elapsed = self.figures, now - self.at
        self.drain_per_s = None
        if (
            prev is not None
            and 0.0 < elapsed <= stale_after_s
            and prev.finished_total is not None
            and figures.finished_total is not None
            # A smaller total means the pod restarted: this interval's rate is unknowable.
            and figures.finished_total >= prev.finished_total
        ):
            self.drain_per_s = (figures.finished_total - prev.finished_total) / elapsed
        self.figures, self.at = figures, now


@dataclass(slots=True)
class _Backend:
    targets: BackendTargets
    static: dict[str, _Endpoint]
    resolved: dict[str, _Endpoint] = field(default_factory=dict)  # the last DNS answer
    pods: dict[str, _Pod] = field(default_factory=dict)
    resolve_failing: bool = False

    def reconcile(self) -> None:
        endpoints = {**self.resolved, **self.static}
        self.pods = {key: self.pods.get(key) or _Pod(endpoint) for key, endpoint in endpoints.items()}

    def load(self, now: float, stale_after_s: float) -> BackendLoad:
        fresh = [
            (pod.figures, pod.drain_per_s)
            for pod in self.pods.values()
            if pod.figures is not None and now - pod.at <= stale_after_s
        ]
        if not fresh:
            return BackendLoad.UNKNOWN
        pods = len(fresh)
        kvs = [figures.kv_cache for figures, _ in fresh if figures.kv_cache is not None]
        rates = [rate for _, rate in fresh if rate is not None]
        return BackendLoad(
            waiting_per_pod=sum(figures.waiting for figures, _ in fresh) / pods,
            kv_cache=sum(kvs) / len(kvs) if kvs else None,
            running=sum(figures.running for figures, _ in fresh),
            pods=pods,
            drain_per_s=sum(rates) / len(rates) * pods if rates else None,
        )


class LoadScraper:
    """Scrapes every backend's pods each interval; `snapshot()` reads the result."""

    def __init__(
        self,
        targets: dict[str, BackendTargets],
        interval_s: float = 0.5,
        timeout_s: float = 1.0,
        stale_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0 or stale_after_s <= 0:
            raise ValueError("interval_s, timeout_s and stale_after_s must be positive")
        self._recorder = recorder
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._backends: dict[str, _Backend] = {}
        self._task: asyncio.Task[None] | None = None
        self.set_targets(targets)

    def configure(self, *, interval_s: float, timeout_s: float, stale_after_s: float) -> None:
        """New timings from a reloaded policy; the next round uses them."""
        if interval_s <= 0 or timeout_s <= 0 or stale_after_s <= 0:
            raise ValueError("interval, timeout and staleness must be positive")
        self._interval_s, self._timeout_s, self._stale_after_s = interval_s, timeout_s, stale_after_s

    def set_targets(self, targets: dict[str, BackendTargets]) -> None:
        """Replace the targets; pods present before and after keep their figures."""
        backends: dict[str, _Backend] = {}
        for name, new in targets.items():
            backend = _Backend(new, {ep.key: ep for ep in map(_parse_url, new.urls)})
            old = self._backends.get(name)
            if old is not None:
                if (old.targets.dns, old.targets.path) == (new.dns, new.path):
                    backend.resolved = old.resolved
                backend.pods = old.pods
            backend.reconcile()
            backends[name] = backend
        self._backends = backends

    def snapshot(self) -> dict[str, BackendLoad]:
        now = self._clock()
        return {name: backend.load(now, self._stale_after_s) for name, backend in self._backends.items()}

    async def scrape_once(self) -> None:
        """One round: resolve, then scrape every pod of every backend concurrently."""
        backends = list(self._backends.values())
        await asyncio.gather(*(self._resolve(b, b.targets.dns) for b in backends if b.targets.dns is not None))
        for backend in backends:
            backend.reconcile()
        await asyncio.gather(*(self._scrape(pod) for b in backends for pod in b.pods.values()))
        for name, load in self.snapshot().items():
            waiting = None if load.waiting_per_pod is None else load.waiting_per_pod * load.pods
            self._recorder.backend_load(name, waiting, load.running, load.kv_cache)

    async def run(self) -> None:
        """Scrape every interval until cancelled."""
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            try:
                await self.scrape_once()
            except Exception:
                log.exception("load scrape round failed")
            next_round += self._interval_s
            # After an overrun start the next round at once, but do not burst to catch up.
            next_round = max(next_round, loop.time())
            await asyncio.sleep(next_round - loop.time())

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="extproc-load-scraper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() rather than awaiting the task: its CancelledError is not ours to raise.
            await asyncio.wait({task})

    async def _resolve(self, backend: _Backend, dns: str) -> None:
        host, port = _split_host_port(dns)
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), self._timeout_s
            )
        except OSError as exc:
            # Keep the last answer: a resolver hiccup must not blank out a healthy backend.
            # Pods that are really gone stop answering and age out.
            if not backend.resolve_failing:
                log.warning("load: resolving %s failed: %s", dns, str(exc) or type(exc).__name__)
            backend.resolve_failing = True
            return
        if backend.resolve_failing:
            log.info("load: resolving %s works again", dns)
        backend.resolve_failing = False
        resolved: dict[str, _Endpoint] = {}
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                endpoint = _Endpoint(str(sockaddr[0]), port, backend.targets.path)
                resolved[endpoint.key] = endpoint
        backend.resolved = resolved

    async def _scrape(self, pod: _Pod) -> None:
        ep = pod.endpoint
        try:
            body = await asyncio.wait_for(_http_get(ep.host, ep.port, ep.target), self._timeout_s)
            figures = parse_vllm_metrics(body.decode("utf-8"))
        except (OSError, EOFError, ValueError, _HttpError) as exc:
            if not pod.failing:
                log.warning("load: scraping %s failed: %s", ep.key, str(exc) or type(exc).__name__)
            pod.failing = True
            return
        if pod.failing:
            log.info("load: scraping %s works again", ep.key)
        pod.failing = False
        pod.record(figures, self._clock(), self._stale_after_s)
