"""Property-based tests of the sans-IO core: hostile request bodies and response streams.

Every body, whatever its bytes, must end in an `Admission` or a `GatewayError` (which the adapter
turns into an OpenAI-shaped 4xx); any other exception would be the adapter's 500 `internal_error`.
An admitted body that the gateway rewrote must re-parse as JSON, carry the content-length of its
own bytes, and come out unchanged when fed back in (normalization is idempotent). On the response
side the SSE reader must give usage or nothing for any bytes split anywhere, never an exception,
and the same answer however the bytes were split.

The default run is deterministic (`derandomize`) and small enough for CI. More examples, randomly
seeded: EXTPROC_PROPERTY_EXAMPLES=5000 .venv/bin/pytest tests/test_properties.py
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from extproc import names
from extproc.core import Admission, Gateway, NeedBody, Passthrough, Reply, ResponseWatcher
from extproc.endpoints import TRANSLATORS
from extproc.errors import GatewayError
from extproc.policy import load_policy
from extproc.processor import RequestStream
from extproc.signals import ContentSignals
from extproc.sse import SseUsageReader, Usage, usage_from_json_body

# Hypothesis keeps caches (unicode tables, constants) in ./.hypothesis even without a database:
# nothing of a test run belongs in the tree.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "extproc-hypothesis"))

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {
    "gateway": ROOT / "tests" / "policies" / "gateway.yaml",  # no tenants, small caps
    "example": ROOT / "extproc" / "examples" / "policy.yaml",  # tenants, rules, the README's playbook
}
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

AUTH = {"gateway": {}, "example": {"authorization": "Bearer sk-demo"}}
CHAT_MODEL = {"gateway": "tiny", "example": "llama3"}
PATHS = (names.CHAT_COMPLETIONS, names.COMPLETIONS, names.EMBEDDINGS)

_EXAMPLES = int(os.environ.get("EXTPROC_PROPERTY_EXAMPLES", "0"))
# Deterministic by default so CI never turns red on a new random draw; a long run explores.
SETTINGS = settings(
    max_examples=_EXAMPLES or 150,
    derandomize=not _EXAMPLES,
    deadline=None,  # a shared 2-core machine: timing is not a property
    database=None,  # nothing written into the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@cache
def gateway_for(policy: str) -> Gateway:
    return Gateway.from_policy(load_policy(POLICIES[policy]))


def need_for(policy: str, path: str) -> NeedBody:
    headers = {":path": path, ":method": "POST", "content-type": "application/json", **AUTH[policy]}
    verdict = gateway_for(policy).on_request_headers(headers)
    assert isinstance(verdict, NeedBody), verdict
    return verdict


def public_models(policy: str) -> list[str]:
    return [name for spec in gateway_for(policy).policy.models for name in (spec.name, *spec.aliases)]


# --- JSON as raw text: what a hostile client can send, not what json.dumps would write --------------

_WS = st.sampled_from(["", "", "", " ", "\n", "\t", " \r\n "])
_SPECIAL_NUMBERS = [
    "1e400",  # overflows a double
    "-1e400",
    "1e-400",  # underflows to 0.0
    "-0",
    "0.0",
    "1E+2",
    "18446744073709551615",  # u64 max: still an int for orjson
    "18446744073709551616",  # one more: becomes a float
    "-9223372036854775809",
    str(2**4096),  # 1,234 digits
    "NaN",  # not JSON
    "Infinity",
    "-Infinity",
    "01",  # leading zero: not JSON
    "1.",
]


def _string_literal(text: str, ascii_only: bool) -> str:
    # ensure_ascii writes a lone surrogate as a \udXXX escape: the only way it can travel in JSON.
    return json.dumps(text, ensure_ascii=ascii_only)


def _any_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.text(alphabet=st.characters(categories=["Cs", "Cc", "Co", "Lo", "So"]), max_size=12),
        st.sampled_from(["", " ", "<|endoftext|>", "<|im_start|>", "\u2028", "\x00", "\ufeff"]),
    )


def _string_token(texts: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    return st.builds(_string_literal, texts if texts is not None else _any_text(), st.booleans())


_SCALARS: st.SearchStrategy[str] = st.one_of(
    st.just("null"),
    st.sampled_from(["true", "false"]),
    st.integers().map(str),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(_SPECIAL_NUMBERS),
    _string_token(),
)

FIELD_NAMES = [  # `model` not first: hypothesis favours the first element of a sampled_from
    "messages",
    "model",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "logit_bias",
    "parallel_tool_calls",
    "temperature",
    "role",
    "content",
    "type",
    "text",
    "include_usage",
    "",
]
_KEYS = st.one_of(st.sampled_from(FIELD_NAMES).map(json.dumps), _string_token())


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    # Pairs, not a dict: the same key may come twice (orjson keeps the last, as Python's json does).
    return "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"


def _spaced(token: str, before: str, after: str) -> str:
    return before + token + after


def _json_texts(leaves: st.SearchStrategy[str], max_leaves: int = 30) -> st.SearchStrategy[str]:
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=5).map(_array),
            st.lists(st.tuples(_KEYS, kids), max_size=5).map(_object),
            st.builds(_spaced, kids, _WS, _WS),
        ),
        max_leaves=max_leaves,
    )


JSON_TEXTS = _json_texts(_SCALARS)


def _nested(depth: int, opener: str, closer: str, inner: str = "1") -> str:
    return opener * depth + inner + closer * depth


# Around orjson's limits: it parses 1,024 levels and writes only 254, so 255-1,024 is the gap.
DEEP = st.builds(
    lambda depth, kind: _nested(depth, *kind),
    st.sampled_from([2, 200, 253, 254, 255, 256, 300, 1000, 1023, 1024, 1025, 10_000]),
    st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"x":', "}]")]),
)


# --- request-shaped bodies: plausible enough to get past `model` and reach every later step ------


# Parseable JSON of any type, for positions inside a body that should still get past the parser.
_VALID_SCALARS: st.SearchStrategy[str] = st.one_of(
    st.just("null"),
    st.sampled_from(["true", "false"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=20).map(json.dumps),
)
VALID_JSON = _json_texts(_VALID_SCALARS, max_leaves=12)
HOSTILE = st.one_of(JSON_TEXTS, DEEP)  # may not even parse


def _maybe(good: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Usually the well-typed value, else any parseable JSON in its place."""
    # A weighted pick: hypothesis's one_of draws branches evenly and favours the recursive one.
    return st.integers(0, 7).flatmap(lambda roll: VALID_JSON if roll == 3 else good)


_INTS = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 16, 32, 64, 100, 101, 256, 512, 1024, 1025, 4096, 8192, 2**31, 2**63 - 1]),
    st.integers(min_value=-(2**65), max_value=2**65),
).map(str)
_TEXT = st.one_of(st.text(max_size=60), st.sampled_from(["", "<|endoftext|>", "\u2028", "\x00"])).map(json.dumps)
_PART = st.one_of(
    st.builds(lambda t: _object([('"type"', '"text"'), ('"text"', t)]), _maybe(_TEXT)),
    st.builds(
        lambda u: _object([('"type"', '"image_url"'), ('"image_url"', _object([('"url"', u)]))]),
        _maybe(st.just('"data:image/png;base64,iVBORw0KGgo="')),
    ),
    st.builds(
        lambda d: _object(
            [('"type"', '"input_audio"'), ('"input_audio"', _object([('"data"', d), ('"format"', '"wav"')]))]
        ),
        _maybe(st.just('"UklGRiQAAABXQVZF"')),
    ),
    st.builds(lambda t: _object([('"type"', t)]), _maybe(st.sampled_from(['"input_image"', '"refusal"', '"file"']))),
    VALID_JSON,
)
_ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard", ""]).map(json.dumps)
_CONTENT = st.one_of(_TEXT, _TEXT, st.lists(_PART, max_size=4).map(_array))
_MESSAGE_EXTRAS = st.lists(
    st.one_of(
        st.tuples(st.just('"role"'), _maybe(_ROLES)),
        st.tuples(st.just('"content"'), _maybe(_CONTENT)),
        st.tuples(st.just('"name"'), _maybe(_TEXT)),
        st.tuples(st.just('"tool_calls"'), _maybe(st.lists(VALID_JSON, max_size=3).map(_array))),
        st.tuples(_KEYS, VALID_JSON),
    ),
    max_size=3,
)
_MESSAGE = st.integers(0, 5).flatmap(
    lambda roll: (
        _MESSAGE_EXTRAS.map(_object)  # the middle value: hypothesis favours the ends of a range
        if roll == 3
        else st.builds(
            lambda role, content, extras: _object([('"role"', role), ('"content"', content), *extras]),
            _maybe(_ROLES),
            _maybe(_CONTENT),
            st.one_of(st.just([]), _MESSAGE_EXTRAS),
        )
    )
)
_SEQUENCES = st.one_of(
    _TEXT,
    st.lists(_TEXT, min_size=1, max_size=4).map(_array),
    st.lists(st.integers(0, 100_000).map(str), min_size=1, max_size=6).map(_array),
    st.lists(st.lists(_INTS, min_size=1, max_size=4).map(_array), min_size=1, max_size=3).map(_array),
    st.sampled_from(["[]", "[[]]", '[1, "a"]', "[[1], 2]"]),
)
_FIELDS: dict[str, st.SearchStrategy[str]] = {
    "messages": st.lists(_MESSAGE, min_size=1, max_size=4).map(_array),
    "prompt": _SEQUENCES,
    "input": _SEQUENCES,
    "max_tokens": _INTS,
    "max_completion_tokens": _INTS,
    "n": st.one_of(st.sampled_from(["1", "2", "4"]), _INTS),
    "stream": st.sampled_from(["true", "false"]),
    "stream_options": st.lists(st.tuples(st.just('"include_usage"'), st.sampled_from(["true", "false"]))).map(_object),
    "stop": st.one_of(_TEXT, st.lists(st.one_of(_TEXT, st.sampled_from(['""', '"END"'])), max_size=8).map(_array)),
    "tools": st.lists(VALID_JSON, max_size=3).map(_array),
    "response_format": st.sampled_from(["json_object", "json_schema", "text"]).map(
        lambda t: _object([('"type"', json.dumps(t))])
    ),
    "logit_bias": st.just('{"50256": -100}'),
    "parallel_tool_calls": st.sampled_from(["true", "false"]),
    "temperature": st.floats(min_value=0, max_value=2).map(repr),
}
_OPTIONAL = sorted(_FIELDS)
_NEEDS = {names.CHAT_COMPLETIONS: "messages", names.COMPLETIONS: "prompt", names.EMBEDDINGS: "input"}


def _models(policy: str, path: str | None) -> st.SearchStrategy[str]:
    """Mostly a model that serves the endpoint; else any of the policy's, or any string."""
    endpoint = TRANSLATORS[path].endpoint if path is not None else None
    serving = [
        name
        for spec in gateway_for(policy).policy.models
        if endpoint is None or endpoint in spec.endpoints
        for name in (spec.name, *spec.aliases)
    ]
    fitting = st.sampled_from(serving).map(json.dumps)
    others = st.sampled_from(public_models(policy)).map(json.dumps)
    return st.integers(0, 7).flatmap(lambda roll: _TEXT if roll == 3 else others if roll == 4 else fitting)


@st.composite
def request_bodies(draw: st.DrawFn, policy: str = "gateway", path: str | None = None) -> str:
    """A JSON object with `model` first and some known fields: well-typed, ill-typed or hostile.

    Most bodies parse, so the later steps (validation, counting, routing, caps, the rewrite) see
    them; a fifth carry one value that may not parse at all (a deep array, 1e400, NaN, a raw
    surrogate) in the place of a field.
    """
    fields = ["model", *draw(st.lists(st.sampled_from(_OPTIONAL), max_size=7))]  # a name twice: a duplicate key
    if draw(st.integers(0, 3)) != 2:  # the field the endpoint needs, so admission is often reached
        fields.append(_NEEDS[path] if path is not None else draw(st.sampled_from(sorted(_NEEDS.values()))))
    if draw(st.integers(0, 19)) == 7:
        fields.append("model")  # a second model: the last one counts, for us and for vLLM
    # Which field (counted from the last, so it is rarely `model`) gets a value that may not parse.
    hostile = len(fields) - 1 - draw(st.integers(0, len(fields) - 1)) if draw(st.integers(0, 4)) == 2 else -1
    pairs: list[tuple[str, str]] = []
    for index, name in enumerate(fields):
        good = _models(policy, path) if name == "model" else _FIELDS[name]
        value = draw(HOSTILE if index == hostile else _maybe(good))
        pairs.append((json.dumps(name), value))
    if draw(st.integers(0, 9)) == 7:
        pairs.append((draw(_KEYS), draw(VALID_JSON)))  # an unknown field
    return draw(_WS) + _object(pairs) + draw(_WS)


# --- the checks ------------------------------------------------------------------------------------


def assert_openai_error(error: GatewayError) -> None:
    assert 400 <= error.status < 500, (error.status, error.message)
    payload = orjson.loads(error.body())
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]


def decide(policy: str, path: str, raw: bytes) -> Admission | GatewayError:
    """The body's decision; any exception other than GatewayError fails the property."""
    try:
        return gateway_for(policy).on_request_body(need_for(policy, path), raw)
    except GatewayError as error:
        assert_openai_error(error)
        return error


def assert_admission_sound(policy: str, path: str, raw: bytes, admission: Admission) -> None:
    gateway = gateway_for(policy)
    requested = orjson.loads(raw)["model"]
    sent = admission.body if admission.body is not None else raw
    upstream = orjson.loads(sent)
    assert isinstance(upstream, dict)
    assert upstream["model"] == admission.target.served_name or admission.body is None
    if admission.stream:
        assert upstream["stream_options"]["include_usage"] is True
    # Idempotent: the upstream body, under the public name again, is rewritten to itself.
    again = dict(upstream, model=requested)
    second = gateway.on_request_body(need_for(policy, path), orjson.dumps(again))
    resent = second.body if second.body is not None else orjson.dumps(again)
    assert orjson.loads(resent) == upstream
    if admission.body is not None:
        assert resent == admission.body
    assert second.body is None or second.body == admission.body
    assert (second.target.backend, second.prompt_tokens, second.completion_tokens, second.stream) == (
        admission.target.backend,
        admission.prompt_tokens,
        admission.completion_tokens,
        admission.stream,
    )


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(raw=st.binary(max_size=512))
@example(raw=b"")
@example(raw=b" \n\t ")
@example(raw=b"\xef\xbb\xbf{}")
@example(raw=b'{"model": "tiny\xff"}')
def test_any_bytes_are_admitted_or_refused(policy: str, path: str, raw: bytes) -> None:
    outcome = decide(policy, path, raw)
    if isinstance(outcome, Admission):
        assert_admission_sound(policy, path, raw, outcome)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(text=st.one_of(JSON_TEXTS, DEEP))
def test_any_json_value_is_admitted_or_refused(policy: str, path: str, text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")  # a raw lone surrogate: invalid UTF-8 on the wire
    outcome = decide(policy, path, raw)
    if isinstance(outcome, Admission):
        assert_admission_sound(policy, path, raw, outcome)


# Bodies that once broke the core (found by these properties and fuzz/): kept as fixed examples.
REGRESSIONS = [  # MODEL: a chat model of the policy under test
    # orjson parses 1,024 levels but writes only 254: a rewrite (served name) of a body holding a
    # 300-deep value raised TypeError -> 500 internal_error.
    '{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "x": ' + _nested(300, "[", "]") + "}",
    # the same through the token count of `tools` and of a message's `tool_calls`
    '{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "tools": ' + _nested(300, "[", "]") + "}",
    '{"model": "MODEL", "messages": [{"role": "assistant", "tool_calls": ' + _nested(300, "[", "]") + "}]}",
    # and through the message of a refusal that quotes the value
    '{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
    + _nested(300, '{"a":', "}")
    + "}",
    # an unhashable role was looked up in a frozenset: TypeError -> 500
    '{"model": "MODEL", "messages": [{"role": [], "content": []}]}',
    '{"model": "MODEL", "messages": [{"role": {}, "content": "hi"}]}',
]


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(data=st.data())
def test_request_shaped_bodies_are_admitted_or_refused_and_rewrites_are_idempotent(
    policy: str, path: str, data: st.DataObject
) -> None:
    raw = data.draw(request_bodies(policy, path), label="body").encode("utf-8", "surrogatepass")
    outcome = decide(policy, path, raw)
    if isinstance(outcome, Admission):
        assert_admission_sound(policy, path, raw, outcome)


@pytest.mark.parametrize("body", REGRESSIONS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_regressions(policy: str, body: str) -> None:
    raw = body.replace("MODEL", CHAT_MODEL[policy]).encode()
    outcome = decide(policy, names.CHAT_COMPLETIONS, raw)
    if isinstance(outcome, Admission):
        assert_admission_sound(policy, names.CHAT_COMPLETIONS, raw, outcome)


def test_request_shaped_bodies_reach_admission() -> None:
    """The generator is not all noise: a fixed sample of it gets admitted on each endpoint."""
    admitted: dict[str, int] = dict.fromkeys(PATHS, 0)

    @settings(SETTINGS, max_examples=300, derandomize=True)
    @given(text=request_bodies(), path=st.sampled_from(PATHS))
    def count(text: str, path: str) -> None:
        if isinstance(decide("gateway", path, text.encode("utf-8", "surrogatepass")), Admission):
            admitted[path] += 1

    count()
    assert all(n > 0 for n in admitted.values()), admitted


# --- the adapter: what Envoy gets back -------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _headers_message(headers: list[tuple[str, bytes]]) -> pb.ProcessingRequest:
    values = [base_pb2.HeaderValue(key=key, raw_value=value) for key, value in headers]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values)))


def _parsed(reply: bytes | pb.ProcessingResponse) -> pb.ProcessingResponse:
    return pb.ProcessingResponse.FromString(reply) if isinstance(reply, bytes) else reply


def assert_immediate_4xx(response: pb.ProcessingResponse) -> None:
    immediate = response.immediate_response
    assert 400 <= immediate.status.code < 500, immediate
    payload = orjson.loads(immediate.body)
    assert set(payload["error"]) == {"message", "type", "param", "code"}


_HEADER_VALUES = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=20).map(lambda b: b"Bearer " + b),
    st.sampled_from([b"Bearer sk-demo", b"Bearer sk-demo\xff", b"Bearer sk-d\xe9mo", b"bearer  sk-demo ", b""]),
)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@SETTINGS
@given(
    path=st.one_of(st.sampled_from([*PATHS, names.MODELS, "/v1/chat/completions?x=1", "/health"]), st.text()),
    method=st.sampled_from(["POST", "GET", "HEAD", "PUT", "OPTIONS", "post", ""]),
    content_type=st.one_of(st.none(), st.sampled_from([b"application/json", b"text/plain", b"application/x+json"])),
    extra=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "authorization",
                    "x-api-key",
                    "content-length",
                    "x-llm-class",
                    "x-llm-quality",
                    "x-llm-backend",
                    "x-llm-tenant",
                    "x-request-id",
                ]
            ),
            _HEADER_VALUES,
        ),
        max_size=5,
    ),
    end_of_stream=st.booleans(),
    data=st.data(),
)
def test_the_adapter_answers_every_request_with_a_4xx_or_a_consistent_mutation(
    loop: asyncio.AbstractEventLoop,
    policy: str,
    path: str,
    method: str,
    content_type: bytes | None,
    extra: list[tuple[str, bytes]],
    end_of_stream: bool,
    data: st.DataObject,
) -> None:
    """obs-text and invalid UTF-8 in any header (the API key included), then any body."""
    body = data.draw(st.one_of(st.binary(max_size=200), request_bodies(policy).map(_wire)), label="body")
    headers = [(":path", path.encode("utf-8", "surrogatepass")), (":method", method.encode())]
    if content_type is not None:
        headers.append(("content-type", content_type))
    headers += extra
    stream = RequestStream(gateway_for(policy))
    message = _headers_message(headers)
    message.request_headers.end_of_stream = end_of_stream
    first = _parsed(loop.run_until_complete(stream.handle(message)))
    if first.HasField("immediate_response"):
        if first.immediate_response.status.code != 200:  # /v1/models answers 200
            assert_immediate_4xx(first)
        return
    if end_of_stream or stream.need is None:
        return  # passed through: Envoy sends no body
    second = _parsed(
        loop.run_until_complete(
            stream.handle(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
        )
    )
    if second.HasField("immediate_response"):
        assert_immediate_4xx(second)
        return
    common = second.request_body.response
    set_headers = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    if common.HasField("body_mutation"):
        replaced = common.body_mutation.body
        assert int(set_headers["content-length"]) == len(replaced)
        assert isinstance(orjson.loads(replaced), dict)
    else:
        assert "content-length" not in set_headers


@pytest.mark.parametrize("policy", sorted(POLICIES))
@SETTINGS
@given(
    headers=st.dictionaries(
        st.sampled_from(
            [
                ":path",
                ":method",
                "content-type",
                "content-length",
                "authorization",
                "x-api-key",
                "x-llm-class",
                "x-llm-quality",
                "x-llm-backend",
            ]
        ),
        st.text(max_size=30),
    )
)
def test_any_request_headers_get_a_verdict(policy: str, headers: dict[str, str]) -> None:
    verdict = gateway_for(policy).on_request_headers(headers)
    assert isinstance(verdict, Passthrough | NeedBody | Reply)
    if isinstance(verdict, Reply) and verdict.error is not None:
        assert_openai_error(verdict.error)


# --- the response side ----------------------------------------------------------------------------

_SSE_PIECES = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n", b"\r", b"data: ", b"data:", b"data: [DONE]\n\n", b":\n\n"]),
    st.sampled_from(
        [
            b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
            b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n',
            b'data: {"choices":[],"usage":{"prompt_tokens":true,"completion_tokens":-7}}\n\n',
            b'data: {"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":0}}\n\n',
            b'data: {"usage":{"prompt_tokens":1e400}}\n\n',
            b'data: {"choices":[{"index":"x","delta":{"tool_calls":[{"index":true,"function":{"arguments":"{"}}]}}]}'
            b"\n\n",
            b'data: {"choices":[{"delta":{"tool_calls":[7,{"function":[]}]}}],"usage":{"prompt_tokens":1}}\n\n',
        ]
    ),
    JSON_TEXTS.map(lambda t: b"data: " + t.encode("utf-8", "surrogatepass") + b"\n\n"),
)


def _read_stream(chunks: list[bytes], hide: bool, signals: ContentSignals | None) -> tuple[bytes, Usage | None]:
    reader = SseUsageReader(hide_usage_event=hide, signals=signals)
    out: list[bytes] = []
    for index, chunk in enumerate(chunks):
        replacement = reader.feed(chunk, end_of_stream=index == len(chunks) - 1)
        out.append(chunk if replacement is None else replacement)
    return b"".join(out), reader.usage


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def assert_usage_sound(usage: Usage | None) -> None:
    if usage is not None:
        for value in (usage.prompt_tokens, usage.completion_tokens):
            assert type(value) is int and 0 <= value < 2**53, usage  # Redis's Lua counts in doubles


@SETTINGS
@given(
    pieces=st.lists(_SSE_PIECES, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
    hide=st.booleans(),
    json_mode=st.booleans(),
    tools=st.booleans(),
    watch=st.booleans(),
)
def test_sse_reader_gives_usage_or_nothing_whatever_the_chunking(
    pieces: list[bytes], cuts: list[int], hide: bool, json_mode: bool, tools: bool, watch: bool
) -> None:
    data = b"".join(pieces)
    whole_signals = ContentSignals(json_mode, tools) if watch else None
    split_signals = ContentSignals(json_mode, tools) if watch else None
    whole, whole_usage = _read_stream([data], hide, whole_signals)
    split, split_usage = _read_stream(_split(data, cuts), hide, split_signals)
    assert split == whole  # what the client gets does not depend on where TCP cut the stream
    assert split_usage == whole_usage
    assert_usage_sound(whole_usage)
    if not hide:
        assert whole == data
    if whole_signals is not None and split_signals is not None:
        assert whole_signals.finish() == split_signals.finish()


@SETTINGS
@given(
    body=st.one_of(st.binary(max_size=300), JSON_TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass"))),
    json_mode=st.booleans(),
    tools=st.booleans(),
)
@example(body=b'{"usage": {"prompt_tokens": -5, "completion_tokens": 3}}', json_mode=False, tools=False)
@example(body=b'{"usage": {"prompt_tokens": true, "completion_tokens": false}}', json_mode=False, tools=False)
def test_json_response_gives_usage_or_nothing(body: bytes, json_mode: bool, tools: bool) -> None:
    signals = ContentSignals(json_mode, tools)
    assert_usage_sound(usage_from_json_body(body, signals))
    verdict, valid, invalid = signals.finish()
    assert verdict in (None, "valid", "invalid", "truncated") and valid >= 0 and invalid >= 0


@SETTINGS
@given(
    status=st.sampled_from([200, 400, 500, 0]),
    content_type=st.sampled_from(["application/json", "text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM", ""]),
    chunks=st.lists(st.binary(max_size=200), min_size=1, max_size=5),
)
def test_response_watcher_never_raises(status: int, content_type: str, chunks: list[bytes]) -> None:
    admission = gateway_for("gateway").on_request_body(
        need_for("gateway", names.CHAT_COMPLETIONS),
        b'{"model": "tiny", "stream": true, "messages": [{"role": "user", "content": "hi"}]}',
    )
    watcher = ResponseWatcher(admission)
    watcher.on_headers(status, content_type)
    for index, chunk in enumerate(chunks):
        watcher.on_body(chunk, index == len(chunks) - 1)
    assert_usage_sound(watcher.usage)
    if watcher.signals is not None:
        watcher.signals.finish()
