"""What the gateway reports about its work, as plain data, and the one interface it reports through.

The places where things happen (the adapter, the quota service, the resilient store, the load
scraper, the admission queue, the policy watcher) are handed a `Recorder` and call it; they never
import a metrics module. `RequestRecord` is everything learned about one request: the access-log
line and the per-request metrics are both derived from it, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from extproc.codes import Outcome

MAX_PHASE_TIMES = 16


@dataclass(slots=True, init=False)
class RequestRecord:
    """One request, filled in as the stream goes; complete once `outcome` is set."""

    started: float  # time.perf_counter() at the request headers
    started_unix: float  # the same moment on the wall clock, for the log
    request_id: str | None
    endpoint: str | None  # chat, completions, embeddings, models
    tenant: str | None  # a policy tenant's name, or None (no tenants, or not identified)
    tier: str | None
    key: str | None  # the API key's name in the policy (never the key)
    requested_class: str | None  # what the client asked for with x-llm-class, if a known class
    traffic_class: str  # the effective class
    quality: str | None
    requested_model: str | None  # as the client wrote it, cut to 128 characters (never a label)
    model: str | None  # the canonical public name
    served_model: str | None  # the name the backend serves
    backend: str | None
    routed_backend: str | None  # the rules' pick, before any fallback
    rule: str | None
    version: str | None  # what served it, from the upstream's response
    json_mode: bool
    tools: bool
    messages: int
    requested_completion: int | None  # max_tokens as the client sent it
    counted_prompt_tokens: int  # the gateway's own count, what it decided on
    prompt_tokens: int  # settled usage (the upstream's report, else the count; 0 if nothing was served)
    completion_cap: int
    completion_tokens: int
    usage: str  # reported, estimated or none
    stream: bool
    status: int  # the status the client got (ours or the upstream's); 0: none
    code: str | None  # the error code of a refusal
    outcome: Outcome | None
    refused: bool  # the gateway refused it itself
    queue_s: float
    ttft_s: float | None
    duration_s: float
    json_result: str | None  # valid, invalid, truncated (JSON-mode responses)
    tool_calls_valid: int
    tool_calls_invalid: int
    finish_reasons: list[str]
    notes: Sequence[str]
    prompt_text: str | None  # only with the access log's debug switch on
    # The gateway's own time per ext_proc message (and per step of the body's decision), reported
    # to the recorder with the request rather than each on its message's path; at most
    # MAX_PHASE_TIMES wait here, a long stream's later ones are reported at once.
    phase_times: list[tuple[str, float]]

    # Written out, not generated: see extproc/compiled_form.py. Everything but when it began and
    # its id is learned later, so starts at its default here.
    def __init__(self, started: float, started_unix: float, request_id: str | None = None) -> None:
        self.started = started
        self.started_unix = started_unix
        self.request_id = request_id
        self.endpoint = None
        self.tenant = None
        self.tier = None
        self.key = None
        self.requested_class = None
        self.traffic_class = "interactive"
        self.quality = None
        self.requested_model = None
        self.model = None
        self.served_model = None
        self.backend = None
        self.routed_backend = None
        self.rule = None
        self.version = None
        self.json_mode = False
        self.tools = False
        self.messages = 0
        self.requested_completion = None
        self.counted_prompt_tokens = 0
        self.prompt_tokens = 0
        self.completion_cap = 0
        self.completion_tokens = 0
        self.usage = "none"
        self.stream = False
        self.status = 0
        self.code = None
        self.outcome = None
        self.refused = False
        self.queue_s = 0.0
        self.ttft_s = None
        self.duration_s = 0.0
        self.json_result = None
        self.tool_calls_valid = 0
        self.tool_calls_invalid = 0
        self.finish_reasons = []
        self.notes = ()
        self.prompt_text = None
        self.phase_times = []

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
