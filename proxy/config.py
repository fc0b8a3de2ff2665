"""The config schema (SPEC §3 and §6) as strict, frozen msgspec Structs, and its loader.

Pure data: imports only the standard library, msgspec, yaml and ``proxy.units``. Tests and the
runtime may build ``Config(...)`` directly; ``load()`` / ``loads()`` add YAML parsing, ``${ENV}``
expansion and error messages that name the YAML path of the problem::

    apis[0].policies[1].llm-token-limit.tokens-per-minute: expected int, got str

Checks live where the data is: one Struct's own fields in its ``__post_init__`` (raising
``ValueError("field: problem")``, which msgspec attaches to the Struct's path), references between
sections in ``Config.__post_init__`` (raising ``ConfigError`` with every problem found). msgspec
stops at the first schema error, so those come one at a time; env and cross-reference errors
all at once.

Loading rules beyond SPEC §3, each chosen so a mistake fails at load rather than at run time:

- ``${VAR}`` unset *or empty* is an error (a secret must not silently become ""); ``${VAR:-}``
  allows empty. Strings convert to numbers or booleans where the schema wants one
  (``tokens-per-minute: ${TPM:-5000}``), and only there.
- YAML 1.2 booleans: only ``true``/``false``, so ``access-log: off`` is the string ``off``.
  A key repeated in one mapping is an error (PyYAML would keep the last one silently).
- ``Backend.url`` and ``Api.path`` are normalised (trailing slash dropped) in ``__post_init__``.
- Templates have no escape for literal braces; a stray brace is an error.
- Frozen all the way down except ``Config.tokenizers``, a plain dict because its order matters
  (first glob wins); treat it as read-only. ``Config`` is therefore not hashable.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import secrets
import typing
from collections.abc import Hashable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import SplitResult, urlsplit

import msgspec
import yaml  # type: ignore[import-untyped, unused-ignore]

from proxy.units import Duration, Size

__all__ = [
    "ALL_ACCESS_ID", "DEFAULT_DIMENSIONS", "DEFAULT_TOKENIZERS", "MAX_WINDOW", "RESERVED_PATHS",
    "TEMPLATE_NAMES", "TIKTOKEN_ENCODINGS",
    "Api", "Backend", "Blocklist", "CacheLookup", "CacheStore", "Categories", "CircuitBreaker",
    "Config",
    "ConfigError", "ContentSafety", "Credentials", "Dimension", "Duration", "FailureCondition",
    "Gateway", "KeyNames", "Policy", "PolicyEntry", "PoolService", "Product", "Retry", "Size",
    "StatusRange", "Subscription", "Telemetry", "TemplateVar", "Timeout", "TokenLimit",
    "TokenMetric", "hash_key", "key_digest", "load", "loads", "new_key", "parse_template",
    "to_builtins",
]  # fmt: skip

ALL_ACCESS_ID = "master"  # the built-in all-access subscription's id (gateway.all-access)
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/console", "/admin")
DEFAULT_TOKENIZERS = {
    "gpt-4o*": "tiktoken:o200k_base", "gpt-4*": "tiktoken:cl100k_base", "*": "tiktoken:o200k_base"
}  # fmt: skip
DEFAULT_DIMENSIONS = (
    "API ID", "Operation ID", "Product ID", "Subscription ID", "Backend ID", "Gateway ID"
)  # fmt: skip
# The OpenAI encodings whose rank files ship offline (proxy/tokens.py loads them).
TIKTOKEN_ENCODINGS = ("cl100k_base", "o200k_base")
TEMPLATE_NAMES = (
    "subscription.id", "subscription.name", "product.id", "api.id", "operation.id",
    "backend.id", "request.ip", "request.model", "request.header.<Name>",
)  # fmt: skip

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token
_PATH_RE = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_STORE_SCHEMES = ("redis", "rediss", "redis+cluster")


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one ``path: problem`` line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        return ConfigError, (self.errors,)  # survives pickling into worker processes


# --- templates -----------------------------------------------------------------------------


class TemplateVar(NamedTuple):
    """One ``{placeholder}``; for ``request.header.<Name>``, ``header`` is the lowercased Name."""

    name: str
    header: str = ""


def parse_template(text: str) -> tuple[str | TemplateVar, ...]:
    """Split ``"team-{subscription.id}"`` into ``("team-", TemplateVar("subscription.id"))``.

    Raises ``ValueError`` for an unknown placeholder or a brace without its partner; there is
    no escape for literal braces. Nothing is evaluated: rendering is a join of looked-up values.
    """
    parts: list[str | TemplateVar] = []
    for i, piece in enumerate(re.split(r"\{([^{}]*)\}", text)):
        if i % 2 == 0:
            if "{" in piece or "}" in piece:
                raise ValueError(f"unbalanced brace in template {text!r}")
            if piece:
                parts.append(piece)
        elif piece in TEMPLATE_NAMES[:-1]:
            parts.append(TemplateVar(piece))
        elif piece.startswith("request.header.") and _TOKEN_RE.fullmatch(piece[15:]):
            parts.append(TemplateVar("request.header", piece[15:].lower()))
        else:
            names = ", ".join(TEMPLATE_NAMES)
            raise ValueError(f"unknown placeholder {{{piece}}} (expected one of: {names})")
    return tuple(parts)


# --- keys ----------------------------------------------------------------------------------


def key_digest(key: str) -> bytes:
    """The SHA-256 digest a key is compared by: decoded from ``sha256:<hex>`` or computed."""
    if key.startswith("sha256:"):
        return bytes.fromhex(key[7:])
    return hashlib.sha256(key.encode()).digest()


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form of a key, to store in the config instead of the key."""
    return "sha256:" + key_digest(key).hex()


def new_key() -> str:
    """A fresh random subscription key (256 bits, URL- and header-safe). Never one starting
    with "-", which a command line would read as an option (`tollway keys hash KEY`, curl)."""
    while True:
        key = secrets.token_urlsafe(32)
        if not key.startswith("-"):
            return key


def _key_problem(key: str) -> str | None:
    # Keys are stored as unsalted SHA-256, so a short key is one a leaked config gives away to a
    # brute-force search; 16 characters is the floor, `tollway keys new` makes 43.
    if key.startswith("sha256:"):
        if not _SHA256_RE.fullmatch(key):
            return "a hashed key must be sha256: and 64 lowercase hex digits"
    elif len(key) < 16:
        return "a literal key must be at least 16 characters (make one with `tollway keys new`)"
    elif not (key.isascii() and key.isprintable()) or " " in key:
        return "a key must be printable ASCII without spaces"
    return None


# --- field checks (each raises ValueError("field: problem")) --------------------------------


def _check_id(value: str, field: str = "id") -> None:
    if not _ID_RE.fullmatch(value):
        raise ValueError(f"{field}: {value!r} is not an id (1-64 letters, digits, '.', '_', '-')")


def _check_header(value: str, field: str) -> None:
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"{field}: {value!r} is not a valid HTTP header name")


def _check_templates(values: tuple[str, ...], field: str) -> None:
    for i, value in enumerate(values):
        try:
            parse_template(value)
        except ValueError as exc:
            where = f"{field}[{i}]" if len(values) > 1 else field
            raise ValueError(f"{where}: {exc}") from None


def _split_url(url: str) -> SplitResult | None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    return parts


def _http_url(url: str, field: str, what: str) -> str:
    """``url`` checked as an http(s) base URL, without its trailing slash."""
    parts = _split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field}: {url!r} is not an http(s) URL with a host ({what})")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{field}: no user, password, query or fragment in a {what}")
    return url.rstrip("/")


class _Schema(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True,
              rename="kebab"):  # fmt: skip
    """The options every config Struct shares (STYLE principle 4). Subclasses repeat
    ``kw_only`` (msgspec applies it per class) and ``frozen`` (for type checkers)."""


# --- gateway and telemetry -----------------------------------------------------------------


class Gateway(_Schema, kw_only=True, frozen=True):
    store: str = "memory"
    store_failure_mode: Literal["open", "closed"] = "open"
    max_request_body: Size = Size("10MiB")
    trusted_proxies: tuple[str, ...] = ()
    console: bool = True
    admin_key: str = ""  # literal or sha256: form; empty disables /admin/*
    # The built-in subscription `master` (scope all-apis), as APIM's all-access one: its
    # keys are made once and kept in the subscription store, for the console to read.
    all_access: bool = True

    def __post_init__(self) -> None:
        if self.store != "memory":
            parts = _split_url(self.store)
            if parts is None or parts.scheme not in _STORE_SCHEMES or not parts.hostname:
                raise ValueError(
                    f"store: {self.store!r} is not memory or a redis://, rediss:// or "
                    "redis+cluster:// URL with a host"
                )
        for i, cidr in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"trusted-proxies[{i}]: {cidr!r} is not an IP network") from None
        if self.admin_key and (problem := _key_problem(self.admin_key)):
            raise ValueError(f"admin-key: {problem}")


class Telemetry(_Schema, kw_only=True, frozen=True):
    service_name: str = "tollway"
    otlp_endpoint: str = ""  # OTLP/HTTP base URL; empty = no export
    prometheus: bool = True
    access_log: Literal["json", "text", "off"] = "json"

    def __post_init__(self) -> None:
        if self.otlp_endpoint:
            _http_url(self.otlp_endpoint, "otlp-endpoint", "OTLP/HTTP endpoint")


# --- backends ------------------------------------------------------------------------------


class Credentials(_Schema, kw_only=True, frozen=True):
    header: str
    value: str

    def __post_init__(self) -> None:
        _check_header(self.header, "header")
        if any(c in self.value for c in "\r\n\0"):  # header injection
            raise ValueError("value: must not contain CR, LF or NUL")


class Timeout(_Schema, kw_only=True, frozen=True):
    connect: Duration = Duration(5)
    read: Duration = Duration(300)


class StatusRange(_Schema, kw_only=True, frozen=True):
    min: Annotated[int, msgspec.Meta(ge=100, le=599)]
    max: Annotated[int, msgspec.Meta(ge=100, le=599)]

    def __post_init__(self) -> None:
        if self.min > self.max:
            raise ValueError(f"max: {self.max} is below min {self.min}")


class FailureCondition(_Schema, kw_only=True, frozen=True):
    """Trip on `count` failures, or on `percentage` % of at least `min-requests` requests,
    within `interval` (proxy/breaker.py)."""

    count: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    percentage: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 10
    interval: Duration
    status_code_ranges: tuple[StatusRange, ...] = ()
    error_reasons: tuple[Literal["timeout", "connection"], ...] = ()

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percentage is None):
            raise ValueError("give either count or percentage")
        if not self.status_code_ranges and not self.error_reasons:
            raise ValueError("give status-code-ranges or error-reasons or both")


class CircuitBreaker(_Schema, kw_only=True, frozen=True):
    failure_condition: FailureCondition
    trip_duration: Duration
    accept_retry_after: bool = False


class PoolService(_Schema, kw_only=True, frozen=True):
    id: str
    priority: Annotated[int, msgspec.Meta(ge=0, le=100)] = 1  # lower is tried first
    weight: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1


class Retry(_Schema, kw_only=True, frozen=True):
    """Further attempts after a retryable status or a connection error (proxy/dispatch.py).

    `interval`: the wait before trying the same backend again (none by default; another
    pool member is tried at once). A backend's Retry-After is honoured up to
    `max-retry-after`; a longer one ends the retries with the backend's own response.
    """

    count: Annotated[int, msgspec.Meta(ge=0, le=50)] = 0
    on_status: tuple[Annotated[int, msgspec.Meta(ge=100, le=599)], ...] = (429, 500, 502, 503, 504)
    interval: Duration | None = None
    max_retry_after: Duration = Duration(10)


class Backend(_Schema, kw_only=True, frozen=True):
    """A single upstream (``url``, normalised without trailing slash) or a pool of backends."""

    id: str
    type: Literal["single", "pool"] = "single"
    url: str = ""
    credentials: Credentials | None = None
    timeout: Timeout = Timeout()
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1000
    circuit_breaker: CircuitBreaker | None = None
    services: Annotated[tuple[PoolService, ...], msgspec.Meta(max_length=30)] = ()
    retry: Retry | None = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.type == "single":
            if not self.url:
                raise ValueError("url: required for a single backend")
            if self.services:
                raise ValueError("services: only a pool has services")
            msgspec.structs.force_setattr(self, "url", _http_url(self.url, "url", "backend URL"))
            return
        for field in ("url", "credentials", "circuit-breaker"):
            if getattr(self, field.replace("-", "_")):
                raise ValueError(f"{field}: set it on the pool's member backends, not the pool")
        if not self.services:
            raise ValueError("services: a pool needs at least one service")
        ids = [service.id for service in self.services]
        for i, service_id in enumerate(ids):
            if service_id in ids[:i]:
                raise ValueError(f"services[{i}].id: {service_id!r} is already in this pool")


# --- policies (SPEC §6) --------------------------------------------------------------------


class TokenLimit(_Schema, kw_only=True, frozen=True):
    counter_key: str = "{subscription.id}"
    tokens_per_minute: Annotated[int, msgspec.Meta(ge=1)] | None = None
    token_quota: Annotated[int, msgspec.Meta(ge=1)] | None = None
    token_quota_period: Literal["hourly", "daily", "weekly", "monthly", "yearly"] = "monthly"
    estimate_prompt_tokens: bool = True
    reserve_completion_tokens: bool = True
    retry_after_header_name: str = "Retry-After"
    remaining_tokens_header_name: str = ""
    remaining_quota_tokens_header_name: str = ""
    tokens_consumed_header_name: str = ""

    def __post_init__(self) -> None:
        if self.tokens_per_minute is None and self.token_quota is None:
            raise ValueError("give tokens-per-minute or token-quota or both")
        if not self.counter_key:
            raise ValueError("counter-key: must not be empty")
        _check_templates((self.counter_key,), "counter-key")
        _check_header(self.retry_after_header_name, "retry-after-header-name")
        named: dict[str, str] = {}
        for field in ("remaining-tokens", "remaining-quota-tokens", "tokens-consumed"):
            if value := getattr(self, f"{field.replace('-', '_')}_header_name"):
                _check_header(value, f"{field}-header-name")
                if value.lower() in named:
                    raise ValueError(
                        f"{field}-header-name: {value!r} is already the "
                        f"{named[value.lower()]}-header-name; each header reports one figure"
                    )
                named[value.lower()] = field


class Dimension(_Schema, kw_only=True, frozen=True):
    name: str
    value: str = ""  # a template; empty only for the DEFAULT_DIMENSIONS, which fill it in

    def __post_init__(self) -> None:
        if not self.value and self.name not in DEFAULT_DIMENSIONS:
            raise ValueError(
                f"value: required, {self.name!r} is not a default dimension "
                f"({', '.join(DEFAULT_DIMENSIONS)})"
            )
        _check_templates((self.value,), "value")


class TokenMetric(_Schema, kw_only=True, frozen=True):
    namespace: str = "tollway"
    dimensions: tuple[Dimension, ...] = tuple(Dimension(name=n) for n in DEFAULT_DIMENSIONS)

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError("namespace: must not be empty")
        if not 1 <= len(self.dimensions) <= 10:
            raise ValueError(f"dimensions: 1 to 10 dimensions, got {len(self.dimensions)}")
        names = [dimension.name for dimension in self.dimensions]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"dimensions[{i}].name: {name!r} is already a dimension")


class CacheLookup(_Schema, kw_only=True, frozen=True):
    """`llm-semantic-cache-lookup` (proxy/cache/policy.py). The partition an entry lives in is
    always the API, operation, model, the request's other parameters, the embedder and (unless
    `share-across-subscriptions`) the caller's subscription, plus the rendered `vary-by`."""

    score_threshold: float  # cosine distance: 0 identical .. 2 opposite; lower is stricter
    embedder: Literal["backend", "local"] = "backend"
    embeddings_backend_id: str = ""  # required for embedder: backend
    embeddings_model: str = "text-embedding-3-small"
    ignore_system_messages: bool = True
    max_message_count: Annotated[int, msgspec.Meta(ge=1)] = 10
    vary_by: tuple[str, ...] = ()
    # Entries are per subscription unless this is true: one tenant could then receive an
    # answer another tenant's request produced.
    share_across_subscriptions: bool = False
    timeout: Duration = Duration("500ms")  # the whole lookup's bound (embedding + index)
    max_entries: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000  # memory index

    def __post_init__(self) -> None:
        if not 0 < self.score_threshold <= 2:
            raise ValueError(f"score-threshold: must be in (0, 2], got {self.score_threshold}")
        if self.embedder == "backend" and not self.embeddings_backend_id:
            raise ValueError("embeddings-backend-id: required with embedder: backend")
        if self.embedder == "local" and self.embeddings_backend_id:
            raise ValueError("embeddings-backend-id: not used with embedder: local")
        if not self.embeddings_model:
            raise ValueError("embeddings-model: must not be empty")
        if float(self.timeout) > 60:
            raise ValueError(f"timeout: at most 60s (it delays every miss), got {self.timeout}")
        _check_templates(self.vary_by, "vary-by")


class CacheStore(_Schema, kw_only=True, frozen=True):
    """`llm-semantic-cache-store`: complete 200 replies kept for `duration`; with
    `cache-response: false` this pipeline only reads the cache."""

    duration: Duration
    cache_response: bool = True


_Severity = Annotated[int, msgspec.Meta(ge=0, le=7)]
MAX_WINDOW = 10_000  # characters: Azure AI Content Safety's limit per text:analyze call


class Categories(_Schema, kw_only=True, frozen=True):
    output_type: Literal["FourSeverityLevels", "EightSeverityLevels"] = "FourSeverityLevels"
    hate: _Severity | None = msgspec.field(default=None, name="Hate")
    self_harm: _Severity | None = msgspec.field(default=None, name="SelfHarm")
    sexual: _Severity | None = msgspec.field(default=None, name="Sexual")
    violence: _Severity | None = msgspec.field(default=None, name="Violence")

    def __post_init__(self) -> None:
        if (self.hate, self.self_harm, self.sexual, self.violence) == (None,) * 4:
            raise ValueError("give at least one of Hate, SelfHarm, Sexual, Violence")


class ContentSafety(_Schema, kw_only=True, frozen=True):
    """`llm-content-safety` (proxy/safety/policy.py). `backend-id` names an Azure AI Content
    Safety-compatible backend; without one only the local blocklists screen. A name in
    `blocklists` is a local list when the top-level `blocklists:` defines it, else a list the
    backend holds (sent as `blocklistNames`). A backend with no categories, shield-prompt or
    blocklists of its own screens the four categories at threshold 4."""

    backend_id: str = ""
    shield_prompt: bool = False
    enforce_on_completions: bool = False
    categories: Categories | None = None
    blocklists: tuple[str, ...] = ()
    # Text is sent to the backend in windows of at most this many characters, each starting
    # `window-size - window-overlap-size` after the previous one: long input is screened in
    # pieces, never refused for its length (10,000 is the service's limit per call).
    window_size: Annotated[int, msgspec.Meta(ge=100, le=MAX_WINDOW)] = MAX_WINDOW
    window_overlap_size: Annotated[int, msgspec.Meta(ge=0)] = 500
    # Streamed completions are screened every this many characters (held back meanwhile).
    stream_window_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_WINDOW)] = 100
    on_error: Literal["block", "allow"] = "block"  # when the backend fails or is too slow
    timeout: Duration = Duration("3s")  # the whole screening of one request or reply

    def __post_init__(self) -> None:
        # Severities and prompt shields come from the analysis backend; the local screen has
        # neither, and a threshold silently never enforced is worse than a refused config.
        for field in ("shield-prompt", "categories"):
            if getattr(self, field.replace("-", "_")) and not self.backend_id:
                raise ValueError(
                    f"{field}: needs backend-id (the local screen has only blocklists)"
                )
        if not self.backend_id and not self.blocklists:
            raise ValueError("give backend-id, blocklists or both (nothing would be screened)")
        if self.window_overlap_size >= self.window_size:
            raise ValueError(
                f"window-overlap-size: must be less than window-size ({self.window_size}), "
                f"got {self.window_overlap_size}"
            )
        if not 0 < float(self.timeout) <= 60:
            raise ValueError(f"timeout: more than 0 and at most 60s, got {self.timeout}")
        for i, name in enumerate(self.blocklists):
            if name in self.blocklists[:i]:
                raise ValueError(f"blocklists[{i}]: {name!r} is listed twice")


class Blocklist(_Schema, kw_only=True, frozen=True):
    """A local blocklist (top-level `blocklists:`): terms matched as whole words and regular
    expressions, on case- and Unicode-normalised text (proxy/safety/screen.py)."""

    terms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    # Checked by Config._blocklist_errors, which knows the list's name for the error's path.


Policy = TokenLimit | TokenMetric | CacheLookup | CacheStore | ContentSafety


class PolicyEntry(_Schema, kw_only=True, frozen=True):
    """One item of a ``policies`` list: a one-key mapping such as ``llm-token-limit: {...}``."""

    llm_token_limit: TokenLimit | None = None
    llm_emit_token_metric: TokenMetric | None = None
    llm_semantic_cache_lookup: CacheLookup | None = None
    llm_semantic_cache_store: CacheStore | None = None
    llm_content_safety: ContentSafety | None = None

    def __post_init__(self) -> None:
        fields = msgspec.structs.fields(self)
        names = [f.encode_name for f in fields if getattr(self, f.name) is not None]
        if len(names) != 1:
            got = ", ".join(names) or "none"
            expected = ", ".join(f.encode_name for f in fields)
            raise ValueError(f"exactly one policy per entry ({expected}); got {got}")

    @property
    def policy(self) -> Policy:
        """The one policy this entry holds."""
        return next(p for p in msgspec.structs.astuple(self) if p is not None)  # type: ignore[no-any-return]

    @property
    def name(self) -> str:
        """The policy's config name, e.g. ``llm-token-limit``."""
        fields = msgspec.structs.fields(self)
        return next(f.encode_name for f in fields if getattr(self, f.name) is not None)


# --- apis, products, subscriptions ---------------------------------------------------------


class KeyNames(_Schema, kw_only=True, frozen=True):
    header: str = "Ocp-Apim-Subscription-Key"
    query: str = "subscription-key"

    def __post_init__(self) -> None:
        _check_header(self.header, "header")
        if not re.fullmatch(r"[A-Za-z0-9._~-]+", self.query):
            raise ValueError(f"query: {self.query!r} is not a plain query parameter name")


class Api(_Schema, kw_only=True, frozen=True):
    """An API served under ``path`` (normalised without trailing slash; never ``/``)."""

    id: str
    display_name: str = ""
    description: str = ""
    path: str
    type: Literal["openai", "passthrough"] = "openai"
    backend: str
    subscription_required: bool = True
    subscription_key_names: KeyNames = KeyNames()
    products: tuple[str, ...] = ()
    policies: tuple[PolicyEntry, ...] = ()

    def __post_init__(self) -> None:
        _check_id(self.id)
        path = self.path.rstrip("/") if self.path.startswith("/") else self.path
        segments = path.split("/")[1:]
        if not _PATH_RE.fullmatch(path) or "." in segments or ".." in segments:
            raise ValueError(
                f"path: {self.path!r} is not a path like /openai (not /; plain segments, "
                "no '.', '..', '//', '%', '?' or '#')"
            )
        for reserved in RESERVED_PATHS:
            if path == reserved or path.startswith(reserved + "/"):
                raise ValueError(f"path: {path} is the gateway's own {reserved} endpoint")
        msgspec.structs.force_setattr(self, "path", path)


class Product(_Schema, kw_only=True, frozen=True):
    id: str
    display_name: str = ""
    description: str = ""
    subscription_required: bool = True
    policies: tuple[PolicyEntry, ...] = ()

    def __post_init__(self) -> None:
        _check_id(self.id)


class Subscription(_Schema, kw_only=True, frozen=True):
    id: str
    display_name: str = ""
    scope: str = "all-apis"  # all-apis | api:<id> | product:<id>
    state: Literal["active", "suspended"] = "active"
    primary_key: str = ""  # a literal key or sha256:<64 lowercase hex>
    secondary_key: str = ""

    def __post_init__(self) -> None:
        _check_id(self.id)
        if self.scope != "all-apis":
            kind, _, target = self.scope.partition(":")
            if kind not in ("api", "product") or not _ID_RE.fullmatch(target):
                raise ValueError(f"scope: {self.scope!r} is not all-apis, api:<id> or product:<id>")
        if not self.primary_key and not self.secondary_key:
            raise ValueError("give primary-key or secondary-key or both")
        for field in ("primary-key", "secondary-key"):
            key = getattr(self, field.replace("-", "_"))
            if key and (problem := _key_problem(key)):
                raise ValueError(f"{field}: {problem}")

    @property
    def scope_kind(self) -> Literal["all-apis", "api", "product"]:
        kind = self.scope.partition(":")[0]  # "all-apis" has no colon
        return typing.cast(Literal["all-apis", "api", "product"], kind)

    @property
    def scope_id(self) -> str:
        """The API or product id the scope names; empty for ``all-apis``."""
        return self.scope.partition(":")[2]

    @property
    def key_digests(self) -> tuple[bytes, ...]:
        """SHA-256 digests of the keys that are set, primary first."""
        return tuple(key_digest(k) for k in (self.primary_key, self.secondary_key) if k)


# --- the whole config ----------------------------------------------------------------------


class Config(_Schema, kw_only=True, frozen=True, dict=True):
    """The whole config. ``backend(id)``, ``api(id)``, ``product(id)``, ``subscription(id)``
    look entries up by id (``KeyError`` if absent) through tables built once per instance.
    """

    gateway: Gateway = Gateway()
    telemetry: Telemetry = Telemetry()
    tokenizers: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_TOKENIZERS))
    backends: tuple[Backend, ...]
    apis: tuple[Api, ...]
    products: tuple[Product, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()
    policies: tuple[PolicyEntry, ...] = ()
    blocklists: dict[str, Blocklist] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        errors = [*self._tokenizer_errors(), *self._duplicate_errors(), *self._path_errors(),
                  *self._reference_errors(), *self._key_errors(),
                  *self._metric_errors(), *self._blocklist_errors()]  # fmt: skip
        if errors:
            raise ConfigError(errors)

    def backend(self, id: str) -> Backend:
        return self._by_id["backends"][id]  # type: ignore[return-value]

    def api(self, id: str) -> Api:
        return self._by_id["apis"][id]  # type: ignore[return-value]

    def product(self, id: str) -> Product:
        return self._by_id["products"][id]  # type: ignore[return-value]

    def subscription(self, id: str) -> Subscription:
        return self._by_id["subscriptions"][id]  # type: ignore[return-value]

    @cached_property
    def _by_id(self) -> dict[str, dict[str, Backend | Api | Product | Subscription]]:
        kinds = ("backends", "apis", "products", "subscriptions")
        return {kind: {item.id: item for item in getattr(self, kind)} for kind in kinds}

    def _tokenizer_errors(self) -> Iterator[str]:
        for glob, spec in self.tokenizers.items():
            kind, _, arg = spec.partition(":")
            if kind not in ("tiktoken", "hf") or not arg:
                yield f"tokenizers[{glob!r}]: {spec!r} is not tiktoken:<encoding> or hf:<path>"
            elif kind == "tiktoken" and arg not in TIKTOKEN_ENCODINGS:
                offline = ", ".join(TIKTOKEN_ENCODINGS)
                yield f"tokenizers[{glob!r}]: {arg!r} is not shipped offline ({offline})"

    def _duplicate_errors(self) -> Iterator[str]:
        for kind in ("backends", "apis", "products", "subscriptions"):
            first: dict[str, int] = {}
            for i, item in enumerate(getattr(self, kind)):
                if (j := first.setdefault(item.id, i)) != i:
                    yield f"{kind}[{i}].id: duplicate id {item.id!r} (also {kind}[{j}])"

    def _path_errors(self) -> Iterator[str]:
        for i, api in enumerate(self.apis):
            for j, other in enumerate(self.apis[:i]):
                if api.path == other.path:
                    yield f"apis[{i}].path: {api.path} is also apis[{j}].path"
                elif (api.path + "/").startswith(other.path + "/") or (other.path + "/").startswith(
                    api.path + "/"
                ):
                    yield f"apis[{i}].path: {api.path} and apis[{j}].path {other.path} nest"

    def _reference_errors(self) -> Iterator[str]:
        backends = {b.id: b for b in self.backends}
        apis, products = {a.id for a in self.apis}, {p.id for p in self.products}

        def missing(path: str, kind: str, id: str, known: Mapping[str, object] | set[str]) -> str:
            close = difflib.get_close_matches(id, list(known), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{path}: unknown {kind} {id!r}{hint}"

        for i, backend in enumerate(self.backends):
            for k, service in enumerate(backend.services):
                path = f"backends[{i}].services[{k}].id"
                if service.id not in backends:
                    yield missing(path, "backend", service.id, backends)
                elif backends[service.id].type == "pool":
                    yield f"{path}: {service.id!r} is a pool; pools cannot contain pools"
        for i, api in enumerate(self.apis):
            if api.backend not in backends:
                yield missing(f"apis[{i}].backend", "backend", api.backend, backends)
            for k, product in enumerate(api.products):
                if product not in products:
                    yield missing(f"apis[{i}].products[{k}]", "product", product, products)
        for i, sub in enumerate(self.subscriptions):
            if sub.id == ALL_ACCESS_ID and self.gateway.all_access:
                yield (f"subscriptions[{i}].id: {ALL_ACCESS_ID!r} is the built-in all-access "
                       "subscription (gateway.all-access: false frees the id)")  # fmt: skip
            known = apis if sub.scope_kind == "api" else products
            if sub.scope_kind != "all-apis" and sub.scope_id not in known:
                yield missing(f"subscriptions[{i}].scope", sub.scope_kind, sub.scope_id, known)
        for path, entry in self.policy_entries():
            policy = entry.policy
            if isinstance(policy, CacheLookup) and policy.embeddings_backend_id:
                field, ref = "embeddings-backend-id", policy.embeddings_backend_id
            elif isinstance(policy, ContentSafety) and policy.backend_id:
                field, ref = "backend-id", policy.backend_id
            else:
                continue
            if ref not in backends:
                yield missing(f"{path}.{entry.name}.{field}", "backend", ref, backends)

    def policy_entries(self) -> Iterator[tuple[str, PolicyEntry]]:
        """Every policy entry of every pipeline (global, products, APIs), with its YAML path."""
        yield from ((f"policies[{k}]", entry) for k, entry in enumerate(self.policies))
        for kind in ("products", "apis"):
            for i, item in enumerate(getattr(self, kind)):
                yield from ((f"{kind}[{i}].policies[{k}]", e) for k, e in enumerate(item.policies))

    def _metric_errors(self) -> Iterator[str]:
        """Token-metric policies sharing a namespace share its counters, so they must name the
        same dimensions (the gateway could not start otherwise)."""
        first: dict[str, tuple[str, tuple[str, ...]]] = {}
        for path, entry in self.policy_entries():
            if isinstance(policy := entry.policy, TokenMetric):
                names = tuple(d.name for d in policy.dimensions)
                other, known = first.setdefault(policy.namespace, (path, names))
                if known != names:
                    yield (f"{path}.{entry.name}.dimensions: namespace {policy.namespace!r} has "
                           f"other dimensions in {other} (give it another namespace)")  # fmt: skip

    def _blocklist_errors(self) -> Iterator[str]:
        from proxy.safety.screen import LocalScreen  # pure; compiles each list once here

        for name, blocklist in self.blocklists.items():
            if not blocklist.terms and not blocklist.patterns:
                yield f"blocklists.{name}: give terms, patterns or both"
            for i, term in enumerate(blocklist.terms):
                if not term.strip():
                    yield f"blocklists.{name}.terms[{i}]: must not be blank"
            try:
                LocalScreen({name: blocklist.terms}, {name: blocklist.patterns})
            except ValueError as exc:
                yield f"blocklists.{name}: {str(exc).removeprefix(name + ': ')}"
        for path, entry in self.policy_entries():
            policy = entry.policy
            if not isinstance(policy, ContentSafety) or policy.backend_id:
                continue
            for k, name in enumerate(policy.blocklists):
                if name not in self.blocklists:
                    close = difflib.get_close_matches(name, list(self.blocklists), 1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    yield (f"{path}.{entry.name}.blocklists[{k}]: {name!r} is not in the "
                           "top-level blocklists and there is no backend-id to hold it"
                           f"{hint}")  # fmt: skip

    def _key_errors(self) -> Iterator[str]:
        # Compared as digests, so a literal key and its sha256: form collide too.
        seen: dict[bytes, str] = {}
        if self.gateway.admin_key:
            seen[key_digest(self.gateway.admin_key)] = "gateway.admin-key"
        for i, sub in enumerate(self.subscriptions):
            for field in ("primary-key", "secondary-key"):
                if key := getattr(sub, field.replace("-", "_")):
                    path = f"subscriptions[{i}].{field}"
                    if (other := seen.setdefault(key_digest(key), path)) != path:
                        yield f"{path}: same key as {other}"


# --- loading -------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader with YAML 1.2 booleans (``off``/``no`` stay strings) that refuses duplicate
    keys (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        if not isinstance(node, yaml.MappingNode):  # `!!set [a]`, `!!map a`
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, found {node.id}", node.start_mark
            )
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key, Hashable):
                continue  # merges may repeat keys; unhashable keys are PyYAML's to refuse
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)  # type: ignore[no-any-return]


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z"), list("tTfF")
)

_ENV_RE = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand(node: object, path: str, env: Mapping[str, str], errors: list[str]) -> object:
    """``node`` with ``${VAR}``, ``${VAR:-default}`` and ``$${`` expanded in every string value."""
    if isinstance(node, dict):
        return {k: _expand(v, _key_path(path, k), env, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, errors) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        name, default_given, default = match[1].partition(":-")
        if not match[2] or not _ENV_NAME_RE.fullmatch(name) or "${" in default:
            errors.append(
                f"{path}: bad reference '${{{match[1]}{match[2]}' "
                "(expected ${NAME} or ${NAME:-default}; $${ is a literal ${)"
            )
        elif value := env.get(name, ""):
            return value
        elif default_given:
            return default
        else:  # secrets must not silently become empty
            errors.append(
                f"{path}: environment variable {name} is not set "
                f"(or empty; write ${{{name}:-}} to allow that)"
            )
        return ""

    expanded = _ENV_RE.sub(substitute, node)
    if expanded.strip().lower() == "null":  # would quietly empty the field it fills
        errors.append(f"{path}: {node!r} expands to {expanded!r}; leave the field out instead")
    return expanded


def _key_path(path: str, key: object) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][\w-]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _schema_type(path: str) -> object:
    """The annotated type at a msgspec error path, or None where the path leaves the schema."""
    tp: object = Config
    for name in re.findall(r"([^.\[\]]+)|\[[^\]]*\]", path):
        while typing.get_origin(tp) in (Annotated, typing.Union, type(int | None)):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not name:
            tp = typing.get_args(tp)[-1 if typing.get_origin(tp) is dict else 0]
            continue
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            return None
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(tp)}
        tp = fields.get(name)
    while typing.get_origin(tp) in (Annotated, typing.Union, type(int | None)):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


# "field: problem" from a __post_init__: the problem is at <struct path>.field
_FIELD_MESSAGE_RE = re.compile(
    r"([A-Za-z][\w-]*(?:\[\d+\])*(?:\.[A-Za-z][\w-]*(?:\[\d+\])*)*): (.+)", re.S
)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _translate(message: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.a[0].b`" as "a[0].b: expected int, got str"."""
    # The path is the last " - at `$...`" (a value or key in the text may contain one);
    # a key of the wrong type is " - at `key` in `$...`".
    text, _, at = message.rpartition(" - at `$")
    if not _:
        text, _, at = message.rpartition(" - at `key` in `$")
        if _:
            text += " (a key)"
        else:
            text, at = message, ""
    path = at.rstrip("`").lstrip(".")
    if match := re.fullmatch(r"Object (missing required|contains unknown) field `(.+)`", text):
        tp = _schema_type(path)
        path, text = _join(path, match[2]), "required field is missing"
        if match[1].startswith("contains") and isinstance(tp, type):
            names = ", ".join(f.encode_name for f in msgspec.structs.fields(tp))
            text = f"unknown field (expected one of: {names})"
    elif match := _FIELD_MESSAGE_RE.fullmatch(text):
        path, text = _join(path, match[1]), match[2]
    else:
        # "| null" is how msgspec spells a field that may be left out; nobody writes null there
        text = text.replace("`", "").replace(" | null,", ",")
        text = text[:1].lower() + text[1:]
        if (
            text.startswith("invalid enum value")
            and typing.get_origin(tp := _schema_type(path)) is Literal
        ):
            text += f" (expected one of: {', '.join(map(str, typing.get_args(tp)))})"
    return f"{path or '(top level)'}: {text}"


def _dec_hook(type_: type, value: object) -> object:
    if type_ is Duration or type_ is Size:
        return type_(value)
    raise NotImplementedError


def loads(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Parse, expand (``env`` defaults to ``os.environ``) and validate a YAML config."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader
    except RecursionError:
        raise ConfigError(["(top level): nested too deeply"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}{exc.problem or exc.context}"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise ConfigError([f"(top level): expected a mapping of sections, got {got}"])
    errors: list[str] = []
    try:
        data = _expand(data, "", os.environ if env is None else env, errors)
    except RecursionError:  # an alias that contains itself
        raise ConfigError(["(top level): a YAML alias refers to itself"]) from None
    if errors:
        raise ConfigError(errors)
    try:
        # strict=False converts strings where a number or bool is due: `${TPM:-5000}` works.
        return msgspec.convert(data, Config, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError([_translate(str(exc))]) from exc


def to_builtins(config: Config) -> dict[str, object]:
    """``config`` as plain data (kebab keys; durations and sizes as ``"5m"``, ``"10MiB"``),
    ready for ``yaml.safe_dump``; ``loads`` of the dump gives an equal Config."""
    return msgspec.to_builtins(config, enc_hook=str)  # type: ignore[no-any-return]


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at ``path``; raises ``ConfigError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{os.fspath(path)}: no such config file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{os.fspath(path)}: cannot read the config file: {exc}"]) from exc
    return loads(text, env)
