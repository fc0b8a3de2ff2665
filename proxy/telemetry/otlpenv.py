"""OTLP export settings from the config and the OpenTelemetry environment variables.

Configuration (`settings`) follows the OTLP exporter spec's environment variables,
https://opentelemetry.io/docs/specs/otel/protocol/exporter/ ; for each signal the first of
these that is set gives the URL:

    OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT   used as-is ("/" when it has no path)
    OTEL_EXPORTER_OTLP_ENDPOINT            base URL + v1/traces or v1/metrics
    telemetry.otlp-endpoint (config)       base URL + v1/traces or v1/metrics

The config is the default and the environment overrides it, so an operator can redirect
export without editing the config. Headers, timeout, compression, protocol and certificates
are per signal as well: the signal-specific variable replaces the general one (as the Python
and Java SDKs do; headers are not merged), because the two signals may go to different
collectors and a credential for one must not be sent to the other. An empty variable counts
as unset. Invalid values raise `ValueError` naming the variable, so the gateway fails at
startup rather than exporting nowhere.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import SplitResult, unquote, urlsplit

_PROTOCOL = "http/protobuf"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters in a header value
_FRAMING = frozenset({"content-length", "transfer-encoding", "content-encoding", "connection"})


class Target(NamedTuple):
    """Where one signal goes and how; `url == ""` means the signal is not exported."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0  # seconds for one export, retries included
    compression: str = "gzip"  # "gzip" or "none"
    certificate: str = ""  # CA bundle file for https ("" = the system's)
    client_certificate: str = ""  # PEM file, for mutual TLS
    client_key: str = ""


OFF = Target("")


class ExportSettings(NamedTuple):
    """Everything the exporter needs, resolved once from the config and the environment."""

    traces: Target
    metrics: Target
    schedule_delay: float = 5.0  # seconds between span flushes (OTEL_BSP_SCHEDULE_DELAY)
    max_queue: int = 2048  # span records held (OTEL_BSP_MAX_QUEUE_SIZE)
    max_batch: int = 512  # span records per POST (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
    metric_interval: float = 60.0  # seconds between metric exports (OTEL_METRIC_EXPORT_INTERVAL)


def settings(endpoint: str, environ: Mapping[str, str] = os.environ) -> ExportSettings | None:
    """The export settings for the config's `telemetry.otlp-endpoint` and the OTel variables
    in `environ` (see the module docstring for precedence), or None when there is nothing to
    export: OTEL_SDK_DISABLED=true, or no signal has both an endpoint and an exporter other
    than `none` (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER). Raises ValueError for a value
    that cannot be used, such as OTEL_EXPORTER_OTLP_PROTOCOL=grpc."""
    env = {name: value.strip() for name, value in environ.items() if value.strip()}
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    traces = _target("TRACES", endpoint, env)
    metrics = _target("METRICS", endpoint, env)
    if not traces.url and not metrics.url:
        return None
    max_queue = _count(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    max_batch = _count(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    if max_batch > max_queue:
        raise ValueError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({max_batch}) is larger than "
            f"OTEL_BSP_MAX_QUEUE_SIZE ({max_queue})"
        )
    delay, interval = "OTEL_BSP_SCHEDULE_DELAY", "OTEL_METRIC_EXPORT_INTERVAL"
    return ExportSettings(
        traces=traces,
        metrics=metrics,
        schedule_delay=_millis(delay, env.get(delay, ""), 5000),
        max_queue=max_queue,
        max_batch=max_batch,
        metric_interval=_millis(interval, env.get(interval, ""), 60000),
    )


def _target(signal: str, endpoint: str, env: Mapping[str, str]) -> Target:
    """One signal's Target, or OFF when it has no endpoint or its exporter excludes otlp."""
    exporters = env.get(f"OTEL_{signal}_EXPORTER", "otlp").lower()
    if "otlp" not in {name.strip() for name in exporters.split(",")}:
        return OFF  # "none", or only exporters this gateway does not have
    url = _url(signal, endpoint, env)
    if not url:
        return OFF

    def option(name: str) -> tuple[str, str]:  # (variable, value); the signal's wins
        for var in (f"OTEL_EXPORTER_OTLP_{signal}_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
            if var in env:
                return var, env[var]
        return "", ""

    var, protocol = option("PROTOCOL")
    if protocol and protocol != _PROTOCOL:
        raise ValueError(f"{var}: {protocol!r} is not supported (only {_PROTOCOL!r} is)")
    var, compression = option("COMPRESSION")
    if compression.lower() not in ("", "gzip", "none"):
        raise ValueError(f"{var}: {compression!r} is not gzip or none")
    var, timeout = option("TIMEOUT")
    return Target(
        url=url,
        headers=_headers(*option("HEADERS")),
        timeout=_millis(var, timeout, 10000),
        compression=compression.lower() or "gzip",
        certificate=option("CERTIFICATE")[1],
        client_certificate=option("CLIENT_CERTIFICATE")[1],
        client_key=option("CLIENT_KEY")[1],
    )


def _url(signal: str, endpoint: str, env: Mapping[str, str]) -> str:
    """The signal's URL: its own variable as-is, else a base URL + v1/<signal>, else ""."""
    var = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
    if var in env:
        parts = _http_url(var, env[var])
        return env[var] if parts.path else parts._replace(path="/").geturl()
    var, base = "OTEL_EXPORTER_OTLP_ENDPOINT", env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not base:
        var, base = "telemetry.otlp-endpoint", endpoint.strip()
    if not base:
        return ""
    _http_url(var, base)
    return f"{base.rstrip('/')}/v1/{signal.lower()}"


def _http_url(var: str, url: str) -> SplitResult:
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number from 1 to 65535
        valid = False
    if not valid:
        raise ValueError(f"{var}: {url!r} is not an http(s) URL with a host")
    return parts


def _headers(var: str, text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` (W3C Baggage without properties), keys lowercased, both percent-decoded."""
    headers = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        key, value = unquote(key).strip().lower(), unquote(value).strip()
        if not sep or not _TOKEN.fullmatch(key) or _FORBIDDEN.search(value):
            raise ValueError(f"{var}: {entry.strip()!r} is not a valid name=value header")
        if key in _FRAMING:
            raise ValueError(f"{var}: {key} is set by the exporter")
        headers.append((key, value))
    return tuple(headers)


def _millis(var: str, text: str, default: float) -> float:
    """A positive duration given in milliseconds (`text`, else `default`), as seconds."""
    try:
        value = float(text) if text else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{var}: {text!r} is not a positive number of milliseconds")
    return value / 1000


def _count(env: Mapping[str, str], var: str, default: int) -> int:
    text = env.get(var, "")
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{var}: {text!r} is not a positive integer")
    return int(text)
