"""The observability assets: alert rules, the Grafana dashboard, and the series they read.

promtool comes from Debian's `prometheus` package; grafana-foundation-sdk from PyPI. Tests that
need either skip with a message when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OBS = ROOT / "observability"
METRICS_MD = OBS / "METRICS.md"
DASHBOARD_JSON = OBS / "grafana" / "extproc.json"
ALERTS = OBS / "prometheus" / "alerts.yaml"
ALERTS_TEST = OBS / "prometheus" / "alerts_test.yaml"
KSM_TESTDATA = OBS / "testdata" / "kube-state-metrics.prom"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


expressions = _load("extproc_observability_expressions", OBS / "expressions.py")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`: apt-get install -y prometheus)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=ROOT)


# --------------------------------------------------------------------------- known series


def _metrics_md_names() -> tuple[set[str], set[str]]:
    """(gateway series, vLLM series) from METRICS.md: its metric tables and its vLLM paragraph.

    A histogram also allows its _bucket, _sum and _count series.
    """
    gateway: set[str] = set()
    lines = METRICS_MD.read_text(encoding="utf-8").splitlines()
    in_metric_table = False
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            in_metric_table = False
            continue
        if cells[0] == "metric":
            in_metric_table = True
            type_column = cells.index("type") if "type" in cells else None
            continue
        if not in_metric_table or set(cells[0]) <= {"-", ":", " "}:
            continue
        for name in re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", cells[0]):
            gateway.add(name)
            kind = cells[type_column] if type_column is not None and type_column < len(cells) else ""
            if kind.startswith("histogram"):
                gateway.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    vllm: set[str] = set()
    for name in re.findall(r"`(vllm:[A-Za-z0-9_:]+)`", METRICS_MD.read_text(encoding="utf-8")):
        vllm.add(name)
        if name.endswith("_seconds"):  # vLLM's histograms
            vllm.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return gateway, vllm


def _testdata_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            assert match, line
            names.add(match.group(0))
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))


def _variable_series(dashboard: dict[str, Any]) -> set[str]:
    """Series read by the query variables (`label_values(metric{...}, label)`, `query_result(...)`)."""
    names: set[str] = set()
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", text, re.S)
        if match:
            text = match.group(1)
        else:
            match = re.fullmatch(r"\s*(?:query_result|metrics|label_names)\((.*)\)\s*", text, re.S)
            text = match.group(1) if match else text
        names |= expressions.series_names(expressions.substitute_variables(text))
    return names


def _dashboard_series() -> set[str]:
    names = set()
    for expr in expressions.dashboard_expressions(DASHBOARD_JSON):
        names |= expressions.series_names(expr)
    return names | _variable_series(_dashboard())


def _alert_series() -> set[str]:
    names = set()
    for expr in expressions.alert_expressions(ALERTS):
        names |= expressions.series_names(expr)
    return names


def test_metrics_md_parses() -> None:
    gateway, vllm = _metrics_md_names()
    assert {"extproc_requests_total", "extproc_request_duration_seconds_bucket", "extproc_quota_store_degraded"} <= (
        gateway
    )
    assert "vllm:num_requests_waiting" in vllm


def test_every_series_is_in_the_contract() -> None:
    gateway, vllm = _metrics_md_names()
    kube = _testdata_names(KSM_TESTDATA)
    used = _dashboard_series() | _alert_series()
    unknown = {name for name in used if name not in gateway | vllm | kube}
    assert not unknown, f"series not in METRICS.md (nor vLLM's list, nor the kube-state-metrics testdata): {unknown}"
    assert not {name for name in _alert_series() if name.startswith("kube_")}, "alerts read kube-state-metrics"


def test_kube_testdata_has_exactly_the_dashboard_kube_series() -> None:
    dashboard_kube = {name for name in _dashboard_series() if name.startswith("kube_")}
    testdata = _testdata_names(KSM_TESTDATA)
    assert dashboard_kube == testdata


def test_kube_testdata_is_valid_exposition() -> None:
    result = subprocess.run(
        [_promtool(), "check", "metrics"],
        input=KSM_TESTDATA.read_text(encoding="utf-8"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- alerts


def test_promtool_check_rules() -> None:
    result = _run(_promtool(), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules() -> None:
    result = _run(_promtool(), "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_complete() -> None:
    rules = _alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        name = rule["alert"]
        assert "for" in rule, name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        for key in ("summary", "description", "runbook"):
            assert rule.get("annotations", {}).get(key), f"{name}: no {key} annotation"


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names <= firing, f"no firing case: {names - firing}"
    assert names <= quiet, f"no not-firing case: {names - quiet}"


# --------------------------------------------------------------------------- dashboard


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row's panels
    return found


def test_dashboard_is_up_to_date() -> None:
    pytest.importorskip(
        "grafana_foundation_sdk",
        reason="grafana-foundation-sdk not installed (pip install grafana-foundation-sdk): cannot regenerate",
    )
    dashboard = _load("extproc_observability_dashboard", OBS / "dashboard.py")
    generated = dashboard.render()
    assert generated == dashboard.render(), "dashboard.py output is not deterministic"
    assert DASHBOARD_JSON.read_text(encoding="utf-8") == generated, (
        "observability/grafana/extproc.json is out of date: run python observability/dashboard.py"
    )


def test_every_panel_has_a_query() -> None:
    dashboard = _dashboard()
    panels = [panel for panel in _panels(dashboard) if panel.get("type") != "row"]
    assert len(panels) >= 20
    for panel in panels:
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert any(exprs), f"panel {panel.get('title')!r} has no target with an expr"


def test_panel_ids_are_unique_and_grid_is_sane() -> None:
    panels = _panels(_dashboard())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_variables_are_defined() -> None:
    dashboard = _dashboard()
    defined = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "backend", "tenant"} <= defined
    for expr in expressions.dashboard_expressions(DASHBOARD_JSON, raw=True):
        for match in re.finditer(r"\$\{?(\w+)", expr):
            assert match.group(1) in defined or match.group(1).startswith("__"), (match.group(1), expr)


def test_dashboard_covers_the_playbook() -> None:
    used = _dashboard_series()
    for name in (
        "extproc_requests_total",
        "extproc_request_duration_seconds_bucket",
        "extproc_time_to_first_token_seconds_bucket",
        "extproc_tokens_total",
        "extproc_backend_waiting_requests",
        "extproc_admission_queue_length",
        "extproc_backend_kv_cache_usage_ratio",
        "vllm:kv_cache_usage_perc",
        "kube_pod_container_status_last_terminated_reason",
        "kube_pod_container_status_restarts_total",
        "extproc_in_flight_requests",
        "extproc_rejections_total",
        "extproc_upstream_responses_total",
        "extproc_json_mode_responses_total",
        "extproc_tool_call_arguments_total",
        "extproc_finish_reasons_total",
    ):
        assert name in used, name


# --------------------------------------------------------------------------- expressions.py


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(foo_bucket{a="b", c=~"d"}[5m] offset 1h)) > bool 3', {"foo_bucket"}),
        ('{__name__="x:y", job="a#b"}  # a comment naming bar', {"x:y"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)") or vector(0)', {"up"}),
        ("a / on (x) group_left (y) b unless ignoring(z) c", {"a", "b", "c"}),
        ("max_over_time(rate(http_total[5m])[1h:1m]) @ start()", {"http_total"}),
        ("histogram_quantile(0.9, sum without (pod) (rate(x[1m]))) * 1e3 + Inf - NaN + 0x1F", {"x"}),
        ("topk(3, sum by (backend) (vllm:num_requests_waiting))", {"vllm:num_requests_waiting"}),
        ("SUM BY (a) (b) AND c", {"b", "c"}),
        ('count_values("ver", build_info) - time()', {"build_info"}),
        ("sum(x) by (le)", {"x"}),
    ],
)
def test_series_names(expr: str, names: set[str]) -> None:
    assert expressions.series_names(expr) == names


def test_substitute_variables() -> None:
    expr = 'x{a="$a", b!="${b}", c=~"[[c]]", d=~"${d:regex}"}[$__rate_interval] + y[$__interval] $__range_s'
    assert expressions.substitute_variables(expr) == 'x{a=~".*", b!~".*", c=~".*", d=~".*"}[1m] + y[1m] 60'
    assert expressions.substitute_variables('x{a="$a"}', names={"b"}) == 'x{a="$a"}'
    assert expressions.substitute_variables('label_replace(x, "d", "$1", "s", "(.*)")') == (
        'label_replace(x, "d", "$1", "s", "(.*)")'
    )


def test_expression_readers() -> None:
    dashboard_exprs = expressions.dashboard_expressions(DASHBOARD_JSON)
    assert dashboard_exprs and not any("$" in expr for expr in dashboard_exprs)
    alert_exprs = expressions.alert_expressions(ALERTS)
    assert len(alert_exprs) == len(_alert_rules())
    for expr in dashboard_exprs + alert_exprs:
        assert expressions.series_names(expr), expr
