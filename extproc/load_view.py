"""What a request sees of the backends' load: the scraper's figures, taken at most every 50 ms.

Every request body reads the load view before it is decided, so it is compiled with the hot path
(`COMPILED_MODULES`); the scraper itself (`extproc.load`) runs twice a second and is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeAlias

from extproc.load import BackendLoad, LoadScraper

__all__ = ["CachedLoads", "LoadView"]

# Called once per request body: the latest figure per backend, an input to the decision.
LoadView: TypeAlias = Callable[[], Mapping[str, BackendLoad]]


class CachedLoads:
    """The scraper's snapshot, rebuilt at most every `max_age_s` rather than per request."""

    def __init__(self, scraper: LoadScraper, max_age_s: float = 0.05) -> None:
        self.scraper = scraper
        self.max_age_s = max_age_s
        self._at = -1.0
        self._snapshot: dict[str, BackendLoad] = {}

    def __call__(self) -> dict[str, BackendLoad]:
        now = time.monotonic()
        if now - self._at > self.max_age_s:
            self._snapshot = self.scraper.snapshot()
            self._at = now
        return self._snapshot
