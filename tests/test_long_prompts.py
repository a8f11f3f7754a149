"""A long prompt is counted off the event loop: other streams are decided meanwhile."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.core import Gateway
from extproc.policy import TokenizerSpec, load_policy
from extproc.processor import OFFLOAD_BODY_BYTES, RequestStream
from extproc.tokenizer import RememberedCounts, counter_for
from extproc_dev import bench
from extproc_dev.stack import LocalStack, free_port, running

LONG_TOKENS = 60_000  # a few tens of milliseconds of counting: far longer than a short request takes


def long_body() -> bytes:
    """A long prompt whose count the gateway does not remember: it has to be counted."""
    remembered = counter_for(TokenizerSpec())
    assert isinstance(remembered, RememberedCounts)
    text, _ = bench.text_of_tokens(LONG_TOKENS, remembered.counter.count)
    remembered.clear()
    body = bench.chat_body(16, content=text)
    assert len(body) >= OFFLOAD_BODY_BYTES
    return body


def test_a_short_request_is_decided_while_a_long_prompt_is_counted(tmp_path: Path) -> None:
    gateway = Gateway.from_policy(load_policy(bench.bench_policy(tmp_path)))
    finished: list[str] = []

    async def decide(name: str, body: bytes) -> None:
        stream = RequestStream(gateway)
        head, first_body = [pb.ProcessingRequest.FromString(raw) for raw in bench._exchange_messages(body)[:2]]
        await stream.handle(head)
        reply = pb.ProcessingResponse.FromString(await stream.handle(first_body))
        assert reply.request_body.response.clear_route_cache  # admitted and routed
        finished.append(name)

    async def main() -> None:
        long = asyncio.create_task(decide("long", long_body()))
        await asyncio.sleep(0)  # the long one has started and handed its body to a thread
        await decide("short", bench.chat_body(8))
        await long

    asyncio.run(main())
    assert finished == ["short", "long"]


@pytest.mark.envoy
def test_through_envoy_a_long_prompt_does_not_hold_up_a_short_one(tmp_path: Path) -> None:
    policy = bench.bench_policy(tmp_path)
    body = long_body()
    done: dict[str, tuple[int, float]] = {}

    def post(name: str, payload: bytes, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", bench.CHAT_PATH, body=payload, headers=bench.HEADERS)
            response = connection.getresponse()
            response.read()
            done[name] = (response.status, time.monotonic())
        finally:
            connection.close()

    with running(LocalStack(policy, listen_port=free_port())) as stack:
        post("warm-up", bench.chat_body(8), stack.listen_port)
        long = threading.Thread(target=post, args=("long", body, stack.listen_port))
        long.start()
        time.sleep(0.005)  # the long body is on its way; its count takes tens of milliseconds
        post("short", bench.chat_body(8), stack.listen_port)
        long.join()
        upstream = f"http://127.0.0.1:{stack.upstream_port(stack.policy.subset('default-8b'))}/debug/requests"
        with urllib.request.urlopen(upstream) as seen:
            lengths = [r["raw_body_length"] for r in json.load(seen)["requests"]]
    # The gateway admitted the long prompt and sent it on (the fake vLLM's 8192-token window then
    # refuses it, as vLLM would); the short one was answered first.
    assert max(lengths) > len(body) // 2
    assert done["short"][0] == 200
    assert done["short"][1] < done["long"][1]
