"""`extproc serve`: the grpc.aio ext_proc server, its health service, workers and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from extproc.policy import Policy
from extproc.quota.service import QuotaService

log = logging.getLogger("extproc.server")

HEALTH_SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


@dataclass(frozen=True)
class ServeOptions:
    listen: str
    policy: Policy
    workers: int = 1
    grace_seconds: float = 30.0
    redis_url: str | None = None
    metrics_port: int | None = None  # worker i serves on metrics_port + i


def build_quota_service(policy: Policy, redis_url: str | None) -> QuotaService | None:
    """Quotas exist only with tenants; Redis when a URL is given, else this process's memory."""
    if not policy.tenants:
        return None
    from extproc.quota.memory import MemoryStore

    if redis_url is None:
        return QuotaService(policy, MemoryStore())
    from extproc.quota.redis_store import RedisStore
    from extproc.quota.resilient import ResilientStore

    store = ResilientStore(RedisStore(redis_url), on_failure=policy.quotas.on_store_failure)
    from extproc import metrics

    metrics.QUOTA_PENDING.set_function(lambda: store.pending)
    return QuotaService(policy, store)


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
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from extproc.core import Gateway
    from extproc.processor import ExternalProcessor
    from extproc.wire import add_processor_to_server

    if options.metrics_port:
        from extproc.metrics import serve_metrics

        serve_metrics(options.metrics_port + worker_index)
    gateway = Gateway(options.policy)
    quotas = build_quota_service(options.policy, options.redis_url)
    server = grpc.aio.server(options=grpc_options(options.policy))
    add_processor_to_server(ExternalProcessor(gateway, quotas), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(options.listen)
    if port == 0:
        raise SystemExit(f"extproc: cannot listen on {options.listen}")
    await server.start()
    for service in ("", HEALTH_SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving ext_proc on %s (pid %d)", options.listen, os.getpid())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining streams for up to %.0fs", options.grace_seconds)
    await health.enter_graceful_shutdown()
    await server.stop(options.grace_seconds)
    if quotas is not None:
        await quotas.close()  # settlements in flight are written (or kept queued) before exit
    log.info("stopped")


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
    if options.workers <= 1:
        run_worker(options)
        return 0
    return _supervise(options)


def _supervise(options: ServeOptions) -> int:
    """Fork N workers sharing the port (SO_REUSEPORT); restart any that die unexpectedly."""
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                run_worker(options, index)
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(options.workers):
        spawn(index)
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
