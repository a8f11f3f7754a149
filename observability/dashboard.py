"""Build the gateway's Grafana dashboard with grafana-foundation-sdk.

    python observability/dashboard.py            # writes observability/grafana/extproc.json
    python observability/dashboard.py --check    # exits 1 if the committed file is out of date

The output is deterministic (sorted keys, panel ids numbered in order) so a test can compare the
committed JSON with what this script generates. The series and labels are the contract in
observability/METRICS.md, vLLM's own series listed there, and kube-state-metrics 2.x for the
Kubernetes row.

Conventions in the queries:
- gateway counters and histograms are summed over replicas and workers (`sum by (...)`);
- `extproc_backend_*` gauges are every replica's copy of the same vLLM scrape, so they are
  combined with `max by (backend)`, never summed (a sum would multiply them by the replica count);
- `extproc_admission_queue_length` and `extproc_in_flight_requests` are per replica: summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUTPUT = Path(__file__).resolve().parent / "grafana" / "extproc.json"
UID = "extproc-gateway"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters driven by the template variables (multi-value; "All" is `.*`).
B = 'backend=~"$backend"'
BT = 'backend=~"$backend", tenant=~"$tenant"'
POD = 'namespace=~"$namespace", pod=~"$pod"'
RI = "$__rate_interval"

# Outcomes that are the service's fault (the error-rate alert uses the same set).
SERVER_ERRORS = "upstream_error|timeout|unavailable|internal_error"

Target = tuple[str, str]  # (expr, legend format)


def _with_targets(panel: Any, targets: list[Target], *, instant: bool = False, table_format: bool = False) -> Any:
    for index, (expr, legend) in enumerate(targets):
        query = (
            prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + index)).datasource(DATASOURCE)
        )
        query = query.instant() if instant else query.range()
        if table_format:
            query = query.format(PromQueryFormat.TABLE)
        panel = panel.with_target(query)
    return panel


def series(
    title: str,
    description: str,
    targets: list[Target],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    stacked: bool = False,
    bars: bool = False,
    max_value: float | None = None,
    right_axis: tuple[str, str] | None = None,
    dashed: str | None = None,
) -> Any:
    """A time series panel.

    `right_axis` = (series name regexp, unit) moves matching series to a right axis; `dashed` (a series
    name regexp) draws matching series dashed.
    """
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if max_value is not None:
        panel = panel.max(max_value)
    if stacked:
        panel = panel.stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(40)
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    if right_axis is not None:
        regexp, right_unit = right_axis
        panel = panel.override_by_regexp(
            regexp,
            [
                DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                DynamicConfigValue(id_val="unit", value=right_unit),
                DynamicConfigValue(id_val="custom.drawStyle", value="line"),
            ],
        )
    if dashed is not None:
        panel = panel.override_by_regexp(
            dashed,
            [DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})],
        )
    return _with_targets(panel, targets)


def single_stat(title: str, description: str, targets: list[Target], *, unit: str = "short") -> Any:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return _with_targets(panel, targets)


def tenant_table() -> Any:
    panel = (
        table.Panel()
        .title("Usage per tenant over the selected range")
        .description(
            "Settled tokens and decided requests per tenant over the dashboard's time range (increase of "
            "extproc_tokens_total and extproc_requests_total). The quota store holds the authoritative budgets; "
            "this is the gateway's own count."
        )
        .datasource(DATASOURCE)
        .unit("short")
        .span(24)
        .height(8)
        .show_header(True)
        .with_transformation(
            DataTransformerConfig(id_val="merge", options={}),
        )
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "Value #A": "prompt tokens",
                        "Value #B": "completion tokens",
                        "Value #C": "requests",
                        "Value #D": "refused by limits",
                    },
                },
            ),
        )
    )
    return _with_targets(
        panel,
        [
            (f'sum by (tenant) (increase(extproc_tokens_total{{{BT}, type="prompt"}}[$__range]))', ""),
            (f'sum by (tenant) (increase(extproc_tokens_total{{{BT}, type="completion"}}[$__range]))', ""),
            (f"sum by (tenant) (increase(extproc_requests_total{{{BT}}}[$__range]))", ""),
            (
                f'sum by (tenant) (increase(extproc_requests_total{{{BT}, outcome=~"rate_limited|quota_exhausted"}}'
                "[$__range]))",
                "",
            ),
        ],
        instant=True,
        table_format=True,
    )


def _all() -> VariableOption:
    return VariableOption(selected=True, text="All", value="$__all")


def variables() -> list[Any]:
    datasource = dash.DatasourceVariable("datasource").label("Data source").type("prometheus").regex("").multi(False)

    def label_values(name: str, label: str, query: str, description: str) -> Any:
        return (
            dash.QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DATASOURCE)
            .query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(_all())
        )

    return [
        datasource,
        label_values(
            "backend",
            "Backend",
            "label_values(extproc_requests_total, backend)",
            "Backends from the policy (`none`: refused before routing).",
        ),
        label_values(
            "tenant",
            "Tenant",
            'label_values(extproc_requests_total{backend=~"$backend"}, tenant)',
            "Tenants from the policy (`anonymous` when not identified).",
        ),
        label_values(
            "namespace",
            "Namespace (Kubernetes row)",
            "label_values(kube_pod_container_status_restarts_total, namespace)",
            "Namespaces for the kube-state-metrics panels (the vLLM Deployments' namespace).",
        ),
        dash.TextBoxVariable("pod")
        .label("Pod regex (Kubernetes row)")
        .description("A regular expression on pod names, e.g. `llama-8b-.*` for one vLLM Deployment's pods.")
        .default_value(".*")
        .current(VariableOption(selected=True, text=".*", value=".*")),
    ]


def panels() -> list[tuple[str, list[Any]]]:
    """The dashboard as (row title, panels) pairs, top to bottom."""
    overview = [
        single_stat(
            "Requests/s",
            "Inference requests decided by the gateway, every outcome.",
            [(f"sum(rate(extproc_requests_total{{{BT}}}[{RI}]))", "requests/s")],
            unit="reqps",
        ),
        single_stat(
            "Server error ratio",
            f"Outcomes {SERVER_ERRORS} over all decided requests (the ExtprocHighErrorRate alert's ratio).",
            [
                (
                    f'sum(rate(extproc_requests_total{{{BT}, outcome=~"{SERVER_ERRORS}"}}[{RI}])) '
                    f"/ sum(rate(extproc_requests_total{{{BT}}}[{RI}]))",
                    "error ratio",
                )
            ],
            unit="percentunit",
        ),
        single_stat(
            "p95 request latency",
            "Request headers to response end, admitted requests.",
            [
                (
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(extproc_request_duration_seconds_bucket{{{B}}}[{RI}])))",
                    "p95",
                )
            ],
            unit="s",
        ),
        single_stat(
            "Replicas with the quota store degraded",
            "Gateway replicas running on their quota failure mode (store unreachable).",
            [("count(extproc_quota_store_degraded > 0) or vector(0)", "degraded replicas")],
        ),
    ]

    traffic = [
        series(
            "Request rate by outcome",
            "Every inference request the gateway decided, once, when it ends.",
            [(f"sum by (outcome) (rate(extproc_requests_total{{{BT}}}[{RI}]))", "{{outcome}}")],
            unit="reqps",
            stacked=True,
        ),
        series(
            "Error ratio by outcome",
            "Share of decided requests per non-ok outcome. The dashed line is the server-side error ratio "
            f"({SERVER_ERRORS}) that the error-rate alert watches; the other outcomes are refusals, and "
            "`cancelled` (the client went away, or the upstream cut a stream short: the gateway cannot tell).",
            [
                (
                    f'sum by (outcome) (rate(extproc_requests_total{{{BT}, outcome!="ok"}}[{RI}])) '
                    f"/ on () group_left sum(rate(extproc_requests_total{{{BT}}}[{RI}]))",
                    "{{outcome}}",
                ),
                (
                    f'sum(rate(extproc_requests_total{{{BT}, outcome=~"{SERVER_ERRORS}"}}[{RI}])) '
                    f"/ sum(rate(extproc_requests_total{{{BT}}}[{RI}]))",
                    "server errors (alerted)",
                ),
            ],
            unit="percentunit",
            dashed="server errors.*",
        ),
        series(
            "Requests by backend and class",
            "Decided requests per backend and traffic class (`none`: refused before routing).",
            [(f"sum by (backend, class) (rate(extproc_requests_total{{{BT}}}[{RI}]))", "{{backend}} {{class}}")],
            unit="reqps",
        ),
        series(
            "Rejections by reason",
            "Requests the gateway refused itself, by error code or policy rule code "
            "(this series has no backend or tenant label: the filters do not apply).",
            [("sum by (reason) (rate(extproc_rejections_total[" + RI + "]))", "{{reason}}")],
            unit="reqps",
            stacked=True,
        ),
    ]

    latency = [
        series(
            "Request latency p50 / p95",
            "Request headers to response end as the gateway sees it (admitted requests).",
            [
                (
                    "histogram_quantile(0.50, sum by (le, backend) "
                    f"(rate(extproc_request_duration_seconds_bucket{{{B}}}[{RI}])))",
                    "p50 {{backend}}",
                ),
                (
                    "histogram_quantile(0.95, sum by (le, backend) "
                    f"(rate(extproc_request_duration_seconds_bucket{{{B}}}[{RI}])))",
                    "p95 {{backend}}",
                ),
            ],
            unit="s",
        ),
        series(
            "Time to first token p50 / p95",
            "Request headers to the first streamed body chunk (streams only).",
            [
                (
                    "histogram_quantile(0.50, sum by (le, backend) "
                    f"(rate(extproc_time_to_first_token_seconds_bucket{{{B}}}[{RI}])))",
                    "p50 {{backend}}",
                ),
                (
                    "histogram_quantile(0.95, sum by (le, backend) "
                    f"(rate(extproc_time_to_first_token_seconds_bucket{{{B}}}[{RI}])))",
                    "p95 {{backend}}",
                ),
            ],
            unit="s",
        ),
        series(
            "Request latency p95 by prompt length",
            "Long prompts take longer: compare like with like before blaming a backend.",
            [
                (
                    "histogram_quantile(0.95, sum by (le, prompt_length) "
                    f"(rate(extproc_request_duration_seconds_bucket{{{B}}}[{RI}])))",
                    "{{prompt_length}}",
                )
            ],
            unit="s",
        ),
        series(
            "Gateway processing time p99 by phase",
            "The gateway's own time per ext_proc message (Envoy's message_timeout applies to each).",
            [
                (
                    f"histogram_quantile(0.99, sum by (le, phase) (rate(extproc_processing_seconds_bucket[{RI}])))",
                    "{{phase}}",
                )
            ],
            unit="s",
        ),
    ]

    tokens = [
        series(
            "Tokens in and out",
            "Settled usage counted by the gateway (prompt = in, completion = out); dashed: vLLM's own counters "
            "for the same backends (they also count traffic that bypasses the gateway).",
            [
                (f"sum by (type) (rate(extproc_tokens_total{{{BT}}}[{RI}]))", "{{type}} (gateway)"),
                (f"sum(rate(vllm:prompt_tokens_total{{{B}}}[{RI}]))", "prompt (vLLM)"),
                (f"sum(rate(vllm:generation_tokens_total{{{B}}}[{RI}]))", "completion (vLLM)"),
            ],
            unit="suffix: tok/s",
            dashed=".*[(]vLLM[)]",
        ),
        series(
            "Tokens per tenant",
            "Settled tokens per tenant and type.",
            [(f"sum by (tenant, type) (rate(extproc_tokens_total{{{BT}}}[{RI}]))", "{{tenant}} {{type}}")],
            unit="suffix: tok/s",
            stacked=True,
        ),
        series(
            "Requests per tenant",
            "Decided requests per tenant; dashed: the part refused by the tenant's rate limits or budgets.",
            [
                (f"sum by (tenant) (rate(extproc_requests_total{{{BT}}}[{RI}]))", "{{tenant}}"),
                (
                    f'sum by (tenant) (rate(extproc_requests_total{{{BT}, outcome=~"rate_limited|quota_exhausted"}}'
                    f"[{RI}]))",
                    "{{tenant}} limited",
                ),
            ],
            unit="reqps",
            dashed=".* limited",
        ),
        series(
            "Errors per tenant",
            f"Server-side errors ({SERVER_ERRORS}) per tenant: is one tenant's traffic hitting a bad backend?",
            [
                (
                    f'sum by (tenant) (rate(extproc_requests_total{{{BT}, outcome=~"{SERVER_ERRORS}"}}[{RI}]))',
                    "{{tenant}}",
                )
            ],
            unit="reqps",
        ),
        tenant_table(),
    ]

    load = [
        series(
            "In flight (gateway) and running (vLLM)",
            "Requests admitted to each backend and not finished (summed over gateway replicas) and vLLM's "
            "running requests as the gateway last scraped them (max over replicas: each holds the same figure).",
            [
                (f"sum by (backend) (extproc_in_flight_requests{{{B}}})", "in flight {{backend}}"),
                (f"max by (backend) (extproc_backend_running_requests{{{B}}})", "vLLM running {{backend}}"),
            ],
        ),
        series(
            "Queue depth",
            "The gateway's admission queue per backend and class (summed over replicas), vLLM's waiting "
            "requests as the gateway scraped them (max over replicas), and vLLM's own series when Prometheus "
            "scrapes the pods too.",
            [
                (
                    f"sum by (backend, class) (extproc_admission_queue_length{{{B}}})",
                    "admission queue {{backend}} {{class}}",
                ),
                (f"max by (backend) (extproc_backend_waiting_requests{{{B}}})", "vLLM waiting {{backend}}"),
                (f"sum by (backend) (vllm:num_requests_waiting{{{B}}})", "vLLM waiting (direct) {{backend}}"),
            ],
        ),
        series(
            "GPU KV-cache use",
            "Mean KV-cache use over each backend's pods as the gateway sees it, and the fullest pod from vLLM's "
            "own series (0-1).",
            [
                (f"max by (backend) (extproc_backend_kv_cache_usage_ratio{{{B}}})", "mean over pods {{backend}}"),
                (f"max by (backend) (vllm:kv_cache_usage_perc{{{B}}})", "fullest pod {{backend}}"),
            ],
            unit="percentunit",
            max_value=1,
        ),
        series(
            "Shed and queued traffic",
            "Requests shed (429 `shed` for batch and experimental, 503 for interactive) per backend and class, "
            "with the admission queue length on the right axis.",
            [
                (
                    f'sum by (backend, class) (rate(extproc_requests_total{{{BT}, outcome="shed"}}[{RI}]))',
                    "shed {{backend}} {{class}}",
                ),
                (
                    f"sum by (backend, class) (extproc_admission_queue_length{{{B}}})",
                    "queued {{backend}} {{class}}",
                ),
            ],
            unit="reqps",
            right_axis=("queued .*", "short"),
        ),
    ]

    kubernetes = [
        series(
            "OOM kills",
            "Container restarts whose last termination was OOMKilled (bars), and the containers whose last "
            "termination is OOMKilled (kube-state-metrics).",
            [
                (
                    f"sum by (namespace, pod, container) (increase(kube_pod_container_status_restarts_total{{{POD}}}"
                    f"[{RI}]) and on (namespace, pod, container) "
                    f'(kube_pod_container_status_last_terminated_reason{{{POD}, reason="OOMKilled"}} == 1))',
                    "OOM restart {{namespace}}/{{pod}}/{{container}}",
                ),
                (
                    "max by (namespace, pod, container) "
                    f'(kube_pod_container_status_last_terminated_reason{{{POD}, reason="OOMKilled"}})',
                    "last termination OOMKilled {{namespace}}/{{pod}}/{{container}}",
                ),
            ],
            bars=True,
        ),
        series(
            "Container restarts",
            "Restarts per container (any reason).",
            [
                (
                    f"sum by (namespace, pod, container) (increase(kube_pod_container_status_restarts_total{{{POD}}}"
                    f"[{RI}]))",
                    "{{namespace}}/{{pod}}/{{container}}",
                )
            ],
            bars=True,
        ),
        series(
            "Model load time",
            "Time from the last container start to all containers ready: vLLM's model load and warm-up "
            "(kube_pod_status_container_ready_time - kube_pod_container_state_started); and pod start to pod "
            "ready, which adds scheduling, image pull and init containers (after a container restart it also "
            "spans the time before the restart). A negative value: a container restarted and the pod is not "
            "ready again yet.",
            [
                (
                    f"max by (namespace, pod) (kube_pod_status_container_ready_time{{{POD}}}) "
                    f"- max by (namespace, pod) (kube_pod_container_state_started{{{POD}}})",
                    "container start to ready {{namespace}}/{{pod}}",
                ),
                (
                    f"max by (namespace, pod) (kube_pod_status_ready_time{{{POD}}}) "
                    f"- max by (namespace, pod) (kube_pod_start_time{{{POD}}})",
                    "pod start to ready {{namespace}}/{{pod}}",
                ),
            ],
            unit="s",
            width=24,
        ),
    ]

    policy = [
        series(
            "Policy reloads",
            "Reloads per result; on `refused` the last good policy stays in force.",
            [(f"sum by (result) (increase(extproc_policy_reloads_total[{RI}]))", "{{result}}")],
            bars=True,
            width=8,
        ),
        series(
            "Replicas per policy digest",
            "How many gateway replicas run each policy digest: more than one line for long means replicas "
            "disagree (a refused reload on some of them).",
            [("count by (digest) (extproc_policy_info == 1)", "{{digest}}")],
            width=8,
        ),
        series(
            "Quota store",
            "Replicas on the failure mode, failed store calls by operation, and admissions decided by "
            "per-process limits while the store was unreachable.",
            [
                ("count(extproc_quota_store_degraded > 0) or vector(0)", "replicas degraded"),
                (f"sum by (operation) (rate(extproc_quota_store_errors_total[{RI}]))", "store errors/s {{operation}}"),
                (f"sum(rate(extproc_quota_fail_open_admissions_total[{RI}]))", "fail-open admissions/s"),
            ],
            width=8,
        ),
        series(
            "Quota settlements",
            "Settlements held in memory until the store returns, and settlements given up (usage lost).",
            [
                ("sum(extproc_quota_pending_settlements)", "pending"),
                (f"sum(increase(extproc_quota_dropped_settlements_total[{RI}]))", "dropped"),
            ],
            width=24,
        ),
    ]

    def by_version(metric: str, selector: str) -> str:
        return f"sum by (backend, version) (rate({metric}{{{B}{selector}}}[{RI}]))"

    upstream = "extproc_upstream_responses_total"
    json_mode = "extproc_json_mode_responses_total"
    tool_calls = "extproc_tool_call_arguments_total"
    valid = ', result="valid"'
    rollout = [
        series(
            "Traffic by version",
            "Upstream responses per backend and served version: the canary's share of the traffic.",
            [(by_version(upstream, ""), "{{backend}} {{version}}")],
            unit="reqps",
        ),
        series(
            "Upstream error ratio by version",
            "5xx over all upstream responses (Envoy's own 503/504 replies included), per backend and version. "
            "A stream the upstream cuts short is not here: the gateway counts it as outcome `cancelled`.",
            [
                (
                    by_version(upstream, ', status_class="5xx"') + " / " + by_version(upstream, ""),
                    "{{backend}} {{version}}",
                )
            ],
            unit="percentunit",
        ),
        series(
            "Time to first token p95 by version",
            "Streams only.",
            [
                (
                    "histogram_quantile(0.95, sum by (le, backend, version) "
                    f"(rate(extproc_time_to_first_token_seconds_bucket{{{B}}}[{RI}])))",
                    "{{backend}} {{version}}",
                )
            ],
            unit="s",
        ),
        series(
            "Request latency p95 by version",
            "Request headers to response end.",
            [
                (
                    "histogram_quantile(0.95, sum by (le, backend, version) "
                    f"(rate(extproc_request_duration_seconds_bucket{{{B}}}[{RI}])))",
                    "{{backend}} {{version}}",
                )
            ],
            unit="s",
        ),
        series(
            "JSON-mode validity by version",
            "JSON-mode responses whose content parsed as JSON, over all JSON-mode responses (truncated ones "
            "count as not valid).",
            [
                (
                    by_version(json_mode, valid) + " / " + by_version(json_mode, ""),
                    "{{backend}} {{version}}",
                )
            ],
            unit="percentunit",
            max_value=1,
        ),
        series(
            "Tool-call argument validity by version",
            "Tool calls whose `arguments` parsed as JSON, over all tool calls.",
            [
                (
                    by_version(tool_calls, valid) + " / " + by_version(tool_calls, ""),
                    "{{backend}} {{version}}",
                )
            ],
            unit="percentunit",
            max_value=1,
        ),
        series(
            "Finish reasons by version",
            "Share of choices per finish reason, per backend and version: a canary that hits `length` or "
            "`abort` more often than stable is worse even with no errors.",
            [
                (
                    f"sum by (backend, version, reason) (rate(extproc_finish_reasons_total{{{B}}}[{RI}])) "
                    "/ on (backend, version) group_left "
                    f"sum by (backend, version) (rate(extproc_finish_reasons_total{{{B}}}[{RI}]))",
                    "{{backend}} {{version}} {{reason}}",
                )
            ],
            unit="percentunit",
            max_value=1,
            width=24,
        ),
    ]

    return [
        ("Overview", overview),
        ("Traffic", traffic),
        ("Latency", latency),
        ("Tokens and tenants", tokens),
        ("Load and queueing", load),
        ("Kubernetes: vLLM pods (kube-state-metrics)", kubernetes),
        ("Policy and quota store", policy),
        ("Rollout: versions per backend", rollout),
    ]


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    builder = (
        dash.Dashboard("extproc: LLM gateway")
        .uid(UID)
        .description("The extproc gateway (Envoy ext_proc) in front of vLLM: traffic, latency, tokens, load, rollouts.")
        .tags(["extproc", "llm", "vllm"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .variables(variables())
        .annotation(
            dash.AnnotationQuery()
            .name("Policy reloads")
            .datasource(DATASOURCE)
            .enable(True)
            .hide(False)
            .icon_color("blue")
            .expr("sum by (result) (increase(extproc_policy_reloads_total[2m])) > 0")
        )
    )
    panel_id = 0
    for title, row_panels in panels():
        panel_id += 1
        builder = builder.with_row(dash.Row(title).id(panel_id).collapsed(False))
        for panel in row_panels:
            panel_id += 1
            builder = builder.with_panel(panel.id(panel_id))
    # Round-trip through the SDK's encoder to get plain JSON types.
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write (default {OUTPUT})")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python observability/dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
