"""The development subcommands of `extproc`: dev, bench, fake-vllm, null-extproc.

Each `add_*` is an `extproc.commands` entry point: it adds one subcommand to the runtime
CLI's parser and sets `func`, which returns the exit code.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from extproc.policy import PolicyError, example_policy_path, load_policy

Subparsers = Any  # argparse._SubParsersAction, which typeshed keeps private


def _cmd_dev(args: argparse.Namespace) -> int:
    from extproc_dev.stack import LocalStack

    try:
        stack = LocalStack(
            Path(args.policy),
            listen_port=args.port,
            workers=args.workers,
            token_delay_ms=args.token_delay_ms,
            redis_url=args.redis_url or None,
            keep_logs=True,
            upstream_base_port=args.port + 1,
            metrics_port=args.metrics_port,
            upstream_versions=dict.fromkeys(load_policy(args.policy).backends, "v1"),
        )
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(f"extproc dev: starting (logs in {stack.work_dir})", flush=True)
    try:
        stack.start()
    except RuntimeError as exc:
        print(f"extproc dev: failed to start: {exc}", file=sys.stderr)
        return 1
    model = stack.policy.models[0].name
    auth = " -H 'authorization: Bearer sk-demo'" if stack.policy.tenants else ""
    backends = "\n".join(
        f"             {u.name:<22} http://127.0.0.1:{u.port}  metrics http://127.0.0.1:{u.port}/metrics"
        for u in stack.upstreams
    )
    print(
        f"""
extproc dev is running.
  base URL : {stack.base_url}
  policy   : {args.policy}
  metrics  : {stack.metrics_url}  (the gateway: every worker summed)
  backends : fake vLLMs, version v1 (steer load, version and faults: PUT http://127.0.0.1:PORT/fake/state)
{backends}
  logs     : {stack.work_dir}  (access log: one JSON line per request in extproc.log)
  quotas   : {stack.redis_url or "in-memory (pass --redis-url to share them)"}

Try it:
  curl -s {stack.base_url}/chat/completions -H 'content-type: application/json'{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}' -i

Or with the openai SDK: OpenAI(base_url="{stack.base_url}", api_key="sk-demo")
Press Ctrl-C to stop.""",
        flush=True,
    )
    code = 0
    while not stop_requested:
        dead = [p for p in stack.processes if not p.alive()]
        if dead:
            for process in dead:
                print(f"extproc dev: {process.name} exited:\n{process.tail()}", file=sys.stderr)
            code = 1
            break
        time.sleep(0.2)
    print("\nextproc dev: stopping", flush=True)
    stack.stop()
    return code


def _cmd_null(args: argparse.Namespace) -> int:
    from extproc_dev.null_processor import main as null_main

    replay = Path(args.replay) if args.replay else None
    return null_main(args.listen, busy_us=args.busy_us, replay=replay, write=args.write)


def add_dev(sub: Subparsers) -> None:
    dev = sub.add_parser("dev", help="run the local stack: Envoy + extproc + fake vLLMs")
    dev.add_argument("--policy", default=str(example_policy_path()))
    dev.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    dev.add_argument("--workers", type=int, default=1)
    dev.add_argument("--redis-url", default="", help="use Redis for quotas (default: in-memory)")
    dev.add_argument("--token-delay-ms", type=float, default=2.0, help="fake vLLM delay per generated token")
    dev.add_argument("--metrics-port", type=int, default=9400, help="the gateway's Prometheus /metrics port")
    dev.set_defaults(func=_cmd_dev)


def add_null_extproc(sub: Subparsers) -> None:
    null = sub.add_parser("null-extproc", help="a do-nothing ext_proc (benchmark floor)")
    null.add_argument("--listen", required=True)
    null.add_argument(
        "--busy-us",
        type=float,
        default=0.0,
        help="burn this many microseconds of pure Python per request (a calibration point for the benchmark)",
    )
    null.add_argument(
        "--replay",
        help="answer request bodies and JSON response headers with recorded gateway replies (written by the bench)",
    )
    null.add_argument(
        "--write",
        action="store_true",
        help="answer with context.write from a coroutine handler (as the gateway does) instead of yielding",
    )
    null.set_defaults(func=_cmd_null)


def add_bench(sub: Subparsers) -> None:
    from extproc_dev import bench

    parser = sub.add_parser(
        "bench", help="the side-by-side benchmark (see bench/README.md)", description=bench.DESCRIPTION
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=lambda args: bench.run_command(args, sys.argv[2:]))


def add_fake_vllm(sub: Subparsers) -> None:
    from extproc_dev import fake_vllm

    parser = sub.add_parser("fake-vllm", help="a protocol-faithful fake vLLM server", description=fake_vllm.DESCRIPTION)
    fake_vllm.add_arguments(parser)
    parser.set_defaults(func=fake_vllm.run_command)


def add_mesh_assets(sub: Subparsers) -> None:
    from extproc_dev import mesh_assets

    parser = sub.add_parser(
        "mesh-assets",
        help="write the files mesh/ and docker/ derive from the policy, the filter contract and observability/",
    )
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    parser.set_defaults(func=mesh_assets.run_command)
