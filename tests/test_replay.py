"""Policy what-if: a log recorded under the example policy, replayed against a changed one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.access_log import AccessLog
from extproc.core import Gateway
from extproc.policy import Policy, example_policy_path, load_policy
from extproc.replay import replay
from tests.recording import run_exchanges


def _headers(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def _request(key: str, body: dict[str, Any], extra: dict[str, str] | None = None) -> list[pb.ProcessingRequest]:
    raw = orjson.dumps(body)
    headers = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
    headers.update({"authorization": f"Bearer {key}", **(extra or {})})
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    response = orjson.dumps({"choices": [], "usage": usage})
    return [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_headers(headers))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True)),
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=_headers({":status": "200", "content-type": "application/json"}))
        ),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=response, end_of_stream=True)),
    ]


def record_log(policy: Policy, requests: list[list[pb.ProcessingRequest]], path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    access_log = AccessLog(fd)
    run_exchanges(Gateway.from_policy(policy), requests, access_log=access_log)
    access_log.close()
    os.close(fd)


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "llama-3.1-8b",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 16,
        **extra,
    }


def test_replay_reports_moves_refusals_and_limits(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    json_mode = {"response_format": {"type": "json_object"}}
    traffic = (
        [_request("sk-demo", chat()) for _ in range(3)]
        + [_request("sk-demo", chat(**json_mode)) for _ in range(2)]
        + [_request("sk-tools", chat())]
        + [_request("sk-tiny", chat()) for _ in range(4)]
        + [_request("sk-demo", chat(model="no-such-model"))]  # refused before and after
    )
    record_log(load_policy(example_policy_path()), traffic, log)
    logged = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    assert [e["backend"] for e in logged[:6]] == ["default-8b"] * 3 + ["strict-json-model"] * 2 + ["fast-8b"]
    assert logged[-1]["code"] == "model_not_found"

    # Unchanged policy: nothing changes, and what load decided (a fallback, a shed) is not the policy's change.
    fallback = {**logged[0], "backend": "fast-8b", "routed_backend": "default-8b", "fallback": True}
    shed = {**logged[0], "backend": "default-8b", "code": "shed", "outcome": "shed", "status": 429}
    with_load = [*log.read_bytes().splitlines(), orjson.dumps(fallback), orjson.dumps(shed)]
    same = replay(Gateway.from_policy(load_policy(example_policy_path())), with_load)
    assert (same.replayed, same.unchanged, same.changes, same.skipped) == (len(traffic) + 1, len(traffic) + 1, [], 1)

    # The change: JSON mode goes to fast-8b, the tiny tenant gets 40 tokens a minute, the internal-tools
    # rule is gone.
    document = yaml.safe_load(example_policy_path().read_text())
    rules = document["routing"]["rules"]
    document["routing"]["rules"] = [r for r in rules if r["name"] != "internal-tools"]
    for rule in document["routing"]["rules"]:
        if rule["name"] == "json-mode":
            rule["backend"] = "fast-8b"
    document["tenants"]["tiny"]["limits"] = {"tokens_per_minute": 40}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(document))
    report = replay(Gateway.from_policy(load_policy(changed)), log.read_bytes().splitlines())
    summary = report.summary()
    assert summary["moves"] == {"-> strict-json-model => -> fast-8b": 2, "-> fast-8b => -> default-8b": 1}
    assert summary["by_kind"]["newly_limited"] >= 2  # 40 TPM: the tiny tenant's later requests no longer fit
    assert any("tiny/experimental: newly_limited" in key for key in summary["by_tenant_and_class"])
    assert report.unchanged == 3 + (4 - summary["by_kind"]["newly_limited"]) + 1

    # The CLI prints the same.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from extproc.cli import main; raise SystemExit(main())",
            "replay",
            "--policy",
            str(changed),
            str(log),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "moves between backends" in out and "-> strict-json-model => -> fast-8b" in out
