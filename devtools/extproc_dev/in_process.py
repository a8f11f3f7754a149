"""One gateway request's CPU in process, with and without what `extproc serve` records.

    python -m extproc_dev.in_process

The bench's section 0 (`bench.measure_in_process`: its request's four ext_proc messages through
`RequestStream`, the benchmark policy), once bare and once with the Prometheus recorder and the
JSON access log as the server runs them; 7 batches of 2,000 each. Prints which form ran (mypyc or
python), so the two forms compare by running it from each.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from extproc.compiled_form import form
from extproc_dev import bench


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="extproc-in-process-") as directory:
        policy = bench.bench_policy(Path(directory))
        for recorded in (False, True):
            result = bench.measure_in_process(bench.Settings(), policy, batches=7, recorded=recorded)
            label = "recorded (metrics + access log)" if recorded else "bare (no recorder)"
            batches = ", ".join(f"{t:.1f}" for t in result.batches)
            print(f"{form():6} {label:32} {result.microseconds:6.1f} µs/request  [{batches}]")


if __name__ == "__main__":
    main()
