"""One gateway request's CPU in process, with and without what `extproc serve` records.

    python -m extproc_dev.in_process          # bare (as the bench's section 0) and recorded

Drives the bench's request (`extproc_dev.bench`: the four ext_proc messages Envoy sends, the
benchmark policy) through `RequestStream`, as `bench.measure_in_process` does, once with no
recorder and once with the Prometheus recorder and the JSON access log (to /dev/null) as the
server runs them. Prints the median of the batches and which form ran (mypyc or python).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import metrics
from extproc.access_log import AccessLog
from extproc.compiled_form import form
from extproc.core import Gateway
from extproc.policy import load_policy
from extproc.processor import RequestStream
from extproc.quota.memory import MemoryStore
from extproc.quota.service import QuotaService
from extproc.recorder import NULL_RECORDER, Recorder
from extproc.wire import to_wire
from extproc_dev import bench

BATCH = 2000
BATCHES = 7


def measure(recorded: bool, work: Path) -> list[float]:
    policy = load_policy(bench.bench_policy(work))
    messages = bench._exchange_messages(bench.chat_body(8))

    async def run() -> list[float]:
        gateway = Gateway.from_policy(policy)
        quotas = QuotaService(MemoryStore()) if policy.tenants else None
        recorder: Recorder = NULL_RECORDER
        access_log = None
        if recorded:
            (work / "metrics").mkdir(exist_ok=True)
            recorder = metrics.GatewayMetrics(metrics.MetricFiles(work / "metrics", "w0"))
            access_log = AccessLog(os.open(os.devnull, os.O_WRONLY))

        async def one() -> None:
            stream = RequestStream(gateway, quotas, None, None, recorder, access_log)
            for raw in messages:
                to_wire(await stream.handle(pb.ProcessingRequest.FromString(raw)))
            settlement = stream.finish()
            if settlement is not None and quotas is not None:
                quotas.settle(*settlement)

        for _ in range(BATCH):
            await one()
        timed = []
        for _ in range(BATCHES):
            start = time.process_time()
            for i in range(BATCH):
                await one()
                if i % 16 == 0:
                    await asyncio.sleep(0)  # settlement flushes run, as they would
            timed.append((time.process_time() - start) / BATCH * 1e6)
        return timed

    return asyncio.run(run())


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="extproc-in-process-") as directory:
        for recorded in (False, True):
            timed = measure(recorded, Path(directory))
            label = "recorded (metrics + access log)" if recorded else "bare (no recorder)"
            batches = ", ".join(f"{t:.1f}" for t in timed)
            print(f"{form():6} {label:32} {statistics.median(timed):6.1f} µs/request  [{batches}]")


if __name__ == "__main__":
    main()
