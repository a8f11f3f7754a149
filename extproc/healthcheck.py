"""`extproc health`: a gRPC health probe for images without a shell or grpc_health_probe.

The runtime image is distroless (no shell, no curl, no grpc_health_probe binary), so the compose
healthcheck and any exec probe run this with the image's own Python:
`python3 -m extproc health --address 127.0.0.1:50051`. It asks the standard gRPC health service
(`grpc.health.v1.Health/Check`) that `extproc serve` registers for "" and for the ext_proc service.
Kubernetes can use its native `grpc` probe instead; this is for everything else.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

Subparsers = Any  # argparse._SubParsersAction, which typeshed keeps private


def probe(address: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name the server reports for `service` ("SERVING", ...), or why there is none."""
    # Imported here: the CLI builds its parser for every command, and only this one needs a channel.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            # UNAVAILABLE (nothing listening), DEADLINE_EXCEEDED, NOT_FOUND (service unknown), ...
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"error: {code.name if code is not None else 'rpc failed'}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def check(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the server at `address` (host:port) says `service` is SERVING."""
    return probe(address, service, timeout_s) == "SERVING"


def _cmd_health(args: argparse.Namespace) -> int:
    status = probe(args.address, args.service, args.timeout)
    serving = status == "SERVING"
    # One line either way: container runtimes keep a probe's output in the health log.
    print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


def add_health_command(subparsers: Subparsers) -> None:
    health = subparsers.add_parser(
        "health",
        help="gRPC health probe: exit 0 when the server says SERVING",
        description="Ask a gRPC server's health service (grpc.health.v1) whether SERVICE is SERVING; exit 0 if "
        "so, 1 otherwise (not serving, unreachable, unknown service, timed out).",
    )
    health.add_argument("--address", required=True, metavar="HOST:PORT", help="the server, e.g. 127.0.0.1:50051")
    health.add_argument("--service", default="", help='the service name to ask about (default "": the whole server)')
    health.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS", help="deadline for the answer")
    health.set_defaults(func=_cmd_health)
