"""Prometheus metrics: each worker writes its own files, one `/metrics` endpoint per replica sums them.

The files use prometheus-client's multiprocess format (`counter_<id>.db`, `histogram_<id>.db`,
`gauge_<mode>_<id>.db`), so its `MultiProcessCollector` reads and sums them. The writer is ours:
prometheus-client's own multiprocess values take a lock and repack two doubles per increment
(2.5 µs a counter, 5 µs a histogram here); ours add to a double in the mapped file through a
memoryview, a single indexed store, and the kernel shares the page with the reader.

A file is named by worker index, not pid (`w0`, `w1`, …): a worker that dies and is replaced
reopens its predecessor's files and goes on counting from their values, so nothing is lost or
counted twice, and churn never piles files up. The supervisor deletes a dead worker's live gauges
(`clear_worker`) before the replacement starts.

Names and labels are the public interface documented in observability/METRICS.md.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from extproc import codes
from extproc.filter_contract import NO_STREAM_END_REPORT, STREAM_END_FLAGS
from extproc.policy import TRAFFIC_CLASSES
from extproc.recorder import Recorder, RequestRecord

log = logging.getLogger("extproc.metrics")

_INITIAL_SIZE = 1 << 16
_HEADER = struct.Struct("i")
_LIVE_MODES = ("livesum", "livemostrecent", "livemax")

NONE = "none"
OTHER = codes.OTHER
ANONYMOUS = "anonymous"
# The `report` label of extproc_cut_streams: each outcome Envoy's stream-end log can report, or none.
CUT_STREAM_REPORTS = (*dict.fromkeys(outcome for _, _, outcome in STREAM_END_FLAGS), NO_STREAM_END_REPORT)


class MetricFile:
    """One mapped file of (key, value, timestamp) entries, as prometheus-client's MmapedDict lays them out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a+b")  # noqa: SIM115 (lives as long as the process)
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            self._file.truncate(_INITIAL_SIZE)
            size = _INITIAL_SIZE
        self._capacity = size
        self._map = mmap.mmap(self._file.fileno(), size)
        self.values = memoryview(self._map).cast("d")  # the hot path indexes this directly
        self._used = _HEADER.unpack_from(self._map, 0)[0]
        self._index: dict[str, int] = {}
        if self._used == 0:
            self._used = 8
            self._map[0:4] = _HEADER.pack(self._used)
        else:
            self._read_existing()
        self._lock = threading.Lock()  # only allocation locks: increments come from one thread

    def _read_existing(self) -> None:
        """A replaced worker's file: keep counting from its values."""
        pos, data = 8, self._map
        while pos < self._used:
            length = _HEADER.unpack_from(data, pos)[0]
            pos += 4
            key = bytes(data[pos : pos + length]).decode("utf-8")
            pos += length + (8 - (length + 4) % 8)
            self._index[key] = pos // 8
            pos += 16

    def slot(self, key: str) -> int:
        """The index in `values` of the entry `key` (its timestamp is the next index)."""
        found = self._index.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._index.get(key)
            if found is not None:
                return found
            encoded = key.encode("utf-8")
            padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
            entry = struct.pack(f"i{len(padded)}sdd", len(encoded), padded, 0.0, 0.0)
            if self._used + len(entry) > self._capacity:
                self._grow(self._used + len(entry))
            self._map[self._used : self._used + len(entry)] = entry
            self._used += len(entry)
            self._map[0:4] = _HEADER.pack(self._used)  # published last: a reader never sees a half entry
            index = (self._used - 16) // 8
            self._index[key] = index
            return index

    def _grow(self, needed: int) -> None:
        capacity = self._capacity
        while capacity < needed:
            capacity *= 2
        self.values.release()
        self._map.close()
        self._file.truncate(capacity)
        self._capacity = capacity
        self._map = mmap.mmap(self._file.fileno(), capacity)
        self.values = memoryview(self._map).cast("d")

    def close(self) -> None:
        self.values.release()
        self._map.close()
        self._file.close()


def _key(metric: str, sample: str, labelnames: Sequence[str], labelvalues: Sequence[str], doc: str) -> str:
    # prometheus_client.mmap_dict.mmap_key, which the collector parses back
    return json.dumps([metric, sample, dict(zip(labelnames, labelvalues, strict=True)), doc], sort_keys=True)


class MetricFiles:
    """The files of one worker, opened lazily, one per metric type (and gauge mode)."""

    def __init__(self, directory: Path, identity: str) -> None:
        self.directory = directory
        self.identity = identity
        self._files: dict[str, MetricFile] = {}

    def file(self, prefix: str) -> MetricFile:
        found = self._files.get(prefix)
        if found is None:
            found = self._files[prefix] = MetricFile(self.directory / f"{prefix}_{self.identity}.db")
        return found

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class Counter:
    def __init__(self, files: MetricFiles, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self._file = files.file("counter")
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._slots: dict[tuple[str, ...], int] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        slot = self._slots.get(labels)
        if slot is None:
            slot = self._slots[labels] = self._file.slot(
                _key(self.name, self.name + "_total", self.labelnames, labels, self.doc)
            )
        self._file.values[slot] += amount


class Histogram:
    def __init__(
        self, files: MetricFiles, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self._file = files.file("histogram")
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.bounds = [*sorted(buckets), float("inf")]
        self._slots: dict[tuple[str, ...], tuple[int, list[int]]] = {}

    def _children(self, labels: tuple[str, ...]) -> tuple[int, list[int]]:
        names = (*self.labelnames, "le")
        f = self._file
        buckets = [
            f.slot(_key(self.name, self.name + "_bucket", names, (*labels, floatToGoString(b)), self.doc))
            for b in self.bounds
        ]
        total = f.slot(_key(self.name, self.name + "_sum", self.labelnames, labels, self.doc))
        self._slots[labels] = (total, buckets)
        return total, buckets

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        found = self._slots.get(labels)
        total, buckets = found if found is not None else self._children(labels)
        values = self._file.values
        # The file holds per-bucket counts; the collector makes them cumulative and adds _count.
        values[buckets[bisect.bisect_left(self.bounds, value)]] += 1
        values[total] += value


class Gauge:
    def __init__(self, files: MetricFiles, name: str, doc: str, labelnames: Sequence[str], mode: str) -> None:
        self._file = files.file(f"gauge_{mode}")
        self._timestamped = mode.endswith("mostrecent")
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._slots: dict[tuple[str, ...], int] = {}

    def _slot(self, labels: tuple[str, ...]) -> int:
        slot = self._slots.get(labels)
        if slot is None:
            slot = self._slots[labels] = self._file.slot(_key(self.name, self.name, self.labelnames, labels, self.doc))
        return slot

    def set(self, labels: tuple[str, ...], value: float) -> None:
        slot = self._slot(labels)
        values = self._file.values
        values[slot] = value
        if self._timestamped:
            values[slot + 1] = time.time()


# --- the gateway's metrics ----------------------------------------------------------------------

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PROCESSING_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
_PROMPT_LENGTHS = ((1024, "0-1k"), (4096, "1k-4k"), (16384, "4k-16k"), (65536, "16k-64k"))
_STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "abort"})
_VERSION_SHAPE = re.compile(r"[A-Za-z0-9._-]{1,40}")
MAX_VERSIONS_PER_BACKEND = 8


def prompt_length_bucket(tokens: int) -> str:
    for bound, label in _PROMPT_LENGTHS:
        if tokens < bound:
            return label
    return "64k+"


class VersionLabels:
    """Served versions come from the upstream: a few well-formed ones per backend are labels, the rest `other`.

    A version unseen for `retire_after_s` gives its place to a new one, so a long-lived worker still
    labels the canary of its tenth rollout; the series stay bounded by the pace of rollouts.
    """

    def __init__(
        self,
        per_backend: int = MAX_VERSIONS_PER_BACKEND,
        retire_after_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_backend = per_backend
        self.retire_after_s = retire_after_s
        self._clock = clock
        self._seen: dict[str, dict[str, float]] = {}  # backend -> version -> last seen

    def label(self, backend: str, version: str | None) -> str:
        if not version:
            return "unknown"
        seen = self._seen.setdefault(backend, {})
        now = self._clock()
        if version in seen:
            seen[version] = now
            return version
        if not _VERSION_SHAPE.fullmatch(version):
            return OTHER
        if len(seen) >= self.per_backend:
            oldest = min(seen, key=seen.__getitem__)
            if now - seen[oldest] < self.retire_after_s:
                return OTHER
            del seen[oldest]
        seen[version] = now
        return version


class GatewayMetrics(Recorder):
    """The Recorder that writes Prometheus metrics into this worker's files."""

    def __init__(self, files: MetricFiles) -> None:
        self.files = files
        self.versions = VersionLabels()
        f = files
        self.requests = Counter(
            f,
            "extproc_requests",
            "Inference requests decided by the gateway, counted once when they end, by outcome.",
            ["tenant", "model", "backend", "class", "outcome"],
        )
        self.rejections = Counter(
            f, "extproc_rejections", "Requests the gateway refused itself, by error code.", ["reason"]
        )
        self.tokens = Counter(
            f, "extproc_tokens", "Tokens settled from real usage.", ["tenant", "model", "backend", "type"]
        )
        latency_labels = ["model", "backend", "version", "prompt_length"]
        self.duration = Histogram(
            f,
            "extproc_request_duration_seconds",
            "Request headers to response end, as the gateway sees it (admitted requests).",
            latency_labels,
            DURATION_BUCKETS,
        )
        self.ttft = Histogram(
            f,
            "extproc_time_to_first_token_seconds",
            "Request headers to the first streamed response chunk.",
            latency_labels,
            TTFT_BUCKETS,
        )
        self.processing = Histogram(
            f,
            "extproc_processing_seconds",
            "The gateway's own time per ext_proc message, by phase.",
            ["phase"],
            PROCESSING_BUCKETS,
        )
        rollout = ["model", "backend", "version"]
        self.upstream = Counter(
            f, "extproc_upstream_responses", "Upstream responses by status class.", [*rollout, "status_class"]
        )
        self.json_mode = Counter(
            f,
            "extproc_json_mode_responses",
            "JSON-mode responses: whether the content parsed as JSON.",
            [*rollout, "result"],
        )
        self.tool_calls = Counter(
            f,
            "extproc_tool_call_arguments",
            "Tool calls in responses: whether their arguments parsed as JSON.",
            [*rollout, "result"],
        )
        self.finish_reasons = Counter(f, "extproc_finish_reasons", "Choices by finish_reason.", [*rollout, "reason"])
        self.cut_streams = Counter(
            f,
            "extproc_cut_streams",
            "Responses cut short, by how Envoy's access log said they ended (none: no report in time).",
            ["report"],
        )
        self.reloads = Counter(f, "extproc_policy_reloads", "Policy reloads by result.", ["result"])
        self.policy_info = Gauge(f, "extproc_policy_info", "The loaded policy's digest.", ["digest"], "livemax")
        self.store_errors = Counter(
            f, "extproc_quota_store_errors", "Calls to the shared quota store that failed.", ["operation"]
        )
        self.degraded = Gauge(
            f, "extproc_quota_store_degraded", "1 while the quota store is unreachable.", [], "livemax"
        )
        self.fail_open = Counter(
            f,
            "extproc_quota_fail_open_admissions",
            "Admissions decided by per-process limits because the shared quota store was unreachable.",
            [],
        )
        self.pending = Gauge(
            f,
            "extproc_quota_pending_settlements",
            "Settlements kept in memory while the quota store is unreachable.",
            [],
            "livesum",
        )
        self.dropped = Counter(f, "extproc_quota_dropped_settlements", "Settlements given up: their usage is lost.", [])
        self.queue = Gauge(
            f,
            "extproc_admission_queue_length",
            "Requests waiting in the gateway's admission queue.",
            ["backend", "class"],
            "livesum",
        )
        self.waiting = Gauge(
            f,
            "extproc_backend_waiting_requests",
            "vllm:num_requests_waiting summed over the backend's pods, as last scraped.",
            ["backend"],
            "livemostrecent",
        )
        self.running = Gauge(
            f,
            "extproc_backend_running_requests",
            "vllm:num_requests_running summed over the backend's pods, as last scraped.",
            ["backend"],
            "livemostrecent",
        )
        self.kv_cache = Gauge(
            f,
            "extproc_backend_kv_cache_usage_ratio",
            "Mean KV-cache use (0-1) over the backend's pods, as last scraped.",
            ["backend"],
            "livemostrecent",
        )
        self._digest: str | None = None
        self._queue_series: set[tuple[str, str]] = set()
        # Series that exist from the start read 0 rather than absent, so rates and alerts work at once.
        for counter in (self.fail_open, self.dropped):
            counter.inc((), 0)
        for code in codes.REGISTRY:
            self.rejections.inc((code,), 0)
        for operation in ("admit", "settle", "ping"):
            self.store_errors.inc((operation,), 0)
        for result in ("ok", "refused"):
            self.reloads.inc((result,), 0)
        for report in CUT_STREAM_REPORTS:
            self.cut_streams.inc((report,), 0)
        self.degraded.set((), 0)
        self.pending.set((), 0)

    def request_done(self, record: RequestRecord) -> None:
        tenant = record.tenant or ANONYMOUS
        model = record.model or (OTHER if record.requested_model is not None else NONE)
        backend = record.backend or NONE
        outcome = record.outcome or "internal_error"
        self.requests.inc((tenant, model, backend, record.traffic_class, outcome))
        if record.refused:
            self.rejections.inc((record.code or codes.INVALID_REQUEST.code,))
            return
        if record.backend is None:
            return
        if record.prompt_tokens or record.completion_tokens:
            self.tokens.inc((tenant, model, backend, "prompt"), record.prompt_tokens)
            self.tokens.inc((tenant, model, backend, "completion"), record.completion_tokens)
        if not record.status:
            return  # no response at all: the client left first, nothing was served
        version = self.versions.label(backend, record.version)
        self.upstream.inc((model, backend, version, _STATUS_CLASSES.get(record.status // 100, OTHER)))
        length = prompt_length_bucket(record.counted_prompt_tokens)
        self.duration.observe((model, backend, version, length), record.duration_s)
        if record.ttft_s is not None:
            self.ttft.observe((model, backend, version, length), record.ttft_s)
        if record.json_result is not None:
            self.json_mode.inc((model, backend, version, record.json_result))
        if record.tool_calls_valid:
            self.tool_calls.inc((model, backend, version, "valid"), record.tool_calls_valid)
        if record.tool_calls_invalid:
            self.tool_calls.inc((model, backend, version, "invalid"), record.tool_calls_invalid)
        for reason in record.finish_reasons:
            self.finish_reasons.inc((model, backend, version, reason if reason in _FINISH_REASONS else OTHER))

    def cut_stream(self, reported: str) -> None:
        self.cut_streams.inc((reported if reported in CUT_STREAM_REPORTS else OTHER,))

    def phase_time(self, phase: str, seconds: float) -> None:
        self.processing.observe((phase,), seconds)

    def policy_loaded(self, digest: str, backends: Iterable[str] = ()) -> None:
        for backend in backends:
            for traffic_class in TRAFFIC_CLASSES:
                key = (backend, traffic_class)
                if key not in self._queue_series:  # a reload must not zero a queue that holds requests
                    self._queue_series.add(key)
                    self.queue.set(key, 0)
        short = digest[:12]
        if self._digest is not None and self._digest != short:
            self.policy_info.set((self._digest,), 0)
        self._digest = short
        self.policy_info.set((short,), 1)

    def policy_reload(self, ok: bool) -> None:
        self.reloads.inc(("ok" if ok else "refused",))

    def store_error(self, operation: str) -> None:
        self.store_errors.inc((operation,))

    def store_degraded(self, degraded: bool) -> None:
        self.degraded.set((), 1.0 if degraded else 0.0)

    def fail_open_admission(self) -> None:
        self.fail_open.inc(())

    def settlements_pending(self, count: int) -> None:
        self.pending.set((), count)

    def settlements_dropped(self, count: int) -> None:
        self.dropped.inc((), count)

    def queue_length(self, backend: str, traffic_class: str, length: int) -> None:
        self._queue_series.add((backend, traffic_class))
        self.queue.set((backend, traffic_class), length)

    def backend_load(self, backend: str, waiting: float | None, running: float | None, kv_cache: float | None) -> None:
        # Unknown figures (no fresh pod) are exported as NaN rather than a misleading 0.
        nan = float("nan")
        self.waiting.set((backend,), nan if waiting is None else waiting)
        self.running.set((backend,), nan if running is None else running)
        self.kv_cache.set((backend,), nan if kv_cache is None else kv_cache)


# --- the directory and the endpoint ---------------------------------------------------------------


def prepare_directory(directory: Path) -> int:
    """At replica start: claim the directory for this replica and empty it, so no file of an earlier
    run is summed into this one. Returns the lock's descriptor: keep it open while the replica runs
    (its workers inherit it); a second replica pointed at the same directory is refused."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"extproc: the metrics directory {directory} is in use by another extproc") from None
    for stale in directory.glob("*.db"):
        stale.unlink()
    return fd


def worker_identity(index: int) -> str:
    return f"w{index}"


def clear_worker(directory: Path, index: int) -> None:
    """A worker died: its live gauges go (its counters stay, so sums never go backwards)."""
    identity = worker_identity(index)
    for mode in _LIVE_MODES:
        (directory / f"gauge_{mode}_{identity}.db").unlink(missing_ok=True)


class InFlightCollector(Collector):
    """In-flight requests per backend, read at scrape time from the replica's shared counter."""

    def __init__(self, backends: Callable[[], Iterable[str]], total: Callable[[str], int]) -> None:
        self._backends = backends
        self._total = total

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "extproc_in_flight_requests",
            "Requests admitted to the backend and not finished, summed over the replica's workers.",
            labels=["backend"],
        )
        for backend in self._backends():
            family.add_metric([backend], self._total(backend))
        yield family


def metrics_registry(directory: Path, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    for collector in extra:
        registry.register(collector)
    return registry


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> None:
    """Serve `/metrics` from a daemon thread of this process."""
    start_http_server(port, addr=host, registry=registry)
