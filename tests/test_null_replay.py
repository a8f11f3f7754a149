"""The benchmark's B-replay row: a null ext_proc sending the gateway's recorded replies through real Envoy."""

from __future__ import annotations

import http.client
import json
import urllib.request
from pathlib import Path

import pytest

from extproc_dev import bench
from extproc_dev.null_processor import dump_replies
from extproc_dev.stack import LocalStack, free_port, running

pytestmark = pytest.mark.envoy


def test_envoy_applies_the_replayed_decisions(tmp_path: Path) -> None:
    policy = bench.bench_policy(tmp_path)
    body = bench.chat_body(8)
    replies = tmp_path / "replies.json"
    dump_replies(bench.record_gateway_replies(policy, body), replies)
    stack = LocalStack(policy, listen_port=free_port(), extproc="null", null_replay=replies)
    with running(stack):
        connection = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
        try:
            connection.request("POST", bench.CHAT_PATH, body=body, headers=bench.HEADERS)
            response = connection.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            answer = json.loads(response.read())
        finally:
            connection.close()
        assert response.status == 200
        assert "x-ratelimit-remaining-tokens" in headers
        assert answer["usage"]["completion_tokens"] == 8
        subset = stack.policy.subset("default-8b")
        url = f"http://127.0.0.1:{stack.upstream_port(subset)}/debug/requests"
        with urllib.request.urlopen(url) as seen:
            (upstream,) = json.load(seen)["requests"]
    # The rewritten body (served model name) and the routing headers reached the upstream; the key did not.
    assert upstream["body"]["model"] != bench.BENCH_MODEL
    assert upstream["headers"]["x-llm-tenant"]
    assert "authorization" not in upstream["headers"]
