"""The probe of `tollway import` (SPEC §2): ``GET {url}/models`` with the backend's access key,
as the gateway will send it, before the backend goes into the config.

Blocking (urllib), for the command line only. A failure is a ``ProbeError`` whose one-line
message says what went wrong in terms of the import command's flags.
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any

import msgspec

__all__ = ["PROBE_TIMEOUT", "ProbeError", "probe_models"]

PROBE_TIMEOUT = 5.0  # seconds per connect and per read: an LLM's model list is quick
_MAX_MODELS_BODY = 16 * 1024 * 1024
_NO_PROBE = "; check --url, or skip the probe with --no-probe"


class ProbeError(Exception):
    """The backend cannot be reached, refuses the key, or does not answer a model list."""


class _ModelItem(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelItem]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the access key to wherever it points: refuse it instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def probe_models(
    url: str, header: str = "", value: str = "", timeout: float = PROBE_TIMEOUT
) -> list[str]:
    """The model ids ``GET {url}/models`` lists; ``ProbeError`` with the reason when the
    backend cannot be reached, refuses the key, or answers anything but a model list."""
    target = url.rstrip("/") + "/models"
    headers = {"Accept": "application/json", "User-Agent": "tollway-import"}
    request = urllib.request.Request(target, headers=headers)
    if header:
        request.add_header(header, value)
    # No proxies from the environment: probe what the gateway itself will reach.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(_MAX_MODELS_BODY + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ProbeError(_status_problem(target, exc.code, exc.reason, header)) from None
    except (OSError, HTTPException) as exc:  # unreachable, a timeout, a reset, a bad reply
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        problem = _network_problem(reason, timeout)
        raise ProbeError(f"cannot reach the backend: GET {target}: {problem}{_NO_PROBE}") from None
    try:
        if len(body) > _MAX_MODELS_BODY:
            raise msgspec.DecodeError("larger than 16 MiB")
        models = msgspec.json.decode(body, type=_ModelList)
    except msgspec.DecodeError as exc:
        raise ProbeError(
            f"GET {target} did not answer an OpenAI model list ({exc}); is --url the API's "
            "base URL (often ending in /v1)? A non-OpenAI API: --type passthrough"
        ) from None
    return [model.id for model in models.data]


def _status_problem(target: str, status: int, reason: str, header: str) -> str:
    if status in (401, 403):
        sent = f"the {header} header" if header else "no access key (give --access-key-env)"
        return (
            f"the backend refused the access key: GET {target} answered {status} {reason} "
            f"with {sent}"
        )
    hint = ""
    if 300 <= status < 400:
        hint = " (redirects are not followed: give the URL it redirects to)"
    elif status == 404:
        hint = " (is --url the API's base URL, often ending in /v1?)"
    return f"GET {target} answered {status} {reason}{hint}{_NO_PROBE}"


def _network_problem(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host ({reason.strerror})"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason})"
    return str(reason)
