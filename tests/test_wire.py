"""The serialized replies of wire.py are the messages the generated classes would build."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import names, wire

_Mode = processing_mode_pb2.ProcessingMode


def _mutation(set_headers: list[tuple[str, str]], remove: list[str]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode())) for k, v in set_headers
        ],
        remove_headers=remove,
    )


HEADERS = [
    ("x-llm-backend", "small"),
    (names.RATELIMIT_REMAINING_TOKENS, "999"),  # never cached
    (names.CONTENT_LENGTH, "130"),
    ("x-long", "v" * 200),  # lengths past one varint byte
    ("x-unicode", "caf\u00e9"),
]


def test_header_mutation_matches_the_generated_classes() -> None:
    encoded = wire.header_mutation(HEADERS, ["authorization", "x-api-key"])
    assert pb.HeaderMutation.FromString(encoded) == _mutation(HEADERS, ["authorization", "x-api-key"])
    # Cached and fresh encodings are the same bytes.
    assert wire.header_mutation(HEADERS, ["authorization", "x-api-key"]) == encoded


def test_request_body_reply_with_routing_headers_body_and_route_refresh() -> None:
    body = b'{"model": "m", "messages": []}' * 1000  # > 16 KiB: a three-byte length
    encoded = wire.reply("request_body", wire.header_mutation(HEADERS), body=body, clear_route_cache=True)
    expected = pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=_mutation(HEADERS, []),
                body_mutation=pb.BodyMutation(body=body),
                clear_route_cache=True,
            )
        )
    )
    assert pb.ProcessingResponse.FromString(encoded) == expected


@pytest.mark.parametrize("kind", ["request_headers", "response_headers"])
def test_headers_reply_with_mode_override(kind: str) -> None:
    mode = _Mode(response_body_mode=_Mode.STREAMED, response_trailer_mode=_Mode.SKIP)
    encoded = wire.reply(kind, wire.header_mutation(HEADERS[:2]), mode_override=wire.mode_override(mode))  # type: ignore[arg-type]
    common = pb.CommonResponse(header_mutation=_mutation(HEADERS[:2], []))
    expected = pb.ProcessingResponse(**{kind: pb.HeadersResponse(response=common)}, mode_override=mode)
    assert pb.ProcessingResponse.FromString(encoded) == expected


def test_to_wire_sends_bytes_as_they_are_and_serializes_messages() -> None:
    message = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    assert wire.to_wire(b"\x0a\x00") == b"\x0a\x00"
    assert wire.to_wire(message) == message.SerializeToString()


def test_the_header_cache_stays_bounded() -> None:
    for i in range(3 * wire._OPTIONS_MAX):
        wire.set_header("x-llm-tenant", f"tenant-{i}")
    assert len(wire._OPTIONS) <= wire._OPTIONS_MAX
