"""The benchmark's arithmetic: ratios within rounds, the targets table, the in-process figure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from extproc_dev import bench
from extproc_dev.bench import GATEWAY, NULL, Report, Round, Saturation, Settings, WrkResult, paired_ratio, targets


def saturation(config: bench.Config, rates: list[float]) -> Saturation:
    rounds = [Round(WrkResult(int(rate * 8), 8.0, 0, 1.0, 2.0), 1.0, 1.0, 1.0, 1, 2, 0.0, {}) for rate in rates]
    return Saturation(config, rounds)


def test_ratios_are_taken_within_each_round() -> None:
    # The machine slows down over the run: per-round ratios see 0.8 every time; medians of each
    # config's own rounds would compare B's fast round with C's slow one.
    sat = {"B": saturation(NULL, [2000, 1000, 1500]), "C": saturation(GATEWAY, [1600, 800, 1200])}
    assert paired_ratio(sat, "C", "B") == pytest.approx(0.8)
    assert math.isnan(paired_ratio(sat, "C", "A"))


def test_throughput_target_uses_the_paired_ratio() -> None:
    report = Report(Settings())
    report.saturation = {"B": saturation(NULL, [2000, 1000, 1500]), "C": saturation(GATEWAY, [1700, 850, 1000])}
    (row,) = [t for t in targets(report) if t[0].startswith("throughput C ")]
    assert row == ("throughput C ≥ 0.9x B", "0.85x [0.67-0.85]", False)
    report.saturation["C"] = saturation(GATEWAY, [1900, 950, 1300])
    (row,) = [t for t in targets(report) if t[0].startswith("throughput C ")]
    assert row == ("throughput C ≥ 0.9x B", "0.95x [0.87-0.95]", True)


def test_redis_litellm_and_in_process_targets_have_their_own_bars() -> None:
    report = Report(Settings())
    report.saturation = {
        "B": saturation(NULL, [2000, 2000]),
        "C": saturation(GATEWAY, [1800, 1800]),
        "C-redis": saturation(bench.GATEWAY_REDIS, [1620, 1620]),
        "L": saturation(bench.LITELLM, [80, 100]),
    }
    runs = {
        "before": bench.InProcessRun("baseline", "python", bench.InProcess(80, [80]), bench.InProcess(120, [120])),
        "mypyc": bench.InProcessRun("this", "mypyc", bench.InProcess(35, [35]), bench.InProcess(55, [55])),
    }
    report.in_process_runs, report.form = runs, "mypyc"
    found = {name: (measured, ok) for name, measured, ok in targets(report)}
    assert found["throughput C-redis ≥ 0.8x B, quotas in Redis"] == ("0.81x [0.81-0.81]", True)
    assert found["throughput C ≥ 20x LiteLLM's proxy (L), one worker each"] == ("20.25x [18.00-22.50]", True)
    assert found["in-process cost per request (mypyc, recorded) ≤ 0.5x the baseline's"] == ("0.46x", True)


def test_plots_are_drawn_beside_the_report(tmp_path: Path) -> None:
    from extproc_dev.bench_plots import draw_plots

    report = Report(Settings(rounds=2))
    report.saturation = {"B": saturation(NULL, [2000, 1900]), "C": saturation(GATEWAY, [1800, 1700])}
    report.rate = {"C": bench.RateResult(GATEWAY, 10, 10, 100.0, [1.0, 2.0, 3.0, 9.0], 0.1)}
    report.rate_rps = 100
    report.in_process_runs = {
        "python": bench.InProcessRun("this", "python", bench.InProcess(70, [70]), bench.InProcess(80, [80]))
    }
    plots = draw_plots(report, tmp_path, "RESULTS")
    assert [name for _, name in plots] == ["RESULTS-throughput.png", "RESULTS-latency.png", "RESULTS-in-process.png"]
    for _, name in plots:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    report.plots = plots
    assert "![Throughput at saturation" in bench.render(report, "extproc bench")


def test_in_process_cost_of_one_request_is_measured(tmp_path: Path) -> None:
    policy = bench.bench_policy(tmp_path)
    cost = bench.measure_in_process(Settings(), policy, batch=50, batches=3)
    assert len(cost.batches) == 3
    assert 0 < cost.microseconds < 10_000


def busy_saturation(config: bench.Config, rates: list[float], busy: float) -> Saturation:
    rounds = [
        Round(WrkResult(int(rate * 8), 8.0, 0, 1.0, 2.0), 1.0, 1.0, 1.0, int(100 * busy), 100, 0.0, {})
        for rate in rates
    ]
    return Saturation(config, rounds)


def test_worker_scaling_is_judged_only_where_a_core_is_left_idle() -> None:
    report = Report(Settings())
    report.saturation = {
        "C": busy_saturation(GATEWAY, [1000, 1000], busy=0.95),
        "C-2w": busy_saturation(bench.GATEWAY_2W, [1050, 1000], busy=0.99),
    }
    (row,) = [t for t in targets(report) if t[0].startswith("2 workers")]
    assert row[2] is None and "95% busy" in row[1]

    report.saturation["C"] = busy_saturation(GATEWAY, [1000, 1000], busy=0.6)
    (row,) = [t for t in targets(report) if t[0].startswith("2 workers")]
    assert row[1:] == ("1.02x", False)


def test_recorded_replies_carry_the_gateway_decisions(tmp_path: Path) -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc_dev.null_processor import dump_replies, load_replies

    replies = bench.record_gateway_replies(bench.bench_policy(tmp_path), bench.chat_body(8))
    assert set(replies) == {"request_headers", "request_body", "response_headers", "response_body"}
    path = tmp_path / "replies.json"
    dump_replies(replies, path)
    loaded = load_replies(path)
    body = pb.ProcessingResponse.FromString(loaded["request_body"]).request_body.response
    assert body.clear_route_cache and body.body_mutation.body
    assert "x-llm-backend" in {h.header.key for h in body.header_mutation.set_headers}
    headers = pb.ProcessingResponse.FromString(loaded["response_headers"]).response_headers.response
    assert "x-ratelimit-remaining-requests" in {h.header.key for h in headers.header_mutation.set_headers}

    swapped = {"request_body": replies["response_headers"], "response_headers": replies["request_body"]}
    dump_replies(swapped, path)
    with pytest.raises(ValueError, match="answers another message"):
        load_replies(path)


def routing_cost(cleared_us: float) -> bench.RoutingCost:
    cases = [
        bench.RuleCase("no rule matches", "default", 5, 0.6, 2.5),
        bench.RuleCase("the last rule", "free-short-chat", 6, 0.35, cleared_us),
    ]
    return bench.RoutingCost(20, cases, 10.8, "default", 10.5, 5, 130, 20_000, 2_000, 7)


def test_report_renders_the_routing_rules_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "machine_description", lambda: [])
    monkeypatch.setattr(bench, "source_revision", lambda: "git test")
    report = Report(Settings())
    assert "## Routing rules" not in bench.render(report, "extproc bench")
    assert not [t for t in targets(report) if t[0].startswith("routing rules")]

    report.routing = routing_cost(cleared_us=6.0)
    text = bench.render(report, "extproc bench")
    assert text.index("## Routing rules") < text.index("## Targets")
    assert "| no rule matches | `default` | 5 | 0.60 | 2.50 | PASS / PASS |" in text
    assert "| the last rule | `free-short-chat` | 6 | 0.35 | 6.00 | PASS / FAIL |" in text
    assert "**10.8 µs** with the 20-rule policy, **10.5 µs** with the example policy (5 rules)" in text
    assert "| routing rules: evaluate ≤ 5 µs/request, 20 rules (memo hit) | 0.60 µs | PASS |" in text
    assert "| routing rules: evaluate ≤ 5 µs/request, 20 rules (memo cleared, worst case) | 6.00 µs | FAIL |" in text


def test_report_names_the_revision_read_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # The run's plots rewrite tracked files: read at render time, every report would say "uncommitted".
    monkeypatch.setattr(bench, "machine_description", lambda: [])
    monkeypatch.setattr(bench, "source_revision", lambda: "git abc1234 with uncommitted changes")
    report = Report(Settings(), revision="git abc1234")
    assert "- code: git abc1234\n" in bench.render(report, "extproc bench")


def test_rules_benchmark_requests_take_the_rules_it_says() -> None:
    from extproc.routing import shadowed_rules

    policy = bench.routing_rules_policy()
    assert len(policy.routing.rules) == 20 and not shadowed_rules(policy)
    cost = bench.measure_routing(Settings(rule_loops=10, rule_decision_loops=10, rule_repeats=1))
    assert [(c.rule, c.candidates) for c in cost.cases] == [("default", 5), ("free-short-chat", 6)]
    assert cost.rules == 20 and cost.decision_rule == "default"
    assert all(c.hit_us > 0 and c.cleared_us > 0 for c in cost.cases) and cost.decision_us > 0


def test_a_baseline_must_be_an_extproc_checkout(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not an extproc checkout"):
        bench.baseline_config(tmp_path, tmp_path)
