"""A Recorder that keeps what it was told, for tests that assert on events."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.access_log import AccessLog
from extproc.core import Gateway
from extproc.processor import RequestStream
from extproc.quota.memory import MemoryStore
from extproc.quota.service import QuotaService
from extproc.recorder import NULL_RECORDER, Recorder, RequestRecord


class CountingRecorder(Recorder):
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.phases: Counter[str] = Counter()
        self.store_errors: Counter[str] = Counter()
        self.degraded: list[bool] = []
        self.fail_open = 0
        self.dropped = 0
        self.pending = 0
        self.reloads: list[bool] = []
        self.digests: list[str] = []
        self.queue: dict[tuple[str, str], int] = {}
        self.loads: dict[str, tuple[float | None, float | None, float | None]] = {}
        self.cut_streams: list[str] = []

    def request_done(self, record: RequestRecord) -> None:
        self.records.append(record)

    def phase_time(self, phase: str, seconds: float) -> None:
        self.phases[phase] += 1

    def cut_stream(self, reported: str) -> None:
        self.cut_streams.append(reported)

    def policy_loaded(self, digest: str, backends: object = ()) -> None:
        self.digests.append(digest)

    def policy_reload(self, ok: bool) -> None:
        self.reloads.append(ok)

    def store_error(self, operation: str) -> None:
        self.store_errors[operation] += 1

    def store_degraded(self, degraded: bool) -> None:
        self.degraded.append(degraded)

    def fail_open_admission(self) -> None:
        self.fail_open += 1

    def settlements_pending(self, count: int) -> None:
        self.pending = count

    def settlements_dropped(self, count: int) -> None:
        self.dropped += count

    def queue_length(self, backend: str, traffic_class: str, length: int) -> None:
        self.queue[(backend, traffic_class)] = length

    def backend_load(self, backend: str, waiting: float | None, running: float | None, kv_cache: float | None) -> None:
        self.loads[backend] = (waiting, running, kv_cache)


def run_exchanges(
    gateway: Gateway,
    exchanges: Sequence[Sequence[pb.ProcessingRequest]],
    recorder: Recorder = NULL_RECORDER,
    access_log: AccessLog | None = None,
) -> None:
    """Drive each exchange through its own RequestStream, with in-memory quotas, settling as the server does."""

    async def run() -> None:
        quotas = QuotaService(MemoryStore())
        for messages in exchanges:
            stream = RequestStream(gateway, quotas, recorder=recorder, access_log=access_log)
            for message in messages:
                await stream.handle(message)
            settlement = stream.finish()
            if settlement is not None:
                quotas.settle(*settlement)
        await quotas.drain()

    asyncio.run(run())


def record_with(request_id: str | None = None, **fields: object) -> RequestRecord:
    """A RequestRecord with some of what a stream would have learned already filled in."""
    record = RequestRecord(0.0, 0.0, request_id)
    for name, value in fields.items():
        setattr(record, name, value)
    return record
