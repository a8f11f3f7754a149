"""The sans-IO core: every decision as a fast unit test, no Envoy, no gRPC."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.core import Admission, Gateway, NeedBody, Passthrough, Reply, ResponseWatcher
from extproc.errors import GatewayError
from extproc.policy import TokenizerSpec
from extproc.tokenizer import counter_for

COUNT = counter_for(TokenizerSpec()).count


def head(path: str = "/v1/chat/completions", method: str = "POST", **extra: str) -> dict[str, str]:
    return {":path": path, ":method": method, "content-type": "application/json", **extra}


def admit(gateway: Gateway, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions") -> Admission:
    verdict = gateway.on_request_headers(head(path))
    assert isinstance(verdict, NeedBody)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return gateway.on_request_body(verdict, raw)


def refuse(gateway: Gateway, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions") -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        admit(gateway, body, path)
    return caught.value


def sent(admission: Admission) -> dict[str, Any]:
    assert admission.body is not None
    return orjson.loads(admission.body)


def chat(content: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


# --- request headers ------------------------------------------------------------------------


def test_models_listing_is_answered_by_the_gateway(gateway: Gateway) -> None:
    reply = gateway.on_request_headers(head("/v1/models", "GET"))
    assert isinstance(reply, Reply) and reply.status == 200
    data = orjson.loads(reply.body)["data"]
    assert {m["id"]: m["max_model_len"] for m in data} == {
        "tiny": 256,
        "tiny-alias": 256,
        "strict": 2048,
        "embedder": 128,
    }


def test_other_paths_pass_through_and_lose_a_forged_routing_header(gateway: Gateway) -> None:
    assert gateway.on_request_headers(head("/health", "GET")) == Passthrough(())
    forged = gateway.on_request_headers(head("/health", "GET", **{"x-llm-backend": "large"}))
    assert forged == Passthrough(("x-llm-backend",))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        (head(method="GET"), 405, "method_not_allowed"),
        (head(**{"content-type": "application/x-www-form-urlencoded"}), 415, "unsupported_media_type"),
        (head(**{"content-length": "70000"}), 413, "request_too_large"),
        (head("/v1/models", "POST"), 405, "method_not_allowed"),
    ],
)
def test_head_errors(gateway: Gateway, headers: dict[str, str], status: int, code: str) -> None:
    reply = gateway.on_request_headers(headers)
    assert isinstance(reply, Reply) and reply.status == status
    assert orjson.loads(reply.body)["error"]["code"] == code
    assert ("content-type", "application/json") in reply.headers


def test_json_with_charset_is_accepted_and_a_bodyless_post_is_refused(gateway: Gateway) -> None:
    assert isinstance(gateway.on_request_headers(head(**{"content-type": "application/json; charset=utf-8"})), NeedBody)
    reply = gateway.on_request_headers(head(), end_of_stream=True)
    assert isinstance(reply, Reply) and reply.status == 400


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, None),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
        (chat(model="nope"), 404, "model", "model_not_found"),
        ({"model": "tiny", "messages": []}, 400, "messages", None),
        ({"model": "tiny", "messages": "hi"}, 400, "messages", None),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
        (chat(max_tokens=True), 400, "max_tokens", None),
        (chat(max_tokens=0), 400, "max_tokens", None),
        (chat(stream="yes"), 400, "stream", None),
        (chat(stop=[1]), 400, "stop", None),
        (chat(n=True), 400, "n", None),
        (
            {"model": "embedder", "messages": [{"role": "user", "content": "x"}]},
            400,
            "model",
            "unsupported_endpoint",
        ),
    ],
)
def test_bad_bodies_get_openai_errors(
    gateway: Gateway, body: dict[str, Any] | bytes, status: int, param: str | None, code: str | None
) -> None:
    error = refuse(gateway, body)
    assert error.status == status
    payload = orjson.loads(error.body())["error"]
    assert set(payload) == {"message", "type", "param", "code"}
    assert payload["type"] == "invalid_request_error"
    assert payload["param"] == param and payload["code"] == code


def test_completions_and_embeddings_require_their_input(gateway: Gateway) -> None:
    assert refuse(gateway, {"model": "tiny"}, "/v1/completions").param == "prompt"
    assert refuse(gateway, {"model": "tiny", "prompt": []}, "/v1/completions").param == "prompt"
    assert refuse(gateway, {"model": "embedder"}, "/v1/embeddings").param == "input"
    assert refuse(gateway, {"model": "embedder", "input": [1, "a"]}, "/v1/embeddings").param == "input"


def test_body_over_the_limit_is_413_even_without_content_length(gateway: Gateway) -> None:
    assert refuse(gateway, chat("x" * 70_000)).status == 413


# --- counting -------------------------------------------------------------------------------


def test_chat_counts_contents_plus_framing(gateway: Gateway) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is an ext_proc?"},
    ]
    admission = admit(gateway, {"model": "tiny", "messages": messages, "max_tokens": 5})
    assert admission.prompt_tokens == COUNT("Be brief.") + COUNT("What is an ext_proc?") + 2 * 3 + 3


def test_chat_counts_text_parts_names_and_images(gateway: Gateway) -> None:
    content = [{"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "data:"}}]
    admission = admit(
        gateway,
        {
            "model": "strict",
            "messages": [{"role": "user", "name": "ann", "content": content}],
            "max_tokens": 5,
        },
    )
    assert admission.prompt_tokens == COUNT("describe") + COUNT("ann") + 765 + 3 + 3


def test_completion_prompts_in_every_shape(gateway: Gateway) -> None:
    def prompt_tokens(prompt: Any) -> int:
        return admit(gateway, {"model": "tiny", "prompt": prompt, "max_tokens": 4}, "/v1/completions").prompt_tokens

    assert prompt_tokens("one two three") == COUNT("one two three")
    assert prompt_tokens(["one", "two three"]) == COUNT("one") + COUNT("two three")
    assert prompt_tokens([5, 6, 7]) == 3
    assert prompt_tokens([[5, 6], [7]]) == 3


def test_completion_reservation_covers_every_sequence(gateway: Gateway) -> None:
    admission = admit(gateway, {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 4, "n": 3}, "/v1/completions")
    assert admission.completion_tokens == 4 * 2 * 3


def test_embeddings_count_input_and_check_each_against_the_window(gateway: Gateway) -> None:
    admission = admit(gateway, {"model": "embedder", "input": ["alpha", "beta"]}, "/v1/embeddings")
    assert admission.prompt_tokens == COUNT("alpha") + COUNT("beta")
    assert admission.completion_tokens == 0
    assert sent(admission)["model"] == "org/embedder"
    error = refuse(gateway, {"model": "embedder", "input": ["word " * 200]}, "/v1/embeddings")
    assert error.code == "context_length_exceeded"


# --- caps -----------------------------------------------------------------------------------


def test_prompt_cap(gateway: Gateway) -> None:
    error = refuse(gateway, {"model": "strict", "messages": [{"role": "user", "content": "word " * 1200}]})
    assert (error.status, error.code, error.param) == (400, "prompt_too_long", "messages")
    assert "1000" in error.message


def test_completion_cap_clamps_when_the_policy_says_clamp(gateway: Gateway) -> None:
    admission = admit(gateway, chat(max_tokens=500, max_completion_tokens=400))
    body = sent(admission)
    assert body["max_tokens"] == 64 and body["max_completion_tokens"] == 64
    assert admission.completion_tokens == 64
    assert admission.body is not None  # the adapter sets content-length with the new body


def test_completion_cap_rejects_when_the_policy_says_reject(gateway: Gateway) -> None:
    error = refuse(
        gateway,
        {"model": "strict", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 101},
    )
    assert (error.status, error.code, error.param) == (400, "max_tokens_exceeded", "max_completion_tokens")


def test_default_completion_is_injected_and_shrinks_to_fit_the_window(gateway: Gateway) -> None:
    assert sent(admit(gateway, chat()))["max_tokens"] == 32
    # 256-token window: a ~240-token prompt leaves less room than the default 32.
    prompt = "hello " * 240
    admission = admit(gateway, chat(prompt))
    assert sent(admission)["max_tokens"] == 256 - admission.prompt_tokens


def test_context_window_names_the_numbers(gateway: Gateway) -> None:
    prompt = "hello " * 230
    error = refuse(gateway, chat(prompt, max_tokens=60))
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    tokens = COUNT(prompt) + 3 + 3
    assert "maximum context length is 256 tokens" in error.message
    assert f"you requested {tokens + 60} tokens ({tokens} in the messages, 60 in the completion)" in error.message


# --- normalization and routing ---------------------------------------------------------------


def test_alias_routes_and_renames(gateway: Gateway) -> None:
    admission = admit(gateway, chat(model="tiny-alias", max_tokens=3))
    assert sent(admission)["model"] == "org/tiny-served"
    assert admission.set_headers[0] == ("x-llm-backend", "small")
    strict = admit(gateway, {"model": "strict", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
    assert strict.set_headers == [("x-llm-backend", "large-pool"), ("x-llm-class", "interactive")]
    assert strict.body is None  # nothing to rewrite: the original body goes upstream


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("END", ["END"]),
        (["a", "b", "a", ""], ["a", "b"]),
        (["1", "2", "3", "4", "5"], ["1", "2", "3", "4"]),
        ([], None),
        (None, None),
    ],
)
def test_stop_sequences(gateway: Gateway, stop: Any, expected: list[str] | None) -> None:
    body = sent(admit(gateway, chat(stop=stop, max_tokens=3)))
    assert body.get("stop") == expected


def test_unsupported_parameters_are_stripped(gateway: Gateway) -> None:
    denied = sent(admit(gateway, chat(logit_bias={"1": 2}, temperature=0.5, max_tokens=3)))
    assert "logit_bias" not in denied and denied["temperature"] == 0.5
    allowed = sent(
        admit(
            gateway,
            {
                "model": "strict",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 3,
                "temperature": 0.1,
                "seed": 7,
                "top_k": 3,
            },
        )
    )
    assert allowed == {
        "model": "strict",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 3,
        "temperature": 0.1,
    }


def test_the_rewrite_is_idempotent(gateway: Gateway) -> None:
    first = sent(admit(gateway, chat(stop="x", logit_bias={}, max_tokens=999, stream=True)))
    # Feed the rewritten body back under the public name: nothing more changes.
    again = sent(admit(gateway, {**first, "model": "tiny"}))
    assert again == first


def test_streams_get_usage_injected_and_hidden_unless_asked(gateway: Gateway) -> None:
    hidden = admit(gateway, chat(stream=True, max_tokens=3))
    assert sent(hidden)["stream_options"] == {"include_usage": True} and hidden.hide_usage_event
    asked = admit(gateway, chat(stream=True, max_tokens=3, stream_options={"include_usage": True}))
    assert asked.stream and not asked.hide_usage_event


# --- response ------------------------------------------------------------------------------


def test_json_response_usage(gateway: Gateway) -> None:
    watcher = ResponseWatcher(admit(gateway, chat(max_tokens=3)))
    watcher.on_headers(200, "application/json")
    assert watcher.on_body(b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}', True) is None
    assert watcher.usage is not None and (watcher.usage.prompt_tokens, watcher.usage.completion_tokens) == (
        7,
        3,
    )


def test_passthrough_strips_every_header_only_the_gateway_may_set(gateway: Gateway) -> None:
    forged = head("/metrics", "GET", **{"x-llm-tenant": "acme", "x-llm-class": "interactive", "x-other": "kept"})
    assert gateway.on_request_headers(forged) == Passthrough(("x-llm-tenant", "x-llm-class"))
