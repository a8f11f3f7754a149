"""The serving process's start-up heap is frozen out of the cyclic collector, and nothing of ours needs it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.core import Gateway
from extproc.heap import freeze_long_lived
from extproc.policy import load_policy
from extproc.processor import Phase, RequestStream


class _Node:
    def __init__(self) -> None:
        self.next: _Node | None = None


def test_freezing_collects_the_garbage_first_and_takes_the_rest_out_of_every_collection() -> None:
    kept = _Node()
    garbage = _Node()
    garbage.next = garbage  # a cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_long_lived()
        assert gone() is None  # collected before the freeze, not kept for good
        assert gc.get_freeze_count() > 0
        assert gc.is_tracked(kept)
        assert not any(found is kept for found in gc.get_objects())  # in no generation a collection walks
    finally:
        gc.unfreeze()


def _message(kind: str, **fields: object) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{kind: fields})


def _header_map(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def test_a_policy_and_a_whole_request_hold_no_reference_cycles(gateway_policy_path: Path) -> None:
    # The start-up policy is frozen: when a reload replaces it, only reference counting can free it,
    # and anything of ours in a reference cycle would stay for good.
    request = {":path": "/v1/chat/completions", ":method": "POST", "content-type": "application/json"}
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    answer = orjson.dumps({"object": "chat.completion", "choices": [choice], "usage": usage})
    response = {":status": "200", "content-type": "application/json"}
    messages = [
        _message("request_headers", headers=_header_map(request)),
        _message("request_body", body=body, end_of_stream=True),
        _message("response_headers", headers=_header_map(response)),
        _message("response_body", body=answer, end_of_stream=True),
    ]

    async def exchange() -> None:
        stream = RequestStream(Gateway.from_policy(load_policy(gateway_policy_path)))
        for message in messages:
            await stream.handle(message)
        assert stream.phase is Phase.DONE and stream.record is not None and stream.record.backend is not None
        stream.finish()

    loop = asyncio.new_event_loop()
    gc.collect()
    gc.garbage.clear()
    debug = gc.get_debug()
    gc.set_debug(debug | gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept in gc.garbage to look at
    try:
        loop.run_until_complete(exchange())
        gc.collect()
        ours = {type(found).__qualname__ for found in gc.garbage if type(found).__module__.startswith("extproc")}
        assert sorted(ours) == []
    finally:
        gc.set_debug(debug)
        gc.garbage.clear()
        loop.close()
