"""`extproc serve`: the grpc.aio ext_proc server, its health service, workers and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from extproc import metrics
from extproc.access_log import AccessLog
from extproc.admission import AdmissionQueue
from extproc.compiled import CompiledPolicy, compile_policy
from extproc.heap import freeze_long_lived
from extproc.inflight import InFlightCounter, LocalInFlight, SharedInFlight
from extproc.load import BackendTargets, LoadScraper
from extproc.load_view import CachedLoads
from extproc.policy import Policy
from extproc.quota.service import QuotaService
from extproc.recorder import NULL_RECORDER, Recorder
from extproc.reload import Fingerprint, PolicyWatcher

log = logging.getLogger("extproc.server")

HEALTH_SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
_METRICS_PROCESS = -1  # the supervisor's child that serves the replica's /metrics
_FORWARDED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})  # the signals the supervisor passes on


@dataclass(frozen=True)
class ServeOptions:
    listen: str
    policy: Policy
    workers: int = 1
    grace_seconds: float = 30.0
    redis_url: str | None = None
    metrics_port: int | None = None  # one /metrics for the replica, summing every worker
    metrics_dir: str | None = None  # where workers write their metric files; set by `serve` when None
    access_log: str = "stdout"  # stdout, stderr, off, or a file path
    access_log_prompts: bool = False  # debug only: the request body goes into the access log
    policy_path: str | None = None  # watched for changes (and re-read on SIGHUP); None: no reload
    # Metrics URLs for backends whose policy names no load source (the local stack's fakes).
    load_urls: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reload_interval_s: float = 1.0
    in_flight: InFlightCounter | None = None  # shared by the workers of a replica; set by the supervisor
    policy_fingerprint: Fingerprint | None = None  # the files as they were when `policy` was read


def load_targets(policy: Policy, extra_urls: dict[str, tuple[str, ...]]) -> dict[str, BackendTargets]:
    """Where to scrape each backend's vLLM figures: the policy's sources, else the ones given at start."""
    targets = {}
    for name, backend in policy.backends.items():
        source = backend.load
        urls = tuple(source.metrics_urls) or extra_urls.get(name, ())
        if urls or source.metrics_dns:
            targets[name] = BackendTargets(urls=urls, dns=source.metrics_dns, path=source.metrics_path)
    return targets


def build_quota_service(policy: Policy, redis_url: str | None, recorder: Recorder = NULL_RECORDER) -> QuotaService:
    """Redis when a URL is given, else this process's memory. Built even without tenants, so a
    reload that adds tenants finds it ready (without tenants nothing ever calls it)."""
    from extproc.quota.memory import MemoryStore

    if redis_url is None:
        return QuotaService(MemoryStore())
    from extproc.quota.redis_store import RedisStore
    from extproc.quota.resilient import ResilientStore

    store = ResilientStore(RedisStore(redis_url), on_failure=policy.quotas.on_store_failure, recorder=recorder)
    return QuotaService(store)


def grpc_options(policy: Policy) -> list[tuple[str, int]]:
    # A buffered body arrives as one message: allow the body limit plus protobuf framing.
    limit = policy.gateway.max_body_bytes + (1 << 20)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1),
    ]


async def run_server(options: ServeOptions, worker_index: int = 0) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight streams within the grace period."""
    # Imported here so a parent that forks workers has created no gRPC object.
    import grpc
    from envoy.service.accesslog.v3 import als_pb2_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from extproc.compiled_form import form
    from extproc.core import Gateway
    from extproc.processor import ExternalProcessor, RecordBatch
    from extproc.stream_ends import AccessLogReceiver, StreamEnds
    from extproc.wire import add_processor_to_server

    recorder: Recorder = NULL_RECORDER
    files: metrics.MetricFiles | None = None
    if options.metrics_dir is not None:
        files = metrics.MetricFiles(Path(options.metrics_dir), metrics.worker_identity(worker_index))
        recorder = metrics.GatewayMetrics(files)
    access_log = AccessLog.open(options.access_log, include_prompts=options.access_log_prompts)
    if access_log is not None and access_log.include_prompts:
        log.warning("the access log includes request bodies (prompt text): a debug switch, never for production")
    loop = asyncio.get_running_loop()
    # Tokenizers and key files are read off the loop, as a reload reads them.
    compiled = await asyncio.to_thread(compile_policy, options.policy)
    gateway = Gateway(compiled)
    recorder.policy_loaded(compiled.digest, options.policy.backends)
    quotas = build_quota_service(options.policy, options.redis_url, recorder)
    scraper = LoadScraper(
        load_targets(options.policy, options.load_urls),
        interval_s=options.policy.load.scrape_interval_ms / 1000,
        timeout_s=options.policy.load.scrape_timeout_ms / 1000,
        stale_after_s=options.policy.load.stale_after_ms / 1000,
        recorder=recorder,
    )
    scraper.start()
    in_flight = options.in_flight or LocalInFlight()
    queue = AdmissionQueue(in_flight, recorder=recorder)
    if options.metrics_port and options.metrics_dir is not None and options.workers <= 1:
        # One process: it serves its own /metrics (a supervisor runs a metrics process instead).
        metrics.serve_metrics(options.metrics_port, replica_registry(Path(options.metrics_dir), in_flight))
    stream_ends = StreamEnds(options.redis_url)
    batch = RecordBatch(recorder, access_log)
    processor = ExternalProcessor(
        gateway, quotas, CachedLoads(scraper), queue, recorder, access_log, stream_ends, batch
    )
    del compiled, gateway  # the processor holds the policy now: a reload's replacement frees it

    def apply(new: CompiledPolicy) -> None:
        # One assignment: streams already running keep the gateway they began with.
        processor.gateway = Gateway(new)
        recorder.policy_loaded(new.digest, new.policy.backends)
        scraper.set_targets(load_targets(new.policy, options.load_urls))
        scraper.configure(
            interval_s=new.policy.load.scrape_interval_ms / 1000,
            timeout_s=new.policy.load.scrape_timeout_ms / 1000,
            stale_after_s=new.policy.load.stale_after_ms / 1000,
        )

    watcher: PolicyWatcher | None = None
    if options.policy_path is not None:
        watcher = PolicyWatcher(
            options.policy_path,
            options.policy,
            apply,
            lambda result: recorder.policy_reload(result.ok),
            options.reload_interval_s,
            options.policy_fingerprint,
        )
        # A worker started after the file changed (one replacing a dead worker) must not serve the
        # policy the replica started with until its first poll, or for good with --reload-interval 0:
        # a key revoked by a reload would be accepted again. Checked before the port opens.
        loop.add_signal_handler(signal.SIGHUP, watcher.request)  # first: a SIGHUP meanwhile is not lost
        try:
            await watcher.check()
        except Exception:
            log.exception("policy reload failed")
        watcher.start()
    server = grpc.aio.server(options=grpc_options(options.policy))
    add_processor_to_server(processor, server)
    reports = AccessLogReceiver(stream_ends)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(reports, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(options.listen)
    if port == 0:
        raise SystemExit(f"extproc: cannot listen on {options.listen}")
    await server.start()
    freeze_long_lived()
    for service in ("", HEALTH_SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving ext_proc on %s (pid %d, %s form; %d start-up objects frozen out of the garbage collector)",
        options.listen,
        os.getpid(),
        form(),
        gc.get_freeze_count(),  # walks the frozen list: once, here
    )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining streams for up to %.0fs", options.grace_seconds)
    await health.enter_graceful_shutdown()
    if watcher is not None:
        await watcher.stop()
    stopped = asyncio.ensure_future(server.stop(options.grace_seconds))
    # Envoy's access log streams stay open: end them once the ext_proc streams they report on are.
    await processor.idle(options.grace_seconds)
    await stream_ends.settled(stream_ends.wait_s)  # the last cut streams' reports may still be on their way
    reports.close()
    await stopped
    await stream_ends.drain()  # outcomes still waiting for a report (each for at most a second)
    await scraper.stop()
    await quotas.close()  # settlements in flight are written (or kept queued) before exit
    batch.flush()  # the last requests' records, before the log closes
    if access_log is not None:
        access_log.close()
    if files is not None:
        files.close()
    log.info("stopped")


def replica_registry(directory: Path, in_flight: InFlightCounter) -> metrics.CollectorRegistry:
    """What the replica's /metrics shows: every worker's files, summed, and the shared in-flight counts."""
    return metrics.metrics_registry(directory, [metrics.InFlightCollector(in_flight.backends, in_flight.total)])


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_worker(options: ServeOptions, worker_index: int = 0) -> None:
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        runner.run(run_server(options, worker_index))


def serve(options: ServeOptions) -> int:
    temporary: str | None = None
    if options.metrics_port and options.metrics_dir is None:
        # The files of this replica's workers; emptied at start, so an earlier run is never summed in.
        temporary = tempfile.mkdtemp(prefix="extproc-metrics-")
        options = dataclasses.replace(options, metrics_dir=temporary)
    lock = metrics.prepare_directory(Path(options.metrics_dir)) if options.metrics_dir is not None else None
    try:
        if options.workers <= 1:
            run_worker(options)
            return 0
        return _supervise(options)
    finally:
        # Only the replica's own process gets here: forked workers leave through os._exit.
        if lock is not None:
            os.close(lock)
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _serve_replica_metrics(options: ServeOptions, in_flight: InFlightCounter) -> None:
    """The metrics process of a supervised replica: /metrics until SIGTERM."""
    assert options.metrics_port and options.metrics_dir is not None
    metrics.serve_metrics(options.metrics_port, replica_registry(Path(options.metrics_dir), in_flight))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


def _supervise(options: ServeOptions) -> int:
    """Fork N workers sharing the port (SO_REUSEPORT); restart any that die unexpectedly."""
    children: dict[int, int] = {}  # pid -> worker index (METRICS_PROCESS for the metrics server)
    stopping = False
    # In-flight counts per backend shared by every worker, so a cap holds for the replica.
    in_flight = SharedInFlight.create(options.workers)
    options = dataclasses.replace(options, in_flight=in_flight)

    def spawn(index: int) -> None:
        # Signals wait while we decide and fork: a SIGTERM that came after `stopping` was read but
        # before the new pid is in `children` would never reach that worker, and the supervisor
        # would wait for it forever. Delivered (to forward()) once the child is known.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            if stopping:
                return
            pid = os.fork()
            if pid == 0:
                _become_child(index)
            children[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _become_child(index: int) -> NoReturn:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # Ignored until the worker's own handler is installed: a reload must never kill it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # the fork inherited the supervisor's block
        code = 0
        try:
            if index == _METRICS_PROCESS:
                _serve_replica_metrics(options, in_flight)
                os._exit(0)
            in_flight.bind_worker(index)
            run_worker(options, index)
        except BaseException:
            log.exception("worker %d failed", index)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def forward_reload(signum: int, _frame: object) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward_reload)
    for index in range(options.workers):
        spawn(index)
    if options.metrics_port:
        spawn(_METRICS_PROCESS)
    log.info("started %d workers on %s", options.workers, options.listen)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if index != _METRICS_PROCESS:
            # Slots the dead worker held come back before its replacement starts, and its live
            # gauges go; its counters stay, and the replacement counts on from them.
            in_flight.reset_worker(index)
            if options.metrics_dir is not None:
                metrics.clear_worker(Path(options.metrics_dir), index)
        if not stopping:
            log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
            time.sleep(0.5)  # a worker that dies at start must not spin the CPU
            spawn(index)
        elif code not in (0, -signal.SIGTERM):
            exit_code = 1
    return exit_code


def configure_logging(level: str) -> None:
    # The access log writes a line per request: skip what our format never prints (the calling
    # frame, thread and process names); the logging docs' "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
