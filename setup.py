"""Build script: the metadata is in pyproject.toml; this adds the compiled form.

`EXTPROC_COMPILE=1` compiles `extproc.compiled_form.COMPILED_MODULES` with mypyc (the build backend
in `build_backend/` then asks for mypy); otherwise the wheel is pure Python.
"""

import ast
import os
import sys
from pathlib import Path

from setuptools import setup


def compiled_modules() -> list[str]:
    # Read, not imported: importing extproc would need its dependencies at build time.
    tree = ast.parse(Path(__file__).with_name("extproc").joinpath("compiled_form.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "COMPILED_MODULES":
            return list(ast.literal_eval(node.value))
    raise RuntimeError("COMPILED_MODULES not found in extproc/compiled_form.py")


if __name__ == "__main__":
    ext_modules = []
    if os.environ.get("EXTPROC_COMPILE") == "1":
        try:
            from mypyc.build import mypycify
        except ImportError:
            # Only while the backend asks what the build needs (mypy is not installed yet).
            if "egg_info" not in sys.argv:
                raise
        else:
            ext_modules = mypycify(compiled_modules(), opt_level="3")
    setup(ext_modules=ext_modules)
