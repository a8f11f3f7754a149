"""setuptools' build backend, asking for mypy (mypyc) only when the compiled form is built."""

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403

MYPY = "mypy==2.4.1"


def _compiling() -> list[str]:
    return [MYPY] if os.environ.get("EXTPROC_COMPILE") == "1" else []


def get_requires_for_build_wheel(config_settings=None):  # type: ignore[no-untyped-def]
    return _setuptools.get_requires_for_build_wheel(config_settings) + _compiling()


def get_requires_for_build_editable(config_settings=None):  # type: ignore[no-untyped-def]
    return _setuptools.get_requires_for_build_editable(config_settings) + _compiling()
