"""The metric files: prometheus-client's collector sums them; a replaced worker counts on; labels stay bounded."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from extproc import codes, metrics
from extproc.recorder import RequestRecord
from tests.recording import record_with

ROOT = Path(__file__).resolve().parent.parent


def exposition(directory: Path) -> str:
    return generate_latest(metrics.metrics_registry(directory)).decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return None


def served(**overrides: object) -> RequestRecord:
    record = record_with(tenant="acme", model="llama", backend="default-8b", traffic_class="batch")
    record.outcome, record.status, record.prompt_tokens, record.completion_tokens = "ok", 200, 1500, 20
    record.counted_prompt_tokens = 1500
    record.duration_s, record.version = 0.3, "v2"
    for key, value in overrides.items():
        setattr(record, key, value)
    return record


def test_workers_are_summed_and_a_replaced_worker_counts_on(tmp_path: Path) -> None:
    metrics.prepare_directory(tmp_path)
    first = metrics.GatewayMetrics(metrics.MetricFiles(tmp_path, metrics.worker_identity(0)))
    second = metrics.GatewayMetrics(metrics.MetricFiles(tmp_path, metrics.worker_identity(1)))
    for _ in range(3):
        first.request_done(served())
    second.request_done(served())
    second.queue_length("default-8b", "batch", 2)
    text = exposition(tmp_path)
    labels = {"tenant": "acme", "model": "llama", "backend": "default-8b", "class": "batch", "outcome": "ok"}
    assert sample(text, "extproc_requests_total", **labels) == 4
    assert (
        sample(text, "extproc_tokens_total", tenant="acme", model="llama", backend="default-8b", type="prompt") == 6000
    )
    bucket = {"model": "llama", "backend": "default-8b", "version": "v2", "prompt_length": "1k-4k"}
    assert sample(text, "extproc_request_duration_seconds_count", **bucket) == 4
    assert sample(text, "extproc_request_duration_seconds_bucket", **bucket, le="0.25") == 0
    assert sample(text, "extproc_request_duration_seconds_bucket", **bucket, le="0.5") == 4
    assert sample(text, "extproc_admission_queue_length", backend="default-8b", **{"class": "batch"}) == 2

    # Worker 1 dies: its live gauges go, its counters stay, and its replacement counts on from them.
    second.files.close()
    metrics.clear_worker(tmp_path, 1)
    replacement = metrics.GatewayMetrics(metrics.MetricFiles(tmp_path, metrics.worker_identity(1)))
    replacement.request_done(served())
    text = exposition(tmp_path)
    assert sample(text, "extproc_requests_total", **labels) == 5
    assert sample(text, "extproc_admission_queue_length", backend="default-8b", **{"class": "batch"}) is None
    assert len(list(tmp_path.glob("counter_*.db"))) == 2  # no pile-up: the replacement reuses the file


def test_a_killed_process_loses_nothing_it_counted(tmp_path: Path) -> None:
    """Every increment is in the mapped file at once: SIGKILL right after loses none of them."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from extproc import metrics
from tests.test_metrics import served
m = metrics.GatewayMetrics(metrics.MetricFiles(Path({str(tmp_path)!r}), "w0"))
for _ in range(1000):
    m.request_done(served())
os.kill(os.getpid(), signal.SIGKILL)
"""
    process = subprocess.run([sys.executable, "-c", script], check=False)
    assert process.returncode == -signal.SIGKILL
    labels = {"tenant": "acme", "model": "llama", "backend": "default-8b", "class": "batch", "outcome": "ok"}
    assert sample(exposition(tmp_path), "extproc_requests_total", **labels) == 1000


def test_labels_are_bounded(tmp_path: Path) -> None:
    m = metrics.GatewayMetrics(metrics.MetricFiles(tmp_path, "w0"))
    for n in range(20):
        m.request_done(served(version=f"v{n}"))
    m.request_done(served(version="bad version with spaces"))
    m.request_done(served(model=None, requested_model="whatever-the-client-sent", backend=None, outcome="invalid"))
    text = exposition(tmp_path)
    versions = set(re.findall(r'extproc_upstream_responses_total\{[^}]*version="([^"]*)"', text))
    assert len(versions) == metrics.MAX_VERSIONS_PER_BACKEND + 1 and "other" in versions
    assert "whatever-the-client-sent" not in text
    assert 'model="other"' in text


def test_refusals_count_their_reason_and_every_code_starts_at_zero(tmp_path: Path) -> None:
    m = metrics.GatewayMetrics(metrics.MetricFiles(tmp_path, "w0"))
    refused = served(outcome="rate_limited", refused=True, code="rate_limit_exceeded", backend="default-8b")
    m.request_done(refused)
    text = exposition(tmp_path)
    assert sample(text, "extproc_rejections_total", reason="rate_limit_exceeded") == 1
    for code in codes.REGISTRY:
        assert sample(text, "extproc_rejections_total", reason=code) is not None
    # A refusal is no upstream response and costs no tokens.
    assert "extproc_upstream_responses_total{" not in text
    assert sample(text, "extproc_quota_store_degraded") == 0


def test_prompt_length_buckets() -> None:
    assert [metrics.prompt_length_bucket(n) for n in (0, 1023, 1024, 4096, 16384, 65536, 10**6)] == [
        "0-1k",
        "0-1k",
        "1k-4k",
        "4k-16k",
        "16k-64k",
        "64k+",
        "64k+",
    ]


def _documented() -> dict[str, list[str]]:
    """Every gateway metric in observability/METRICS.md's tables, with its labels."""
    documented: dict[str, list[str]] = {}
    for line in (ROOT / "observability" / "METRICS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells or not re.fullmatch(r"`extproc_\w+`", cells[0]):
            continue
        labels_cell = (
            cells[2] if cells[1] in ("counter", "histogram", "gauge") or cells[1].startswith("gauge") else cells[1]
        )
        labels = [x.strip() for x in re.sub(r"\([^)]*\)", "", labels_cell).split(",")]
        documented[cells[0].strip("`")] = sorted(x for x in labels if x and x != "\u2013")  # an en dash: no labels
    return documented


def test_what_is_exported_is_what_metrics_md_documents(tmp_path: Path) -> None:
    m = metrics.GatewayMetrics(metrics.MetricFiles(tmp_path, "w0"))
    exported = {}
    for value in (getattr(m, name) for name in dir(m) if not name.startswith("__")):  # no vars(): compiled
        if isinstance(value, metrics.Counter):
            exported[value.name + "_total"] = sorted(value.labelnames)
        elif isinstance(value, metrics.Histogram | metrics.Gauge):
            exported[value.name] = sorted(value.labelnames)
    in_flight = metrics.InFlightCollector(list, lambda _b: 0)
    for family in in_flight.collect():
        exported[family.name] = ["backend"]
    assert exported == _documented()
