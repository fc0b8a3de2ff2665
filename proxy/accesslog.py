"""The access log: one line per request, JSON or text, never a secret.

Logged: ids (request, subscription, trace), method, path without the query string (it may
carry a subscription key), status, timings (duration, gateway overhead, time to the first
streamed chunk), API, operation, model and usage. Never logged: keys, headers, bodies.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Literal

import msgspec

from proxy.exchange import Exchange

_encoder = msgspec.json.Encoder()


class AccessLog:
    """Writes one line per finished request to `stream` (stdout by default)."""

    def __init__(self, mode: Literal["json", "text", "off"], stream: IO[bytes] | None = None):
        self.stream = stream or sys.stdout.buffer
        self.write = {"json": self._json, "text": self._text, "off": self._off}[mode]

    def _json(self, ex: Exchange) -> None:
        usage = ex.usage
        record = {
            "ts": round(time.time(), 3),
            "request_id": ex.request_id,
            "method": ex.method,
            "path": ex.path,
            "status": ex.status,
            "duration_ms": round((time.perf_counter() - ex.t0) * 1000, 3),
            "overhead_ms": round(ex.overhead_ms(), 3),
            "client_ip": ex.client_ip,
            "api": ex.api_id or None,
            "operation": ex.operation or None,
            "subscription": ex.subscription_id or None,
            "product": ex.product_id or None,
            "backend": ex.backend_id or None,
            "model": ex.model or None,
            "stream": ex.stream,
            "cache": ex.cache or None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "ttft_ms": round((ex.t_first - ex.t0) * 1000, 3) if ex.t_first else None,
            "error": ex.error_code or None,
            "trace_id": f"{ex.trace[0]:032x}" if ex.trace else None,
        }
        self._emit(_encoder.encode(record))

    def _text(self, ex: Exchange) -> None:
        duration = (time.perf_counter() - ex.t0) * 1000
        usage = ex.usage
        tokens = f"{usage.prompt_tokens}/{usage.completion_tokens}" if usage else "-"
        ttft = f"{(ex.t_first - ex.t0) * 1000:.2f}ms" if ex.t_first else "-"
        line = (
            f'{ex.client_ip} "{ex.method} {_printable(ex.path)}" {ex.status} {duration:.2f}ms '
            f"overhead={ex.overhead_ms():.3f}ms ttft={ttft} tokens={tokens} "
            f"sub={ex.subscription_id or '-'} api={ex.api_id or '-'} "
            f"op={ex.operation or '-'} model={_printable(ex.model) or '-'} cache={ex.cache or '-'} "
            f"error={ex.error_code or '-'} id={ex.request_id}"
        )
        self._emit(line.encode("utf-8", "replace"))

    def _off(self, ex: Exchange) -> None:
        pass

    def _emit(self, line: bytes) -> None:
        try:
            self.stream.write(line + b"\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full log pipe must never fail a request


def _printable(text: str) -> str:
    """`text` with every character that is not printable (CR, LF, U+2028, ...) escaped, so
    what a client sent cannot start a line of its own in the text log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
