"""The thin adapter: Envoy ext_proc messages in, core decisions out.

One gRPC stream is one HTTP request. `RequestStream` is its explicit state
machine; every message Envoy sends gets exactly one response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from functools import partial
from typing import TypeAlias

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc import codes, errors, names, wire
from extproc.access_log import DEBUG_PROMPT_BYTES, AccessLog
from extproc.admission import AdmissionQueue, Shed, Slot
from extproc.codes import Outcome
from extproc.compiled_form import IdentityEnum
from extproc.core import Admission, BodyMode, Gateway, NeedBody, Reply, ResponseWatcher
from extproc.endpoints import TRANSLATORS
from extproc.errors import GatewayError
from extproc.filter_contract import (
    CONTINUE_RESPONSE_HEADERS,
    MODE_OVERRIDES,
    NO_STREAM_END_REPORT,
    RESPONSE_HEADERS_WITH_MODE,
)
from extproc.load import BackendLoad
from extproc.load_view import LoadView
from extproc.quota.service import QuotaService, Reservation
from extproc.recorder import MAX_PHASE_TIMES, NULL_RECORDER, Recorder, RequestRecord
from extproc.routing import CLASS_PRIORITY
from extproc.saturation import queue_shed_error
from extproc.stream_ends import StreamEnds

log = logging.getLogger("extproc.request")

_Mode = processing_mode_pb2.ProcessingMode

# No load view wired (tests, tools): no figures for any backend, each taken as `load.unknown` says.
_NO_LOADS: Mapping[str, BackendLoad] = {}

# What a stream answers: serialized bytes on the hot paths (see wire.py), messages for rare replies.
Wire: TypeAlias = bytes | pb.ProcessingResponse

# Replies that carry no decision are serialized once.
_CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString()
_CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()
_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
_CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse()).SerializeToString()
_CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse()).SerializeToString()

# Non-inference traffic: no body, no response processing; Envoy stops calling us.
_PASSTHROUGH_MODE = _Mode(
    request_body_mode=_Mode.NONE,
    response_header_mode=_Mode.SKIP,
    response_body_mode=_Mode.NONE,
    request_trailer_mode=_Mode.SKIP,
    response_trailer_mode=_Mode.SKIP,
)
_PASSTHROUGH_OVERRIDE = wire.mode_override(_PASSTHROUGH_MODE)
_CONTINUE_PASSTHROUGH = _CONTINUE_REQUEST_HEADERS + _PASSTHROUGH_OVERRIDE

# Bodies from this size up are decided in a worker thread (the loop's default executor, a few
# threads): below it the hand-off costs more than the stall it saves (about 2 ms of counting).
OFFLOAD_BODY_BYTES = 32 * 1024

# Admitted requests of one caller and model get the same routing headers; only a rewritten
# body's content-length differs.
_ROUTING_MUTATIONS: dict[tuple[tuple[tuple[str, str], ...], tuple[str, ...]], bytes] = {}
_ROUTING_MUTATIONS_MAX = 4096


def _admitted_reply(admission: Admission) -> bytes:
    key = (tuple(admission.set_headers), tuple(admission.remove_headers))
    mutation = _ROUTING_MUTATIONS.get(key)
    if mutation is None:
        mutation = wire.header_mutation(admission.set_headers, admission.remove_headers)
        if len(_ROUTING_MUTATIONS) >= _ROUTING_MUTATIONS_MAX:
            _ROUTING_MUTATIONS.clear()
        _ROUTING_MUTATIONS[key] = mutation
    if admission.body is not None:
        mutation += wire.set_header(names.CONTENT_LENGTH, str(len(admission.body)))
    return wire.reply("request_body", mutation, body=admission.body, clear_route_cache=True)


def header_mutation(set_headers: Iterable[tuple[str, str]], remove: Iterable[str] = ()) -> pb.HeaderMutation:
    """A HeaderMutation message, for the rare replies built with the generated classes."""
    # Values travel in raw_value only: `value` alone yields an empty header, both are rejected.
    options = [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode())) for k, v in set_headers
    ]
    return pb.HeaderMutation(set_headers=options, remove_headers=remove)


def immediate(reply: Reply) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=reply.status),
            headers=header_mutation(reply.headers),
            body=reply.body,
            details=f"extproc_{reply.status}",
        )
    )


def _headers(message: pb.HttpHeaders, wanted: frozenset[str]) -> dict[str, str]:
    """The headers a decision may read, decoded; a mesh adds many more that nothing here reads."""
    headers = {}
    received = message.headers.headers
    # By index: upb's repeated fields have no iterator, so a `for` loop ends on an IndexError that
    # upb formats with printf, whose code is cold by then (once per headers message).
    for i in range(len(received)):
        header = received[i]
        key = header.key
        if key in wanted:
            headers[key] = header.raw_value.decode("utf-8", "replace")
    return headers


def _response_head(message: pb.HttpHeaders, version_header: str) -> tuple[int, str, str | None]:
    """The response headers the watcher and the record need, without decoding the others."""
    status, content_type, version = 0, "", None
    received = message.headers.headers
    for i in range(len(received)):  # by index: see _headers
        header = received[i]
        key = header.key
        if key == names.STATUS:
            value = header.raw_value
            status = int(value) if value.isdigit() else 0
        elif key == names.CONTENT_TYPE:
            content_type = header.raw_value.decode("latin-1")
        elif key == version_header:
            version = header.raw_value[:_MAX_VERSION_BYTES].decode("latin-1")
    return status, content_type, version


_MAX_VERSION_BYTES = 64


def version_from_attributes(request: pb.ProcessingRequest) -> str | None:
    """The served version from what Envoy knows of the upstream host (see names.VERSION_ATTRIBUTES)."""
    if names.ATTRIBUTES_NAMESPACE not in request.attributes:
        return None
    fields = request.attributes[names.ATTRIBUTES_NAMESPACE].fields
    workload = fields.get(names.WORKLOAD_ATTRIBUTE)
    if workload is not None:
        parts = workload.string_value.split(";")
        if len(parts) >= 4 and parts[3]:
            return parts[3][:_MAX_VERSION_BYTES]
    cluster = fields.get(names.CLUSTER_ATTRIBUTE)
    if cluster is not None:
        parts = cluster.string_value.split("|")
        if len(parts) == 4 and parts[0] == "outbound" and parts[2]:
            return parts[2][:_MAX_VERSION_BYTES]
    return None


def _internal_error(message: str) -> pb.ProcessingResponse:
    return immediate(Reply.from_error(errors.internal_error(message)))


class Phase(IdentityEnum):
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    UPSTREAM = "upstream"  # admitted, waiting for the response
    RESPONSE_BODY = "response_body"
    DONE = "done"


# Which phases take which message. Envoy sends request headers, the body we asked for, then the
# response headers and (when we switched it on) the response body; trailers are skipped but tolerated.
_ACCEPTS: dict[str, frozenset[Phase]] = {
    "request_headers": frozenset({Phase.REQUEST_HEADERS}),
    "request_body": frozenset({Phase.REQUEST_BODY}),
    "request_trailers": frozenset({Phase.REQUEST_BODY, Phase.UPSTREAM}),
    "response_headers": frozenset({Phase.UPSTREAM}),
    "response_body": frozenset({Phase.RESPONSE_BODY}),
    "response_trailers": frozenset({Phase.RESPONSE_BODY, Phase.DONE}),
}
_CONTINUE_BY_KIND: dict[str, bytes] = {
    "request_headers": _CONTINUE_REQUEST_HEADERS,
    "request_body": _CONTINUE_REQUEST_BODY,
    "request_trailers": _CONTINUE_REQUEST_TRAILERS,
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "response_body": _CONTINUE_RESPONSE_BODY,
    "response_trailers": _CONTINUE_RESPONSE_TRAILERS,
}


class RequestStream:
    """Per-request state: what has been seen, what was decided, what the response showed."""

    __slots__ = (
        "access_log",
        "admission",
        "batch",
        "gateway",
        "loads",
        "need",
        "phase",
        "queue",
        "quotas",
        "record",
        "recorder",
        "reservation",
        "slot",
        "stream_ends",
        "watcher",
    )

    def __init__(
        self,
        gateway: Gateway,
        quotas: QuotaService | None = None,
        loads: LoadView | None = None,
        queue: AdmissionQueue | None = None,
        recorder: Recorder = NULL_RECORDER,
        access_log: AccessLog | None = None,
        stream_ends: StreamEnds | None = None,
        batch: RecordBatch | None = None,
    ) -> None:
        self.gateway = gateway  # the policy in force when the stream began: a reload never changes it midway
        self.stream_ends = stream_ends
        self.batch = batch  # None: a finished request is recorded at once
        self.quotas = quotas
        self.loads = loads
        self.queue = queue
        self.recorder = recorder
        self.access_log = access_log
        self.slot: Slot | None = None
        self.phase = Phase.REQUEST_HEADERS
        self.need: NeedBody | None = None
        self.admission: Admission | None = None
        self.reservation: Reservation | None = None
        self.watcher: ResponseWatcher | None = None
        self.record: RequestRecord | None = None  # None: not a request we decide (passthrough)

    async def handle(self, request: pb.ProcessingRequest) -> Wire:
        kind = request.WhichOneof("request")
        if self.phase not in _ACCEPTS.get(kind or "", ()):
            return self._out_of_phase(kind or "")
        if kind == "request_body":
            return await self._on_request_body(request.request_body)
        started = time.perf_counter()
        if kind == "request_headers":
            response = self._on_request_headers(request.request_headers, started)
        elif kind == "response_headers":
            response = self._on_response_headers(request)
        elif kind == "response_body":
            response = self._on_response_body(request.response_body, started)
        elif kind == "request_trailers":
            return _CONTINUE_REQUEST_TRAILERS
        else:
            return _CONTINUE_RESPONSE_TRAILERS
        if self.record is not None:
            self._phase_time(self.record, kind, time.perf_counter() - started)
        return response

    def _phase_time(self, record: RequestRecord, phase: str, seconds: float) -> None:
        # Reported with the request (`_write_record`), where the recorder's code and data are warm.
        times = record.phase_times
        if len(times) < MAX_PHASE_TIMES:
            times.append((phase, seconds))
        else:
            self.recorder.phase_time(phase, seconds)

    def _on_request_headers(self, message: pb.HttpHeaders, started: float) -> Wire:
        headers = _headers(message, self.gateway.request_header_names)
        verdict = self.gateway.on_request_headers(headers, message.end_of_stream)
        if isinstance(verdict, NeedBody):
            self.need = verdict
            self.phase = Phase.REQUEST_BODY
            self.record = _record_for(verdict, headers, started)
            return _CONTINUE_REQUEST_HEADERS
        self.phase = Phase.DONE
        if isinstance(verdict, Reply):
            record = self.record = _record_for(None, headers, started)
            record.endpoint = _endpoint_of(headers)
            record.status = verdict.status
            if verdict.error is not None:
                _refused(record, verdict.error)
            else:
                record.outcome = "ok"
            return immediate(verdict)
        if not verdict.strip_headers:
            return _CONTINUE_PASSTHROUGH
        mutation = wire.header_mutation((), verdict.strip_headers)
        return wire.reply("request_headers", mutation, clear_route_cache=True) + _PASSTHROUGH_OVERRIDE

    async def _on_request_body(self, message: pb.HttpBody) -> Wire:
        need, record = self.need, self.record
        assert need is not None and record is not None  # the phase says the headers asked for this body
        gateway = self.gateway
        loads = self.loads() if self.loads is not None else _NO_LOADS
        body = message.body  # each read of a protobuf bytes field is a fresh copy
        if self.access_log is not None and self.access_log.include_prompts:
            record.prompt_text = body[:DEBUG_PROMPT_BYTES].decode("utf-8", "replace")
        # The step in progress and when it began: each is timed once, however the request leaves.
        step, began = "request_body", time.perf_counter()
        try:
            if len(body) < OFFLOAD_BODY_BYTES:
                admission = gateway.on_request_body(need, body, loads, record)
            else:
                # Counting a long prompt takes tens of milliseconds; the tokenizers release the GIL
                # while they work, so in a thread it no longer stalls every other stream on the loop.
                admission = await asyncio.to_thread(gateway.on_request_body, need, body, loads, record)
            if self.quotas is not None and admission.identity is not None:
                step, began = self._lap(step, began, "quota")
                self.reservation = await self.quotas.admit(
                    admission.identity,
                    admission.model.name,
                    admission.prompt_tokens,
                    admission.completion_tokens,
                    gateway.quota_planner,
                )
            if self.queue is not None:
                step, began = self._lap(step, began, "queue")
                self.slot = await self._take_slot(admission)
        except GatewayError as exc:
            self.phase = Phase.DONE
            record.status = exc.status
            _refused(record, exc)
            return immediate(Reply.from_error(exc))
        finally:
            self._lap(step, began, "")
        self.admission = admission
        self.phase = Phase.UPSTREAM
        record.stream = admission.stream
        record.completion_cap = admission.completion_tokens
        record.notes = admission.notes
        return _admitted_reply(admission)

    def _lap(self, step: str, began: float, following: str) -> tuple[str, float]:
        """End `step` (the gateway's own time, or the wait in the admission queue); begin `following`."""
        now = time.perf_counter()
        record = self.record
        assert record is not None
        if step == "queue":
            record.queue_s = now - began
        else:
            self._phase_time(record, step, now - began)
        return following, now

    async def _take_slot(self, admission: Admission) -> Slot:
        """A place among the backend's in-flight requests, maybe after a bounded wait in its queue."""
        assert self.queue is not None
        target = admission.target
        queue_policy = self.gateway.policy.queue
        identity = admission.identity
        try:
            return await self.queue.acquire(
                target.backend,
                target.max_in_flight,
                admission.priority,
                identity.tenant.name if identity is not None else "-",
                queue_policy.max_wait_ms / 1000,
                queue_policy.max_length,
            )
        except Shed as shed:
            # Not admitted: `finish` gives the reservation back whole, as after a client that left the queue.
            raise queue_shed_error(
                admission.traffic_class, target.backend, shed.reason, queue_policy.max_wait_ms
            ) from None

    def _on_response_headers(self, request: pb.ProcessingRequest) -> Wire:
        assert self.admission is not None and self.record is not None  # UPSTREAM only once admitted
        message = request.response_headers
        status, content_type, version = _response_head(message, self.gateway.version_header)
        self.record.status = status
        self.record.version = version if version is not None else version_from_attributes(request)
        self.watcher = ResponseWatcher(self.admission)
        mode = self.watcher.on_headers(status, content_type)
        done = mode is BodyMode.NONE or message.end_of_stream
        self.phase = Phase.DONE if done else Phase.RESPONSE_BODY
        if self.reservation is None:
            return CONTINUE_RESPONSE_HEADERS if done else RESPONSE_HEADERS_WITH_MODE[mode]
        mutation = wire.header_mutation(self.reservation.rate_limit_headers())
        return wire.reply("response_headers", mutation, mode_override=b"" if done else MODE_OVERRIDES[mode])

    def _on_response_body(self, message: pb.HttpBody, started: float) -> Wire:
        assert self.watcher is not None and self.record is not None  # set with the headers that chose a mode
        record = self.record
        if record.ttft_s is None and record.stream:
            record.ttft_s = started - record.started
        replacement = self.watcher.on_body(message.body, message.end_of_stream)
        if message.end_of_stream:
            self.phase = Phase.DONE
        if replacement is None:
            return _CONTINUE_RESPONSE_BODY
        mutation = pb.BodyMutation(body=replacement) if replacement else pb.BodyMutation(clear_body=True)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation)))

    def _out_of_phase(self, kind: str) -> Wire:
        """A message this phase cannot take: never let a request we have not decided go upstream."""
        log.warning("ext_proc message %s arrived in phase %s", kind or "(empty)", self.phase.value)
        if kind in ("request_headers", "request_body") and self.admission is None:
            self.phase = Phase.DONE
            self._internal_failure()
            return _internal_error("The gateway received the request out of order and refused it.")
        # The request is already decided (or its response has begun): the response goes on unchanged.
        return _CONTINUE_BY_KIND.get(kind, _CONTINUE_RESPONSE_TRAILERS)

    def failed(self, request: pb.ProcessingRequest) -> Wire:
        """Our own bug must not become a hung or reset stream: answer what the phase allows."""
        kind = request.WhichOneof("request")
        if kind in ("request_headers", "request_body"):
            self.phase = Phase.DONE
            self._internal_failure()
            return _internal_error("The gateway failed to process the request.")
        return _CONTINUE_BY_KIND.get(kind or "", _CONTINUE_RESPONSE_TRAILERS)

    def _internal_failure(self) -> None:
        record = self.record
        if record is None:  # failed before the request headers were read
            record = self.record = RequestRecord(time.perf_counter(), time.time())
        if record.outcome is None:
            _refused(record, errors.internal_error(""))
            record.status = 500

    def final_usage(self) -> tuple[int, int]:
        """What the request really cost; an estimate from what was seen when usage never came."""
        assert self.admission is not None
        watcher = self.watcher
        if watcher is None or watcher.status == 0:
            return 0, 0  # no response: the upstream failed or the client left before it answered
        if watcher.usage is not None:
            return watcher.usage.prompt_tokens, watcher.usage.completion_tokens
        if watcher.status != 200:
            return 0, 0  # an upstream error generated nothing
        # Cut short mid-stream: one SSE event per generated token is vLLM's pacing.
        return self.admission.prompt_tokens, min(watcher.events_seen, self.admission.completion_tokens)

    def finish(self) -> tuple[Reservation, int, int] | None:
        """The stream is over, finished or cut short: record and log it; return what to settle."""
        if self.slot is not None and self.queue is not None:
            self.queue.release(self.slot)
            self.slot = None
        settlement: tuple[Reservation, int, int] | None = None
        prompt = completion = 0
        if self.admission is None:
            # Reserved, then failed before admission completed (an error of ours, or the client
            # left while queued): give it all back.
            reservation, self.reservation = self.reservation, None
            settlement = (reservation, 0, 0) if reservation is not None else None
        else:
            prompt, completion = self.final_usage()
            if self.reservation is not None:
                settlement = (self.reservation, prompt, completion)
        record = self.record
        if record is not None:
            try:
                self._close_record(record, prompt, completion)
            except Exception:  # recording must never cost the settlement
                log.exception("recording a finished request failed")
            # Cut mid-response: the client left, or the upstream reset or timed out. Only Envoy's
            # report tells which (`extproc.stream_ends`); the settlement does not wait for it.
            cut = record.outcome == "cancelled" and self.watcher is not None and self.watcher.status != 0
            if not cut:
                if self.batch is not None:
                    self.batch.add(record)
                else:
                    _write_record(self.recorder, self.access_log, record, None)
            else:
                # Bound to the record alone, not this stream: a held outcome keeps no body alive.
                write = partial(_write_cut, self.recorder, self.access_log, record)
                ends = self.stream_ends
                if ends is None or not ends.hold(record.request_id, write):
                    write(None)
        return settlement

    def _close_record(self, record: RequestRecord, prompt: int, completion: int) -> None:
        record.duration_s = time.perf_counter() - record.started
        if record.outcome is not None:
            return  # refused or answered by the gateway itself
        if self.admission is None:
            record.outcome = "cancelled"  # the client left before the decision (while queued, say)
            return
        watcher = self.watcher
        record.prompt_tokens, record.completion_tokens = prompt, completion
        if watcher is None or watcher.status == 0:
            record.outcome = "cancelled"  # the client left before any response
            return
        record.usage = "reported" if watcher.usage is not None else "estimated"
        if watcher.signals is not None:
            record.json_result, record.tool_calls_valid, record.tool_calls_invalid = watcher.signals.finish()
            record.finish_reasons = watcher.signals.finish_reasons
        if watcher.status >= 300:
            record.outcome = codes.upstream_outcome(watcher.status)
        elif self.phase is Phase.DONE or (not watcher.streamed and watcher.bodies) or watcher.finished:
            # A JSON body over Envoy's buffer limit comes in part (BUFFERED_PARTIAL), the rest unseen.
            # A client that has `[DONE]` may close before the stream's end reaches us: it has it all.
            record.outcome = "ok"
        else:
            record.outcome = "cancelled"  # the stream ended before its last chunk


def _write_cut(
    recorder: Recorder, access_log: AccessLog | None, record: RequestRecord, reported: Outcome | None
) -> None:
    """A response cut short: its outcome as Envoy reported it (None: no report, it stays cancelled)."""
    if reported is not None:
        record.outcome = reported
    _write_record(recorder, access_log, record, reported or NO_STREAM_END_REPORT)


def _write_record(recorder: Recorder, access_log: AccessLog | None, record: RequestRecord, cut: str | None) -> None:
    try:  # recording must never cost the settlement, which may still be ahead of this call
        if cut is not None:
            recorder.cut_stream(cut)
        recorder.request_done(record)
        if access_log is not None:
            access_log.write(record)
        for phase, seconds in record.phase_times:
            recorder.phase_time(phase, seconds)
    except Exception:
        log.exception("recording a finished request failed")


class RecordBatch:
    """Finished requests, recorded (metrics, access log) a few milliseconds after they end, together.

    Recording a request the moment it ends runs the recorder's and the access log's code with the
    caches Envoy, the upstream and the other streams left cold; a batch runs that code and its data
    once for all of its records. A record waits at most `delay_s`, and at most `max_pending` wait.
    """

    __slots__ = ("access_log", "delay_s", "max_pending", "pending", "recorder", "scheduled")

    def __init__(
        self, recorder: Recorder, access_log: AccessLog | None, delay_s: float = 0.005, max_pending: int = 1024
    ) -> None:
        self.recorder = recorder
        self.access_log = access_log
        self.delay_s = delay_s
        self.max_pending = max_pending
        self.pending: list[RequestRecord] = []
        self.scheduled = False

    def add(self, record: RequestRecord) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.max_pending:
            self.flush()
        elif not self.scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self.scheduled = True
            loop.call_later(self.delay_s, self._flush_later)

    def _flush_later(self) -> None:
        self.scheduled = False
        self.flush()

    def flush(self) -> None:
        """Record every waiting request now (the timer; and the server's drain, before the log closes)."""
        pending, self.pending = self.pending, []
        for record in pending:
            _write_record(self.recorder, self.access_log, record, None)


def _record_for(need: NeedBody | None, headers: dict[str, str], started: float) -> RequestRecord:
    request_id = headers.get(names.REQUEST_ID)
    record = RequestRecord(started, time.time(), request_id=request_id[:_MAX_REQUEST_ID] if request_id else None)
    requested = headers.get(names.TRAFFIC_CLASS)
    if requested in CLASS_PRIORITY:
        record.requested_class = requested
    if need is not None:
        record.endpoint = need.translator.endpoint
        record.traffic_class = need.traffic_class
        record.quality = need.quality
        identity = need.identity
        if identity is not None:
            record.tenant, record.tier, record.key = identity.tenant.name, identity.tenant.tier, identity.key_name
    return record


def _endpoint_of(headers: dict[str, str]) -> str:
    path = headers.get(names.PATH, "/").split("?", 1)[0]
    if path == names.MODELS:
        return "models"
    translator = TRANSLATORS.get(path)
    return translator.endpoint if translator is not None else "other"


_MAX_REQUEST_ID = 128


def _refused(record: RequestRecord, error: GatewayError) -> None:
    record.refused = True
    record.code = error.reason
    record.outcome = error.kind.outcome


class ExternalProcessor:
    """The ExternalProcessor service (registered by `wire.add_processor_to_server`)."""

    def __init__(
        self,
        gateway: Gateway,
        quotas: QuotaService | None = None,
        loads: LoadView | None = None,
        queue: AdmissionQueue | None = None,
        recorder: Recorder = NULL_RECORDER,
        access_log: AccessLog | None = None,
        stream_ends: StreamEnds | None = None,
        batch: RecordBatch | None = None,
    ) -> None:
        # Replaced whole by a reload (one assignment); each stream keeps the one it began with.
        self.gateway = gateway
        self.batch = batch
        self.quotas = quotas
        self.loads = loads
        self.queue = queue
        self.recorder = recorder
        self.access_log = access_log
        self.stream_ends = stream_ends
        self.active = 0  # streams open now

    async def idle(self, timeout_s: float) -> None:
        """Until no stream is open (a draining server), or `timeout_s` is over."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # Replies are written rather than yielded: the same path in grpc.aio, and a coroutine
        # compiles (mypyc has no async generators).
        stream = RequestStream(
            self.gateway,
            self.quotas,
            self.loads,
            self.queue,
            self.recorder,
            self.access_log,
            self.stream_ends,
            self.batch,
        )
        write = context.write
        self.active += 1
        try:
            async for request in request_iterator:
                try:
                    response = await stream.handle(request)
                except Exception:
                    log.exception("internal error in phase %s", stream.phase.value)
                    response = stream.failed(request)
                await write(response)
        except asyncio.CancelledError:
            # Envoy closes streams it no longer needs, clients go away: both are normal.
            pass
        finally:
            self.active -= 1
            # Never awaited here: Envoy resets the stream once the HTTP exchange is over, which
            # would cancel a settlement in flight. The quota service settles in its own task.
            settlement = stream.finish()
            if settlement is not None and self.quotas is not None:
                self.quotas.settle(*settlement)
