"""The thin adapter: Envoy ext_proc messages in, core decisions out.

One gRPC stream is one HTTP request. `RequestStream` is its explicit state
machine; every message Envoy sends gets exactly one response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from enum import Enum
from typing import TypeAlias

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from extproc import metrics, names, wire
from extproc.admission import AdmissionQueue, Shed, Slot
from extproc.core import Admission, BodyMode, Gateway, NeedBody, Reply, ResponseWatcher
from extproc.errors import GatewayError
from extproc.load import BackendLoad
from extproc.quota.service import QuotaService, Reservation
from extproc.saturation import queue_shed_error

log = logging.getLogger("extproc.request")

_Mode = processing_mode_pb2.ProcessingMode

# The latest load figure per backend, as the scraper last saw it.
LoadView: TypeAlias = Callable[[], Mapping[str, BackendLoad]]
_NO_LOADS: Mapping[str, BackendLoad] = {}

# What a stream answers: serialized bytes on the hot paths (see wire.py), messages for rare replies.
Wire: TypeAlias = bytes | pb.ProcessingResponse

# Replies that carry no decision are serialized once.
_CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString()
_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()
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
RESPONSE_BODY_MODES = {
    BodyMode.STREAMED: _Mode(response_body_mode=_Mode.STREAMED, response_trailer_mode=_Mode.SKIP),
    # BUFFERED_PARTIAL: a JSON body over Envoy's buffer limit is passed on rather than failed with 500.
    BodyMode.BUFFERED: _Mode(response_body_mode=_Mode.BUFFERED_PARTIAL, response_trailer_mode=_Mode.SKIP),
}
_MODE_OVERRIDES = {mode: wire.mode_override(override) for mode, override in RESPONSE_BODY_MODES.items()}
RESPONSE_HEADERS_WITH_MODE = {mode: _CONTINUE_RESPONSE_HEADERS + field for mode, field in _MODE_OVERRIDES.items()}
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
    for header in message.headers.headers:
        key = header.key
        if key in wanted:
            headers[key] = header.raw_value.decode("utf-8", "replace")
    return headers


def _status_and_content_type(message: pb.HttpHeaders) -> tuple[int, str]:
    """The two response headers the watcher needs, without decoding the others."""
    status, content_type = 0, ""
    for header in message.headers.headers:
        key = header.key
        if key == names.STATUS:
            value = header.raw_value
            status = int(value) if value.isdigit() else 0
        elif key == names.CONTENT_TYPE:
            content_type = header.raw_value.decode("latin-1")
    return status, content_type


def _internal_error(message: str) -> pb.ProcessingResponse:
    error = GatewayError(500, message, type="server_error", code="internal_error")
    return immediate(Reply.from_error(error))


class Phase(Enum):
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
    "response_headers": _CONTINUE_RESPONSE_HEADERS,
    "response_body": _CONTINUE_RESPONSE_BODY,
    "response_trailers": _CONTINUE_RESPONSE_TRAILERS,
}


class RequestStream:
    """Per-request state: what has been seen, what was decided, what the response showed."""

    __slots__ = (
        "admission",
        "gateway",
        "loads",
        "need",
        "phase",
        "queue",
        "quotas",
        "reservation",
        "slot",
        "watcher",
    )

    def __init__(
        self,
        gateway: Gateway,
        quotas: QuotaService | None = None,
        loads: LoadView | None = None,
        queue: AdmissionQueue | None = None,
    ) -> None:
        self.gateway = gateway  # the policy in force when the stream began: a reload never changes it midway
        self.quotas = quotas
        self.loads = loads
        self.queue = queue
        self.slot: Slot | None = None
        self.phase = Phase.REQUEST_HEADERS
        self.need: NeedBody | None = None
        self.admission: Admission | None = None
        self.reservation: Reservation | None = None
        self.watcher: ResponseWatcher | None = None

    async def handle(self, request: pb.ProcessingRequest) -> Wire:
        kind = request.WhichOneof("request")
        if self.phase not in _ACCEPTS.get(kind or "", ()):
            return self._out_of_phase(kind or "")
        if kind == "request_headers":
            return self._on_request_headers(request.request_headers)
        if kind == "request_body":
            return await self._on_request_body(request.request_body)
        if kind == "response_headers":
            return self._on_response_headers(request.response_headers)
        if kind == "response_body":
            return self._on_response_body(request.response_body)
        if kind == "request_trailers":
            return _CONTINUE_REQUEST_TRAILERS
        return _CONTINUE_RESPONSE_TRAILERS

    def _on_request_headers(self, message: pb.HttpHeaders) -> Wire:
        headers = _headers(message, self.gateway.request_header_names)
        verdict = self.gateway.on_request_headers(headers, message.end_of_stream)
        if isinstance(verdict, NeedBody):
            self.need = verdict
            self.phase = Phase.REQUEST_BODY
            return _CONTINUE_REQUEST_HEADERS
        self.phase = Phase.DONE
        if isinstance(verdict, Reply):
            if verdict.status >= 400:
                metrics.count_request("-", "-", verdict.code)
            return immediate(verdict)
        if not verdict.strip_headers:
            return _CONTINUE_PASSTHROUGH
        mutation = wire.header_mutation((), verdict.strip_headers)
        return wire.reply("request_headers", mutation, clear_route_cache=True) + _PASSTHROUGH_OVERRIDE

    async def _on_request_body(self, message: pb.HttpBody) -> Wire:
        need = self.need
        assert need is not None  # the phase says the headers asked for this body
        endpoint = need.translator.endpoint
        gateway = self.gateway
        loads = self.loads() if self.loads is not None else _NO_LOADS
        admission: Admission | None = None
        body = message.body  # each read of a protobuf bytes field is a fresh copy
        try:
            if len(body) < OFFLOAD_BODY_BYTES:
                admission = gateway.on_request_body(need, body, loads)
            else:
                # Counting a long prompt takes tens of milliseconds; the tokenizers release the GIL
                # while they work, so in a thread it no longer stalls every other stream on the loop.
                admission = await asyncio.to_thread(gateway.on_request_body, need, body, loads)
            if self.quotas is not None and admission.identity is not None:
                self.reservation = await self.quotas.admit(
                    admission.identity,
                    admission.model.name,
                    admission.prompt_tokens,
                    admission.completion_tokens,
                    gateway.quota_planner,
                )
            if self.queue is not None:
                self.slot = await self._take_slot(admission)
        except GatewayError as exc:
            self.phase = Phase.DONE
            model = admission.model.name if admission is not None else "-"
            metrics.count_request(model, endpoint, exc.code)
            if log.isEnabledFor(logging.INFO):
                identity = need.identity
                tenant = identity.tenant.name if identity is not None else "-"
                log.info(
                    "refused endpoint=%s model=%s tenant=%s status=%d code=%s",
                    endpoint,
                    model,
                    tenant,
                    exc.status,
                    exc.code,
                )
            return immediate(Reply.from_error(exc))
        self.admission = admission
        self.phase = Phase.UPSTREAM
        metrics.count_request(admission.model.name, endpoint, "ok")
        return _admitted_reply(admission)

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

    def _on_response_headers(self, message: pb.HttpHeaders) -> Wire:
        assert self.admission is not None  # the phase is UPSTREAM only once admitted
        status, content_type = _status_and_content_type(message)
        self.watcher = ResponseWatcher(self.admission)
        mode = self.watcher.on_headers(status, content_type)
        done = mode is BodyMode.NONE or message.end_of_stream
        self.phase = Phase.DONE if done else Phase.RESPONSE_BODY
        if self.reservation is None:
            return _CONTINUE_RESPONSE_HEADERS if done else RESPONSE_HEADERS_WITH_MODE[mode]
        mutation = wire.header_mutation(self.reservation.rate_limit_headers())
        return wire.reply("response_headers", mutation, mode_override=b"" if done else _MODE_OVERRIDES[mode])

    def _on_response_body(self, message: pb.HttpBody) -> Wire:
        assert self.watcher is not None  # set with the response headers that chose a body mode
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
            return _internal_error("The gateway received the request out of order and refused it.")
        # The request is already decided (or its response has begun): the response goes on unchanged.
        return _CONTINUE_BY_KIND.get(kind, _CONTINUE_RESPONSE_TRAILERS)

    def failed(self, request: pb.ProcessingRequest) -> Wire:
        """Our own bug must not become a hung or reset stream: answer what the phase allows."""
        kind = request.WhichOneof("request")
        if kind in ("request_headers", "request_body"):
            self.phase = Phase.DONE
            return _internal_error("The gateway failed to process the request.")
        return _CONTINUE_BY_KIND.get(kind or "", _CONTINUE_RESPONSE_TRAILERS)

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
        """The stream is over, finished or cut short: count and log the cost; return what to settle."""
        if self.slot is not None and self.queue is not None:
            self.queue.release(self.slot)
            self.slot = None
        if self.admission is None:
            # Reserved, then failed before admission completed (an error of ours): give it all back.
            reservation, self.reservation = self.reservation, None
            return (reservation, 0, 0) if reservation is not None else None
        prompt, completion = self.final_usage()
        settlement = (self.reservation, prompt, completion) if self.reservation is not None else None
        model = self.admission.model.name
        identity = self.admission.identity
        tenant = identity.tenant.name if identity is not None else "-"
        metrics.count_usage(model, tenant, prompt, completion)
        watcher = self.watcher
        if watcher is not None and watcher.status:
            metrics.count_response(model, watcher.status)
        if log.isEnabledFor(logging.INFO):
            self._log_end(watcher, prompt, completion)
        return settlement

    def _log_end(self, watcher: ResponseWatcher | None, prompt: int, completion: int) -> None:
        """The request's one access line: what was decided at admission and what the response cost."""
        admission = self.admission
        assert admission is not None
        identity = admission.identity
        if watcher is None or watcher.status == 0:
            usage = "none"
        else:
            usage = "reported" if watcher.usage is not None else "estimated"
        log.info(
            "request endpoint=%s model=%s backend=%s tenant=%s stream=%s status=%d phase=%s "
            "prompt_tokens=%d completion_tokens=%d usage=%s max_completion_tokens=%d%s",
            admission.endpoint,
            admission.model.name,
            admission.target.subset,
            identity.tenant.name if identity is not None else "-",
            admission.stream,
            watcher.status if watcher is not None else 0,
            self.phase.value,
            prompt,
            completion,
            usage,
            admission.completion_tokens,
            "".join(f" [{note}]" for note in admission.notes),
        )


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        gateway: Gateway,
        quotas: QuotaService | None = None,
        loads: LoadView | None = None,
        queue: AdmissionQueue | None = None,
    ) -> None:
        # Replaced whole by a reload (one assignment); each stream keeps the one it began with.
        self.gateway = gateway
        self.quotas = quotas
        self.loads = loads
        self.queue = queue

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Wire]:
        stream = RequestStream(self.gateway, self.quotas, self.loads, self.queue)
        try:
            async for request in request_iterator:
                try:
                    response = await stream.handle(request)
                except Exception:
                    log.exception("internal error in phase %s", stream.phase.value)
                    response = stream.failed(request)
                yield response
        except asyncio.CancelledError:
            # Envoy closes streams it no longer needs, clients go away: both are normal.
            pass
        finally:
            # Never awaited here: Envoy resets the stream once the HTTP exchange is over, which
            # would cancel a settlement in flight. The quota service settles in its own task.
            settlement = stream.finish()
            if settlement is not None and self.quotas is not None:
                self.quotas.settle(*settlement)
