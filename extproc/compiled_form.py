"""Which form of the package is running: compiled with mypyc, or pure Python.

The per-request modules (`COMPILED_MODULES`) are compiled to C extensions with mypyc when the
package is built with `EXTPROC_COMPILE=1` (the image does); the same sources run as plain Python
anywhere else. `extproc --version` and the start-up log say which form is running.

Compiled code still runs the interpreter for whatever it calls that mypyc did not compile, and
with caches cold that costs more than the call itself (the bench's section 0, "cold"). So the
classes built on every request write their `__init__` out rather than let `@dataclass` generate
it (a generated method is interpreted Python, even in a compiled module), and are not frozen (a
frozen dataclass's own `__init__` could not assign its fields); enums looked up by hash derive
from `IdentityEnum`.
"""

from __future__ import annotations

import importlib
from enum import Enum
from typing import Final

# The hot path: every ext_proc message runs through these. Paths from the project root.
COMPILED_MODULES: Final = (
    "extproc/processor.py",
    "extproc/core.py",
    "extproc/compiled.py",
    "extproc/wire.py",
    "extproc/endpoints.py",
    "extproc/identity.py",
    "extproc/routing.py",
    "extproc/sse.py",
    "extproc/signals.py",
    "extproc/recorder.py",
    "extproc/metrics.py",
    "extproc/access_log.py",
    "extproc/admission.py",
    "extproc/inflight.py",
    "extproc/load_view.py",
    "extproc/saturation.py",
    "extproc/errors.py",
    "extproc/codes.py",
    "extproc/tokenizer.py",
    "extproc/stream_ends.py",
    "extproc/quota/plan.py",
    "extproc/quota/memory.py",
    "extproc/quota/service.py",
    "extproc/quota/resilient.py",
    "extproc/quota/redis_store.py",
    "extproc/quota/resp.py",
    "extproc/quota/store.py",
)


class IdentityEnum(Enum):
    """An Enum hashed by identity: Enum's own `__hash__` is Python code (the name's hash), called on
    every dict or set lookup; members are singletons compared by identity, so object's C hash agrees."""

    __hash__ = object.__hash__


def form() -> str:
    """`mypyc` when the hot path is compiled, `python` when it runs from source."""
    module = importlib.import_module("extproc.processor")
    return "mypyc" if (module.__file__ or "").endswith((".so", ".pyd")) else "python"
