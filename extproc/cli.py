"""The `extproc` command: serve, policy check, route, replay, size; development subcommands as plugins."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Collection
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from extproc.policy import PolicyError, example_policy_path, load_policy

PLUGIN_GROUP = "extproc.commands"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _cmd_serve(args: argparse.Namespace) -> int:
    from extproc.reload import fingerprint
    from extproc.server import ServeOptions, configure_logging, serve

    configure_logging(args.log_level)
    try:
        seen = fingerprint([args.policy])  # before reading: a change made meanwhile is caught later
        policy = load_policy(args.policy)
        seen = seen + fingerprint(policy.auth.key_files)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    load_urls: dict[str, list[str]] = {}
    for item in args.load_url:
        backend, sep, url = item.partition("=")
        if not sep or not url.startswith("http://"):
            print(f"--load-url {item!r}: expected BACKEND=http://host:port/metrics", file=sys.stderr)
            return 2
        load_urls.setdefault(backend, []).append(url)
    options = ServeOptions(
        args.listen,
        policy,
        args.workers,
        args.grace_seconds,
        args.redis_url or None,
        args.metrics_port or None,
        policy_path=args.policy,
        reload_interval_s=args.reload_interval,
        policy_fingerprint=seen,
        load_urls={name: tuple(urls) for name, urls in load_urls.items()},
        metrics_dir=args.metrics_dir or None,
        access_log=args.access_log,
        access_log_prompts=args.access_log_prompts,
    )
    return serve(options)


def _cmd_policy_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        from extproc.dry_run import rule_problems

        problems = rule_problems(policy)  # compiles it: loads every tokenizer and key file it names
    except ValueError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"{args.file}: warning: {problem}", file=sys.stderr)
    names = sum(1 + len(m.aliases) for m in policy.models)
    print(
        f"{args.file}: ok ({len(policy.models)} models, {names} public names, {len(policy.backends)} backends, "
        f"{len(policy.routing.rules)} rules{f', {len(problems)} warnings' if problems else ''})"
    )
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import dataclasses

    from extproc.core import Gateway
    from extproc.replay import format_report, replay

    try:
        gateway = Gateway.from_policy(load_policy(args.policy))
    except (PolicyError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        with open(args.log, "rb") if args.log != "-" else sys.stdin.buffer as lines:
            report = replay(gateway, lines)
    except OSError as exc:
        print(f"{args.log}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        changes = [{**dataclasses.asdict(c), "kind": c.kind} for c in report.changes]
        print(json.dumps({**report.summary(), "changes": changes}, indent=2))
    else:
        print(format_report(report))
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    from extproc.dry_run import parse_header, parse_load, route

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        headers = dict(parse_header(h) for h in args.header)
        loads = dict(parse_load(spec) for spec in args.load)
        request = sys.stdin.buffer.read() if args.request == "-" else Path(args.request).read_bytes()
    except (ValueError, OSError) as exc:
        print(f"extproc route: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(loads) - set(policy.backends))
    if unknown:
        print(f"extproc route: --load names unknown backends: {', '.join(unknown)}", file=sys.stderr)
        return 2
    result = route(policy, request, headers, loads, args.endpoint)
    if args.json:
        print(json.dumps(result.decision, indent=2))
    else:
        print(result.text())
    return 0 if result.status == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description="LLM traffic gateway (Envoy ext_proc)")
    parser.add_argument("--version", action=_VersionAction, help="the release and its form (mypyc or python)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument("--listen", default=_env("EXTPROC_LISTEN", "0.0.0.0:50051"), help="host:port ($EXTPROC_LISTEN)")
    serve.add_argument(
        "--policy",
        default=_env("EXTPROC_POLICY", str(example_policy_path())),
        help="policy YAML ($EXTPROC_POLICY)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=int(_env("EXTPROC_WORKERS", "1")),
        help="processes sharing the port ($EXTPROC_WORKERS)",
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=float(_env("EXTPROC_GRACE_SECONDS", "30")),
        help="how long in-flight streams may finish after SIGTERM",
    )
    serve.add_argument("--log-level", default=_env("EXTPROC_LOG_LEVEL", "info"))
    serve.add_argument(
        "--redis-url",
        default=_env("EXTPROC_REDIS_URL", ""),
        help="shared quota store, e.g. redis://redis:6379/0 ($EXTPROC_REDIS_URL); memory if unset",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("EXTPROC_METRICS_PORT", "0")),
        help="Prometheus /metrics port: one per replica, summing all its workers (0: off) ($EXTPROC_METRICS_PORT)",
    )
    serve.add_argument(
        "--metrics-dir",
        default=_env("PROMETHEUS_MULTIPROC_DIR", ""),
        help="where the workers write their metric files; emptied at start (default: a new temporary directory)",
    )
    serve.add_argument(
        "--access-log",
        default=_env("EXTPROC_ACCESS_LOG", "stdout"),
        help="one JSON line per request to stdout, stderr, a file path, or off ($EXTPROC_ACCESS_LOG)",
    )
    serve.add_argument(
        "--access-log-prompts",
        action="store_true",
        default=_env("EXTPROC_ACCESS_LOG_PROMPTS", "") == "1",
        help="DEBUG ONLY: put request bodies (prompt text) into the access log; warns at start",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=float(_env("EXTPROC_RELOAD_INTERVAL_SECONDS", "1")),
        help="seconds between checks of the policy and key files for changes; 0: only on SIGHUP",
    )
    serve.add_argument(
        "--load-url",
        action="append",
        default=[],
        metavar="BACKEND=URL",
        help="a vLLM /metrics URL for a backend whose policy names no load source (repeatable)",
    )
    serve.set_defaults(func=_cmd_serve)

    policy = sub.add_parser("policy", help="policy tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy file without starting")
    check.add_argument("file")
    check.set_defaults(func=_cmd_policy_check)

    route = sub.add_parser(
        "route",
        help="dry run: what the gateway would do with a request",
        description="Print the routing decision for REQUEST.json (or - for stdin): tenant, class, prompt "
        "tokens, caps, normalizations, the rule matched, fallbacks considered, the backend and the model "
        "name sent upstream; or the error the client would get (exit 1).",
    )
    route.add_argument("request", help="the request body (JSON file, or - for stdin)")
    route.add_argument("--policy", default=str(example_policy_path()))
    route.add_argument("--endpoint", choices=["chat", "completions", "embeddings"], default="chat")
    route.add_argument("--header", action="append", default=[], metavar="'K: V'", help="a request header")
    route.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="BACKEND:waiting=N,kv=F",
        help="a backend's load figures (queue per pod, KV-cache use; also pods=P, drain=R/s); others unknown",
    )
    route.add_argument("--json", action="store_true", help="print the decision as JSON")
    route.set_defaults(func=_cmd_route)

    replay_cmd = sub.add_parser(
        "replay",
        help="policy what-if: re-decide logged requests under another policy",
        description="Re-decide every request of an access log (JSON lines) under POLICY, from the logged features "
        "alone (no prompt text), and print what would change: requests moving between backends, newly refused "
        "or limited requests, per tenant and class. Load is taken as unsaturated; quotas are replayed in log order.",
    )
    replay_cmd.add_argument("log", help="the access log (JSON lines), or - for stdin")
    replay_cmd.add_argument("--policy", required=True, help="the policy to try")
    replay_cmd.add_argument("--json", action="store_true", help="print the report as JSON, with every change")
    replay_cmd.set_defaults(func=_cmd_replay)

    from extproc.healthcheck import add_health_command
    from extproc.sizing import add_size_command

    add_size_command(sub)
    add_health_command(sub)

    return parser


def _plugin_commands(argv: list[str], builtin: Collection[str]) -> list[EntryPoint]:
    """The `extproc.commands` entry points to load for this command line.

    A development install (extproc-dev) adds `dev`, `bench`, `fake-vllm` and `null-extproc`. Only
    the one named is imported, so `extproc serve` never loads development code; all are loaded when
    no known command is named, for the help text and the error.
    """
    plugins = list(entry_points(group=PLUGIN_GROUP))
    named = [ep for ep in plugins if argv[:1] == [ep.name]]
    if named or (argv[:1] and argv[0] in builtin):
        return named
    return plugins


class _VersionAction(argparse.Action):
    """Like argparse's "version", but works out the form only when asked (it imports the hot path)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_version())
        parser.exit()


def _version() -> str:
    """The release, and whether its hot path is compiled (`mypyc`) or runs from source (`python`)."""
    from importlib.metadata import PackageNotFoundError, version

    from extproc.compiled_form import form

    try:
        release = version("extproc")
    except PackageNotFoundError:
        release = "unknown"
    return f"extproc {release} ({form()})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for plugin in _plugin_commands(argv, builtin=set(subparsers.choices)):
        plugin.load()(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))
