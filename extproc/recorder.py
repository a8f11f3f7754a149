"""What the gateway reports about its work, as plain data, and the one interface it reports through.

The places where things happen (the adapter, the quota service, the resilient store, the load
scraper, the admission queue, the policy watcher) are handed a `Recorder` and call it; they never
import a metrics module. `RequestRecord` is everything learned about one request: the access-log
line and the per-request metrics are both derived from it, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr

from extproc.codes import Outcome

MAX_PHASE_TIMES = 16


@dataclass(slots=True)
class RequestRecord:
    """One request, filled in as the stream goes; complete once `outcome` is set."""

    started: float  # time.perf_counter() at the request headers
    started_unix: float  # the same moment on the wall clock, for the log
    request_id: str | None = None
    endpoint: str | None = None  # chat, completions, embeddings, models
    tenant: str | None = None  # a policy tenant's name, or None (no tenants, or not identified)
    tier: str | None = None
    key: str | None = None  # the API key's name in the policy (never the key)
    requested_class: str | None = None  # what the client asked for with x-llm-class, if a known class
    traffic_class: str = "interactive"  # the effective class
    quality: str | None = None
    requested_model: str | None = None  # as the client wrote it, cut to 128 characters (never a label)
    model: str | None = None  # the canonical public name
    served_model: str | None = None  # the name the backend serves
    backend: str | None = None
    routed_backend: str | None = None  # the rules' pick, before any fallback
    rule: str | None = None
    version: str | None = None  # what served it, from the upstream's response
    json_mode: bool = False
    tools: bool = False
    messages: int = 0
    requested_completion: int | None = None  # max_tokens as the client sent it
    counted_prompt_tokens: int = 0  # the gateway's own count, what it decided on
    prompt_tokens: int = 0  # settled usage (the upstream's report, else the count; 0 if nothing was served)
    completion_cap: int = 0
    completion_tokens: int = 0
    usage: str = "none"  # reported, estimated or none
    stream: bool = False
    status: int = 0  # the status the client got (ours or the upstream's); 0: none
    code: str | None = None  # the error code of a refusal
    outcome: Outcome | None = None
    refused: bool = False  # the gateway refused it itself
    queue_s: float = 0.0
    ttft_s: float | None = None
    duration_s: float = 0.0
    json_result: str | None = None  # valid, invalid, truncated (JSON-mode responses)
    tool_calls_valid: int = 0
    tool_calls_invalid: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    notes: Sequence[str] = ()
    prompt_text: str | None = None  # only with the access log's debug switch on
    # The gateway's own time per ext_proc message (and per step of the body's decision), reported
    # to the recorder with the request rather than each on its message's path; at most
    # MAX_PHASE_TIMES wait here, a long stream's later ones are reported at once.
    phase_times: list[tuple[str, float]] = field(default_factory=list)

    @property
    def fallback(self) -> bool:
        return self.routed_backend is not None and self.backend != self.routed_backend


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
class Recorder:
    """The events the gateway reports. This base records nothing: tools and tests use it as is."""

    def request_done(self, record: RequestRecord) -> None:
        """A request is over (served, refused, or cut short): once per request."""

    def cut_stream(self, reported: str) -> None:
        """A response cut short, and the outcome Envoy reported for it (`none`: no report in time)."""

    def phase_time(self, phase: str, seconds: float) -> None:
        """The gateway's own time on one ext_proc message (or on the quota round trip)."""

    def policy_loaded(self, digest: str, backends: Iterable[str] = ()) -> None:
        """A policy is in force: its digest, and its backends (their per-backend series start at 0)."""

    def policy_reload(self, ok: bool) -> None: ...

    def store_error(self, operation: str) -> None:
        """A call to the shared quota store failed (`admit` or `settle`)."""

    def store_degraded(self, degraded: bool) -> None: ...

    def fail_open_admission(self) -> None: ...

    def settlements_pending(self, count: int) -> None: ...

    def settlements_dropped(self, count: int) -> None: ...

    def queue_length(self, backend: str, traffic_class: str, length: int) -> None:
        """Requests waiting in this process's admission queue for `backend` in that class."""

    def backend_load(self, backend: str, waiting: float | None, running: float | None, kv_cache: float | None) -> None:
        """The latest scraped figures of one backend, summed (waiting, running) or averaged (KV) over its pods."""


NULL_RECORDER = Recorder()
