"""A null ext_proc: answers CONTINUE to the same message sequence the gateway sees.

It is the benchmark's floor: what any Python grpc.aio ext_proc costs before it
does any work. It asks for response bodies exactly as the gateway does.

With `busy_us` it also spins that long in pure Python per request (half on the
request headers, half on the body, where the gateway does its work): a calibration
point for what a given amount of per-request Python costs in throughput on the
machine at hand, compared with what it costs in isolation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.core import BodyMode
from extproc.processor import RESPONSE_HEADERS_WITH_MODE
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


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, busy_us: float = 0.0) -> None:
        self.busy_s = busy_us / 2e6  # per request phase; two phases per request

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if self.busy_s and kind in ("request_headers", "request_body"):
                _spin(self.busy_s)
            if kind == "response_headers":
                is_sse = any(
                    h.key == "content-type" and h.raw_value.startswith(b"text/event-stream")
                    for h in request.response_headers.headers.headers
                )
                yield _RESPONSE_HEADERS[BodyMode.STREAMED if is_sse else BodyMode.BUFFERED]
            else:
                yield _REPLIES[kind]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def run(listen: str, busy_us: float = 0.0) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    add_processor_to_server(NullProcessor(busy_us), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main(listen: str, *, busy_us: float = 0.0) -> int:
    try:
        import uvloop

        uvloop.run(run(listen, busy_us))
    except ImportError:
        asyncio.run(run(listen, busy_us))
    except KeyboardInterrupt:
        pass
    return 0
