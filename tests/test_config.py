"""The config schema and loader (SPEC §3, §6): values, defaults, and errors that name YAML paths."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import (
    DEFAULT_DIMENSIONS,
    Api,
    Backend,
    CacheLookup,
    Config,
    ConfigError,
    Credentials,
    Duration,
    Size,
    TemplateVar,
    TokenLimit,
    hash_key,
    key_digest,
    load,
    loads,
    new_key,
    parse_template,
    to_builtins,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = "a-literal-key-0123456789"
OTHER_KEY = "another-key-0123456789"

BASE = """
backends:
  - id: openai
    url: https://api.openai.com/v1
    credentials: {header: Authorization, value: "Bearer ${OPENAI_API_KEY}"}
apis:
  - id: chat
    path: /openai
    backend: openai
"""
ENV = {"OPENAI_API_KEY": "sk-test"}


def load_text(extra: str = "", *, base: str = BASE, env: dict[str, str] | None = None) -> Config:
    return loads(base + extra, ENV if env is None else env)


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text, ENV if env is None else env)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def policy(body: str) -> str:
    return f"policies:\n  - {body}\n"


# --- valid configs load to the expected values ---------------------------------------------

VALID: list[tuple[str, str, Callable[[Config], Any], Any]] = [
    ("minimal url", "", lambda c: c.backends[0].url, "https://api.openai.com/v1"),
    (
        "trailing slash stripped",
        BASE.replace("/v1", "/v1/"),
        lambda c: c.backends[0].url,
        "https://api.openai.com/v1",
    ),
    (
        "api path normalised",
        BASE.replace("path: /openai", "path: /openai/"),
        lambda c: c.apis[0].path,
        "/openai",
    ),
    ("env expanded", "", lambda c: c.backends[0].credentials.value, "Bearer sk-test"),
    (
        "default timeouts",
        "",
        lambda c: (c.backends[0].timeout.connect, c.backends[0].timeout.read),
        (5.0, 300.0),
    ),
    (
        "duration ms",
        BASE.replace("credentials:", "timeout: {connect: 500ms, read: 5m}\n    credentials:"),
        lambda c: (c.backends[0].timeout.connect, c.backends[0].timeout.read),
        (0.5, 300.0),
    ),
    (
        "duration bare number is seconds",
        BASE.replace("credentials:", "timeout: {connect: 2, read: 1.5}\n    credentials:"),
        lambda c: (c.backends[0].timeout.connect, c.backends[0].timeout.read),
        (2.0, 1.5),
    ),
    (
        "duration hours",
        policy("llm-semantic-cache-store: {duration: 1h}"),
        lambda c: c.policies[0].policy.duration,
        3600.0,
    ),
    ("size default", "", lambda c: c.gateway.max_request_body, 10 * 1024 * 1024),
    (
        "size KiB",
        "gateway: {max-request-body: 512KiB}\n",
        lambda c: c.gateway.max_request_body,
        512 * 1024,
    ),
    (
        "size GiB",
        "gateway: {max-request-body: 1GiB}\n",
        lambda c: c.gateway.max_request_body,
        2**30,
    ),
    (
        "size kB",
        "gateway: {max-request-body: 100kB}\n",
        lambda c: c.gateway.max_request_body,
        100_000,
    ),
    (
        "size MB",
        "gateway: {max-request-body: 1MB}\n",
        lambda c: c.gateway.max_request_body,
        1_000_000,
    ),
    (
        "size bare int",
        "gateway: {max-request-body: 2048}\n",
        lambda c: c.gateway.max_request_body,
        2048,
    ),
    (
        "env default when unset",
        "telemetry: {service-name: '${SVC:-edge}'}\n",
        lambda c: c.telemetry.service_name,
        "edge",
    ),
    (
        "env set beats default",
        "telemetry: {service-name: '${OPENAI_API_KEY:-edge}'}\n",
        lambda c: c.telemetry.service_name,
        "sk-test",
    ),
    (
        "env empty default",
        "gateway: {admin-key: '${ADMIN:-}'}\n",
        lambda c: c.gateway.admin_key,
        "",
    ),
    (
        "env default with colon",
        "gateway: {store: '${STORE:-redis://cache:6379/0}'}\n",
        lambda c: c.gateway.store,
        "redis://cache:6379/0",
    ),
    (
        "escaped ${",
        "telemetry: {service-name: 'cost-$${ENV}'}\n",
        lambda c: c.telemetry.service_name,
        "cost-${ENV}",
    ),
    (
        "env into an int field",
        policy("llm-token-limit: {tokens-per-minute: '${TPM:-5000}'}"),
        lambda c: c.policies[0].policy.tokens_per_minute,
        5000,
    ),
    (
        "kebab keys",
        "gateway: {store-failure-mode: closed, trusted-proxies: [10.0.0.0/8, '::1']}\n",
        lambda c: (c.gateway.store_failure_mode, c.gateway.trusted_proxies),
        ("closed", ("10.0.0.0/8", "::1")),
    ),
    (
        "yaml 1.2 booleans: off is a string",
        "telemetry: {access-log: off, prometheus: false}\n",
        lambda c: (c.telemetry.access_log, c.telemetry.prometheus),
        ("off", False),
    ),
    (
        "redis cluster store",
        "gateway: {store: 'redis+cluster://r1:7000'}\n",
        lambda c: c.gateway.store,
        "redis+cluster://r1:7000",
    ),
    (
        "default tokenizers, ordered",
        "",
        lambda c: list(c.tokenizers.items()),
        [
            ("gpt-4o*", "tiktoken:o200k_base"),
            ("gpt-4*", "tiktoken:cl100k_base"),
            ("*", "tiktoken:o200k_base"),
        ],
    ),
    (
        "tokenizers keep file order",
        "tokenizers: {'llama*': 'hf:/m/tokenizer.json', '*': 'tiktoken:o200k_base'}\n",
        lambda c: list(c.tokenizers),
        ["llama*", "*"],
    ),
    (
        "key names",
        BASE + "    subscription-key-names: {header: X-Key, query: key}\n",
        lambda c: (c.apis[0].subscription_key_names.header, c.apis[0].subscription_key_names.query),
        ("X-Key", "key"),
    ),
    (
        "default key names",
        "",
        lambda c: (c.apis[0].subscription_key_names.header, c.apis[0].subscription_key_names.query),
        ("Ocp-Apim-Subscription-Key", "subscription-key"),
    ),
    (
        "token limit defaults",
        policy("llm-token-limit: {token-quota: 1000}"),
        lambda c: (
            c.policies[0].name,
            c.policies[0].policy.counter_key,
            c.policies[0].policy.token_quota_period,
            c.policies[0].policy.tokens_per_minute,
        ),
        ("llm-token-limit", "{subscription.id}", "monthly", None),
    ),
    (
        "metric default dimensions",
        policy("llm-emit-token-metric: {}"),
        lambda c: tuple(d.name for d in c.policies[0].policy.dimensions),
        DEFAULT_DIMENSIONS,
    ),
    (
        "metric custom dimension",
        policy(
            "llm-emit-token-metric: {dimensions: "
            "[{name: API ID}, {name: User, value: 'u-{request.header.X-User}'}]}"
        ),
        lambda c: [(d.name, d.value) for d in c.policies[0].policy.dimensions],
        [("API ID", ""), ("User", "u-{request.header.X-User}")],
    ),
    (
        "content safety PascalCase categories",
        policy(
            "llm-content-safety: {backend-id: openai, "
            "categories: {output-type: EightSeverityLevels, Hate: 4, SelfHarm: 0}}"
        ),
        lambda c: (
            c.policies[0].policy.categories.output_type,
            c.policies[0].policy.categories.hate,
            c.policies[0].policy.categories.self_harm,
            c.policies[0].policy.categories.sexual,
        ),
        ("EightSeverityLevels", 4, 0, None),
    ),
    (
        "local content screen",
        policy("llm-content-safety: {blocklists: [banned]}")
        + "blocklists:\n  banned: {terms: [make a bomb], patterns: ['\\b\\d{16}\\b']}\n",
        lambda c: (
            c.policies[0].policy.backend_id,
            c.policies[0].policy.blocklists,
            c.blocklists["banned"].terms,
            c.policies[0].policy.window_size,
            c.policies[0].policy.on_error,
        ),
        ("", ("banned",), ("make a bomb",), 10_000, "block"),
    ),
    (
        "semantic cache",
        policy(
            "llm-semantic-cache-lookup: {score-threshold: 0.05, embeddings-backend-id: openai, "
            "vary-by: ['{subscription.id}']}"
        ),
        lambda c: (
            c.policies[0].policy.score_threshold,
            c.policies[0].policy.max_message_count,
            c.policies[0].policy.ignore_system_messages,
        ),
        (0.05, 10, True),
    ),
    (
        "pool with defaults",
        BASE.replace(
            "apis:",
            "  - id: pool\n    type: pool\n"
            "    services: [{id: openai, weight: 3}]\n    retry: {count: 2}\napis:",
        ),
        lambda c: (
            c.backend("pool").services[0].priority,
            c.backend("pool").services[0].weight,
            c.backend("pool").retry.on_status,
        ),
        (1, 3, (429, 500, 502, 503, 504)),
    ),
    (
        "circuit breaker",
        BASE.replace(
            "credentials:",
            "circuit-breaker: {failure-condition: "
            "{count: 5, interval: 1m, status-code-ranges: [{min: 500, max: 599}], "
            "error-reasons: [timeout]}, trip-duration: 30s, accept-retry-after: true}\n"
            "    credentials:",
        ),
        lambda c: (
            c.backends[0].circuit_breaker.failure_condition.interval,
            c.backends[0].circuit_breaker.trip_duration,
            c.backends[0].circuit_breaker.failure_condition.status_code_ranges[0].max,
        ),
        (60.0, 30.0, 599),
    ),
    (
        "subscription scope and keys",
        f"products: [{{id: starter}}]\nsubscriptions:\n"
        f"  - {{id: a, scope: 'product:starter', primary-key: {KEY},\n"
        f"      secondary-key: '{hash_key(OTHER_KEY)}'}}\n",
        lambda c: (
            c.subscriptions[0].scope_kind,
            c.subscriptions[0].scope_id,
            c.subscriptions[0].key_digests,
        ),
        (
            "product",
            "starter",
            (hashlib.sha256(KEY.encode()).digest(), hashlib.sha256(OTHER_KEY.encode()).digest()),
        ),
    ),
]


def _full(text: str) -> str:
    """A case starting with a newline (like BASE) is a whole config; others extend BASE."""
    return text if text.startswith("\n") else BASE + text


@pytest.mark.parametrize(("text", "get", "expected"), [c[1:] for c in VALID],
                         ids=[c[0] for c in VALID])  # fmt: skip
def test_valid_config_loads_to_expected_values(text: str, get: Callable[[Config], Any],
                                               expected: Any) -> None:  # fmt: skip
    assert get(loads(_full(text), ENV)) == expected


def test_duration_and_size_types_survive_loading() -> None:
    config = load_text("gateway: {max-request-body: 512KiB}\n")
    assert type(config.gateway.max_request_body) is Size
    assert type(config.backends[0].timeout.read) is Duration
    assert repr(config.backends[0].timeout.read) == "Duration('5m')"
    assert str(config.gateway.max_request_body) == "512KiB"


# --- invalid configs: each error names the exact YAML path ---------------------------------

POOL = "  - id: pool\n    type: pool\n    services: [{id: openai}]\n"
INVALID: list[tuple[str, str, str]] = [
    (
        "wrong type",
        policy("llm-token-limit: {tokens-per-minute: lots}"),
        "policies[0].llm-token-limit.tokens-per-minute: expected int, got str",
    ),
    (
        "wrong type in list",
        "gateway: {trusted-proxies: 10.0.0.0/8}\n",
        "gateway.trusted-proxies: expected array, got str",
    ),
    ("unknown top-level key", "gatway: {}\n", "gatway: unknown field"),
    ("unknown key in section", "gateway: {stor: memory}\n", "gateway.stor: unknown field"),
    (
        "unknown key deep",
        BASE.replace("credentials: {", "credentials: {scheme: Bearer, "),
        "backends[0].credentials.scheme: unknown field",
    ),
    (
        "unknown key in policy",
        policy("llm-token-limit: {tokens-per-minut: 5}"),
        "policies[0].llm-token-limit.tokens-per-minut: unknown field",
    ),
    ("unknown policy", policy("llm-rate-limit: {}"), "policies[0].llm-rate-limit: unknown field"),
    (
        "snake_case key",
        "gateway: {max_request_body: 1MiB}\n",
        "gateway.max_request_body: unknown field",
    ),
    (
        "two policies in one entry",
        "policies:\n  - llm-token-limit: {tokens-per-minute: 5}\n"
        "    llm-semantic-cache-store: {duration: 1h}\n",
        "policies[0]: exactly one policy per entry",
    ),
    (
        "missing required field",
        BASE.replace("    backend: openai\n", ""),
        "apis[0].backend: required field is missing",
    ),
    ("missing section", "\nproducts: []\n", "backends: required field is missing"),
    (
        "bad enum",
        "telemetry: {access-log: xml}\n",
        "telemetry.access-log: invalid enum value 'xml' (expected one of: json, text, off)",
    ),
    (
        "bad duration",
        BASE.replace("credentials:", "timeout: {read: 5 minutes}\n    credentials:"),
        "backends[0].timeout.read: invalid duration '5 minutes'",
    ),
    (
        "zero duration",
        policy("llm-semantic-cache-store: {duration: 0s}"),
        "policies[0].llm-semantic-cache-store.duration: duration must be positive",
    ),
    (
        "bad size unit",
        "gateway: {max-request-body: 10Mb}\n",
        "gateway.max-request-body: invalid size '10Mb'",
    ),
    (
        "fractional byte size",
        "gateway: {max-request-body: 1.5}\n",
        "gateway.max-request-body: a size in bytes must be a whole number",
    ),
    (
        "unset env var",
        BASE.replace("${OPENAI_API_KEY}", "${MISSING_KEY}"),
        "backends[0].credentials.value: environment variable MISSING_KEY is not set",
    ),
    (
        "unclosed env reference",
        "telemetry: {service-name: '${SVC'}\n",
        "telemetry.service-name: bad reference '${SVC'",
    ),
    (
        "unknown backend ref",
        BASE.replace("backend: openai", "backend: opena"),
        "apis[0].backend: unknown backend 'opena' (did you mean 'openai'?)",
    ),
    (
        "unknown pool member",
        BASE.replace("apis:", POOL.replace("{id: openai}", "{id: azure}") + "apis:"),
        "backends[1].services[0].id: unknown backend 'azure'",
    ),
    (
        "pool of pools",
        BASE.replace(
            "apis:",
            POOL
            + POOL.replace("id: pool", "id: outer").replace("{id: openai}", "{id: pool}")
            + "apis:",
        ),
        "backends[2].services[0].id: 'pool' is a pool",
    ),
    (
        "pool with url",
        BASE.replace("apis:", POOL + "    url: http://x\n" + "apis:"),
        "backends[1].url: set it on the pool's member backends",
    ),
    (
        "pool without services",
        BASE.replace("apis:", "  - {id: pool, type: pool}\napis:"),
        "backends[1].services: a pool needs at least one service",
    ),
    (
        "single without url",
        BASE.replace("apis:", "  - {id: other}\napis:"),
        "backends[1].url: required for a single backend",
    ),
    (
        "unknown product ref",
        BASE + "    products: [gold]\n",
        "apis[0].products[0]: unknown product 'gold'",
    ),
    (
        "unknown scope target",
        f"subscriptions:\n  - {{id: a, scope: 'api:nope', primary-key: {KEY}}}\n",
        "subscriptions[0].scope: unknown api 'nope'",
    ),
    (
        "bad scope form",
        f"subscriptions:\n  - {{id: a, scope: everything, primary-key: {KEY}}}\n",
        "subscriptions[0].scope: 'everything' is not all-apis",
    ),
    (
        "unknown embeddings backend",
        "products:\n  - id: p\n    policies:\n      - "
        "llm-semantic-cache-lookup: {score-threshold: 0.1, embeddings-backend-id: emb}\n",
        "products[0].policies[0].llm-semantic-cache-lookup.embeddings-backend-id: "
        "unknown backend 'emb'",
    ),
    (
        "unknown content-safety backend",
        BASE + "    policies:\n      - llm-content-safety: {backend-id: cs}\n",
        "apis[0].policies[0].llm-content-safety.backend-id: unknown backend 'cs'",
    ),
    (
        "duplicate backend id",
        BASE.replace("apis:", "  - {id: openai, url: 'http://x'}\napis:"),
        "backends[1].id: duplicate id 'openai' (also backends[0])",
    ),
    (
        "duplicate api path",
        BASE + "  - {id: chat2, path: /openai/, backend: openai}\n",
        "apis[1].path: /openai is also apis[0].path",
    ),
    (
        "nested api paths",
        BASE + "  - {id: v2, path: /openai/v2, backend: openai}\n",
        "apis[1].path: /openai/v2 and apis[0].path /openai nest",
    ),
    (
        "reserved api path",
        BASE.replace("path: /openai", "path: /admin/llm"),
        "apis[0].path: /admin/llm is the gateway's own /admin endpoint",
    ),
    ("root api path", BASE.replace("path: /openai", "path: /"), "apis[0].path: '/' is not a path"),
    (
        "dot-dot api path",
        BASE.replace("path: /openai", "path: /a/../b"),
        "apis[0].path: '/a/../b' is not a path",
    ),
    ("bad id", BASE.replace("id: chat", "id: 'my api'"), "apis[0].id: 'my api' is not an id"),
    (
        "bad template placeholder",
        policy("llm-token-limit: {tokens-per-minute: 5, counter-key: '{user.id}'}"),
        "policies[0].llm-token-limit.counter-key: unknown placeholder {user.id}",
    ),
    (
        "unbalanced template",
        policy(
            "llm-semantic-cache-lookup: {score-threshold: 0.1, embeddings-backend-id: openai, "
            "vary-by: ['{api.id}', '{subscription.id']}"
        ),
        "policies[0].llm-semantic-cache-lookup.vary-by[1]: unbalanced brace",
    ),
    (
        "bad dimension template",
        policy("llm-emit-token-metric: {dimensions: [{name: X, value: '{request.header.}'}]}"),
        "policies[0].llm-emit-token-metric.dimensions[0].value: unknown placeholder",
    ),
    (
        "custom dimension without value",
        policy("llm-emit-token-metric: {dimensions: [{name: Team}]}"),
        "policies[0].llm-emit-token-metric.dimensions[0].value: required, 'Team' is not a default",
    ),
    (
        "too many dimensions",
        policy(
            "llm-emit-token-metric: {dimensions: ["
            + ", ".join(f"{{name: d{i}, value: x}}" for i in range(11))
            + "]}"
        ),
        "policies[0].llm-emit-token-metric.dimensions: 1 to 10 dimensions, got 11",
    ),
    (
        "one metric namespace, other dimensions",
        "policies:\n  - llm-emit-token-metric: {}\n"
        "  - llm-emit-token-metric: {dimensions: [{name: API ID}]}\n",
        "policies[1].llm-emit-token-metric.dimensions: namespace 'tollway' has other "
        "dimensions in policies[0] (give it another namespace)",
    ),
    (
        "token limit without limits",
        policy("llm-token-limit: {counter-key: x}"),
        "policies[0].llm-token-limit: give tokens-per-minute or token-quota",
    ),
    (
        "non-positive limit",
        policy("llm-token-limit: {tokens-per-minute: 0}"),
        "policies[0].llm-token-limit.tokens-per-minute: expected int >= 1",
    ),
    (
        "bad header name",
        policy("llm-token-limit: {tokens-per-minute: 5, tokens-consumed-header-name: 'x tokens'}"),
        "policies[0].llm-token-limit.tokens-consumed-header-name: 'x tokens' is not a valid HTTP",
    ),
    (
        "one header for two figures",
        policy(
            "llm-token-limit: {tokens-per-minute: 5, remaining-tokens-header-name: x-left,"
            " tokens-consumed-header-name: X-Left}"
        ),
        "policies[0].llm-token-limit.tokens-consumed-header-name: 'X-Left' is already the "
        "remaining-tokens-header-name",
    ),
    (
        "score threshold out of range",
        policy("llm-semantic-cache-lookup: {score-threshold: 0, embeddings-backend-id: openai}"),
        "policies[0].llm-semantic-cache-lookup.score-threshold: must be in (0, 2]",
    ),
    (
        "severity out of range",
        policy("llm-content-safety: {backend-id: openai, categories: {Violence: 8}}"),
        "policies[0].llm-content-safety.categories.Violence: expected int <= 7",
    ),
    (
        "categories without backend",
        policy("llm-content-safety: {categories: {Hate: 2}}"),
        "policies[0].llm-content-safety.categories: needs backend-id",
    ),
    (
        "local blocklist not defined",
        policy("llm-content-safety: {blocklists: [banned]}")
        + "blocklists:\n  baned: {terms: [x]}\n",
        "policies[0].llm-content-safety.blocklists[0]: 'banned' is not in the top-level "
        "blocklists and there is no backend-id to hold it (did you mean 'baned'?)",
    ),
    (
        "blocklist pattern invalid",
        "blocklists:\n  cards: {patterns: ['(unclosed']}\n",
        "blocklists.cards: invalid pattern '(unclosed'",
    ),
    (
        "blocklist empty",
        "blocklists:\n  empty: {}\n",
        "blocklists.empty: give terms, patterns or both",
    ),
    (
        "content safety with nothing to screen",
        policy("llm-content-safety: {}"),
        "policies[0].llm-content-safety: give backend-id, blocklists or both",
    ),
    (
        "window overlap not below size",
        policy(
            "llm-content-safety: {backend-id: openai, window-size: 1000, window-overlap-size: 1000}"
        ),
        "policies[0].llm-content-safety.window-overlap-size: must be less than window-size",
    ),
    (
        "window over the service limit",
        policy("llm-content-safety: {backend-id: openai, window-size: 20000}"),
        "policies[0].llm-content-safety.window-size: expected int <= 10000",
    ),
    (
        "on-error unknown",
        policy("llm-content-safety: {backend-id: openai, on-error: ignore}"),
        "policies[0].llm-content-safety.on-error: invalid enum value 'ignore'",
    ),
    (
        "lowercase category key",
        policy("llm-content-safety: {backend-id: openai, categories: {hate: 2}}"),
        "policies[0].llm-content-safety.categories.hate: unknown field",
    ),
    (
        "bad CIDR",
        "gateway: {trusted-proxies: [10.0.0.0/8, 10.0.0.300/8]}\n",
        "gateway.trusted-proxies[1]: '10.0.0.300/8' is not an IP network",
    ),
    (
        "bad store scheme",
        "gateway: {store: 'http://cache:6379'}\n",
        "gateway.store: 'http://cache:6379' is not memory or a redis://",
    ),
    ("store without host", "gateway: {store: 'redis://'}\n", "gateway.store: 'redis://' is not"),
    (
        "bad backend scheme",
        BASE.replace("https://api.openai.com/v1", "ftp://files/v1"),
        "backends[0].url: 'ftp://files/v1' is not an http(s) URL",
    ),
    (
        "credentials in backend url",
        BASE.replace("https://", "https://user:pw@"),
        "backends[0].url: no user, password, query or fragment",
    ),
    (
        "bad otlp endpoint",
        "telemetry: {otlp-endpoint: 'collector:4318'}\n",
        "telemetry.otlp-endpoint: 'collector:4318' is not an http(s) URL",
    ),
    (
        "CR/LF in credentials value",
        BASE.replace("Bearer ${OPENAI_API_KEY}", "Bearer x\\r\\nX-Evil: 1"),
        "backends[0].credentials.value: must not contain CR, LF or NUL",
    ),
    (
        "bad credentials header",
        BASE.replace("header: Authorization", "header: 'Auth: x'"),
        "backends[0].credentials.header: 'Auth: x' is not a valid HTTP header name",
    ),
    (
        "short literal key",
        "subscriptions:\n  - {id: a, primary-key: short}\n",
        "subscriptions[0].primary-key: a literal key must be at least 16 characters",
    ),
    (
        "malformed sha256 key",
        "subscriptions:\n  - {id: a, primary-key: 'sha256:ABC'}\n",
        "subscriptions[0].primary-key: a hashed key must be sha256: and 64 lowercase hex digits",
    ),
    (
        "subscription without keys",
        "subscriptions:\n  - {id: a}\n",
        "subscriptions[0]: give primary-key or secondary-key",
    ),
    (
        "key collision literal vs hashed",
        f"subscriptions:\n  - {{id: a, primary-key: {KEY}}}\n"
        f"  - {{id: b, primary-key: {OTHER_KEY}, secondary-key: '{hash_key(KEY)}'}}\n",
        "subscriptions[1].secondary-key: same key as subscriptions[0].primary-key",
    ),
    (
        "key collision within one subscription",
        f"subscriptions:\n  - {{id: a, primary-key: {KEY}, secondary-key: {KEY}}}\n",
        "subscriptions[0].secondary-key: same key as subscriptions[0].primary-key",
    ),
    (
        "admin key reused as subscription key",
        f"gateway: {{admin-key: {KEY}}}\nsubscriptions:\n  - {{id: a, primary-key: {KEY}}}\n",
        "subscriptions[0].primary-key: same key as gateway.admin-key",
    ),
    (
        "bad tokenizer",
        "tokenizers: {'gpt*': 'sentencepiece:/x'}\n",
        "tokenizers['gpt*']: 'sentencepiece:/x' is not tiktoken:<encoding> or hf:<path>",
    ),
    (
        "tiktoken encoding not shipped offline",
        "tokenizers: {'davinci*': 'tiktoken:p50k_base'}\n",
        "tokenizers['davinci*']: 'p50k_base' is not shipped offline (cl100k_base, o200k_base)",
    ),
    ("yaml syntax error", "gateway: {store: memory\n", "line 11, column 1: expected ',' or '}'"),
    (
        "duplicate yaml key",
        "gateway: {}\ngateway: {}\n",
        "line 11, column 1: duplicate key 'gateway'",
    ),
    ("not a mapping", "\n- a\n- b\n", "(top level): expected a mapping of sections, got list"),
    ("empty document", "\n# nothing\n", "(top level): expected a mapping of sections"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])  # fmt: skip
def test_invalid_config_error_names_the_path(text: str, expected: str) -> None:
    errors = errors_of(_full(text))
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_are_reported_together() -> None:
    text = BASE.replace("${OPENAI_API_KEY}", "${A1}") + "telemetry: {service-name: '${A2}'}\n"
    assert errors_of(text) == [
        "backends[0].credentials.value: environment variable A1 is not set "
        "(or empty; write ${A1:-} to allow that)",
        "telemetry.service-name: environment variable A2 is not set "
        "(or empty; write ${A2:-} to allow that)",
    ]
    cross = BASE.replace("backend: openai", "backend: x") + "    products: [y]\n"
    assert [e.split(":")[0] for e in errors_of(cross)] == ["apis[0].backend", "apis[0].products[0]"]


def test_config_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["a: one", "b: two"])))
    assert error.errors == ["a: one", "b: two"]
    assert str(error) == "a: one\nb: two"


def test_empty_env_var_counts_as_unset_but_default_applies() -> None:
    errors = errors_of(BASE, {"OPENAI_API_KEY": ""})
    assert errors[0].startswith("backends[0].credentials.value: environment variable OPENAI_API")
    text = BASE.replace("${OPENAI_API_KEY}", "${OPENAI_API_KEY:-none}")
    assert loads(text, {"OPENAI_API_KEY": ""}).backends[0].credentials == Credentials(
        header="Authorization", value="Bearer none"
    )


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-environ")
    assert loads(BASE).backends[0].credentials == Credentials(
        header="Authorization", value="Bearer sk-from-environ"
    )


# --- the shipped config files --------------------------------------------------------------


def test_shipped_tollway_yaml_loads_with_the_api_key() -> None:
    config = load(ROOT / "config" / "tollway.yaml", {"OPENAI_API_KEY": "sk-shipped"})
    openai = config.backend("openai")
    assert openai.url == "https://api.openai.com/v1"
    assert openai.credentials == Credentials(header="Authorization", value="Bearer sk-shipped")
    assert {(api.path, api.type) for api in config.apis} == {
        ("/openai", "openai"), ("/passthrough", "passthrough")
    }  # fmt: skip
    starter = config.product("starter")
    assert isinstance(starter.policies[0].policy, TokenLimit)
    for sub in config.subscriptions:  # no literal secrets in the shipped file
        assert all(k == "" or k.startswith("sha256:") for k in (sub.primary_key, sub.secondary_key))
    assert config.gateway.admin_key == ""


def test_shipped_tollway_yaml_names_the_missing_api_key() -> None:
    with pytest.raises(ConfigError) as info:
        load(ROOT / "config" / "tollway.yaml", {})
    assert info.value.errors == [
        "backends[0].credentials.value: environment variable OPENAI_API_KEY is not set "
        "(or empty; write ${OPENAI_API_KEY:-} to allow that)"
    ]


def test_shipped_demo_yaml_loads_without_any_environment() -> None:
    config = load(ROOT / "config" / "demo.yaml", {})
    assert config.gateway.store == "memory"
    assert config.backend("mock").url == "http://127.0.0.1:9000/v1"
    assert {(api.path, api.type, api.backend) for api in config.apis} == {
        ("/openai", "openai", "mock"), ("/passthrough", "passthrough", "mock")
    }  # fmt: skip
    (demo,) = config.subscriptions
    assert demo.primary_key == "tollway-demo-key-0123456789"
    assert demo.scope_kind == "product"
    assert isinstance(config.product(demo.scope_id).policies[0].policy, TokenLimit)


def test_demo_yaml_takes_mock_url_and_key_from_the_environment() -> None:
    env = {"TOLLWAY_DEMO_MOCK_URL": "http://127.0.0.1:9123/v1/", "TOLLWAY_DEMO_KEY": KEY}
    config = load(ROOT / "config" / "demo.yaml", env)
    assert config.backends[0].url == "http://127.0.0.1:9123/v1"
    assert config.subscriptions[0].primary_key == KEY


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml")
    assert info.value.errors == [f"{tmp_path / 'nope.yaml'}: no such config file"]


# --- the Structs themselves ----------------------------------------------------------------


def direct_config(**overrides: Any) -> Config:
    fields: dict[str, Any] = {
        "backends": (Backend(id="b", url="http://mock:9000/v1/"),),
        "apis": (Api(id="a", path="/a", backend="b"),),
    }
    return Config(**{**fields, **overrides})


def test_config_is_frozen() -> None:
    config = load_text()
    with pytest.raises(AttributeError):
        config.apis = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.gateway.store = "redis://x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.backends[0].url = "http://elsewhere"  # type: ignore[misc]


def test_config_built_directly_is_checked_and_normalised() -> None:
    config = direct_config()
    assert config.backend("b").url == "http://mock:9000/v1"
    assert config.api("a").path == "/a"
    with pytest.raises(KeyError):
        config.product("missing")
    with pytest.raises(ConfigError, match=r"apis\[0\].backend: unknown backend 'nope'"):
        direct_config(apis=(Api(id="a", path="/a", backend="nope"),))
    with pytest.raises(ValueError, match="url: required for a single backend"):
        Backend(id="b")


def test_policy_entry_exposes_its_one_policy() -> None:
    config = load_text(policy("llm-semantic-cache-lookup: {score-threshold: 0.1, "
                              "embeddings-backend-id: openai}"))  # fmt: skip
    (entry,) = config.policies
    assert entry.name == "llm-semantic-cache-lookup"
    assert entry.policy == CacheLookup(score_threshold=0.1, embeddings_backend_id="openai")


def test_config_round_trips_through_to_builtins() -> None:
    config = load(ROOT / "config" / "tollway.yaml", {"OPENAI_API_KEY": "sk-x"})
    data = to_builtins(config)
    assert data["backends"][0]["timeout"] == {"connect": "5s", "read": "5m"}  # type: ignore[index]
    assert data["gateway"]["max-request-body"] == "10MiB"  # type: ignore[index]
    assert loads(yaml.safe_dump(data), {}) == config


# --- templates, keys, units ----------------------------------------------------------------


@pytest.mark.parametrize(("template", "parts"), [
    ("{subscription.id}", (TemplateVar("subscription.id"),)),
    ("constant", ("constant",)),
    ("team-{product.id}/{request.model}", ("team-", TemplateVar("product.id"), "/",
                                           TemplateVar("request.model"))),
    ("{request.header.X-User-Id}", (TemplateVar("request.header", "x-user-id"),)),
    ("", ()),
])  # fmt: skip
def test_parse_template(template: str, parts: tuple[str | TemplateVar, ...]) -> None:
    assert parse_template(template) == parts


@pytest.mark.parametrize("template", ["{nope}", "{request.header.}", "{a", "b}", "{{api.id}}",
                                      "{request.header.X User}"])  # fmt: skip
def test_parse_template_rejects(template: str) -> None:
    with pytest.raises(ValueError):
        parse_template(template)


def test_key_digest_and_hash_key_agree() -> None:
    digest = hashlib.sha256(KEY.encode()).digest()
    assert key_digest(KEY) == digest
    assert hash_key(KEY) == "sha256:" + digest.hex()
    assert key_digest(hash_key(KEY)) == digest
    assert hash_key(hash_key(KEY)) == hash_key(KEY)
    key = new_key()
    assert len(key) >= 40 and key != new_key()


@pytest.mark.parametrize(("text", "seconds", "canonical"), [
    ("500ms", 0.5, "500ms"), ("30s", 30.0, "30s"), ("5m", 300.0, "5m"), ("1h", 3600.0, "1h"),
    ("90s", 90.0, "90s"), ("1.5s", 1.5, "1500ms"), (45, 45.0, "45s"), ("2d", 172800.0, "2d"),
])  # fmt: skip
def test_duration(text: str | int, seconds: float, canonical: str) -> None:
    assert Duration(text) == seconds
    assert str(Duration(text)) == canonical


@pytest.mark.parametrize(("text", "size"), [
    ("10MiB", 10 * 2**20), ("512KiB", 512 * 1024), ("1GiB", 2**30), ("100kB", 100_000),
    ("1MB", 10**6), (4096, 4096), ("1.5KiB", 1536), ("7B", 7),
])  # fmt: skip
def test_size(text: str | int, size: int) -> None:
    assert Size(text) == size


@pytest.mark.parametrize("value", ["", "ms", "-5s", "5 fortnights", True, None, float("inf")])
def test_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        Duration(value)


@pytest.mark.parametrize("value", ["", "10 MiBs", "0", -1, 1.5, True, "1TiB"])
def test_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        Size(value)
