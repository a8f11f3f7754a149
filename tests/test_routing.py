"""Routing: the playbook, every rule matcher, the routed target's window and caps, load-aware fallback
and shedding, and the shadowed-rule check. Pure: plain data in, decisions out (no network, no Envoy)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
import yaml

from extproc.core import Admission, Gateway, NeedBody
from extproc.errors import GatewayError
from extproc.identity import hash_key
from extproc.load import BackendLoad
from extproc.policy import LoadPolicy, Policy, PolicyError, example_policy_path, parse_policy
from extproc.routing import shadowed_rules
from extproc.saturation import retry_after_ms, saturation_level

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

RAW_PLAYBOOK: dict[str, Any] = yaml.safe_load(example_policy_path().read_text())

# What the playbook's backends write into the body for llama-3.1-8b.
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_FP8 = "meta-llama/Llama-3.1-8B-Instruct-FP8"
QWEN_7B = "Qwen/Qwen2.5-7B-Instruct"
QWEN_72B = "Qwen/Qwen2.5-72B-Instruct"

# "word " * n is n + 1 cl100k tokens; a chat message adds 3 and the reply 3 more.
LONG = "word " * 7000  # over the playbook's 6,000-token rule
FITS_8K_NOT_4K = "word " * 4990  # 4,997 tokens: fits default-8b (8192), not fast-8b (4096)


def playbook_with(**changes: Any) -> Gateway:
    """The example policy with top-level sections merged over (one level deep)."""
    raw = copy.deepcopy(RAW_PLAYBOOK)
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    return Gateway.from_policy(parse_policy(raw))


@pytest.fixture(scope="module")
def playbook() -> Gateway:
    return Gateway.from_policy(parse_policy(copy.deepcopy(RAW_PLAYBOOK)))


def head(
    path: str = CHAT, key: str | None = None, cls: str | None = None, quality: str | None = None
) -> dict[str, str]:
    headers = {":path": path, ":method": "POST", "content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if cls is not None:
        headers["x-llm-class"] = cls
    if quality is not None:
        headers["x-llm-quality"] = quality
    return headers


def admit(
    gateway: Gateway,
    body: dict[str, Any],
    *,
    path: str = CHAT,
    key: str | None = None,
    cls: str | None = None,
    quality: str | None = None,
    loads: dict[str, BackendLoad] | None = None,
) -> Admission:
    need = gateway.on_request_headers(head(path, key, cls, quality))
    assert isinstance(need, NeedBody), need
    return gateway.on_request_body(need, orjson.dumps(body), loads or {})


def refuse(gateway: Gateway, body: dict[str, Any], **kwargs: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        admit(gateway, body, **kwargs)
    return caught.value


def sent(admission: Admission) -> dict[str, Any]:
    assert admission.body is not None
    return orjson.loads(admission.body)


def chat(content: str = "hello", model: str = "llama-3.1-8b", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def backend_header(admission: Admission) -> str:
    return dict(admission.set_headers)["x-llm-backend"]


# --- 1. the playbook -------------------------------------------------------------------------


def test_prompts_over_6000_tokens_are_refused_by_the_rule(playbook: Gateway) -> None:
    error = refuse(playbook, chat(LONG), key="sk-demo")
    assert (error.status, error.code) == (400, "prompt_too_long")
    payload = orjson.loads(error.body())["error"]
    assert payload["code"] == "prompt_too_long"
    assert payload["message"].startswith("Prompts over 6,000 tokens are not accepted")


@pytest.mark.parametrize(
    ("case", "kwargs", "body", "backend", "rule", "served"),
    [
        ("tools tier", {"key": "sk-tools"}, chat(), "fast-8b", "internal-tools", LLAMA_FP8),
        ("tools tier, alias", {"key": "sk-tools"}, chat(model="llama3"), "fast-8b", "internal-tools", LLAMA_FP8),
        (
            "tools tier, completions",
            {"key": "sk-tools", "path": COMPLETIONS},
            {"model": "llama-3.1-8b", "prompt": "hi"},
            "fast-8b",
            "internal-tools",
            LLAMA_FP8,
        ),
        (
            "json_object",
            {"key": "sk-demo"},
            chat(response_format={"type": "json_object"}),
            "strict-json-model",
            "json-mode",
            QWEN_7B,
        ),
        (
            "json_schema",
            {"key": "sk-demo"},
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            "strict-json-model",
            "json-mode",
            QWEN_7B,
        ),
        (
            "text format is not JSON mode",
            {"key": "sk-demo"},
            chat(response_format={"type": "text"}),
            "default-8b",
            "default",
            LLAMA,
        ),
        (
            "quality high",
            {"key": "sk-demo", "quality": "high"},
            chat(),
            "large-reasoning-model",
            "high-quality",
            QWEN_72B,
        ),
        ("quality standard", {"key": "sk-demo", "quality": "standard"}, chat(), "default-8b", "default", LLAMA),
        ("undeclared quality ignored", {"key": "sk-demo", "quality": "ultra"}, chat(), "default-8b", "default", LLAMA),
        ("quality is case-sensitive", {"key": "sk-demo", "quality": "HIGH"}, chat(), "default-8b", "default", LLAMA),
        ("demo may choose batch", {"key": "sk-demo", "cls": "batch"}, chat(), "batch-pool", "batch", LLAMA),
        (
            "tiny cannot raise to interactive",
            {"key": "sk-tiny", "cls": "interactive"},
            chat(),
            "default-8b",
            "default",
            LLAMA,
        ),
        ("tiny cannot raise to batch", {"key": "sk-tiny", "cls": "batch"}, chat(), "default-8b", "default", LLAMA),
        ("otherwise default-8b", {"key": "sk-demo"}, chat(), "default-8b", "default", LLAMA),
        ("alias, default", {"key": "sk-demo"}, chat(model="gpt-4o-mini"), "default-8b", "default", LLAMA),
        (
            "embeddings with quality high",
            {"key": "sk-demo", "path": EMBEDDINGS, "quality": "high"},
            {"model": "bge-m3", "input": "hello"},
            "embeddings",
            "default",
            "BAAI/bge-m3",
        ),
        (
            "embeddings from the tools tier",
            {"key": "sk-tools", "path": EMBEDDINGS},
            {"model": "bge-m3", "input": "hello"},
            "embeddings",
            "default",
            "BAAI/bge-m3",
        ),
        (
            "embeddings from batch",
            {"key": "sk-demo", "path": EMBEDDINGS, "cls": "batch"},
            {"model": "bge-m3", "input": "hello"},
            "embeddings",
            "default",
            "BAAI/bge-m3",
        ),
        # Rule order: internal-tools comes before json-mode and high-quality.
        (
            "tools tier + JSON mode",
            {"key": "sk-tools"},
            chat(response_format={"type": "json_object"}),
            "fast-8b",
            "internal-tools",
            LLAMA_FP8,
        ),
        (
            "tools tier + quality high",
            {"key": "sk-tools", "quality": "high"},
            chat(),
            "fast-8b",
            "internal-tools",
            LLAMA_FP8,
        ),
        ("tools tier + batch", {"key": "sk-tools", "cls": "batch"}, chat(), "fast-8b", "internal-tools", LLAMA_FP8),
        # json-mode comes before high-quality, high-quality before batch.
        (
            "JSON mode + quality high",
            {"key": "sk-demo", "quality": "high"},
            chat(response_format={"type": "json_object"}),
            "strict-json-model",
            "json-mode",
            QWEN_7B,
        ),
        (
            "quality high + batch",
            {"key": "sk-demo", "quality": "high", "cls": "batch"},
            chat(),
            "large-reasoning-model",
            "high-quality",
            QWEN_72B,
        ),
        (
            "qwen-72b by default",
            {"key": "sk-demo"},
            chat(model="qwen-2.5-72b"),
            "large-reasoning-model",
            "default",
            QWEN_72B,
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and " " in value else None,
)
def test_the_playbook(
    playbook: Gateway,
    case: str,
    kwargs: dict[str, Any],
    body: dict[str, Any],
    backend: str,
    rule: str,
    served: str,
) -> None:
    admission = admit(playbook, body, **kwargs)
    assert admission.target.backend == backend
    assert backend_header(admission) == backend
    assert admission.rule == rule
    assert admission.target.served_name == served
    assert sent(admission)["model"] == served


@pytest.mark.parametrize(
    ("key", "cls", "expected"),
    [
        ("sk-demo", None, "interactive"),
        ("sk-demo", "batch", "batch"),
        ("sk-demo", "experimental", "experimental"),  # giving way never needs permission
        ("sk-demo", "urgent", "interactive"),  # not a class: ignored
        ("sk-tiny", None, "experimental"),
        ("sk-tiny", "interactive", "experimental"),  # never raises its priority
        ("sk-tiny", "batch", "experimental"),
        ("sk-tools", "batch", "batch"),  # lower than its own: always allowed
    ],
)
def test_traffic_class_from_the_class_header(playbook: Gateway, key: str, cls: str | None, expected: str) -> None:
    admission = admit(playbook, chat(), key=key, cls=cls)
    assert admission.traffic_class == expected
    assert dict(admission.set_headers)["x-llm-class"] == expected


def test_playbook_has_no_shadowed_rules() -> None:
    assert shadowed_rules(parse_policy(copy.deepcopy(RAW_PLAYBOOK))) == []


# --- 2. every matcher, on a small policy -----------------------------------------------------------

KEYS = {"acme": "sk-acme", "beta": "sk-beta", "gamma": "sk-gamma"}


def small_policy(rules: list[dict[str, Any]], default: str | None = None, **sections: dict[str, Any]) -> Policy:
    raw: dict[str, Any] = {
        "backends": {
            "own": {},
            "own-n": {},
            "emb": {},
            "hit": {"served_name": "hit-served"},
            "other": {"served_name": "other-served"},
            "alt": {"served_name": "alt-served"},
            "small": {"served_name": "small-served", "max_model_len": 1000},
            "capped": {"max_prompt_tokens": 100, "max_completion_tokens": 50},
        },
        "models": [
            {
                "name": "m",
                "aliases": ["m-a", "m-b"],
                "backend": "own",
                "served_name": "m-served",
                "max_model_len": 8192,
            },
            {"name": "n", "backend": "own-n", "max_model_len": 8192},
            {"name": "e", "backend": "emb", "endpoints": ["embeddings"], "max_model_len": 8192},
        ],
        "tenants": {
            "acme": {"tier": "gold", "keys": [{"sha256": hash_key("sk-acme")}]},
            "beta": {"tier": "free", "traffic_class": "batch", "keys": [{"sha256": hash_key("sk-beta")}]},
            "gamma": {"tier": "gold", "traffic_class": "experimental", "keys": [{"sha256": hash_key("sk-gamma")}]},
        },
        "routing": {"rules": rules, **({"default": default} if default else {})},
        **sections,
    }
    return parse_policy(raw)


def small_gateway(rules: list[dict[str, Any]], default: str | None = None, **sections: dict[str, Any]) -> Gateway:
    return Gateway.from_policy(small_policy(rules, default, **sections))


def ids_prompt(tokens: int, model: str = "m") -> dict[str, Any]:
    """A completions body whose prompt is exactly `tokens` token ids."""
    return {"model": model, "prompt": [1] * tokens, "max_tokens": 1}


def messages(count: int, model: str = "m") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}] * count, "max_tokens": 1}


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("match", "request_kwargs", "body", "matches"),
    [
        # tenants
        ({"tenants": ["acme"]}, {"key": "sk-acme"}, chat(model="m"), True),
        ({"tenants": ["acme"]}, {"key": "sk-beta"}, chat(model="m"), False),
        ({"tenants": ["acme", "beta"]}, {"key": "sk-beta"}, chat(model="m"), True),
        # tiers
        ({"tiers": ["gold"]}, {"key": "sk-acme"}, chat(model="m"), True),
        ({"tiers": ["gold"]}, {"key": "sk-gamma"}, chat(model="m"), True),
        ({"tiers": ["gold"]}, {"key": "sk-beta"}, chat(model="m"), False),
        ({"tiers": ["silver", "free"]}, {"key": "sk-beta"}, chat(model="m"), True),
        # classes: the effective class, after the tenant's permissions
        ({"classes": ["batch"]}, {"key": "sk-beta"}, chat(model="m"), True),
        ({"classes": ["batch"]}, {"key": "sk-acme"}, chat(model="m"), False),
        ({"classes": ["batch"]}, {"key": "sk-acme", "cls": "batch"}, chat(model="m"), True),
        ({"classes": ["interactive"]}, {"key": "sk-beta", "cls": "interactive"}, chat(model="m"), False),
        ({"classes": ["experimental"]}, {"key": "sk-beta", "cls": "experimental"}, chat(model="m"), True),
        ({"classes": ["batch", "experimental"]}, {"key": "sk-gamma"}, chat(model="m"), True),
        # endpoints
        ({"endpoints": ["completions"]}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(5), True),
        ({"endpoints": ["completions"]}, {"key": "sk-acme"}, chat(model="m"), False),
        ({"endpoints": ["chat", "completions"]}, {"key": "sk-acme"}, chat(model="m"), True),
        ({"endpoints": ["embeddings"]}, {"key": "sk-acme", "path": EMBEDDINGS}, {"model": "e", "input": "x"}, True),
        ({"endpoints": ["chat"]}, {"key": "sk-acme", "path": EMBEDDINGS}, {"model": "e", "input": "x"}, False),
        # models: a canonical name stands for its aliases; an alias only for itself
        ({"models": ["m"]}, {"key": "sk-acme"}, chat(model="m"), True),
        ({"models": ["m"]}, {"key": "sk-acme"}, chat(model="m-a"), True),
        ({"models": ["m"]}, {"key": "sk-acme"}, chat(model="m-b"), True),
        ({"models": ["m"]}, {"key": "sk-acme"}, chat(model="n"), False),
        ({"models": ["m-a"]}, {"key": "sk-acme"}, chat(model="m-a"), True),
        ({"models": ["m-a"]}, {"key": "sk-acme"}, chat(model="m"), False),
        ({"models": ["m-a"]}, {"key": "sk-acme"}, chat(model="m-b"), False),
        ({"models": ["m-a", "n"]}, {"key": "sk-acme"}, chat(model="n"), True),
        # json_mode
        ({"json_mode": True}, {"key": "sk-acme"}, chat(model="m", response_format={"type": "json_object"}), True),
        ({"json_mode": True}, {"key": "sk-acme"}, chat(model="m", response_format={"type": "json_schema"}), True),
        ({"json_mode": True}, {"key": "sk-acme"}, chat(model="m", response_format={"type": "text"}), False),
        ({"json_mode": True}, {"key": "sk-acme"}, chat(model="m"), False),
        ({"json_mode": False}, {"key": "sk-acme"}, chat(model="m"), True),
        ({"json_mode": False}, {"key": "sk-acme"}, chat(model="m", response_format={"type": "text"}), True),
        ({"json_mode": False}, {"key": "sk-acme"}, chat(model="m", response_format={"type": "json_object"}), False),
        # tools
        ({"tools": True}, {"key": "sk-acme"}, chat(model="m", tools=TOOLS), True),
        ({"tools": True}, {"key": "sk-acme"}, chat(model="m"), False),
        ({"tools": True}, {"key": "sk-acme"}, chat(model="m", tools=[]), False),
        ({"tools": False}, {"key": "sk-acme"}, chat(model="m"), True),
        ({"tools": False}, {"key": "sk-acme"}, chat(model="m", tools=TOOLS), False),
        # quality: only declared values count
        ({"quality": ["high"]}, {"key": "sk-acme", "quality": "high"}, chat(model="m"), True),
        ({"quality": ["high"]}, {"key": "sk-acme", "quality": "standard"}, chat(model="m"), False),
        ({"quality": ["high"]}, {"key": "sk-acme"}, chat(model="m"), False),
        ({"quality": ["high"]}, {"key": "sk-acme", "quality": "ultra"}, chat(model="m"), False),
        ({"quality": ["standard", "high"]}, {"key": "sk-acme", "quality": "standard"}, chat(model="m"), True),
        # prompt_tokens: inclusive at both ends
        ({"prompt_tokens": {"min": 10, "max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(9), False),
        ({"prompt_tokens": {"min": 10, "max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(10), True),
        ({"prompt_tokens": {"min": 10, "max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(20), True),
        ({"prompt_tokens": {"min": 10, "max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(21), False),
        ({"prompt_tokens": {"min": 10}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(9), False),
        ({"prompt_tokens": {"min": 10}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(5000), True),
        ({"prompt_tokens": {"max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(1), True),
        ({"prompt_tokens": {"max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(20), True),
        ({"prompt_tokens": {"max": 20}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(21), False),
        ({"prompt_tokens": {"min": 7, "max": 7}}, {"key": "sk-acme", "path": COMPLETIONS}, ids_prompt(7), True),
        # a chat prompt's count includes the framing: "hi" is 1 token + 3 per message + 3 for the reply
        ({"prompt_tokens": {"min": 7, "max": 7}}, {"key": "sk-acme"}, chat("hi", model="m"), True),
        ({"prompt_tokens": {"max": 6}}, {"key": "sk-acme"}, chat("hi", model="m"), False),
        # messages: inclusive at both ends
        ({"messages": {"min": 2, "max": 3}}, {"key": "sk-acme"}, messages(1), False),
        ({"messages": {"min": 2, "max": 3}}, {"key": "sk-acme"}, messages(2), True),
        ({"messages": {"min": 2, "max": 3}}, {"key": "sk-acme"}, messages(3), True),
        ({"messages": {"min": 2, "max": 3}}, {"key": "sk-acme"}, messages(4), False),
        ({"messages": {"max": 1}}, {"key": "sk-acme"}, messages(1), True),
        ({"messages": {"max": 1}}, {"key": "sk-acme"}, messages(2), False),
        ({"messages": {"min": 5}}, {"key": "sk-acme"}, messages(5), True),
        # combinations: every condition must hold
        (
            {"tiers": ["gold"], "json_mode": True},
            {"key": "sk-acme"},
            chat(model="m", response_format={"type": "json_object"}),
            True,
        ),
        ({"tiers": ["gold"], "json_mode": True}, {"key": "sk-acme"}, chat(model="m"), False),
        (
            {"tiers": ["gold"], "json_mode": True},
            {"key": "sk-beta"},
            chat(model="m", response_format={"type": "json_object"}),
            False,
        ),
        (
            {"models": ["m"], "endpoints": ["completions"], "prompt_tokens": {"max": 20}},
            {"key": "sk-acme", "path": COMPLETIONS},
            ids_prompt(10, "m-a"),
            True,
        ),
        (
            {"models": ["m"], "endpoints": ["completions"], "prompt_tokens": {"max": 20}},
            {"key": "sk-acme", "path": COMPLETIONS},
            ids_prompt(30),
            False,
        ),
        (
            {"models": ["m"], "endpoints": ["completions"], "prompt_tokens": {"max": 20}},
            {"key": "sk-acme", "path": COMPLETIONS},
            ids_prompt(10, "n"),
            False,
        ),
        (
            {"models": ["m"], "endpoints": ["completions"], "prompt_tokens": {"max": 20}},
            {"key": "sk-acme"},
            chat(model="m"),
            False,
        ),
        (
            {"tenants": ["gamma"], "classes": ["experimental"], "tools": True, "messages": {"min": 2}},
            {"key": "sk-gamma"},
            {**messages(2), "tools": TOOLS},
            True,
        ),
        (
            {"tenants": ["gamma"], "classes": ["experimental"], "tools": True, "messages": {"min": 2}},
            {"key": "sk-gamma"},
            {**messages(1), "tools": TOOLS},
            False,
        ),
        (
            {"tiers": ["gold"], "quality": ["high"], "classes": ["interactive"]},
            {"key": "sk-acme", "quality": "high"},
            chat(model="m"),
            True,
        ),
        (
            {"tiers": ["gold"], "quality": ["high"], "classes": ["interactive"]},
            {"key": "sk-gamma", "quality": "high"},
            chat(model="m"),
            False,
        ),
        # an empty match matches everything
        ({}, {"key": "sk-beta", "path": EMBEDDINGS}, {"model": "e", "input": "x"}, True),
    ],
)
def test_each_matcher(
    match: dict[str, Any], request_kwargs: dict[str, Any], body: dict[str, Any], matches: bool
) -> None:
    gateway = small_gateway([{"name": "r", "match": match, "backend": "hit"}])
    admission = admit(gateway, body, **request_kwargs)
    model = gateway.models[body["model"]]
    if matches:
        assert (admission.rule, admission.target.backend) == ("r", "hit")
    else:
        assert (admission.rule, admission.target.backend) == ("default", model.backend)


def test_a_matching_rule_rewrites_the_model_to_its_backends_served_name() -> None:
    gateway = small_gateway([{"name": "r", "match": {"tiers": ["gold"]}, "backend": "hit"}])
    assert sent(admit(gateway, chat(model="m-a"), key="sk-acme"))["model"] == "hit-served"
    # No rule: the model's own served name.
    assert sent(admit(gateway, chat(model="m-a"), key="sk-beta"))["model"] == "m-served"


RULES_IN_ORDER = [
    {"name": "gold-short", "match": {"tiers": ["gold"], "prompt_tokens": {"max": 20}}, "backend": "hit"},
    {"name": "acme", "match": {"tenants": ["acme"]}, "backend": "other"},
    {"name": "gold", "match": {"tiers": ["gold"]}, "backend": "alt"},
    {"name": "never", "match": {"tenants": ["acme"], "json_mode": True}, "backend": "small"},
]


@pytest.mark.parametrize(
    ("key", "body", "rule", "backend"),
    [
        ("sk-acme", ids_prompt(10), "gold-short", "hit"),
        # Same discrete facts, a prompt outside the first rule's range: the next candidate.
        ("sk-acme", ids_prompt(30), "acme", "other"),
        ("sk-acme", ids_prompt(20), "gold-short", "hit"),
        ("sk-acme", ids_prompt(21), "acme", "other"),
        ("sk-gamma", ids_prompt(10), "gold-short", "hit"),
        ("sk-gamma", ids_prompt(30), "gold", "alt"),
        ("sk-beta", ids_prompt(10), "default", "own"),
        ("sk-acme", {**ids_prompt(30), "response_format": {"type": "json_object"}}, "acme", "other"),
    ],
)
def test_first_match_wins(key: str, body: dict[str, Any], rule: str, backend: str) -> None:
    gateway = small_gateway(RULES_IN_ORDER)
    admission = admit(gateway, body, key=key, path=COMPLETIONS)
    assert (admission.rule, admission.target.backend) == (rule, backend)


def test_first_match_wins_repeatedly_with_the_memo_warm() -> None:
    # The same discrete facts evaluated many times, alternating prompt sizes: the memo keeps every
    # candidate that has a range, not just the first.
    gateway = small_gateway(RULES_IN_ORDER)
    for _ in range(3):
        for tokens, rule in ((10, "gold-short"), (30, "acme"), (1, "gold-short"), (25, "acme")):
            assert admit(gateway, ids_prompt(tokens), key="sk-acme", path=COMPLETIONS).rule == rule


@pytest.mark.parametrize(
    ("default", "model", "path", "backend"),
    [
        (None, "m", CHAT, "own"),
        (None, "m-a", CHAT, "own"),
        (None, "n", CHAT, "own-n"),
        (None, "e", EMBEDDINGS, "emb"),
        ("alt", "m", CHAT, "alt"),
        ("alt", "n", CHAT, "alt"),
        ("alt", "e", EMBEDDINGS, "alt"),
    ],
)
def test_default_backend_versus_the_models_own(default: str | None, model: str, path: str, backend: str) -> None:
    gateway = small_gateway([{"name": "r", "match": {"tenants": ["gamma"]}, "backend": "hit"}], default=default)
    body = {"model": model, "input": "x"} if path == EMBEDDINGS else chat(model=model)
    admission = admit(gateway, body, key="sk-acme", path=path)
    assert (admission.rule, admission.target.backend) == ("default", backend)
    # A rule still wins over the default.
    if path == CHAT:
        assert admit(gateway, body, key="sk-gamma", path=path).target.backend == "hit"


@pytest.mark.parametrize(
    ("reject", "status", "type_"),
    [
        (
            {"status": 403, "code": "tier_forbidden", "message": "The free tier may not use m."},
            403,
            "invalid_request_error",
        ),
        ({"code": "no_free_lunch", "message": "Not for the free tier."}, 400, "invalid_request_error"),
        ({"status": 503, "code": "maintenance", "message": "m is down for maintenance."}, 503, "server_error"),
    ],
)
def test_a_reject_rule_answers_with_its_status_code_and_message(
    reject: dict[str, Any], status: int, type_: str
) -> None:
    gateway = small_gateway(
        [
            {"name": "no-free", "match": {"tiers": ["free"]}, "reject": reject},
            {"name": "after", "match": {}, "backend": "hit"},
        ]
    )
    error = refuse(gateway, chat(model="m"), key="sk-beta")
    assert (error.status, error.code, error.message) == (status, reject["code"], reject["message"])
    payload = orjson.loads(error.body())
    assert payload == {"error": {"message": reject["message"], "type": type_, "param": None, "code": reject["code"]}}
    # Another tier is not rejected: it reaches the next rule.
    assert admit(gateway, chat(model="m"), key="sk-acme").rule == "after"


# --- 3. the routed target's window and caps --------------------------------------------------------


def test_a_smaller_window_on_the_routed_backend_is_what_is_checked() -> None:
    gateway = small_gateway([{"name": "to-small", "match": {"tiers": ["gold"]}, "backend": "small"}])
    prompt = "word " * 1500  # 1,507 tokens: fits m's own 8192, not small's 1000
    error = refuse(gateway, chat(prompt, model="m"), key="sk-acme")
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    assert "maximum context length is 1000 tokens" in error.message
    admission = admit(gateway, chat(prompt, model="m"), key="sk-beta")  # no rule: the model's own window
    assert admission.target.backend == "own"


def test_a_default_max_tokens_shrinks_to_fit_the_routed_window() -> None:
    gateway = small_gateway([{"name": "to-small", "match": {"tiers": ["gold"]}, "backend": "small"}])
    body = chat("word " * 800, model="m")  # 807 tokens
    on_small = admit(gateway, body, key="sk-acme")
    assert on_small.target.backend == "small"
    assert sent(on_small)["max_tokens"] == 1000 - on_small.prompt_tokens == 193
    on_own = admit(gateway, body, key="sk-beta")
    assert sent(on_own)["max_tokens"] == 512  # the gateway's default, room to spare


def test_the_routed_backends_prompt_and_completion_caps_apply() -> None:
    gateway = small_gateway([{"name": "to-capped", "match": {"tiers": ["gold"]}, "backend": "capped"}])
    error = refuse(gateway, chat("word " * 150, model="m"), key="sk-acme")
    assert (error.status, error.code) == (400, "prompt_too_long")
    assert "at most 100 prompt tokens" in error.message
    clamped = admit(gateway, chat(model="m", max_tokens=80), key="sk-acme")
    assert sent(clamped)["max_tokens"] == 50 and clamped.completion_tokens == 50
    assert sent(admit(gateway, chat(model="m"), key="sk-acme"))["max_tokens"] == 50  # default 512 capped
    # The same requests on the model's own backend.
    assert admit(gateway, chat("word " * 150, model="m"), key="sk-beta").target.backend == "own"
    assert admit(gateway, chat(model="m", max_tokens=80), key="sk-beta").body is not None  # rename only
    assert sent(admit(gateway, chat(model="m", max_tokens=80), key="sk-beta"))["max_tokens"] == 80


def test_playbook_tools_tier_gets_fast_8b_window(playbook: Gateway) -> None:
    # 5,007 tokens: within llama-3.1-8b's own 8192 (and the 6,000 rule), not fast-8b's 4096.
    error = refuse(playbook, chat("word " * 5000), key="sk-tools")
    assert (error.status, error.code) == (400, "context_length_exceeded")
    assert "maximum context length is 4096 tokens" in error.message
    assert admit(playbook, chat("word " * 5000), key="sk-demo").target.backend == "default-8b"
    # 3,907 tokens leave 189 of fast-8b's window: less than the model's default of 256.
    on_fast = admit(playbook, chat("word " * 3900), key="sk-tools")
    assert on_fast.target.backend == "fast-8b"
    assert sent(on_fast)["max_tokens"] == 4096 - on_fast.prompt_tokens == 189
    assert sent(admit(playbook, chat("word " * 3900), key="sk-demo"))["max_tokens"] == 256


# --- 4. load: saturation, fallback, shedding --------------------------------------------------------


def load(waiting: float | None = 0, kv: float | None = 0.1, pods: int = 2, drain: float | None = 4.0) -> BackendLoad:
    return BackendLoad(waiting_per_pod=waiting, kv_cache=kv, running=4, pods=pods, drain_per_s=drain)


SATURATED = BackendLoad(waiting_per_pod=10, kv_cache=0.1, running=4, pods=2, drain_per_s=4.0)  # level 2.0
IDLE = load(0)


def test_a_saturated_primary_falls_back(playbook: Gateway) -> None:
    admission = admit(playbook, chat(), key="sk-demo", loads={"default-8b": SATURATED})
    assert admission.target.backend == "fast-8b"
    assert backend_header(admission) == "fast-8b"
    assert admission.rule == "default"
    assert sent(admission)["model"] == LLAMA_FP8
    assert [c.backend for c in admission.considered] == ["default-8b", "fast-8b"]
    assert admission.considered[0].verdict.startswith("saturated")
    assert admission.considered[1].verdict.startswith("chosen")
    assert "fallback default-8b->fast-8b" in admission.notes


@pytest.mark.parametrize(
    ("primary", "backend"),
    [
        (load(0), "default-8b"),
        (load(4.9), "default-8b"),
        (load(5), "fast-8b"),  # 5 per pod is saturated
        (load(0, kv=0.79), "default-8b"),
        (load(0, kv=0.8), "fast-8b"),  # 80% KV is saturated
        (load(0, kv=0.95), "fast-8b"),
        (load(1, kv=None), "default-8b"),  # no KV figure: the queue alone decides
        (load(6, kv=None), "fast-8b"),
    ],
)
def test_queue_and_kv_saturate(playbook: Gateway, primary: BackendLoad, backend: str) -> None:
    admission = admit(playbook, chat(), key="sk-demo", loads={"default-8b": primary})
    assert admission.target.backend == backend


def test_an_unsaturated_primary_is_chosen_alone(playbook: Gateway) -> None:
    admission = admit(playbook, chat(), key="sk-demo", loads={"default-8b": IDLE, "fast-8b": SATURATED})
    assert admission.target.backend == "default-8b"
    assert [c.backend for c in admission.considered] == ["default-8b"]
    assert admission.considered[0].verdict.startswith("chosen")
    assert not any(note.startswith("fallback") for note in admission.notes)


def test_a_saturated_fallback_is_skipped(playbook: Gateway) -> None:
    # Interactive at level 2.0 with its only fallback saturated: shed.
    error = refuse(playbook, chat(), key="sk-demo", loads={"default-8b": SATURATED, "fast-8b": load(5)})
    assert (error.status, error.code) == (503, "backend_overloaded")
    # Below 2.0 it stays on the saturated primary; the fallback was weighed and passed over.
    admission = admit(playbook, chat(), key="sk-demo", loads={"default-8b": load(7), "fast-8b": load(0, kv=0.9)})
    assert admission.target.backend == "default-8b"
    assert [c.backend for c in admission.considered] == ["default-8b", "fast-8b"]
    assert admission.considered[0].verdict.startswith("chosen while saturated")
    assert admission.considered[1].verdict.startswith("saturated")


def test_a_fallback_whose_window_cannot_hold_the_prompt_is_skipped(playbook: Gateway) -> None:
    body = chat(FITS_8K_NOT_4K)
    # fast-8b is idle but too small: interactive below level 2.0 queues on the saturated primary.
    admission = admit(playbook, body, key="sk-demo", loads={"default-8b": load(9), "fast-8b": IDLE})
    assert admission.target.backend == "default-8b"
    assert [c.backend for c in admission.considered] == ["default-8b", "fast-8b"]
    assert admission.considered[1].verdict.startswith("cannot take it")
    assert "4096" in admission.considered[1].verdict
    # At level 2.0 interactive is shed: 503.
    error = refuse(playbook, body, key="sk-demo", loads={"default-8b": SATURATED, "fast-8b": IDLE})
    assert (error.status, error.code, error.type) == (503, "backend_overloaded", "server_error")
    assert error.headers == {"retry-after": "5", "retry-after-ms": "5000"}
    # A short prompt does fit fast-8b.
    assert admit(playbook, chat(), key="sk-demo", loads={"default-8b": SATURATED}).target.backend == "fast-8b"


def test_an_explicit_max_tokens_counts_against_the_fallbacks_window(playbook: Gateway) -> None:
    body = chat("word " * 3100, max_tokens=1024)  # 3,107 + 1,024 > 4096
    admission = admit(playbook, body, key="sk-demo", loads={"default-8b": load(6)})
    assert admission.target.backend == "default-8b"
    assert admission.considered[1].verdict.startswith("cannot take it")
    # Without max_tokens the default shrinks to fit: fast-8b takes it.
    fallback = admit(playbook, chat("word " * 3100), key="sk-demo", loads={"default-8b": load(6)})
    assert fallback.target.backend == "fast-8b"
    assert sent(fallback)["max_tokens"] == 256


@pytest.mark.parametrize(
    ("level_waiting", "outcome"),
    [
        (4.9, "default-8b"),  # not saturated
        (5, "default-8b"),  # level 1.0: saturated, interactive still queues on it
        (9.99, "default-8b"),  # level 1.998
        (10, 503),  # level 2.0
        (25, 503),
    ],
)
def test_interactive_sheds_at_level_two(playbook: Gateway, level_waiting: float, outcome: str | int) -> None:
    loads = {"default-8b": load(level_waiting), "fast-8b": SATURATED}
    if isinstance(outcome, str):
        assert admit(playbook, chat(), key="sk-demo", loads=loads).target.backend == outcome
    else:
        error = refuse(playbook, chat(), key="sk-demo", loads=loads)
        assert (error.status, error.code) == (outcome, "backend_overloaded")
        assert set(error.headers) == {"retry-after", "retry-after-ms"}


@pytest.mark.parametrize(
    ("key", "cls", "backend", "waiting", "outcome"),
    [
        # experimental (sk-tiny) on default-8b; its fallback fast-8b is saturated too
        ("sk-tiny", None, "default-8b", 4.9, "default-8b"),
        ("sk-tiny", None, "default-8b", 5, 429),
        ("sk-tiny", None, "default-8b", 10, 429),
        # tiny asking for interactive stays experimental: shed like one
        ("sk-tiny", "interactive", "default-8b", 5, 429),
        # batch (sk-demo, x-llm-class: batch) on batch-pool, which has no fallback
        ("sk-demo", "batch", "batch-pool", 4.9, "batch-pool"),
        ("sk-demo", "batch", "batch-pool", 5, 429),
        ("sk-demo", "batch", "batch-pool", 10, 429),
    ],
)
def test_experimental_and_batch_shed_at_level_one(
    playbook: Gateway, key: str, cls: str | None, backend: str, waiting: float, outcome: str | int
) -> None:
    loads = {backend: load(waiting), "fast-8b": SATURATED}
    if isinstance(outcome, str):
        assert admit(playbook, chat(), key=key, cls=cls, loads=loads).target.backend == outcome
    else:
        error = refuse(playbook, chat(), key=key, cls=cls, loads=loads)
        assert (error.status, error.code, error.type) == (429, "shed", "requests")
        assert set(error.headers) == {"retry-after", "retry-after-ms"}


def test_experimental_at_level_one_still_takes_a_free_fallback(playbook: Gateway) -> None:
    admission = admit(playbook, chat(), key="sk-tiny", loads={"default-8b": SATURATED, "fast-8b": IDLE})
    assert admission.target.backend == "fast-8b"
    assert admission.traffic_class == "experimental"


@pytest.mark.parametrize(
    ("waiting", "pods", "drain", "retry_ms", "retry_s"),
    [
        (10, 2, 4.0, "5000", "5"),  # 10 x 2 / 4 = 5 s
        (12, 3, 7.0, "5143", "6"),  # 36 / 7 = 5.142... s: ms and s both rounded up
        (10, 2, 1000.0, "1000", "1"),  # 20 ms: never less than a second
        (10, 2, 0.1, "60000", "60"),  # 200 s: never more than a minute
        (100, 4, 10.0, "40000", "40"),
        (10, 2, None, "1000", "1"),  # no drain rate: the minimum
        (10, 2, 0.0, "1000", "1"),
    ],
)
def test_shed_errors_carry_retry_after(
    playbook: Gateway, waiting: float, pods: int, drain: float | None, retry_ms: str, retry_s: str
) -> None:
    figures = load(waiting, pods=pods, drain=drain)
    batch = refuse(playbook, chat(), key="sk-demo", cls="batch", loads={"batch-pool": figures})
    assert batch.status == 429
    assert batch.headers == {"retry-after": retry_s, "retry-after-ms": retry_ms}
    assert f"retry in {retry_s}s" in batch.message
    interactive = refuse(playbook, chat(), key="sk-demo", loads={"default-8b": figures, "fast-8b": figures})
    assert interactive.status == 503
    assert interactive.headers == {"retry-after": retry_s, "retry-after-ms": retry_ms}


@pytest.mark.parametrize(
    ("figures", "level"),
    [
        (load(0, kv=0.0), 0.0),
        (load(5, kv=0.0), 1.0),
        (load(10, kv=0.4), 2.0),
        (load(1, kv=0.8), 1.0),
        (load(1, kv=0.96), 1.2),
        (load(2, kv=None), 0.4),
        (load(None), None),
        (load(3, pods=0), None),
        (BackendLoad.UNKNOWN, None),
        (None, None),
    ],
)
def test_saturation_level(figures: BackendLoad | None, level: float | None) -> None:
    got = saturation_level(figures, LoadPolicy())
    assert got == (None if level is None else pytest.approx(level))


def test_retry_after_for_unknown_figures_is_the_minimum() -> None:
    assert retry_after_ms(None) == retry_after_ms(BackendLoad.UNKNOWN) == 1000


@pytest.mark.parametrize(
    "figures",
    [
        {},
        {"default-8b": BackendLoad.UNKNOWN},
        {"default-8b": load(None)},  # the queue figure missing
        {"default-8b": load(10, pods=0)},  # no fresh pod
        {"default-8b": BackendLoad.UNKNOWN, "fast-8b": BackendLoad.UNKNOWN},
    ],
)
def test_unknown_figures_taken_as_available_route_as_usual(figures: dict[str, BackendLoad]) -> None:
    gateway = playbook_with(load={"unknown": "available"})
    for key in ("sk-demo", "sk-tiny"):
        admission = admit(gateway, chat(), key=key, loads=figures)
        assert admission.target.backend == "default-8b"
        assert [c.backend for c in admission.considered] == ["default-8b"]
        assert "unknown" in admission.considered[0].verdict
    assert admit(gateway, chat(), key="sk-demo", cls="batch", loads=figures).target.backend == "batch-pool"


@pytest.mark.parametrize(
    "figures",
    [
        {},
        {"default-8b": BackendLoad.UNKNOWN, "fast-8b": BackendLoad.UNKNOWN, "batch-pool": BackendLoad.UNKNOWN},
        {"default-8b": load(None), "fast-8b": load(None), "batch-pool": load(None)},
    ],
)
def test_unknown_figures_taken_as_saturated(figures: dict[str, BackendLoad]) -> None:
    gateway = playbook_with(load={"unknown": "saturated"})
    # Interactive: level 1.0 < 2.0, the unknown fallback is saturated too: it queues on the primary.
    admission = admit(gateway, chat(), key="sk-demo", loads=figures)
    assert admission.target.backend == "default-8b"
    assert [c.backend for c in admission.considered] == ["default-8b", "fast-8b"]
    assert admission.considered[0].verdict.startswith("chosen while saturated")
    assert "unknown" in admission.considered[1].verdict
    # Experimental and batch: shed at 1.0, with the minimum retry hint.
    for kwargs in ({"key": "sk-tiny"}, {"key": "sk-demo", "cls": "batch"}):
        error = refuse(gateway, chat(), loads=figures, **kwargs)
        assert (error.status, error.code) == (429, "shed")
        assert error.headers == {"retry-after": "1", "retry-after-ms": "1000"}


def test_unknown_taken_as_saturated_still_takes_a_known_idle_fallback() -> None:
    gateway = playbook_with(load={"unknown": "saturated"})
    admission = admit(gateway, chat(), key="sk-tiny", loads={"fast-8b": IDLE})
    assert admission.target.backend == "fast-8b"
    assert admission.considered[0].verdict.startswith("saturated: figures unknown")


def test_shed_levels_follow_the_policy() -> None:
    gateway = playbook_with(load={"shed_at": {"experimental": 1.3, "batch": 2.5, "interactive": 3.0}})
    loads = {"default-8b": load(6), "fast-8b": SATURATED, "batch-pool": load(12)}  # 1.2; batch-pool 2.4
    assert admit(gateway, chat(), key="sk-demo", loads=loads).target.backend == "default-8b"
    assert admit(gateway, chat(), key="sk-tiny", loads=loads).target.backend == "default-8b"  # 1.2 < 1.3
    assert admit(gateway, chat(), key="sk-demo", cls="batch", loads=loads).target.backend == "batch-pool"
    loads["default-8b"] = load(7)  # 1.4
    assert refuse(gateway, chat(), key="sk-tiny", loads=loads).status == 429


def test_shed_levels_must_keep_the_class_order() -> None:
    with pytest.raises(PolicyError, match="experimental <= batch <= interactive"):
        playbook_with(load={"shed_at": {"experimental": 1.5, "batch": 3.0, "interactive": 1.0}})


def test_saturation_thresholds_follow_the_policy() -> None:
    gateway = playbook_with(load={"saturation": {"queue_per_pod": 20, "kv_cache": 0.5}})
    assert admit(gateway, chat(), key="sk-demo", loads={"default-8b": SATURATED}).target.backend == "default-8b"
    assert admit(gateway, chat(), key="sk-demo", loads={"default-8b": load(0, kv=0.5)}).target.backend == "fast-8b"


def test_fallback_from_a_rule_routed_backend() -> None:
    # Fallbacks belong to the backend a rule routed to, and each one's own window and served name apply.
    gateway = small_gateway(
        [{"name": "to-hit", "match": {"tiers": ["gold"]}, "backend": "hit"}],
        backends={
            "own": {},
            "own-n": {},
            "emb": {},
            "hit": {"served_name": "hit-served", "fallbacks": ["small", "alt"]},
            "other": {},
            "alt": {"served_name": "alt-served"},
            "small": {"served_name": "small-served", "max_model_len": 1000},
            "capped": {},
        },
    )
    short = admit(gateway, chat(model="m"), key="sk-acme", loads={"hit": SATURATED})
    assert (short.target.backend, sent(short)["model"]) == ("small", "small-served")
    long = admit(gateway, chat("word " * 1500, model="m"), key="sk-acme", loads={"hit": SATURATED})
    assert (long.target.backend, sent(long)["model"]) == ("alt", "alt-served")
    assert [c.backend for c in long.considered] == ["hit", "small", "alt"]
    # The model's own backend has no fallbacks: batch traffic on it is shed, asking for interactive or not.
    for cls in (None, "interactive"):
        error = refuse(gateway, chat(model="m"), key="sk-beta", cls=cls, loads={"own": SATURATED})
        assert (error.status, error.code) == (429, "shed")


# --- 5. shadowed rules ------------------------------------------------------------------------------


def rule(name: str, **match: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "backend": "hit"}


@pytest.mark.parametrize(
    ("rules", "shadowed"),
    [
        # broad first: the narrower one after it can never match
        ([rule("broad", tiers=["gold"]), rule("narrow", tiers=["gold"], json_mode=True)], ["narrow"]),
        # narrower first: both reachable
        ([rule("narrow", tiers=["gold"], json_mode=True), rule("broad", tiers=["gold"])], []),
        ([rule("all"), rule("anything", tenants=["acme"], tools=True)], ["anything"]),
        ([rule("two", tenants=["acme", "beta"]), rule("one", tenants=["acme"])], ["one"]),
        ([rule("one", tenants=["acme"]), rule("two", tenants=["acme", "beta"])], []),
        ([rule("same", classes=["batch"]), rule("again", classes=["batch"])], ["again"]),
        ([rule("wide", prompt_tokens={"max": 100}), rule("inside", prompt_tokens={"min": 10, "max": 50})], ["inside"]),
        ([rule("short", prompt_tokens={"max": 50}), rule("longer", prompt_tokens={"max": 100})], []),
        ([rule("few", messages={"max": 3}), rule("any-count")], []),
        ([rule("json", json_mode=True), rule("unset")], []),
        ([rule("json", json_mode=True), rule("no-json", json_mode=False)], []),
        ([rule("alias", models=["m-a"]), rule("canonical", models=["m"])], []),
        ([rule("q", quality=["high", "standard"]), rule("q-high", quality=["high"], endpoints=["chat"])], ["q-high"]),
        # only the first shadowing rule is named; each shadowed rule once
        ([rule("a", tiers=["gold"]), rule("b", tiers=["gold"]), rule("c", tiers=["gold"], tools=False)], ["b", "c"]),
    ],
)
def test_shadowed_rules(rules: list[dict[str, Any]], shadowed: list[str]) -> None:
    problems = shadowed_rules(small_policy(rules))
    assert [p.split("]", 1)[0].removeprefix("routing.rules[") for p in problems] == shadowed


def test_a_shadowed_rule_names_the_rule_that_covers_it() -> None:
    problems = shadowed_rules(small_policy([rule("broad", tiers=["gold"]), rule("narrow", tiers=["gold"], tools=True)]))
    assert problems == [
        "routing.rules[narrow] is shadowed by routing.rules[broad]: every request it matches is matched first "
        "by the earlier rule"
    ]


def test_a_shadowed_rule_really_never_matches() -> None:
    rules = [rule("broad", tiers=["gold"]), {**rule("narrow", tiers=["gold"], json_mode=True), "backend": "other"}]
    gateway = small_gateway(rules)
    body = chat(model="m", response_format={"type": "json_object"})
    assert admit(gateway, body, key="sk-acme").rule == "broad"


def test_a_rule_behind_one_naming_its_canonical_model_is_shadowed() -> None:
    rules = [rule("canonical", models=["m"]), {**rule("alias", models=["m-a"]), "backend": "other"}]
    gateway = small_gateway(rules)
    assert admit(gateway, chat(model="m-a"), key="sk-acme").rule == "canonical"  # "alias" can never match
    assert [p.split("]", 1)[0] for p in shadowed_rules(small_policy(rules))] == ["routing.rules[alias"]


def test_an_embeddings_input_that_fills_a_fallbacks_window_may_fall_back() -> None:
    def gateway(routing: dict[str, Any]) -> Gateway:
        return Gateway.from_policy(
            parse_policy(
                {
                    "backends": {"emb": {"fallbacks": ["emb-small"]}, "emb-small": {"max_model_len": 100}},
                    "models": [{"name": "e", "backend": "emb", "endpoints": ["embeddings"], "max_model_len": 8192}],
                    "routing": routing,
                }
            )
        )

    body = {"model": "e", "input": [1] * 100}  # exactly emb-small's window
    # Routed there by a rule, emb-small takes it: an embedding has no completion.
    ruled = gateway({"rules": [{"name": "r", "match": {}, "backend": "emb-small"}]})
    assert admit(ruled, body, path=EMBEDDINGS).target.backend == "emb-small"
    # As the fallback of a saturated primary, it should take it too.
    fallback = admit(gateway({}), body, path=EMBEDDINGS, loads={"emb": load(7)})
    assert fallback.target.backend == "emb-small", fallback.considered


def test_a_fallback_that_would_refuse_the_requested_max_tokens_is_skipped() -> None:
    policy = parse_policy(
        {
            "backends": {
                "main": {"fallbacks": ["tight", "roomy"]},
                "tight": {"max_completion_tokens": 256},
                "roomy": {},
            },
            "models": [{"name": "m", "backend": "main", "max_model_len": 8192, "completion_cap": "reject"}],
        }
    )
    gateway = Gateway.from_policy(policy)
    verdict = gateway.on_request_headers({":path": "/v1/chat/completions", ":method": "POST"})
    assert isinstance(verdict, NeedBody)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500})
    admission = gateway.on_request_body(verdict, body, {"main": load(6)})
    assert admission.target.backend == "roomy"
    assert "max tokens 500 > its cap 256" in admission.considered[1].verdict
