"""Every header, metadata and path name the gateway reads or writes, in one place."""

from typing import Final

# Request headers Envoy gives us (lower-case; pseudo-headers included).
PATH: Final = ":path"
METHOD: Final = ":method"
CONTENT_TYPE: Final = "content-type"
CONTENT_LENGTH: Final = "content-length"
STATUS: Final = ":status"

# Our routing header. The policy may rename it; this is the default.
DEFAULT_BACKEND_HEADER: Final = "x-llm-backend"

# Set by the fake vLLM (and useful in any upstream) to show who answered.
SERVED_BY: Final = "x-served-by"
# The version that served a response (policy `observability.version_header` renames it).
MODEL_VERSION: Final = "x-model-version"
# Response attributes Envoy is asked for (ext_proc `response_attributes`), to tell which version
# served when the upstream sends no version header. Istio names a DestinationRule subset's cluster
# `outbound|PORT|SUBSET|HOST`, and puts `NAME;NAMESPACE;SERVICE;REVISION;CLUSTER` in the endpoint's
# `istio` metadata, REVISION being the pod's canonical revision (its `version` label by default).
# Both checked on Envoy 1.40: they arrive with the response headers, as strings.
ATTRIBUTES_NAMESPACE: Final = "envoy.filters.http.ext_proc"
WORKLOAD_ATTRIBUTE: Final = "xds.upstream_host_metadata.filter_metadata['istio']['workload']"
CLUSTER_ATTRIBUTE: Final = "xds.cluster_name"
VERSION_ATTRIBUTES: Final = (WORKLOAD_ATTRIBUTE, CLUSTER_ATTRIBUTE)
# Envoy's request id, the access log's key.
REQUEST_ID: Final = "x-request-id"

JSON_CONTENT_TYPE: Final = "application/json"
SSE_CONTENT_TYPE: Final = "text/event-stream"

# OpenAI-compatible endpoints the gateway decides on.
CHAT_COMPLETIONS: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
MODELS: Final = "/v1/models"

# Credentials and identity.
AUTHORIZATION: Final = "authorization"
API_KEY: Final = "x-api-key"
XFCC: Final = "x-forwarded-client-cert"

# Set by the gateway for the backend and the mesh; a client-sent value is never passed on.
TENANT: Final = "x-llm-tenant"
TIER: Final = "x-llm-tier"
TRAFFIC_CLASS: Final = "x-llm-class"

# Rate-limit headers as OpenAI clients read them.
RATELIMIT_LIMIT_REQUESTS: Final = "x-ratelimit-limit-requests"
RATELIMIT_LIMIT_TOKENS: Final = "x-ratelimit-limit-tokens"
RATELIMIT_REMAINING_REQUESTS: Final = "x-ratelimit-remaining-requests"
RATELIMIT_REMAINING_TOKENS: Final = "x-ratelimit-remaining-tokens"
RATELIMIT_RESET_REQUESTS: Final = "x-ratelimit-reset-requests"
RATELIMIT_RESET_TOKENS: Final = "x-ratelimit-reset-tokens"
RETRY_AFTER: Final = "retry-after"
RETRY_AFTER_MS: Final = "retry-after-ms"
SHOULD_RETRY: Final = "x-should-retry"
