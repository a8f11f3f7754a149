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

JSON_CONTENT_TYPE: Final = "application/json"
SSE_CONTENT_TYPE: Final = "text/event-stream"

# OpenAI-compatible endpoints the gateway decides on.
CHAT_COMPLETIONS: Final = "/v1/chat/completions"
COMPLETIONS: Final = "/v1/completions"
EMBEDDINGS: Final = "/v1/embeddings"
MODELS: Final = "/v1/models"
