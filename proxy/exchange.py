"""The per-request record: what one request did, read by the error guard and the access log."""

from __future__ import annotations

import time

from proxy.schemas import Usage
from proxy.types import Headers, Send


class Exchange:
    """Everything the gateway learns about one request while serving it."""

    __slots__ = (
        "api_id",
        "backend_id",
        "backend_seconds",
        "client_ip",
        "disconnected",
        "error_code",
        "method",
        "model",
        "operation",
        "path",
        "product_id",
        "request_id",
        "started",
        "status",
        "stream",
        "subscription_id",
        "t0",
        "usage",
    )

    def __init__(self, method: str, path: str, request_id: str, client_ip: str):
        self.t0 = time.perf_counter()
        self.method = method
        self.path = path
        self.request_id = request_id
        self.client_ip = client_ip
        self.api_id = self.operation = self.subscription_id = self.product_id = ""
        self.backend_id = self.model = self.error_code = ""
        self.stream = False
        self.disconnected = False  # did the client leave before the response ended?
        self.started = False  # has the response start been sent?
        self.status = 0
        self.backend_seconds = 0.0  # time spent waiting on the backend
        self.usage: Usage | None = None

    def add_backend_time(self, seconds: float) -> None:
        self.backend_seconds += seconds

    def overhead_ms(self) -> float:
        """Gateway time so far, excluding time spent waiting on the backend."""
        return (time.perf_counter() - self.t0 - self.backend_seconds) * 1000.0

    def stamp(self, headers: Headers) -> Headers:
        """Add the gateway's own response headers (request id, overhead)."""
        headers.append((b"x-request-id", self.request_id.encode("latin-1")))
        headers.append((b"x-tollway-overhead-ms", b"%.3f" % self.overhead_ms()))
        return headers

    async def start(self, send: Send, status: int, headers: Headers) -> None:
        """Send the response start, stamped; marks the response as started."""
        self.status = status
        self.started = True
        await send(
            {"type": "http.response.start", "status": status, "headers": self.stamp(headers)}
        )
