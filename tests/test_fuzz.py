"""Run each atheris target in fuzz/ for a short, bounded number of runs (coverage-guided, seeded).

A run that finds a crash exits non-zero and leaves the input under pytest's tmp_path (its path is
in the failure message); a found crash becomes a fixed case in tests/test_properties.py.
Longer runs: EXTPROC_FUZZ_RUNS=500000 .venv/bin/pytest tests/test_fuzz.py (random seed then).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (coverage-guided fuzzing) is not installed: pip install atheris")

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = {"fuzz_request_body": "json.dict", "fuzz_sse": "sse.dict"}
SEEDS = {"fuzz_request_body": "request_body", "fuzz_sse": "sse"}
_LONG_RUNS = int(os.environ.get("EXTPROC_FUZZ_RUNS", "0"))
RUNS = _LONG_RUNS or 20_000  # a few seconds each on this machine (about 5,000 runs a second)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    # libFuzzer writes what it learns into the corpus directory: a copy, never the seeds themselves.
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "seeds" / SEEDS[target], corpus)
    argv = [
        sys.executable,
        str(FUZZ / f"{target}.py"),
        f"-atheris_runs={RUNS}",
        "-max_len=4096",
        f"-dict={FUZZ / TARGETS[target]}",
        f"-artifact_prefix={tmp_path}/",
        "-rss_limit_mb=2048",
        str(corpus),
    ]
    if not _LONG_RUNS:
        argv.insert(2, "-seed=1")  # the same inputs every CI run: a red build is a real finding
    result = subprocess.run(argv, capture_output=True, text=True, timeout=max(120, RUNS / 50), cwd=tmp_path)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-")))
    assert result.returncode == 0 and not crashes, (
        f"{target} failed (exit {result.returncode}); inputs kept in {tmp_path}: {crashes}\n{result.stderr[-4000:]}"
    )
    assert "Done" in result.stderr  # it really ran its runs
