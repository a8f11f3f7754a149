"""The compiled form (mypyc) and the pure-Python form: which one runs, and what gets compiled.

`scripts/test-compiled.sh` runs the whole suite against the compiled wheel's modules with
EXTPROC_EXPECT_FORM=mypyc; `scripts/test.sh` runs it from source (python)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

from extproc.compiled_form import COMPILED_MODULES, form

ROOT = Path(__file__).resolve().parents[1]


def test_the_form_running_is_the_one_under_test() -> None:
    expected = os.environ.get("EXTPROC_EXPECT_FORM", "python")
    assert form() == expected
    # The processes the integration tests start (extproc serve, the null ext_proc) run it too.
    printed = subprocess.run(
        [sys.executable, "-m", "extproc", "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert printed.strip().endswith(f"({expected})"), printed


def test_the_build_compiles_the_listed_modules_and_they_exist() -> None:
    build = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    assert build["compiled_modules"]() == list(COMPILED_MODULES)
    for path in COMPILED_MODULES:
        assert (ROOT / path).is_file(), path
    assert "extproc/processor.py" in COMPILED_MODULES  # what form() looks at


def test_no_compiled_function_reuses_an_exception_name_for_another_type() -> None:
    """mypyc gives an `except ... as name` one type per function: a second handler binding the same
    name to another exception type fails at run time (TypeError) in the compiled form only."""
    import ast

    found = []
    for path in COMPILED_MODULES:
        for function in ast.walk(ast.parse((ROOT / path).read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [f"{path}:{function.name}: {name}" for name, seen in types.items() if len(seen) > 1]
    assert found == []


def test_a_compiled_request_runs_no_interpreted_python_of_ours(tmp_path: Path) -> None:
    """With caches cold, every interpreted call drags the interpreter's code and data back in: the
    compiled form's request path calls none (a dataclass's generated __init__, a NamedTuple's
    __new__, Enum's __hash__ and a module left out of COMPILED_MODULES all are interpreted)."""
    import asyncio

    import pytest

    if form() != "mypyc":
        pytest.skip("the pure-Python form interprets everything (scripts/test-compiled.sh runs this)")
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.wire import to_wire
    from extproc_dev import bench

    policy = bench.load_policy(bench.bench_policy(tmp_path))
    messages = bench._exchange_messages(bench.chat_body(bench.Settings().max_tokens))
    interpreted: set[str] = set()

    def watch(frame: object, event: str, arg: object) -> None:
        if event == "call":
            code = frame.f_code  # type: ignore[attr-defined]
            if code.co_filename == __file__:
                return
            interpreted.add(f"{code.co_filename}:{code.co_name}")

    async def requests() -> None:
        # As section 0 of the bench drives them: the gateway wired as `extproc serve` wires it.
        harness = bench._harness(policy, str(tmp_path), recorded=True)
        # The scraper's snapshot is interpreted and rebuilt every 50 ms, not per request: keep the first.
        harness.loads.max_age_s = float("inf")
        for n in range(2):  # the first warms imports, caches and the quota planner
            if n == 1:
                sys.setprofile(watch)
            stream = harness.stream()
            for raw in messages:
                to_wire(await stream.handle(pb.ProcessingRequest.FromString(raw)))
            harness.finish(stream)
            harness.batch.flush()
            sys.setprofile(None)
        await harness.close()

    asyncio.run(requests())
    suspects = ("enum.py:__hash__", "tiktoken/core.py:encode_ordinary")
    ours = sorted(n for n in interpreted if "/extproc/" in n or n.startswith("<") or n.endswith(suspects))
    assert ours == []
