"""The sans-IO gateway core: plain data in, decisions out.

`Gateway` is built once per policy and precomputes everything a request would
otherwise look up. Per request the adapter calls, in order:

1. `on_request_headers` -> `Passthrough` | `NeedBody` | `Reply`
2. `on_request_body`    -> `Admission` (or raises `GatewayError`)
3. `ResponseWatcher`    -> reads usage from the JSON body or the SSE stream.

Nothing here knows about gRPC or Envoy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from extproc import codes, errors, names
from extproc.compiled import CompiledModel, CompiledPolicy, Target, compile_policy
from extproc.compiled_form import IdentityEnum
from extproc.endpoints import TRANSLATORS, ChatFraming, Translator, dump_client_json
from extproc.errors import GatewayError
from extproc.identity import Identity
from extproc.load import BackendLoad
from extproc.policy import Policy
from extproc.quota.plan import QuotaPlanner
from extproc.recorder import RequestRecord
from extproc.routing import CLASS_PRIORITY, RejectWith, RequestFacts, RouteTo
from extproc.saturation import Considered, choose
from extproc.signals import ContentSignals
from extproc.sse import SseUsageReader, Usage, usage_from_json_body

# --- what the core answers --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not an inference call: let it through, minus any routing header the client forged."""

    strip_headers: tuple[str, ...]


@dataclass(slots=True, init=False)
class NeedBody:
    """An inference call whose headers passed: what they said, kept for the body's decision."""

    translator: Translator
    identity: Identity | None  # None when the policy has no tenants
    traffic_class: str
    quality: str | None  # a declared x-llm-quality value, else None

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(
        self, translator: Translator, identity: Identity | None, traffic_class: str, quality: str | None
    ) -> None:
        self.translator = translator
        self.identity = identity
        self.traffic_class = traffic_class
        self.quality = quality


@dataclass(frozen=True, slots=True)
class Reply:
    """A response the gateway sends itself (errors, /v1/models)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    error: GatewayError | None = None  # what was refused, for the record

    @classmethod
    def from_error(cls, error: GatewayError) -> Reply:
        headers = (("content-type", names.JSON_CONTENT_TYPE), *error.headers.items())
        return cls(error.status, error.body(), headers, error)


@dataclass(slots=True, init=False)
class Admission:
    """An accepted inference request and everything later phases need to know about it."""

    model: CompiledModel
    target: Target  # where it goes: the backend, the served name, the window and caps checked
    endpoint: str
    identity: Identity | None
    traffic_class: str
    rule: str  # the routing rule that matched, or "default"
    considered: tuple[Considered, ...]  # backends weighed against their load, and why
    set_headers: list[tuple[str, str]]
    remove_headers: list[str]
    body: bytes | None  # the rewritten body, None when the original goes upstream as is
    prompt_tokens: int
    completion_tokens: int  # the most the backend may generate: cap x sequences
    stream: bool
    hide_usage_event: bool
    facts: RequestFacts  # what the routing rules saw (also what a replay re-decides from)
    notes: list[str]  # normalizations applied, for the log

    # Written out, not generated: see extproc/compiled_form.py.
    def __init__(
        self,
        model: CompiledModel,
        target: Target,
        endpoint: str,
        identity: Identity | None,
        traffic_class: str,
        rule: str,
        considered: tuple[Considered, ...],
        set_headers: list[tuple[str, str]],
        remove_headers: list[str],
        body: bytes | None,
        prompt_tokens: int,
        completion_tokens: int,
        stream: bool,
        hide_usage_event: bool,
        facts: RequestFacts,
        notes: list[str] | None = None,
    ) -> None:
        self.model = model
        self.target = target
        self.endpoint = endpoint
        self.identity = identity
        self.traffic_class = traffic_class
        self.rule = rule
        self.considered = considered
        self.set_headers = set_headers
        self.remove_headers = remove_headers
        self.body = body
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.stream = stream
        self.hide_usage_event = hide_usage_event
        self.facts = facts
        self.notes = [] if notes is None else notes

    @property
    def priority(self) -> int:
        return CLASS_PRIORITY[self.traffic_class]


_NO_LOAD: Mapping[str, BackendLoad] = {}


class Gateway:
    """Decisions for one compiled policy. Building it does no I/O; a reload builds a new one."""

    @classmethod
    def from_policy(cls, policy: Policy) -> Gateway:
        """Compile (tokenizers, key files, the clock) and build: for tests and one-shot tools."""
        return cls(compile_policy(policy))

    def __init__(self, compiled: CompiledPolicy) -> None:
        self.compiled = compiled
        policy = compiled.policy
        self.policy = policy
        self.auth = compiled.auth
        self.rules = compiled.rules
        gw = policy.gateway
        self.backend_header = gw.backend_header
        self.max_body_bytes = gw.max_body_bytes
        self.max_stop_sequences = gw.max_stop_sequences
        self.framing = ChatFraming(gw.tokens_per_message, gw.tokens_per_reply, gw.tokens_per_image)
        self.load_policy = policy.load
        self.quality_header = policy.routing.quality_header
        self.version_header = policy.observability.version_header
        self.quality_values = frozenset(policy.routing.quality_values)
        self.models: dict[str, CompiledModel] = compiled.models
        self.quota_planner = QuotaPlanner(policy.quotas.key_prefix, policy.quotas.reservation_ttl_seconds * 1000)
        listing: list[dict[str, Any]] = []
        for spec in policy.models:
            for public in (spec.name, *spec.aliases):
                listing.append(
                    {
                        "id": public,
                        "object": "model",
                        "created": compiled.created,
                        "owned_by": "extproc",
                        "max_model_len": spec.max_model_len,
                    }
                )
        self._models_reply = _json_reply(listing)
        # Tenants' allowed models by canonical name, so an alias of an allowed model is allowed too.
        self._allowed: dict[str, frozenset[str] | None] = {}
        self._models_reply_for: dict[str, Reply] = {}
        for name, tenant in self.auth.tenants.items():
            allowed = tenant.allowed_models
            self._allowed[name] = None if allowed is None else frozenset(self.models[m].name for m in allowed)
            if allowed is None:
                self._models_reply_for[name] = self._models_reply
            else:
                visible = [entry for entry in listing if self.models[entry["id"]].name in (self._allowed[name] or ())]
                self._models_reply_for[name] = _json_reply(visible)
        # Per tenant: the classes it may ask for with x-llm-class (its own and every lower one always).
        self._classes_for: dict[str | None, frozenset[str]] = {None: frozenset(CLASS_PRIORITY)}
        for name, tenant in self.auth.tenants.items():
            own = CLASS_PRIORITY[tenant.traffic_class]
            lower = {c for c, p in CLASS_PRIORITY.items() if p >= own}
            self._classes_for[name] = frozenset(lower | set(tenant.spec.allowed_classes))
        # Identity headers only we may set; with no tenants they are removed, not passed on.
        self._identity_headers = (names.TENANT, names.TIER, names.TRAFFIC_CLASS)
        # Headers a client must never choose: removed from anything we let through untouched.
        self._ours = (self.backend_header, *self._identity_headers)
        # The request headers some decision reads, each declared by the part that reads it, so the
        # adapter (which decodes only these) can never drop a header a matcher needs.
        readers: tuple[frozenset[str], ...] = (
            frozenset({names.PATH, names.METHOD, names.CONTENT_TYPE, names.CONTENT_LENGTH}),  # the head check
            frozenset(self._ours),  # stripped when forged; the class header is also a request
            self.auth.header_names if self.auth.enabled else frozenset(),
            frozenset({self.quality_header}),
            frozenset({names.REQUEST_ID}),  # the access log's key
        )
        self.request_header_names = frozenset().union(*readers)

    # --- request headers -----------------------------------------------------------------

    def on_request_headers(
        self, headers: dict[str, str], end_of_stream: bool = False
    ) -> Passthrough | NeedBody | Reply:
        path = headers.get(names.PATH, "/").split("?", 1)[0]
        translator = TRANSLATORS.get(path)
        if translator is None and path != names.MODELS:
            return Passthrough(tuple(name for name in self._ours if name in headers))
        method = headers.get(names.METHOD, "GET")
        try:
            identity = self.auth.identify(headers) if self.auth.enabled else None
            if translator is None:
                if method not in ("GET", "HEAD"):
                    raise errors.method_not_allowed(method, path)
                return self._models_reply_for[identity.tenant.name] if identity else self._models_reply
            self._check_head(headers, method, path, end_of_stream)
        except GatewayError as exc:
            return Reply.from_error(exc)
        quality = headers.get(self.quality_header)
        return NeedBody(
            translator,
            identity,
            self.traffic_class(identity, headers.get(names.TRAFFIC_CLASS)),
            quality if quality in self.quality_values else None,
        )

    def traffic_class(self, identity: Identity | None, requested: str | None) -> str:
        """The caller's class; a requested one only when the tenant may choose it (never a raise)."""
        default = identity.tenant.traffic_class if identity is not None else "interactive"
        if requested is None or requested == default:
            return default
        allowed = self._classes_for.get(identity.tenant.name if identity is not None else None, frozenset())
        return requested if requested in allowed else default

    def _check_head(self, headers: dict[str, str], method: str, path: str, end_of_stream: bool) -> None:
        if method != "POST":
            raise errors.method_not_allowed(method, path)
        content_type = headers.get(names.CONTENT_TYPE)
        if content_type is not None:
            media = content_type.split(";", 1)[0].strip().lower()
            if media != names.JSON_CONTENT_TYPE and not media.endswith("+json"):
                raise errors.unsupported_media_type(content_type)
        length = headers.get(names.CONTENT_LENGTH)
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise errors.body_too_large(self.max_body_bytes)
        if end_of_stream:
            raise errors.invalid_request("The request has no body; send a JSON object.")

    # --- request body --------------------------------------------------------------------

    def on_request_body(
        self,
        need: NeedBody,
        raw: bytes,
        loads: Mapping[str, BackendLoad] = _NO_LOAD,
        record: RequestRecord | None = None,
    ) -> Admission:
        """Validate, count, route (rules, then load), cap and rewrite; raise the error a client should see.

        `loads` is the latest scraped figure per backend: an input, so the decision stays pure.
        `record` gets what is learned as it is learned, so a refusal's log line says how far it got.
        """
        return self._on_request_body(need, raw, loads, record)

    def _on_request_body(
        self, need: NeedBody, raw: bytes, loads: Mapping[str, BackendLoad], record: RequestRecord | None
    ) -> Admission:
        if record is None:
            record = RequestRecord(0.0, 0.0)
        translator, identity = need.translator, need.identity
        if len(raw) > self.max_body_bytes:
            raise errors.body_too_large(self.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.invalid_request(
                "We could not parse the JSON body of your request: it is not valid JSON.", kind=codes.INVALID_JSON
            ) from None
        if not isinstance(body, dict):
            raise errors.invalid_request("The request body must be a JSON object.")
        requested_model = body.get("model")
        if not isinstance(requested_model, str) or not requested_model:
            raise errors.invalid_request("`model` is required and must be a string.", "model")
        record.requested_model = requested_model[:_MAX_LOGGED_MODEL]
        model = self.model_for(identity, requested_model, translator.endpoint, record)
        translator.validate(body)

        notes: list[str] = []
        cost = translator.prompt_cost(body, model.counter, self.framing)
        facts = RequestFacts(
            tenant=identity.tenant.name if identity is not None else None,
            tier=identity.tenant.tier if identity is not None else None,
            traffic_class=need.traffic_class,
            endpoint=translator.endpoint,
            requested_model=requested_model,
            model=model.name,
            json_mode=_json_mode(body),
            tools=bool(body.get("tools")),
            quality=need.quality,
            prompt_tokens=cost.total,
            messages=len(body["messages"]) if translator.endpoint == "chat" else 0,
        )
        requested = translator.requested_completion(body)
        record.json_mode, record.tools, record.messages = facts.json_mode, facts.tools, facts.messages
        record.counted_prompt_tokens, record.requested_completion = cost.total, requested
        action, routed = self.route(facts, model, record)
        choice = choose(
            model,
            action.backend,
            translator.endpoint,
            need.traffic_class,
            cost.longest,
            cost.total,
            requested,
            loads,
            self.load_policy,
            translator.generates,
        )
        target = choice.target
        record.backend, record.served_model = target.backend, target.served_name
        if target is not routed:
            notes.append(f"fallback {routed.backend}->{target.backend}")

        prompt_field = translator.prompt_field
        check_prompt(target, cost.total, requested_model, prompt_field)
        changed = False
        completion = 0
        if translator.generates:
            completion, changed = self._settle_completion_cap(
                translator, body, requested, model, target, cost.longest, notes
            )
        context_check(target, cost.longest, completion, prompt_field)

        changed |= self._normalize(translator, body, model, target, notes)
        stream = translator.generates and body.get("stream") is True
        hide_usage = False
        if stream:
            options = body.get("stream_options") or {}
            if options.get("include_usage") is not True:
                # We need usage to settle; the client did not ask, so it will not see it.
                body["stream_options"] = {**options, "include_usage": True}
                hide_usage = True
                changed = True
        new_body = dump_client_json(body) if changed else None
        set_headers = [(self.backend_header, target.subset), (names.TRAFFIC_CLASS, need.traffic_class)]
        remove_headers: list[str] = []
        if identity is not None:
            tenant = identity.tenant
            set_headers += [(names.TENANT, tenant.name), (names.TIER, tenant.tier)]
            remove_headers += self.auth.strip
        else:
            remove_headers += (names.TENANT, names.TIER)
        # A replaced body's content-length is the adapter's to set: it depends on how the body travels.
        return Admission(
            model=model,
            target=target,
            endpoint=translator.endpoint,
            identity=identity,
            traffic_class=need.traffic_class,
            rule=action.rule,
            considered=choice.considered,
            set_headers=set_headers,
            remove_headers=remove_headers,
            body=new_body,
            prompt_tokens=cost.total,
            completion_tokens=completion * translator.sequences(body),
            stream=stream,
            hide_usage_event=hide_usage,
            facts=facts,
            notes=notes,
        )

    def model_for(
        self, identity: Identity | None, requested_model: str, endpoint: str, record: RequestRecord
    ) -> CompiledModel:
        """The model a public name stands for, if this caller may use it on this endpoint."""
        model = self.models.get(requested_model)
        if model is None:
            raise errors.model_not_found(requested_model)
        record.model = model.name  # before the access checks, so a 403 says which model
        if identity is not None:
            allowed = self._allowed[identity.tenant.name]
            if allowed is not None and model.name not in allowed:
                raise errors.model_not_allowed(requested_model)
        own = model.own
        if endpoint not in own.endpoints:
            raise errors.unsupported_endpoint(
                f"Model `{requested_model}` does not serve the {endpoint} endpoint "
                f"(it serves: {', '.join(sorted(own.endpoints))})."
            )
        return model

    def route(self, facts: RequestFacts, model: CompiledModel, record: RequestRecord) -> tuple[RouteTo, Target]:
        """The rules' pick for these facts (before load), or the rule's rejection."""
        action = self.rules.evaluate(facts, model.backend)
        record.rule = action.rule
        if isinstance(action, RejectWith):
            raise errors.rule_rejection(action.kind, action.message)
        routed = model.targets[action.backend]
        record.routed_backend = record.backend = action.backend  # a shed request keeps the backend it was shed from
        if facts.endpoint not in routed.endpoints:
            raise errors.unsupported_endpoint(
                f"Model `{facts.requested_model}` is routed to backend {action.backend} by rule {action.rule}, "
                f"which does not serve the {facts.endpoint} endpoint."
            )
        return action, routed

    def _settle_completion_cap(
        self,
        translator: Translator,
        body: dict[str, Any],
        requested: int | None,
        model: CompiledModel,
        target: Target,
        longest: int,
        notes: list[str],
    ) -> tuple[int, bool]:
        """Return the completion cap that goes upstream and whether the body changed."""
        if requested is not None and requested <= target.completion_cap:
            return requested, False  # the usual case: nothing to name, nothing to change
        field_name = "max_tokens" if requested is None else translator.completion_field(body)
        completion = completion_cap(target, model, requested, longest, field_name, body["model"])
        if requested is None:
            body["max_tokens"] = completion
            notes.append(f"max_tokens={completion} (default)")
            return completion, True
        for name in ("max_tokens", "max_completion_tokens"):
            if body.get(name) is not None:
                body[name] = target.completion_cap
        notes.append(f"{field_name} clamped {requested}->{target.completion_cap}")
        return target.completion_cap, True

    def _normalize(
        self, translator: Translator, body: dict[str, Any], model: CompiledModel, target: Target, notes: list[str]
    ) -> bool:
        """Idempotent rewrite: applying it to its own output changes nothing."""
        changed = False
        if body["model"] != target.served_name:
            body["model"] = target.served_name
            changed = True
        if "stop" in body:
            stop = _normalize_stop(body["stop"], self.max_stop_sequences)
            if not stop:
                del body["stop"]
                changed = True
            elif stop != body["stop"]:
                body["stop"] = stop
                changed = True
        stripped = [
            key
            for key in body
            if key in model.denied_params
            or (
                model.allowed_params is not None and key not in model.allowed_params and key not in translator.essential
            )
        ]
        if stripped:
            for key in stripped:
                del body[key]
            # Parameter names are the client's: only a few, shortened, reach the log.
            notes.append("stripped " + ",".join(k[:40] for k in stripped[:_MAX_NOTED_PARAMS]))
            changed = True
        return changed


_MAX_LOGGED_MODEL = 128  # a model name as the client wrote it, in the log
_MAX_NOTED_PARAMS = 10


def check_prompt(target: Target, prompt_tokens: int, requested_model: str, prompt_field: str) -> None:
    if prompt_tokens > target.prompt_cap:
        raise errors.invalid_request(
            f"The prompt is {prompt_tokens} tokens; model `{requested_model}` accepts at most "
            f"{target.prompt_cap} prompt tokens.",
            prompt_field,
            kind=codes.PROMPT_TOO_LONG,
        )


def completion_cap(
    target: Target, model: CompiledModel, requested: int | None, longest: int, field_name: str, requested_model: str
) -> int:
    """The completion cap that goes upstream for `requested` (None: the client set none), or the refusal."""
    if requested is None:
        # Shrink our own default to the room left; the client asked for nothing specific.
        return max(1, min(target.default_completion, target.max_model_len - longest))
    if requested <= target.completion_cap:
        return requested
    if model.cap_action == "reject":
        raise errors.invalid_request(
            f"`{field_name}` is {requested}; model `{requested_model}` allows at most {target.completion_cap}.",
            field_name,
            kind=codes.MAX_TOKENS_EXCEEDED,
        )
    return target.completion_cap


def context_check(target: Target, longest: int, completion: int, prompt_field: str) -> None:
    if longest + completion > target.max_model_len:
        raise _context_exceeded(target.max_model_len, longest, completion, prompt_field)


def _json_mode(body: dict[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def _json_reply(payload: list[dict[str, Any]]) -> Reply:
    return Reply(200, orjson.dumps({"object": "list", "data": payload}), (("content-type", names.JSON_CONTENT_TYPE),))


def _normalize_stop(value: Any, limit: int) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise errors.invalid_request("`stop` must be a string or an array of strings.", "stop")
    # dict.fromkeys keeps first occurrences in order.
    unique = [s for s in dict.fromkeys(items) if s]
    return unique[:limit]


def _context_exceeded(window: int, prompt: int, completion: int, prompt_field: str) -> GatewayError:
    where = "messages" if prompt_field == "messages" else "prompt"
    return errors.invalid_request(
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the {where}, {completion} in the completion). "
        "Please reduce the length of the messages or completion.",
        prompt_field,
        kind=codes.CONTEXT_LENGTH_EXCEEDED,
    )


# --- response side ------------------------------------------------------------------------


class BodyMode(IdentityEnum):
    NONE = "none"  # nothing to read
    BUFFERED = "buffered"  # one JSON document
    STREAMED = "streamed"  # SSE, chunk by chunk


class ResponseWatcher:
    """Reads usage from an upstream response without ever holding a whole stream."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.status = 0
        self.usage: Usage | None = None
        self._sse: SseUsageReader | None = None
        self.signals: ContentSignals | None = None  # set for a successful generation
        self.bodies = 0  # body messages seen

    @property
    def streamed(self) -> bool:
        return self._sse is not None

    @property
    def finished(self) -> bool:
        """A stream whose `[DONE]` went by: complete, whether or not its end-of-stream follows."""
        return self._sse is not None and self._sse.finished

    @property
    def events_seen(self) -> int:
        return self._sse.events if self._sse is not None else 0

    def on_headers(self, status: int, content_type: str) -> BodyMode:
        self.status = status
        media = content_type.split(";", 1)[0].strip().lower()
        admission = self.admission
        if status == 200 and admission.endpoint != "embeddings":
            self.signals = ContentSignals(admission.facts.json_mode, admission.facts.tools)
        if media == names.SSE_CONTENT_TYPE:
            self._sse = SseUsageReader(hide_usage_event=admission.hide_usage_event, signals=self.signals)
            return BodyMode.STREAMED
        if status == 200 and media == names.JSON_CONTENT_TYPE:
            return BodyMode.BUFFERED
        return BodyMode.NONE

    def on_body(self, chunk: bytes, end_of_stream: bool) -> bytes | None:
        """Returns replacement bytes for the chunk, or None to pass it unchanged."""
        self.bodies += 1
        if self._sse is not None:
            replacement = self._sse.feed(chunk, end_of_stream)
            if self._sse.usage is not None:
                self.usage = self._sse.usage
            return replacement
        self.usage = usage_from_json_body(chunk, self.signals)
        return None
