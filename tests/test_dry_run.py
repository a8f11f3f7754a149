"""`extproc route` (the SRE's dry run) and the rule checks of `extproc policy check`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from extproc.policy import example_policy_path


def extproc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def request(tmp_path: Path, body: dict[str, Any]) -> str:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(body))
    return str(path)


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "Hello!"}]}
DEMO = ("--header", "authorization: Bearer sk-demo")


def test_route_prints_the_decision(tmp_path: Path) -> None:
    done = extproc("route", request(tmp_path, {**CHAT, "response_format": {"type": "json_object"}}), *DEMO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "routed to backend strict-json-model" in out
    assert "rule          : json-mode" in out
    assert "tenant        : demo (tier standard)" in out
    assert "llama-3.1-8b -> Qwen/Qwen2.5-7B-Instruct upstream" in out
    assert "max_tokens=256 (default)" in out
    assert "sk-demo" not in out  # the credential never appears


def test_route_json_shows_fallbacks_considered(tmp_path: Path) -> None:
    done = extproc("route", request(tmp_path, CHAT), *DEMO, "--load", "default-8b:waiting=12,kv=0.5", "--json")
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["backend"] == "fast-8b"
    assert decision["served_model"] == "meta-llama/Llama-3.1-8B-Instruct-FP8"
    assert decision["rule"] == "default" and decision["class"] == "interactive"
    assert [c["backend"] for c in decision["considered"]] == ["default-8b", "fast-8b"]
    assert decision["considered"][0]["verdict"].startswith("saturated: queue 12/pod")
    assert decision["body"]["model"] == "meta-llama/Llama-3.1-8B-Instruct-FP8"
    assert decision["prompt_tokens"] > 0 and decision["max_model_len"] == 4096


def test_route_prints_the_error_a_client_would_get(tmp_path: Path) -> None:
    shed = extproc(
        "route",
        request(tmp_path, CHAT),
        *DEMO,
        "--header",
        "x-llm-class: batch",
        "--load",
        "batch-pool:waiting=12,pods=2,drain=4",
        "--json",
    )
    assert shed.returncode == 1
    decision = json.loads(shed.stdout)
    assert decision["status"] == 429 and decision["error"]["code"] == "shed"
    assert decision["headers"] == {"retry-after": "6", "retry-after-ms": "6000"}  # 12 x 2 / 4 per second
    long = extproc(
        "route", "-", *DEMO, stdin=json.dumps({**CHAT, "messages": [{"role": "user", "content": "a " * 7000}]})
    )
    assert long.returncode == 1
    assert "refused: 400 prompt_too_long" in long.stdout
    nokey = extproc("route", request(tmp_path, CHAT))
    assert nokey.returncode == 1 and "refused: 401 invalid_api_key" in nokey.stdout
    bad = extproc("route", request(tmp_path, CHAT), "--load", "nowhere:waiting=1")
    assert bad.returncode == 2 and "unknown backends: nowhere" in bad.stderr


def test_policy_check_reports_rule_problems(tmp_path: Path) -> None:
    example = extproc("policy", "check", str(example_policy_path()))
    assert example.returncode == 0, example.stderr
    assert "5 rules" in example.stdout
    assert "backends[default-8b].fallbacks: fast-8b (window 4096" in example.stderr

    raw = yaml.safe_load(example_policy_path().read_text())
    raw["routing"]["rules"].append(
        {"name": "late-json", "match": {"json_mode": True, "tools": True, "endpoints": ["chat"]}, "backend": "fast-8b"}
    )
    shadowed = tmp_path / "shadowed.yaml"
    shadowed.write_text(yaml.safe_dump(raw))
    done = extproc("policy", "check", str(shadowed))
    assert done.returncode == 0
    assert "routing.rules[late-json] is shadowed by routing.rules[json-mode]" in done.stderr

    raw["routing"]["rules"].append({"name": "lost", "match": {}, "backend": "no-such-backend"})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump(raw))
    done = extproc("policy", "check", str(unknown))
    assert done.returncode == 1
    assert "routing.rules[lost].backend: 'no-such-backend' is not a key of `backends`" in done.stderr
