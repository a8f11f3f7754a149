"""The benchmark's figures as PNG files beside its report (matplotlib, no display needed).

`draw_plots` returns (caption, file name) pairs; `bench.render` embeds them in the markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc_dev.bench import Report

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def draw_plots(report: Report, directory: Path, stem: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    directory.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[str, str]] = []
    for caption, suffix, draw in (
        ("Throughput at saturation per row (median of rounds, whiskers: range)", "throughput", _throughput),
        (f"Open-loop latency percentiles at {report.rate_rps:g} req/s", "latency", _latency),
        ("In-process CPU per request, before and after", "in-process", _in_process),
    ):
        name = f"{stem}-{suffix}.png"
        if draw(report, directory / name):
            drawn.append((caption, name))
    return drawn


def _throughput(report: Report, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [(key, sat) for key, sat in report.saturation.items() if sat.rounds]
    if not rows:
        return False
    keys = [key for key, _ in rows]
    medians = [sat.rps for _, sat in rows]
    lows = [m - min(r.wrk.rps for r in sat.rounds) for m, (_, sat) in zip(medians, rows, strict=True)]
    highs = [max(r.wrk.rps for r in sat.rounds) - m for m, (_, sat) in zip(medians, rows, strict=True)]
    colours = [_colour(key) for key in keys]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(keys) + 1.6))
    positions = list(range(len(keys)))[::-1]
    ax.barh(positions, medians, xerr=[lows, highs], color=colours, capsize=3)
    ax.set_yticks(positions, [f"{key}  {sat.config.label}" for key, sat in rows], fontsize=8)
    null = report.saturation.get("B")
    if null is not None and null.rounds:
        from extproc_dev.bench import TARGET_THROUGHPUT_RATIO

        ax.axvline(null.rps, color="grey", linestyle=":", linewidth=1)
        ax.axvline(TARGET_THROUGHPUT_RATIO * null.rps, color="tab:red", linestyle="--", linewidth=1)
        ax.text(TARGET_THROUGHPUT_RATIO * null.rps, positions[0] + 0.6, f" {TARGET_THROUGHPUT_RATIO}x B", fontsize=8)
    for y, value in zip(positions, medians, strict=True):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("requests per second (wrk, 32 connections)")
    ax.set_title(f"Throughput at saturation, {report.settings.rounds} interleaved rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _latency(report: Report, path: Path) -> bool:
    import matplotlib.pyplot as plt

    from extproc_dev.bench import percentile

    rows = [(key, r) for key, r in report.rate.items() if r.latencies_ms]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(rows)
    for index, (key, result) in enumerate(rows):
        values = [percentile(result.latencies_ms, q) for q in PERCENTILES]
        xs = [i + index * width for i in range(len(PERCENTILES))]
        ax.bar(xs, values, width=width, label=f"{key} {result.config.label}", color=_colour(key))
        for x, value in zip(xs, values, strict=True):
            ax.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(PERCENTILES))], [f"p{q:g}" for q in PERCENTILES])
    ax.set_yscale("log")
    ax.set_ylabel("ms from the scheduled send (log scale)")
    ax.set_title(f"Open-loop latency at {report.rate_rps:g} req/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _in_process(report: Report, path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = list(report.in_process_runs.values())
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(runs)))
    bare = [r.bare.microseconds for r in runs]
    recorded = [r.recorded.microseconds for r in runs]
    ax.bar([x - 0.2 for x in xs], bare, width=0.4, label="bare", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], recorded, width=0.4, label="recorded (metrics + access log)", color="tab:orange")
    for x, b, r in zip(xs, bare, recorded, strict=True):
        ax.text(x - 0.2, b, f"{b:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, r, f"{r:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [f"{r.label}\n({r.form})" for r in runs], fontsize=8)
    ax.set_ylabel("µs of CPU per request")
    ax.set_title("One request in process (no gRPC, no Envoy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _colour(key: str) -> str:
    if key == "A":
        return "tab:green"
    if key.startswith("B"):
        return "tab:grey"
    if key == "C":
        return "tab:blue"
    if key == "L":
        return "tab:purple"
    return "tab:cyan" if key.startswith("C") else "tab:olive"
