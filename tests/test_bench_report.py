"""The benchmark's arithmetic: ratios within rounds, the targets table, the in-process figure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from extproc import bench
from extproc.bench import GATEWAY, NULL, Report, Round, Saturation, Settings, WrkResult, paired_ratio, targets


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
    assert row == ("throughput C ≥ 0.8x B", "0.85x", True)


def test_in_process_cost_of_one_request_is_measured(tmp_path: Path) -> None:
    policy = bench.bench_policy(tmp_path)
    cost = bench.measure_in_process(Settings(), policy, batch=50, batches=3)
    assert len(cost.batches) == 3
    assert 0 < cost.microseconds < 10_000
