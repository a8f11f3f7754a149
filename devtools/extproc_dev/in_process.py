"""One gateway request's CPU in process, with and without what `extproc serve` records.

    python -m extproc_dev.in_process [--policy FILE] [--batches N] [--cold] [--json]

The bench's section 0 (`bench.measure_in_process`: its request's four ext_proc messages through
`RequestStream`, the benchmark policy), once bare and once with the Prometheus recorder and the
JSON access log as the server runs them. Prints which form ran (mypyc or python), so the two forms
compare by running it from each; the bench runs it so for every source tree it measures
(`bench.in_process_of`), with `PYTHONPATH` naming the tree.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from extproc.compiled_form import form
from extproc_dev import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m extproc_dev.in_process")
    parser.add_argument("--policy", type=Path, help="a benchmark policy (default: the example's, made benchmarkable)")
    parser.add_argument("--batches", type=int, default=7, help="timed batches of 2,000 requests (default 7)")
    parser.add_argument("--json", action="store_true", help="one JSON object: form, bare and recorded batches (µs)")
    parser.add_argument(
        "--cold", action="store_true", help="also with caches evicted before each message (bench.measure_cold)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="extproc-in-process-") as directory:
        policy = args.policy or bench.bench_policy(Path(directory))
        results = {}
        for recorded in (False, True):
            result = bench.measure_in_process(bench.Settings(), policy, batches=args.batches, recorded=recorded)
            results["recorded" if recorded else "bare"] = result
            if not args.json:
                label = "recorded (metrics + access log)" if recorded else "bare (no recorder)"
                batches = ", ".join(f"{t:.1f}" for t in result.batches)
                print(f"{form():6} {label:32} {result.microseconds:6.1f} µs/request  [{batches}]")
        if args.cold:
            results["cold"], results["cold_null"] = bench.measure_cold(bench.Settings(), policy)
            if not args.json:
                print(
                    f"{form():6} {'recorded, caches evicted':32} {results['cold'].microseconds:6.1f} µs/request  "
                    f"(the null's own work so: {results['cold_null'].microseconds:.1f} µs)"
                )
    if args.json:
        print(json.dumps({"form": form(), **{name: r.batches for name, r in results.items()}}))


if __name__ == "__main__":
    main()
