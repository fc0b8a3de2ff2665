"""Names and advisory buckets: the OpenTelemetry GenAI semantic conventions (v1.41) and
Tollway's own instruments. Constants only; the public interface of the telemetry.
"""

from __future__ import annotations

# --- metrics (semconv gen_ai.client.*) -------------------------------------------------------
TOKEN_USAGE = "gen_ai.client.token.usage"
OPERATION_DURATION = "gen_ai.client.operation.duration"
TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
TIME_PER_OUTPUT_CHUNK = "gen_ai.client.operation.time_per_output_chunk"

# The conventions' ExplicitBucketBoundaries advisories.
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
FIRST_CHUNK_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
PER_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# --- Tollway's own ---------------------------------------------------------------------------
OVERHEAD = "tollway.gateway.overhead"  # seconds of gateway time, backend waits excluded
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip
REQUESTS = "tollway.requests"  # by API, operation, status code and error
TOKENS = "tollway.tokens"  # by subscription, model, API and token type
STORE_UNAVAILABLE = "tollway.limits.store.unavailable"  # gauge: 1 while the shared store is down
STORE_FAILED_ADMISSIONS = "tollway.limits.store.failed_admissions"  # admissions it could not take
BACKEND_CONNECTIONS = "tollway.backend.connections"  # gauge: open, busy or idle
TASKS = "tollway.process.tasks"  # gauge: asyncio tasks in the worker's event loop
BACKEND_RETRIES = "tollway.backend.retries"  # attempts after a request's first, by backend
BREAKER_OPEN = "tollway.backend.circuit_breaker.open"  # gauge: 1 while a breaker is tripped
BREAKER_TRIPS = "tollway.backend.circuit_breaker.trips"  # times a breaker tripped
SPANS_DROPPED = "tollway.telemetry.spans.dropped"  # export queue full
METRIC_FOLDED = "tollway.telemetry.metric.folded"  # measurements sent to an overflow series
CACHE_LOOKUPS = "tollway.cache.lookups"  # semantic-cache lookups by API and result
CACHE_ERRORS = "tollway.cache.errors"  # fail-open embedder or index failures, by stage, error.type
CACHE_ENTRIES = "tollway.cache.entries"  # gauge: entries in the in-process index
SAFETY_CHECKS = "tollway.content_safety.checks"  # screenings by API, target and result
CACHE_EVICTIONS = "tollway.cache.evictions"  # entries the in-process index dropped for room
CACHE_BYTES = "tollway.cache.bytes"  # gauge: bytes the in-process index's entries take
CACHE_COPIED = "tollway.cache.copied"  # gauge: Redis index entries copied into this process

# --- attributes ------------------------------------------------------------------------------
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
TOKEN_TYPE = "gen_ai.token.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
API_ID = "tollway.api.id"
OPERATION_ID = "tollway.operation.id"
SUBSCRIPTION_ID = "tollway.subscription.id"
STATUS_CODE = "http.response.status_code"

# Tollway's operation ids -> gen_ai.operation.name (None: not a GenAI operation).
OPERATION_NAMES: dict[str, str] = {
    "chat-completions": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}

# Backend hosts with a well-known gen_ai.provider.name; any other OpenAI-compatible backend is
# "openai", as the conventions ask when the client speaks OpenAI's API to another system.
PROVIDERS: tuple[tuple[str, str], ...] = (
    (".openai.azure.com", "azure.ai.openai"),
    (".services.ai.azure.com", "azure.ai.inference"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.groq.com", "groq"),
    ("api.deepseek.com", "deepseek"),
    ("api.x.ai", "x_ai"),
    ("api.perplexity.ai", "perplexity"),
)


def provider_of(host: str) -> str:
    host = host.lower()
    for suffix, name in PROVIDERS:
        if host == suffix.lstrip(".") or host.endswith(suffix):
            return name
    return "openai"
