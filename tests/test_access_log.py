"""The per-request access log: one line per request, never the key or the prompt."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.core import Gateway
from extproc.policy import load_policy
from extproc.processor import RequestStream
from extproc.quota.memory import MemoryStore
from extproc.quota.service import QuotaService

POLICY = Path(__file__).parent / "policies" / "quota.yaml"
PROMPT = "the secret prompt text"


def header_map(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def exchange(key: str, body: dict[str, object], response: bytes | None) -> list[pb.ProcessingRequest]:
    raw = orjson.dumps(body)
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "content-type": "application/json",
        "content-length": str(len(raw)),
        "authorization": f"Bearer {key}",
    }
    messages = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(headers))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True)),
    ]
    if response is not None:
        status = {":status": "200", "content-type": "application/json"}
        messages += [
            pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(status))),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=response, end_of_stream=True)),
        ]
    return messages


async def drive(messages: list[pb.ProcessingRequest]) -> None:
    policy = load_policy(POLICY)
    quotas = QuotaService(MemoryStore())
    stream = RequestStream(Gateway.from_policy(policy), quotas)
    for message in messages:
        await stream.handle(message)
    settlement = stream.finish()
    if settlement is not None:
        quotas.settle(*settlement)
    await quotas.drain()


def test_an_admitted_request_logs_one_line_with_its_cost(caplog: pytest.LogCaptureFixture) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    response = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [], "usage": usage})
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 7}
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        asyncio.run(drive(exchange("sk-stream", body, response)))
    lines = [r.getMessage() for r in caplog.records if r.name == "extproc.request"]
    assert len(lines) == 1
    (line,) = lines
    assert line.startswith("request endpoint=chat model=tiny backend=small tenant=stream stream=False status=200")
    assert "prompt_tokens=11 completion_tokens=5 usage=reported max_completion_tokens=7" in line
    assert "sk-stream" not in caplog.text and PROMPT not in caplog.text


def test_a_refused_request_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 999_999}
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        asyncio.run(drive(exchange("sk-stream", body, None)))
    lines = [r.getMessage() for r in caplog.records if r.name == "extproc.request"]
    assert len(lines) == 1
    assert lines[0] == "refused endpoint=chat model=- tenant=stream status=400 code=context_length_exceeded"
    assert "sk-stream" not in caplog.text and PROMPT not in caplog.text
