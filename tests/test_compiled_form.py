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
