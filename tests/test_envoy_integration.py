"""Real Envoy + `extproc serve` + fake vLLMs, driven by the openai SDK and raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from extproc_dev.stack import LocalStack, free_port, running

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def stack(gateway_policy_path: Path) -> Iterator[LocalStack]:
    with running(LocalStack(gateway_policy_path, listen_port=free_port(), token_delay_ms=10)) as started:
        yield started


@pytest.fixture
def client(stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="sk-test", max_retries=0)


def upstream_requests(stack: LocalStack, subset: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.upstream_port(subset)}/debug/requests"
    with urllib.request.urlopen(url) as response:
        return list(json.load(response)["requests"])


def clear_upstream(stack: LocalStack, subset: str) -> None:
    url = f"http://127.0.0.1:{stack.upstream_port(subset)}/debug/requests"
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE")).close()


def raw_post(stack: LocalStack, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_routed_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4
    )
    assert raw.headers["x-served-by"] == "small"
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    other = client.chat.completions.with_raw_response.create(
        model="strict", messages=[{"role": "user", "content": "Say hi"}], max_tokens=2
    )
    assert other.headers["x-served-by"] == "large-pool"


def test_rewritten_body_reaches_the_backend_with_served_name_and_content_length(
    client: openai.OpenAI, stack: LocalStack
) -> None:
    clear_upstream(stack, "small")
    client.chat.completions.create(
        model="tiny-alias",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
        stop="END",
        logit_bias={"50256": -100},
    )
    (seen,) = upstream_requests(stack, "small")
    assert seen["body"]["model"] == "org/tiny-served"
    assert seen["body"]["stop"] == ["END"]
    assert "logit_bias" not in seen["body"]
    assert int(seen["headers"]["content-length"]) == seen["raw_body_length"]
    assert seen["headers"]["x-llm-backend"] == "small"


def test_clamped_max_tokens_reaches_the_backend_clamped(client: openai.OpenAI, stack: LocalStack) -> None:
    clear_upstream(stack, "small")
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=500
    )
    (seen,) = upstream_requests(stack, "small")
    assert seen["body"]["max_tokens"] == 64
    assert completion.usage is not None and completion.usage.completion_tokens == 64


def test_streaming_arrives_chunk_by_chunk_and_reports_usage(client: openai.OpenAI) -> None:
    arrivals: list[float] = []
    usage = None
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
    assert usage is not None and usage.completion_tokens == 20
    # 20 tokens 10 ms apart: a buffered response would arrive all at once.
    assert len(arrivals) >= 21
    assert arrivals[-1] - arrivals[0] > 0.1


def test_a_stream_that_did_not_ask_for_usage_does_not_see_it(client: openai.OpenAI, stack: LocalStack) -> None:
    clear_upstream(stack, "small")
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=5, stream=True
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert len(text.split()) == 5
    (seen,) = upstream_requests(stack, "small")
    assert seen["body"]["stream_options"] == {"include_usage": True}


def test_completions_and_embeddings(client: openai.OpenAI) -> None:
    completion = client.completions.with_raw_response.create(model="tiny", prompt=["a", "b"], max_tokens=2)
    assert completion.headers["x-served-by"] == "small"
    assert len(completion.parse().choices) == 2
    embedding = client.embeddings.with_raw_response.create(model="embedder", input=["alpha", "beta"])
    assert embedding.headers["x-served-by"] == "embed"
    assert len(embedding.parse().data) == 2


def test_over_long_prompt_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello " * 240}], max_tokens=60
        )
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in caught.value.message


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"


def test_models_are_listed_by_the_gateway(client: openai.OpenAI) -> None:
    models = {m.id: m.model_extra for m in client.models.list()}
    assert set(models) == {"tiny", "tiny-alias", "strict", "embedder"}
    assert models["tiny"] is not None and models["tiny"]["max_model_len"] == 256


def test_invalid_json_gets_a_json_400(stack: LocalStack) -> None:
    status, headers, body = raw_post(stack, "/v1/chat/completions", b"{nope", {"content-type": "application/json"})
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "invalid_json"


def test_wrong_content_type_is_415_and_big_bodies_are_413(stack: LocalStack) -> None:
    status, _, body = raw_post(
        stack, "/v1/chat/completions", b"a=b", {"content-type": "application/x-www-form-urlencoded"}
    )
    assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_media_type"
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    status, _, body = raw_post(stack, "/v1/chat/completions", big, {"content-type": "application/json"})
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_chunked_body_over_envoy_buffer_is_a_json_413(stack: LocalStack) -> None:
    # No content-length: Envoy's own buffer limit answers, formatted as an OpenAI error.
    connection = http.client.HTTPConnection("127.0.0.1", stack.listen_port, timeout=10)
    try:
        chunks = (b"x" * 16_384 for _ in range(20))
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=chunks,
            headers={"content-type": "application/json"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "request_too_large"
    finally:
        connection.close()


def test_spoofed_backend_header_has_no_effect(stack: LocalStack) -> None:
    spoof = {"x-llm-backend": "large-pool"}
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode()
    status, headers, _ = raw_post(stack, "/v1/chat/completions", body, {"content-type": "application/json", **spoof})
    assert status == 200 and headers["x-served-by"] == "small"
    # On paths the gateway does not decide, the forged header is removed, not obeyed.
    request = urllib.request.Request(f"{stack.origin}/health", headers=spoof)
    with urllib.request.urlopen(request) as response:
        assert response.headers["x-served-by"] == "small"


def test_non_inference_paths_pass_through(stack: LocalStack) -> None:
    with urllib.request.urlopen(f"{stack.origin}/metrics") as response:
        assert b"vllm:num_requests_running" in response.read()


def test_client_abort_mid_stream_is_harmless(stack: LocalStack, client: openai.OpenAI) -> None:
    body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 60, "stream": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", stack.listen_port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert b"200 OK" in sock.recv(4096)
    time.sleep(0.2)
    assert stack.process("extproc").alive()
    completion = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert completion.choices
    log = stack.process("extproc").tail(200)
    assert "Traceback" not in log
