"""The OTel resource that names this process in exported telemetry: `service.name` from the
config (`telemetry.service-name`) unless `OTEL_SERVICE_NAME` says otherwise, plus
`OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`, values percent-decoded), and per process
`service.instance.id` (each gateway worker exports its own cumulative series, which the OTel
data model requires to be told apart), `service.version` and `host.name`. Read once at start.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from importlib import metadata
from urllib.parse import unquote


def version() -> str:
    try:
        return metadata.version("tollway")
    except metadata.PackageNotFoundError:
        return "0"


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """`k=v,k2=v2` (W3C Baggage-like, as OTEL_RESOURCE_ATTRIBUTES and the OTLP headers
    variables use it): keys and values trimmed and percent-decoded; malformed members are
    skipped."""
    pairs = []
    for member in text.split(","):
        key, sep, value = member.partition("=")
        key, value = unquote(key.strip()), unquote(value.strip())
        if sep and key:
            pairs.append((key, value))
    return pairs


def resource_attributes(
    service_name: str, environ: Mapping[str, str] = os.environ
) -> tuple[tuple[str, object], ...]:
    attributes: dict[str, object] = {
        "service.name": service_name,
        "service.version": version(),
        "service.instance.id": str(uuid.uuid4()),
        "host.name": socket.gethostname(),
        "telemetry.sdk.name": "tollway",
        "telemetry.sdk.language": "python",
    }
    attributes.update(parse_pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    if name := environ.get("OTEL_SERVICE_NAME", "").strip():
        attributes["service.name"] = name
    return tuple(attributes.items())
