"""A null ext_proc: answers CONTINUE to the same message sequence the gateway sees.

It is the benchmark's floor: what any Python grpc.aio ext_proc costs before it
does any work. It asks for response bodies exactly as the gateway does.

With `busy_us` it also spins that long in pure Python per request (half on the
request headers, half on the body, where the gateway does its work): a calibration
point for what a given amount of per-request Python costs in throughput on the
machine at hand, compared with what it costs in isolation.

With `replies` it answers the request body and a JSON response's headers with
replies the gateway recorded for the benchmark request (routing headers, the
rewritten body, `clear_route_cache`, x-ratelimit-* headers): Envoy then does all
the work the gateway's decisions ask of it, while the ext_proc still does none.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.core import BodyMode
from extproc.filter_contract import RESPONSE_HEADERS_WITH_MODE
from extproc.wire import add_processor_to_server

# Serialized once and sent as they are, exactly as the gateway sends its own fixed replies.
_REPLIES = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString(),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString(),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString(),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()).SerializeToString(),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()).SerializeToString(),
}
_RESPONSE_HEADERS = RESPONSE_HEADERS_WITH_MODE
REPLAYED = ("request_body", "response_headers")  # the replies that carry the gateway's decisions


def load_replies(path: Path) -> dict[str, bytes]:
    """Recorded replies: a JSON object of message kind -> base64 of a serialized ProcessingResponse."""
    recorded = orjson.loads(path.read_bytes())
    replies = {kind: base64.b64decode(recorded[kind]) for kind in REPLAYED}
    for kind, raw in replies.items():
        if pb.ProcessingResponse.FromString(raw).WhichOneof("response") != kind:
            raise ValueError(f"{path}: the recorded {kind} reply answers another message")
    return replies


def dump_replies(replies: Mapping[str, bytes], path: Path) -> None:
    path.write_bytes(orjson.dumps({kind: base64.b64encode(replies[kind]).decode() for kind in REPLAYED}))


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, busy_us: float = 0.0, replies: Mapping[str, bytes] | None = None) -> None:
        self.busy_s = busy_us / 2e6  # per request phase; two phases per request
        self.replies = dict(_REPLIES)
        self.json_response_headers = _RESPONSE_HEADERS[BodyMode.BUFFERED]
        if replies is not None:
            self.replies["request_body"] = replies["request_body"]
            self.json_response_headers = replies["response_headers"]

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in request_iterator:
            yield self.reply(request)

    def reply(self, request: pb.ProcessingRequest) -> bytes:
        kind = request.WhichOneof("request")
        if self.busy_s and kind in ("request_headers", "request_body"):
            _spin(self.busy_s)
        if kind == "response_headers":
            is_sse = any(
                h.key == "content-type" and h.raw_value.startswith(b"text/event-stream")
                for h in request.response_headers.headers.headers
            )
            return _RESPONSE_HEADERS[BodyMode.STREAMED] if is_sse else self.json_response_headers
        return self.replies[str(kind)]


class WritingNullProcessor(NullProcessor):
    """The same answers written with `context.write` from a coroutine, the way the gateway's handler
    sends them (mypyc compiles no async generators)."""

    async def Process(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        async for request in request_iterator:
            await context.write(self.reply(request))


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def run(
    listen: str, busy_us: float = 0.0, replies: Mapping[str, bytes] | None = None, write: bool = False
) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    processor = (WritingNullProcessor if write else NullProcessor)(busy_us, replies)
    add_processor_to_server(processor, server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main(listen: str, *, busy_us: float = 0.0, replay: Path | None = None, write: bool = False) -> int:
    replies = load_replies(replay) if replay is not None else None
    try:
        import uvloop

        uvloop.run(run(listen, busy_us, replies, write))
    except ImportError:
        asyncio.run(run(listen, busy_us, replies, write))
    except KeyboardInterrupt:
        pass
    return 0
