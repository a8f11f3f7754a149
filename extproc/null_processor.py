"""A null ext_proc: answers CONTINUE to the same message sequence the gateway sees.

It is the benchmark's floor: what any Python grpc.aio ext_proc costs before it
does any work. It asks for response bodies exactly as the gateway does.
"""

from __future__ import annotations

import asyncio
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
    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "response_headers":
                is_sse = any(
                    h.key == "content-type" and h.raw_value.startswith(b"text/event-stream")
                    for h in request.response_headers.headers.headers
                )
                yield _RESPONSE_HEADERS[BodyMode.STREAMED if is_sse else BodyMode.BUFFERED]
            else:
                yield _REPLIES[kind]


async def run(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    add_processor_to_server(NullProcessor(), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main(listen: str) -> int:
    try:
        import uvloop

        uvloop.run(run(listen))
    except ImportError:
        asyncio.run(run(listen))
    except KeyboardInterrupt:
        pass
    return 0
