"""Serialized `ProcessingResponse`s for the replies built on every request.

Building a header mutation with the generated protobuf classes costs about a
microsecond per header, and every admitted request sends two of them (the
request-body reply with routing headers, the response-headers reply with the
x-ratelimit-* headers). These helpers produce the same message as serialized
bytes in a fraction of that: protobuf's wire format is a concatenation of
(tag, length, payload) fields, so a reply is assembled from cached pieces.
Field numbers are read from the generated descriptors, never written here, and
the tests parse every shape back with the generated classes.

The gRPC server sends `bytes` as they are and serializes message objects as
usual (`to_wire`), so rare replies (errors) keep using the generated classes.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, Literal, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import Message

from extproc import names

_LENGTH_DELIMITED = 2
_VARINT = 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(n) for n in range(1 << 14)]  # lengths of nearly every field we send


def _length(n: int) -> bytes:
    return _SMALL[n] if n < 16384 else _varint(n)


def _tag(message: type[Message], field: str, wire_type: int = _LENGTH_DELIMITED) -> bytes:
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type)


_HEADER_KEY = _tag(base_pb2.HeaderValue, "key")
_HEADER_RAW_VALUE = _tag(base_pb2.HeaderValue, "raw_value")
_OPTION_HEADER = _tag(base_pb2.HeaderValueOption, "header")
_SET_HEADERS = _tag(pb.HeaderMutation, "set_headers")
_REMOVE_HEADERS = _tag(pb.HeaderMutation, "remove_headers")
_HEADER_MUTATION = _tag(pb.CommonResponse, "header_mutation")
_BODY_MUTATION = _tag(pb.CommonResponse, "body_mutation")
_MUTATION_BODY = _tag(pb.BodyMutation, "body")
_CLEAR_ROUTE_CACHE_TRUE = _tag(pb.CommonResponse, "clear_route_cache", _VARINT) + b"\x01"
_COMMON = {  # BodyResponse.response and HeadersResponse.response
    "body": _tag(pb.BodyResponse, "response"),
    "headers": _tag(pb.HeadersResponse, "response"),
}
_MODE_OVERRIDE = _tag(pb.ProcessingResponse, "mode_override")

ReplyKind = Literal["request_headers", "response_headers", "request_body", "response_body"]
_REPLY = {kind: _tag(pb.ProcessingResponse, kind) for kind in ReplyKind.__args__}  # type: ignore[attr-defined]

_OPTIONS: dict[tuple[str, str], bytes] = {}
_OPTIONS_MAX = 4096  # header values repeat (backend, tenant, tier, limits); bounded all the same
_KEY_PREFIXES: dict[str, bytes] = {}
# Headers whose value differs on nearly every request: caching them would only churn the cache.
_FRESH_EVERY_TIME = frozenset(
    {names.RATELIMIT_REMAINING_REQUESTS, names.RATELIMIT_REMAINING_TOKENS, names.CONTENT_LENGTH}
)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _length(len(payload)) + payload


def _encode_set_header(key: str, value: str) -> bytes:
    prefix = _KEY_PREFIXES.get(key)
    if prefix is None:
        if len(_KEY_PREFIXES) >= _OPTIONS_MAX:
            _KEY_PREFIXES.clear()
        prefix = _KEY_PREFIXES[key] = _field(_HEADER_KEY, key.encode()) + _HEADER_RAW_VALUE
    # Values travel in raw_value only: `value` alone yields an empty header, both are rejected.
    raw = value.encode()
    header = prefix + _length(len(raw)) + raw
    option = _OPTION_HEADER + _length(len(header)) + header
    return _SET_HEADERS + _length(len(option)) + option


def set_header(key: str, value: str) -> bytes:
    """One `set_headers` entry of a HeaderMutation."""
    if key in _FRESH_EVERY_TIME:
        return _encode_set_header(key, value)
    option = _OPTIONS.get((key, value))
    if option is None:
        option = _encode_set_header(key, value)
        if len(_OPTIONS) >= _OPTIONS_MAX:
            _OPTIONS.clear()
        _OPTIONS[(key, value)] = option
    return option


@functools.lru_cache(maxsize=256)
def _remove_header(name: str) -> bytes:
    return _field(_REMOVE_HEADERS, name.encode())


def header_mutation(set_headers: Iterable[tuple[str, str]], remove: Iterable[str] = ()) -> bytes:
    """A `HeaderMutation`, serialized."""
    parts = [set_header(key, value) for key, value in set_headers]
    parts += [_remove_header(name) for name in remove]
    return b"".join(parts)


def reply(
    kind: ReplyKind,
    mutation: bytes = b"",
    *,
    body: bytes | None = None,
    clear_route_cache: bool = False,
    mode_override: bytes = b"",
) -> bytes:
    """A serialized `ProcessingResponse` answering `kind` with a `CommonResponse`.

    The body, up to the size limit, is copied once: lengths are added up, not re-measured
    after each nesting level.
    """
    parts: list[bytes] = []
    if mutation:
        parts += (_HEADER_MUTATION, _length(len(mutation)), mutation)
    if body is not None:
        body_length = _length(len(body))
        parts += (_BODY_MUTATION, _length(len(_MUTATION_BODY) + len(body_length) + len(body)))
        parts += (_MUTATION_BODY, body_length, body)
    if clear_route_cache:
        parts.append(_CLEAR_ROUTE_CACHE_TRUE)
    common_length = sum(map(len, parts))
    container = _COMMON["body" if kind.endswith("_body") else "headers"]
    container_length = _length(common_length)
    reply_length = _length(len(container) + len(container_length) + common_length)
    return b"".join((_REPLY[kind], reply_length, container, container_length, *parts, mode_override))


def mode_override(mode: processing_mode_pb2.ProcessingMode) -> bytes:
    """The `mode_override` field of a reply, to pass to `reply` (build once, reuse)."""
    return _field(_MODE_OVERRIDE, mode.SerializeToString())


def to_wire(response: bytes | Message) -> bytes:
    """The gRPC response serializer: bytes as they are, messages serialized."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()


class ProcessorServicer(Protocol):
    """What `add_processor_to_server` needs: the one RPC (no generated base class, which a
    compiled class cannot inherit from)."""

    def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any) -> Awaitable[None]: ...


def add_processor_to_server(servicer: ProcessorServicer, server: grpc.aio.Server) -> None:
    """`add_ExternalProcessorServicer_to_server`, with a serializer that sends prebuilt bytes as they are."""
    service = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
    handlers = {
        "Process": grpc.stream_stream_rpc_method_handler(
            servicer.Process,
            request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=to_wire,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
