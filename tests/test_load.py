"""extproc.load: parsing vLLM's /metrics and scraping real local HTTP servers.

Every server binds a loopback address; time is a fake clock wherever freshness matters.
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from extproc.load import BackendLoad, BackendTargets, LoadScraper, PodFigures, parse_vllm_metrics

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"

# Shaped like a vLLM v1 engine's output, trimmed: process metrics, gauges, a counter with
# its `_created` series, and histograms whose bucket/count/sum samples must be ignored.
VLLM_SAMPLE = f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 18237.0
python_gc_objects_collected_total{{generation="1"}} 3542.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.147483648e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{LLAMA}"}} 12.0
vllm:num_requests_running{{engine="0",model_name="{QWEN}"}} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{LLAMA}"}} 4.0
vllm:num_requests_waiting{{engine="0",model_name="{QWEN}"}} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{LLAMA}"}} 0.63
vllm:kv_cache_usage_perc{{engine="0",model_name="{QWEN}"}} 0.21
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="{LLAMA}"}} 918273.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{{engine="0",model_name="{LLAMA}"}} 2.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{LLAMA}"}} 1200.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="{LLAMA}"}} 34.0
vllm:request_success_total{{engine="0",finished_reason="abort",model_name="{LLAMA}"}} 6.0
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{QWEN}"}} 60.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{{engine="0",finished_reason="stop",model_name="{LLAMA}"}} 1.7361e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.01",model_name="{LLAMA}"}} 15.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="{LLAMA}"}} 800.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="1.0",model_name="{LLAMA}"}} 1230.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="{LLAMA}"}} 1240.0
vllm:time_to_first_token_seconds_count{{engine="0",model_name="{LLAMA}"}} 1240.0
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="{LLAMA}"}} 98.5
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="1.0",model_name="{LLAMA}"}} 100.0
vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="{LLAMA}"}} 1240.0
vllm:e2e_request_latency_seconds_count{{engine="0",model_name="{LLAMA}"}} 1240.0
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="{LLAMA}"}} 4410.2
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="16",cache_dtype="auto",engine="0",gpu_memory_utilization="0.9"}} 1.0
"""


def vllm_text(
    waiting: float, running: float, kv: float | None = None, finished: float | None = None, *, legacy: bool = False
) -> str:
    """What a one-model vLLM pod would serve, with a histogram alongside."""
    model = f'engine="0",model_name="{LLAMA}"'
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{model}}} {running}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{model}}} {waiting}",
    ]
    if kv is not None:
        name = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
        lines += [f"# HELP {name} KV-cache usage.", f"# TYPE {name} gauge", f"{name}{{{model}}} {kv}"]
    if finished is not None:
        lines += [
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{LLAMA}"}} {finished - 1}',
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{LLAMA}"}} 1.0',
        ]
    lines += [
        "# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.",
        "# TYPE vllm:request_queue_time_seconds histogram",
        f'vllm:request_queue_time_seconds_bucket{{{model},le="0.3"}} 5.0',
        f'vllm:request_queue_time_seconds_bucket{{{model},le="+Inf"}} 9.0',
        f"vllm:request_queue_time_seconds_count{{{model}}} 9.0",
        f"vllm:request_queue_time_seconds_sum{{{model}}} 3.5",
    ]
    return "\n".join(lines) + "\n"


# -- parsing -----------------------------------------------------------------------------


def test_parse_realistic_sample_sums_models_and_takes_the_fullest_cache() -> None:
    assert parse_vllm_metrics(VLLM_SAMPLE) == PodFigures(
        waiting=5.0, running=15.0, kv_cache=0.63, finished_total=1300.0
    )


def test_parse_legacy_kv_name() -> None:
    assert parse_vllm_metrics(vllm_text(2, 3, kv=0.5, legacy=True)).kv_cache == 0.5


def test_parse_prefers_the_new_kv_name_when_both_are_exported() -> None:
    text = vllm_text(2, 3, kv=0.7) + 'vllm:gpu_cache_usage_perc{model_name="m"} 0.1\n'
    assert parse_vllm_metrics(text).kv_cache == 0.7


def test_parse_without_kv_or_counter() -> None:
    assert parse_vllm_metrics(vllm_text(2, 3)) == PodFigures(waiting=2, running=3, kv_cache=None, finished_total=None)


def test_parse_untyped_exposition() -> None:
    text = (
        'vllm:num_requests_waiting{model_name="m"} 1\n'
        'vllm:num_requests_running{model_name="m"} 2\n'
        'vllm:request_success_total{finished_reason="stop",model_name="m"} 7\n'
        'vllm:request_success_total{finished_reason="abort",model_name="m"} 2\n'
    )
    assert parse_vllm_metrics(text) == PodFigures(waiting=1, running=2, kv_cache=None, finished_total=9)


def test_parse_ignores_non_finite_samples() -> None:
    text = vllm_text(2, 3, kv=0.4) + 'vllm:kv_cache_usage_perc{model_name="other"} NaN\n'
    figures = parse_vllm_metrics(text)
    assert figures.kv_cache == 0.4
    assert not math.isnan(figures.waiting)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html><body>502 Bad Gateway</body></html>",
        "vllm:num_requests_waiting{model_name=} not-a-number\nvllm:num_requests_running 1\n",
        'vllm:num_requests_waiting{model_name="m" 3\nvllm:num_requests_running 1\n',
        "vllm:num_requests_running 1\n",  # waiting missing
        VLLM_SAMPLE.replace("vllm:num_requests_waiting", "vllm:num_requests_queued"),
    ],
)
def test_parse_rejects_garbage_and_incomplete_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_vllm_metrics(text)


@pytest.mark.parametrize(
    "targets",
    [
        {"urls": ("https://10.0.0.5:8000/metrics",)},
        {"urls": ("10.0.0.5:8000/metrics",)},
        {"dns": "vllm-headless"},
        {"dns": "vllm-headless:http"},
        {"path": "metrics"},
    ],
)
def test_bad_targets_fail_early(targets: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BackendTargets(**targets)


# -- scraping ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class MetricsServer:
    """A real aiohttp server on loopback serving whatever `text` holds at the moment."""

    text: str
    chunked: bool = False
    hang: bool = False  # answer only once stopped
    host: str = "127.0.0.1"
    port: int = 0
    hits: int = 0
    runner: web.AppRunner | None = field(default=None, repr=False)
    released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.hang:
            await self.released.wait()
        if not self.chunked:
            return web.Response(text=self.text, content_type="text/plain", charset="utf-8")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; version=0.0.4"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = self.text.encode()
        for start in range(0, len(data), 97):  # chunk edges fall mid-line
            await response.write(data[start : start + 97])
        await response.write_eof()
        return response

    async def start(self, *extra_hosts: str) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        for host in extra_hosts:
            await web.TCPSite(self.runner, host, self.port).start()

    async def stop(self) -> None:
        self.released.set()  # or cleanup would wait out the hanging handler
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


ServerFactory = Callable[..., Awaitable[MetricsServer]]


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    started: list[MetricsServer] = []

    async def start(text: str, *extra_hosts: str, **options: Any) -> MetricsServer:
        server = MetricsServer(text, **options)
        await server.start(*extra_hosts)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def urls(*servers: MetricsServer) -> BackendTargets:
    return BackendTargets(urls=tuple(s.url for s in servers))


@pytest.mark.asyncio
async def test_figures_are_read_and_follow_the_server(serve: ServerFactory) -> None:
    server = await serve(vllm_text(3, 5, kv=0.25, finished=10))
    scraper = LoadScraper({"small": urls(server)}, clock=FakeClock())
    assert scraper.snapshot() == {"small": BackendLoad.UNKNOWN}

    await scraper.scrape_once()
    assert scraper.snapshot()["small"] == BackendLoad(
        waiting_per_pod=3, kv_cache=0.25, running=5, pods=1, drain_per_s=None
    )

    server.text = vllm_text(7, 8, kv=0.5, finished=10)
    await scraper.scrape_once()
    load = scraper.snapshot()["small"]
    assert (load.waiting_per_pod, load.running, load.kv_cache) == (7, 8, 0.5)


@pytest.mark.asyncio
async def test_pods_average_waiting_and_kv_and_total_running(serve: ServerFactory) -> None:
    a = await serve(vllm_text(2, 10, kv=0.2))
    b = await serve(vllm_text(6, 4, kv=0.6))
    c = await serve(vllm_text(4, 1))  # no kv metric: counts for waiting, not for kv
    scraper = LoadScraper({"big": urls(a, b, c), "small": urls(a)}, clock=FakeClock())
    await scraper.scrape_once()
    snap = scraper.snapshot()
    assert snap["big"].pods == 3
    assert snap["big"].waiting_per_pod == pytest.approx(4.0)
    assert snap["big"].running == 15
    assert snap["big"].kv_cache == pytest.approx(0.4)
    assert snap["small"].pods == 1


@pytest.mark.asyncio
async def test_drain_rate_from_the_counter_increase(serve: ServerFactory) -> None:
    clock = FakeClock()
    a = await serve(vllm_text(0, 4, finished=10))
    b = await serve(vllm_text(0, 4, finished=20))
    scraper = LoadScraper({"pool": urls(a, b)}, clock=clock)
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].drain_per_s is None  # one scrape says nothing about a rate

    clock.now += 0.5
    a.text = vllm_text(0, 4, finished=12)  # 4/s
    b.text = vllm_text(0, 4, finished=23)  # 6/s
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].drain_per_s == pytest.approx(10.0)

    # b restarted (its counter went back): its rate is unknown, so a's stands in for both.
    clock.now += 0.5
    a.text = vllm_text(0, 4, finished=15)  # 6/s
    b.text = vllm_text(0, 4, finished=1)
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].drain_per_s == pytest.approx(12.0)

    clock.now += 0.5
    a.text = vllm_text(0, 4, finished=15)  # 0/s
    b.text = vllm_text(0, 4, finished=3)  # 4/s
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].drain_per_s == pytest.approx(4.0)


@pytest.mark.asyncio
async def test_no_rate_across_a_stale_gap(serve: ServerFactory) -> None:
    clock = FakeClock()
    server = await serve(vllm_text(0, 1, finished=10))
    scraper = LoadScraper({"pool": urls(server)}, stale_after_s=2.0, clock=clock)
    await scraper.scrape_once()
    clock.now += 5
    server.text = vllm_text(0, 1, finished=20)
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].drain_per_s is None
    clock.now += 1
    server.text = vllm_text(0, 1, finished=23)
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].drain_per_s == pytest.approx(3.0)


@pytest.mark.asyncio
async def test_stale_figures_make_the_backend_unknown(serve: ServerFactory) -> None:
    clock = FakeClock()
    server = await serve(vllm_text(1, 1, kv=0.1))
    scraper = LoadScraper({"pool": urls(server)}, stale_after_s=2.0, clock=clock)
    await scraper.scrape_once()
    clock.now += 2.0
    assert scraper.snapshot()["pool"].pods == 1  # exactly stale_after_s old is still fresh
    clock.now += 0.01
    assert scraper.snapshot()["pool"] is BackendLoad.UNKNOWN
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].pods == 1


@pytest.mark.asyncio
async def test_a_server_that_stops_answering_ages_out(serve: ServerFactory) -> None:
    clock = FakeClock()
    a = await serve(vllm_text(2, 1))
    b = await serve(vllm_text(8, 1))
    scraper = LoadScraper({"pool": urls(a, b)}, stale_after_s=2.0, clock=clock)
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].waiting_per_pod == 5

    await b.stop()
    clock.now += 1.5
    await scraper.scrape_once()  # b refuses the connection: its last figures still count
    assert scraper.snapshot()["pool"].pods == 2
    clock.now += 1.0
    await scraper.scrape_once()
    load = scraper.snapshot()["pool"]
    assert (load.pods, load.waiting_per_pod) == (1, 2)

    await a.stop()
    clock.now += 2.5
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"] is BackendLoad.UNKNOWN


@pytest.mark.asyncio
async def test_a_server_that_hangs_times_out_without_holding_up_the_others(serve: ServerFactory) -> None:
    fast = await serve(vllm_text(1, 1))
    slow = await serve(vllm_text(9, 9), hang=True)
    scraper = LoadScraper({"fast": urls(fast), "slow": urls(slow)}, timeout_s=0.2, clock=FakeClock())
    loop = asyncio.get_running_loop()
    began = loop.time()
    await scraper.scrape_once()
    assert loop.time() - began < 2.0
    snap = scraper.snapshot()
    assert snap["fast"].pods == 1
    assert snap["slow"] is BackendLoad.UNKNOWN
    assert slow.hits == 1


@pytest.mark.asyncio
async def test_chunked_transfer_encoding(serve: ServerFactory) -> None:
    server = await serve(VLLM_SAMPLE, chunked=True)
    scraper = LoadScraper({"pool": urls(server)}, clock=FakeClock())
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"] == BackendLoad(
        waiting_per_pod=5, kv_cache=0.63, running=15, pods=1, drain_per_s=None
    )


async def raw_server(response: bytes) -> tuple[asyncio.Server, str]:
    """A server that answers every connection with `response` verbatim, then hangs up."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/metrics"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("response", "answers"),
    [
        # No length, no chunking: the body runs to the end of the connection.
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + vllm_text(3, 1).encode(), True),
        # Chunk extensions and trailers are legal and carry nothing wanted.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(
                b"%x;name=value\r\n%s\r\n" % (len(line), line) for line in vllm_text(3, 1).encode().splitlines(True)
            )
            + b"0\r\nX-Trailer: yes\r\n\r\n",
            True,
        ),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n" + vllm_text(3, 1).encode()[:100], False),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", False),
        # Over the 4 MiB cap, declared and undeclared.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\n\r\n" + vllm_text(3, 1).encode() + b"#" * (5 * 1024 * 1024) + b"\n", False),
        (b"SSH-2.0-OpenSSH_9.6\r\n", False),
    ],
)
async def test_http_framing(response: bytes, answers: bool) -> None:
    server, url = await raw_server(response)
    async with server:
        scraper = LoadScraper({"pool": BackendTargets(urls=(url,))}, clock=FakeClock())
        await scraper.scrape_once()
    load = scraper.snapshot()["pool"]
    assert load.pods == (1 if answers else 0)
    if answers:
        assert load.waiting_per_pod == 3


@pytest.mark.asyncio
async def test_dns_target_counts_each_answering_address_once(serve: ServerFactory) -> None:
    server = await serve(vllm_text(4, 2, kv=0.3))  # 127.0.0.1 only: a ::1 answer for localhost refuses
    scraper = LoadScraper({"pool": BackendTargets(dns=f"localhost:{server.port}")}, clock=FakeClock())
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"] == BackendLoad(
        waiting_per_pod=4, kv_cache=0.3, running=2, pods=1, drain_per_s=None
    )

    # The same pod listed statically and found through DNS is one pod.
    both = BackendTargets(urls=(server.url,), dns=f"localhost:{server.port}")
    scraper = LoadScraper({"pool": both}, clock=FakeClock())
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].pods == 1
    assert server.hits == 2


def addrinfo(*hosts: str, port: int) -> list[tuple[Any, ...]]:
    return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (h, port)) for h in hosts]


@pytest.mark.asyncio
async def test_dns_pods_come_and_go_with_the_answer(serve: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await serve(vllm_text(2, 1), "127.0.0.2")  # two "pods": one server on two loopback addresses
    # Duplicates, and 127.0.0.3 where nothing listens: it is scraped, fails, and does not count.
    answer: list[tuple[Any, ...]] | OSError = addrinfo(
        "127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.3", port=server.port
    )
    asked: list[tuple[str, int]] = []

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        asked.append((host, port))
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    scraper = LoadScraper({"pool": BackendTargets(dns=f"vllm-headless.ns.svc:{server.port}")}, clock=FakeClock())
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].pods == 2
    assert asked == [("vllm-headless.ns.svc", server.port)]

    # A failed lookup keeps the last answer rather than blanking out the backend.
    answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].pods == 2

    # An address missing from a good answer is dropped at once, not left to age.
    answer = addrinfo("127.0.0.1", port=server.port)
    await scraper.scrape_once()
    assert scraper.snapshot()["pool"].pods == 1
    assert len(asked) == 3


@pytest.mark.asyncio
async def test_set_targets_keeps_the_figures_of_pods_still_present(serve: ServerFactory) -> None:
    a = await serve(vllm_text(2, 1))
    b = await serve(vllm_text(8, 1))
    c = await serve(vllm_text(5, 1))
    scraper = LoadScraper({"pool": urls(a, b), "gone": urls(a)}, clock=FakeClock())
    await scraper.scrape_once()

    scraper.set_targets({"pool": urls(b, c), "new": urls(c)})
    snap = scraper.snapshot()
    assert set(snap) == {"pool", "new"}
    assert (snap["pool"].pods, snap["pool"].waiting_per_pod) == (1, 8)  # b kept, a dropped, c not yet read
    assert snap["new"] is BackendLoad.UNKNOWN

    await scraper.scrape_once()
    snap = scraper.snapshot()
    assert (snap["pool"].pods, snap["pool"].waiting_per_pod) == (2, 6.5)
    assert snap["new"].pods == 1


@pytest.mark.asyncio
async def test_run_keeps_scraping_through_failures_until_stopped(serve: ServerFactory) -> None:
    server = await serve(vllm_text(1, 1))
    dead = MetricsServer("")
    await dead.start()
    await dead.stop()  # a port that refuses
    scraper = LoadScraper({"pool": urls(server, dead)}, interval_s=0.05, timeout_s=0.5)
    scraper.start()
    scraper.start()  # idempotent while running
    try:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if server.hits >= 3:
                break
        assert server.hits >= 3
        assert scraper.snapshot()["pool"].pods == 1
    finally:
        await scraper.stop()
    hits = server.hits
    await asyncio.sleep(0.15)
    assert server.hits == hits
    await scraper.stop()  # stopping twice is harmless
