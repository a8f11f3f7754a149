"""Coverage-guided fuzzing of the request-body path: body bytes -> Admission or GatewayError.

    .venv/bin/python fuzz/fuzz_request_body.py -atheris_runs=100000 -dict=fuzz/json.dict CORPUS_DIR

Any exception other than `GatewayError` is a crash (the adapter would answer 500 `internal_error`),
and so is an admitted rewrite that does not parse back as a JSON object. Half the inputs are raw
bytes; the other half are bodies assembled from the input (a real model name, known fields, values
of every JSON type, deep nesting), so the later steps (validation, counting, routing, caps, the
rewrite) are reached far more often than random bytes would reach them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["extproc"]):
    import orjson

    from extproc import names
    from extproc.core import Admission, Gateway, NeedBody
    from extproc.errors import GatewayError
    from extproc.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
POLICIES = [ROOT / "tests" / "policies" / "gateway.yaml", ROOT / "extproc" / "examples" / "policy.yaml"]
GATEWAYS = [Gateway.from_policy(load_policy(path)) for path in POLICIES]
PATHS = [names.CHAT_COMPLETIONS, names.COMPLETIONS, names.EMBEDDINGS]


def _need(gateway: Gateway, path: str) -> NeedBody:
    headers = {":path": path, ":method": "POST", "content-type": "application/json"}
    headers["authorization"] = "Bearer sk-demo"  # the example policy's tenant; ignored without tenants
    verdict = gateway.on_request_headers(headers)
    assert isinstance(verdict, NeedBody)
    return verdict


NEEDS = [[_need(gateway, path) for path in PATHS] for gateway in GATEWAYS]
MODELS = [[n for spec in g.policy.models for n in (spec.name, *spec.aliases)] for g in GATEWAYS]
# Per policy and endpoint: the names of models that serve it, so most bodies get past the model check.
SERVING = [
    [
        [n for spec in g.policy.models if endpoint in spec.endpoints for n in (spec.name, *spec.aliases)]
        for endpoint in ("chat", "completions", "embeddings")
    ]
    for g in GATEWAYS
]
FIELDS = [
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "stop",
    "tools",
    "response_format",
    "logit_bias",
    "temperature",
    "parallel_tool_calls",
    "model",
]
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "nobody"]
PART_TYPES = ["text", "image_url", "input_image", "input_audio", "file"]


class Raw(str):
    """JSON text written as is (nesting deeper than any serializer here would write)."""


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value.items()) + "}"
    return json.dumps(value)


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """Any JSON value, steered by the input."""
    kind = fdp.ConsumeIntInRange(0, 11)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-3, 5000)
    if kind == 3:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))  # up to 72-bit integers
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    if kind in (5, 6):
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 7 and depth < 8:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 8 and depth < 8:
        return {fdp.PickValueInList(FIELDS): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}
    if kind == 9:
        return _message(fdp, depth + 1) if depth < 8 else {}
    if kind == 10:
        levels = fdp.ConsumeIntInRange(200, 1100)  # around orjson's limits: 254 written, 1,024 read
        return Raw("[" * levels + "1" + "]" * levels)
    return fdp.PickValueInList(["", "END", "<|endoftext|>", "json_object", "user"])


def _message(fdp: atheris.FuzzedDataProvider, depth: int) -> Any:
    message: dict[str, Any] = {"role": fdp.PickValueInList(ROLES) if fdp.ConsumeBool() else _value(fdp, depth)}
    if fdp.ConsumeBool():
        message["content"] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
    elif fdp.ConsumeBool():
        parts = []
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            part: dict[str, Any] = {"type": fdp.PickValueInList(PART_TYPES)}
            part["text" if fdp.ConsumeBool() else fdp.PickValueInList(PART_TYPES)] = _value(fdp, depth + 1)
            parts.append(part)
        message["content"] = parts
    else:
        message["content"] = _value(fdp, depth + 1)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        message[fdp.PickValueInList(["name", "tool_calls", "tool_call_id"])] = _value(fdp, depth + 1)
    return message


def _structured(fdp: atheris.FuzzedDataProvider, policy: int, path: int) -> bytes:
    models = MODELS[policy] if fdp.ConsumeIntInRange(0, 3) == 0 else SERVING[policy][path]
    body: dict[str, Any] = {"model": fdp.PickValueInList(models)}
    need = ("messages", "prompt", "input")[path]
    if fdp.ConsumeIntInRange(0, 3) != 0:
        body[need] = (
            [_message(fdp, 1) for _ in range(fdp.ConsumeIntInRange(1, 3))]
            if need == "messages"
            else fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 60))
        )
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        body[fdp.PickValueInList(FIELDS)] = _value(fdp)
    return dump(body).encode("utf-8", "surrogatepass")


def TestOneInput(data: bytes) -> None:  # atheris calls it by this name
    fdp = atheris.FuzzedDataProvider(data)
    policy = fdp.ConsumeIntInRange(0, len(GATEWAYS) - 1)
    path = fdp.ConsumeIntInRange(0, len(PATHS) - 1)
    raw = _structured(fdp, policy, path) if fdp.ConsumeBool() else fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        admission = GATEWAYS[policy].on_request_body(NEEDS[policy][path], raw)
    except GatewayError as error:
        if not 400 <= error.status < 500:
            raise AssertionError(f"a body got {error.status}: {error.message}") from None
        return
    check(admission, raw)


def check(admission: Admission, raw: bytes) -> None:
    sent = orjson.loads(admission.body if admission.body is not None else raw)
    if not isinstance(sent, dict) or (admission.body is not None and sent["model"] != admission.target.served_name):
        raise AssertionError(f"bad rewrite: {admission.body!r}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
